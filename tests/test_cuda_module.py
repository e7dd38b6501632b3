"""gradfuse._C_cuda on a machine without a GPU (CI): it imports, counts no device, and reduce/scale
check the clip descriptor before any CUDA call, naming the bad field, so a bad descriptor is
reported as such even here; a valid one then fails with "no CUDA device". (With a GPU these paths
run for real in test_gpu.py.)"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import math

import pytest
import torch

import gradfuse
from gradfuse import _abi, _backends, _plan

if importlib.util.find_spec("gradfuse._C_cuda") is None:
    pytest.skip("gradfuse._C_cuda is not built (no nvcc at install time)", allow_module_level=True)
if torch.cuda.is_available():
    pytest.skip("a CUDA device is present: test_gpu.py runs the module", allow_module_level=True)

cuda = importlib.import_module("gradfuse._C_cuda")
NO_DEVICE = r"no CUDA device"


def _descriptor(chunks: bool = True):
    """A descriptor as the engine fills it for a reduce: a CUDA-sized plan of real (host) gradients
    and live output buffers, kept alive in the returned list. The CUDA module never reads these
    addresses without a device; the CPU module can run it. ``chunks=False``: one empty gradient
    (no chunks, the tables still given)."""
    grads = [torch.randn(100), torch.randn(3 * (1 << 16) + 5, dtype=torch.bfloat16)] if chunks else [torch.zeros(0)]
    plan = _plan.build_plan(grads, _backends.CudaBackend.chunk_size)
    desc = _abi.ClipDesc.from_buffer_copy(plan.desc)
    t = len(grads)
    keep = [grads, plan, torch.empty(4), torch.empty(t), torch.empty(t, dtype=torch.float64), torch.empty(t),
            torch.empty(2 * t, dtype=torch.int64), torch.ones(t), torch.ones(1)]  # fmt: skip
    names = ("result", "tensor_norms", "tensor_partials", "tensor_max_abs", "tensor_counts", "tensor_scales", "scale_ptr")
    for name, buf in zip(names, keep[2:]):
        setattr(desc, name, buf.data_ptr())
    desc.norm_kind, desc.p, desc.max_norm, desc.policy, desc.flags = _abi.NORM_L2, 2.0, 1.0, _abi.POLICY_PROPAGATE, 0
    return desc, keep


def _with(desc, **fields):
    """A copy of desc with fields changed (hold on to it while its address is in use)."""
    bad = _abi.ClipDesc.from_buffer_copy(desc)
    for name, value in fields.items():
        setattr(bad, name, value)
    return bad


def test_imports_without_a_device_and_says_why():
    assert cuda.device_count() == 0
    why = cuda.device_error(0)
    assert why.startswith(NO_DEVICE), why
    assert cuda.device_error(3).startswith(NO_DEVICE)
    assert cuda.descriptor_size() == ctypes.sizeof(_abi.ClipDesc)
    reason = _backends.FUSED_BACKENDS["cuda"].unavailable_reason(torch.device("cuda"))
    assert reason == f"gradfuse._C_cuda: {why}"
    assert "cuda" not in gradfuse.available_backends("cuda")


@pytest.mark.parametrize(
    "case, fields",
    [
        ("as built", {}),
        *[(f"norm kind {k}", {"norm_kind": k}) for k in (_abi.NORM_L1, _abi.NORM_INF, _abi.NORM_NEG_INF, _abi.NORM_L0)],
        ("NORM_P", {"norm_kind": _abi.NORM_P, "p": 3.5}),
        ("NORM_P with p < 0", {"norm_kind": _abi.NORM_P, "p": -1.0}),
        ("device scalars", {"max_norm_ptr": 8, "inv_scale_ptr": 8}),
        ("per-tensor factors", {"flags": _abi.FLAG_WRITE_TENSOR_SCALES}),
        ("policy zero", {"policy": _abi.POLICY_ZERO}),
        ("largest chunk", {"chunk_size": 1 << 30}),
        ("tensor_scales unused without the flag", {"tensor_scales": 0}),
    ],
)
def test_a_valid_reduce_descriptor_gets_to_the_device_check(case, fields):
    desc, _keep = _descriptor()
    valid = _with(desc, **fields)  # kept alive: the module reads it by address
    with pytest.raises(RuntimeError, match=r"^gradfuse\._C_cuda\.reduce: " + NO_DEVICE):
        cuda.reduce(valid.address(), 0, 0)


def test_no_chunks_needs_no_chunk_tables_or_workspace():
    desc, _keep = _descriptor(chunks=False)
    assert desc.num_chunks == 0 and desc.num_tensors == 1
    empty = _with(desc, chunk_tensor=0, chunk_start=0, chunk_partials=0, chunk_max_abs=0, chunk_counts=0)
    with pytest.raises(RuntimeError, match=r"^gradfuse\._C_cuda\.reduce: " + NO_DEVICE):
        cuda.reduce(empty.address(), 0, 0)
    nothing = _with(empty, num_tensors=0, addrs=0, numels=0, dtypes=0, tensor_norms=0, tensor_partials=0, tensor_max_abs=0, tensor_counts=0)
    with pytest.raises(RuntimeError, match=r"^gradfuse\._C_cuda\.reduce: " + NO_DEVICE):
        cuda.reduce(nothing.address(), 0, 0)
    # the scale launches nothing for no chunks, but still says the device cannot run
    with pytest.raises(RuntimeError, match=r"^gradfuse\._C_cuda\.scale: " + NO_DEVICE):
        cuda.scale(nothing.address(), 0, 0)


REQUIRED_FOR_REDUCE = ["result", "tensor_chunk_begin", "ticket", "addrs", "numels", "dtypes", "chunk_tensor", "chunk_start",
                       "tensor_norms", "tensor_partials", "tensor_max_abs", "tensor_counts", "chunk_partials", "chunk_max_abs",
                       "chunk_counts"]  # fmt: skip

BAD_REDUCE = [
    ({"norm_kind": 9}, "norm_kind 9 is not one of NORM_L2 (0) .. NORM_L0 (5)"),
    ({"norm_kind": -1}, "norm_kind -1 is not one of"),
    ({"norm_kind": _abi.NORM_P, "p": math.nan}, "NORM_P needs a finite non-zero p, got nan"),
    ({"norm_kind": _abi.NORM_P, "p": 0.0}, "NORM_P needs a finite non-zero p, got 0"),
    ({"norm_kind": _abi.NORM_P, "p": math.inf}, "NORM_P needs a finite non-zero p, got inf"),
    ({"policy": 5}, "policy 5 is not one of POLICY_PROPAGATE (0), SKIP (1), ZERO (2)"),
    ({"flags": 4}, "flags 4 has bits outside FLAG_WRITE_TENSOR_SCALES | FLAG_READ_TENSOR_SCALES"),
    ({"flags": -1}, "flags -1 has bits outside"),
    ({"chunk_size": 0}, "chunk_size must be in [1, 2^30], got 0"),
    ({"chunk_size": (1 << 30) + 1}, "chunk_size must be in [1, 2^30], got 1073741825"),
    ({"num_chunks": -1}, "num_chunks must be >= 0, got -1"),
    ({"num_tensors": -2}, "num_tensors must be >= 0, got -2"),
    ({"num_tensors": 0}, "num_chunks is 5 but num_tensors is 0"),
    ({"flags": _abi.FLAG_WRITE_TENSOR_SCALES, "tensor_scales": 0}, "tensor_scales is 0"),
    *[({name: 0}, f"{name} is 0") for name in REQUIRED_FOR_REDUCE],
]


@pytest.mark.parametrize("fields, message", BAD_REDUCE, ids=lambda v: v if isinstance(v, str) else None)
def test_reduce_names_the_bad_field_before_any_cuda_call(fields, message):
    """The check comes first: without a device, a CUDA call would have said "no CUDA device"."""
    desc, _keep = _descriptor()
    assert desc.num_chunks == 5
    bad = _with(desc, **fields)  # kept alive: the module reads it by address
    with pytest.raises(ValueError) as err:
        cuda.reduce(bad.address(), 0, 0)
    assert str(err.value).startswith("gradfuse._C_cuda.reduce: ")
    assert message in str(err.value)


@pytest.mark.parametrize("fields, message", [(f, m) for f, m in BAD_REDUCE if "ticket" not in f],
                         ids=lambda v: v if isinstance(v, str) else None)  # fmt: skip
def test_the_cpu_module_refuses_the_same_descriptors(fields, message):
    """Both compiled modules implement one contract: a descriptor one refuses, the other refuses too,
    naming the same field, chunk_size's bounds and num_tensors included. (The CUDA module also needs
    the ticket, which the CPU module does not use.)"""
    cpu = importlib.import_module("gradfuse._C_cpu")
    desc, _keep = _descriptor()
    cpu.reduce(desc.address(), 1)  # valid as it is
    bad = _with(desc, **fields)  # kept alive: the module reads it by address
    with pytest.raises(ValueError, match=message.split(" ")[0]):
        cpu.reduce(bad.address(), 1)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"scale_ptr": 0}, "scale_ptr is 0"),
        ({"flags": _abi.FLAG_READ_TENSOR_SCALES, "tensor_scales": 0}, "tensor_scales is 0"),
        ({"flags": 8}, "flags 8 has bits outside"),
        ({"chunk_size": 0}, "chunk_size must be in [1, 2^30]"),
        ({"num_chunks": -3}, "num_chunks must be >= 0, got -3"),
        ({"num_tensors": 0}, "num_chunks is 5 but num_tensors is 0"),
        *[({name: 0}, f"{name} is 0") for name in ("addrs", "numels", "dtypes", "chunk_tensor", "chunk_start")],
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_scale_names_the_bad_field_before_any_cuda_call(fields, message):
    desc, _keep = _descriptor()
    bad = _with(desc, **fields)  # kept alive: the module reads it by address
    with pytest.raises(ValueError) as err:
        cuda.scale(bad.address(), 0, 0)
    assert str(err.value).startswith("gradfuse._C_cuda.scale: ")
    assert message in str(err.value)


def test_a_valid_scale_descriptor_gets_to_the_device_check():
    desc, _keep = _descriptor()
    for fields in ({}, {"flags": _abi.FLAG_READ_TENSOR_SCALES, "scale_ptr": 0}, {"zero_if_scale_is_zero": 1},
                   {"tensor_chunk_begin": 0, "result": 0, "ticket": 0, "chunk_partials": 0}):  # fmt: skip
        valid = _with(desc, **fields)  # kept alive: the module reads it by address
        with pytest.raises(RuntimeError, match=r"^gradfuse\._C_cuda\.scale: " + NO_DEVICE):
            cuda.scale(valid.address(), 0, 0)


def test_a_null_descriptor_address():
    for call in (cuda.reduce, cuda.scale):
        with pytest.raises(ValueError, match=rf"gradfuse\._C_cuda\.{call.__name__}: the descriptor address is 0"):
            call(0, 0, 0)
