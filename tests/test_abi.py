"""The kernel contract is declared once (gradfuse/_abi.py): the committed C header is what it
generates, every compiled module was built from it, and the modules check a descriptor before
touching memory."""

from __future__ import annotations

import ctypes
import importlib
import math
from pathlib import Path

import pytest
import torch
from helpers import params_from

import gradfuse
from gradfuse import _abi, _engine

ROOT = Path(__file__).resolve().parent.parent


def test_committed_header_is_generated_from_abi_py():
    header = (ROOT / "csrc" / "gradfuse_abi.h").read_text()
    assert header == _abi.c_header(), "csrc/gradfuse_abi.h is stale: run python gradfuse/_abi.py > csrc/gradfuse_abi.h"


def test_descriptor_fields_are_8_bytes_in_declaration_order():
    for i, field in enumerate(_abi.DESCRIPTOR):
        assert getattr(_abi.ClipDesc, field.name).offset == 8 * i
    assert ctypes.sizeof(_abi.ClipDesc) == 8 * len(_abi.DESCRIPTOR)
    assert len({f.name for f in _abi.DESCRIPTOR}) == len(_abi.DESCRIPTOR)


@pytest.mark.parametrize("module", ["gradfuse._C_cpu", "gradfuse._C_cuda"])
def test_compiled_modules_share_the_descriptor(module):
    try:
        m = importlib.import_module(module)
    except ImportError:
        pytest.skip(f"{module} is not built here")
    assert m.descriptor_size() == ctypes.sizeof(_abi.ClipDesc)


def _descriptor():
    """A copy of a real plan's descriptor with valid outputs (kept alive in the returned list), the
    gradients it reads, and the engine's result for them."""
    grads = [torch.randn(100), torch.randn(7, dtype=torch.bfloat16)]
    at = _engine.target(grads, tuple(g.dtype for g in grads), "cpu")
    r = _engine.measure(at, 1.0, 2.0, dtypes=tuple(g.dtype for g in grads))
    desc = _abi.ClipDesc.from_buffer_copy(at.plan.desc)
    outputs = [torch.empty(4), torch.empty(2), torch.empty(2, dtype=torch.float64), torch.empty(2), torch.empty(4, dtype=torch.int64), torch.ones(1)]
    for name, t in zip(("result", "tensor_norms", "tensor_partials", "tensor_max_abs", "tensor_counts", "scale_ptr"), outputs):
        setattr(desc, name, t.data_ptr())
    desc.max_norm, desc.p = 1.0, 2.0
    return desc, grads, r, outputs


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("norm_kind", 9, "norm_kind 9 is not one of"),
        ("policy", 5, "policy 5 is not one of"),
        ("flags", 8, "flags 8 has bits outside"),
        ("tensor_max_abs", 0, "tensor_max_abs is 0"),
        ("tensor_counts", 0, "tensor_counts is 0"),
        ("chunk_partials", 0, "chunk_partials is 0"),
        ("chunk_size", 0, "chunk_size must be in \\[1, 2\\^30\\], got 0"),
        ("chunk_size", (1 << 30) + 1, "chunk_size must be in \\[1, 2\\^30\\], got 1073741825"),
        ("num_tensors", 0, "num_chunks is 2 but num_tensors is 0"),
    ],
)
def test_cpu_module_names_the_bad_field_before_touching_memory(field, value, words):
    m = importlib.import_module("gradfuse._C_cpu")
    desc, grads, _, outputs = _descriptor()
    m.reduce(desc.address(), 1)  # the unaltered descriptor is valid
    before = [g.clone() for g in grads]
    bad = _abi.ClipDesc.from_buffer_copy(desc)
    setattr(bad, field, value)
    with pytest.raises(ValueError, match=words):
        m.reduce(bad.address(), 1)
    for g, b in zip(grads, before):
        assert torch.equal(g, b)


def test_cpu_scale_checks_its_factor_source():
    m = importlib.import_module("gradfuse._C_cpu")
    desc, grads, _, outputs = _descriptor()
    bad = _abi.ClipDesc.from_buffer_copy(desc)
    bad.flags, bad.tensor_scales = _abi.FLAG_READ_TENSOR_SCALES, 0
    with pytest.raises(ValueError, match="tensor_scales is 0"):
        m.scale(bad.address(), 1)
    bad.flags, bad.scale_ptr = 0, 0
    with pytest.raises(ValueError, match="scale_ptr is 0"):
        m.scale(bad.address(), 1)
    with pytest.raises(ValueError, match="descriptor address is 0"):
        m.reduce(0, 1)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_per_tensor_factors_clip_each_gradient_to_its_own_bound(backend):
    """FLAG_WRITE/READ_TENSOR_SCALES: tensor t is scaled by min(1, max_norm / (norm_t + 1e-6)); a
    gradient under the bound is not touched."""
    grads = [torch.full((50,), 1.0), torch.full((4,), 0.1), torch.full((9,), -2.0, dtype=torch.bfloat16)]
    before = [g.clone() for g in grads]
    r = _engine.clip(grads, 1.0, 2.0, apply=True, backend=backend, per_tensor=True)
    norms = [math.sqrt(50), 0.2, 6.0]
    want = [min(1.0, 1.0 / (n + 1e-6)) for n in norms]
    torch.testing.assert_close(r.tensor_scales, torch.tensor(want), rtol=1e-6, atol=0)
    assert torch.equal(grads[1], before[1])  # under its bound: bitwise untouched
    for g, b, w in zip(grads, before, want):
        torch.testing.assert_close(g.double(), (b.double() * w).to(b.dtype).double(), rtol=4e-3 if b.dtype == torch.bfloat16 else 1e-6, atol=0)


def test_fused_results_have_the_contracts_dtypes_and_shapes():
    _, grads, r, _ = _descriptor()
    t = len(grads)
    assert r.tensor_norms.shape == (t,) and r.tensor_norms.dtype == torch.float32
    assert r.tensor_partials.shape == (t,) and r.tensor_partials.dtype == torch.float64
    assert r.tensor_max_abs.shape == (t,) and r.tensor_max_abs.dtype == torch.float32
    assert r.tensor_counts.shape == (t, 2) and r.tensor_counts.dtype == torch.int64
    assert r.total_norm.shape == () and r.tensor_scales is None
    ref = gradfuse.clip_grads(params_from([g.clone() for g in grads]), 1.0, apply=False, backend="torch")
    torch.testing.assert_close(r.tensor_partials, ref.tensor_partials, rtol=1e-6, atol=0)


_ISA_PROBE = """
import torch, gradfuse
from gradfuse import _engine
g = torch.Generator().manual_seed(3)
grads = [torch.randn(n, generator=g).to(dt) * s for n, dt, s in
         [(70001, torch.bfloat16, 1.0), (4099, torch.float16, 3.0), (65537, torch.float32, 1e20), (300, torch.bfloat16, 1e-30), (9000, torch.float32, 1.0)]]
grads[0][5000] = float("nan")
out = []
for p in (2.0, 1.0, 3.0, float("inf"), 0.0):
    r = _engine.clip(grads, 1.0, p, apply=False, backend="cpu")
    out.append([r.result.tolist(), r.tensor_partials.tolist(), r.tensor_max_abs.tolist(), r.tensor_counts.tolist()])
print(gradfuse._C_cpu.isa(), repr(out))
"""


def test_avx512_and_avx2_give_the_same_bits():
    """The lane layout is fixed across instruction sets (kernels_impl.h), so AVX-512 and AVX2 give
    the same bits. (The portable kernels have no FMA: their fp32 sums may differ in the last bits.)"""
    import os
    import subprocess
    import sys

    runs = {}
    for isa in ("avx512", "avx2"):
        env = {**os.environ, "GRADFUSE_CPU_ISA": isa}
        out = subprocess.run([sys.executable, "-c", _ISA_PROBE], env=env, capture_output=True, text=True, check=True).stdout
        got_isa, values = out.split(" ", 1)
        runs[got_isa] = values
    if len(runs) < 2:
        pytest.skip(f"this CPU runs only {', '.join(runs)}")
    assert len(set(runs.values())) == 1


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_rows_make_every_dim0_slice_an_entry(backend):
    """Target(rows=...): the plan's entries are dim-0 slices (unit-wise norms, AGC), measured in one
    read and scaled one factor per row; a row whose factor is 1 is not touched."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(50, 30, generator=gen), torch.randn(7, generator=gen), torch.randn(4, 3, 2, 2, generator=gen).bfloat16()]
    rows = (50, 1, 4)
    dtypes = tuple(g.dtype for g in grads)
    at = _engine.target(grads, dtypes, backend, rows=rows)
    assert (at.plan is not None) == (backend == "cpu")
    r = _engine.measure(at, 1.0, 2.0, dtypes=dtypes, stats=True)
    want = torch.cat([grads[0].double().norm(dim=1), grads[1].double().norm().reshape(1), grads[2].double().reshape(4, -1).norm(dim=1)])
    torch.testing.assert_close(r.tensor_norms.double(), want, rtol=1e-6, atol=0)
    assert r.tensor_counts.shape == (55, 2) and r.tensor_max_abs.shape == (55,)
    factors = torch.ones(55)
    factors[3], factors[50], factors[52] = 0.5, 0.25, 0.125
    before = [g.clone() for g in grads]
    _engine.apply_scale(at, factors, per_tensor=True)
    assert torch.equal(grads[0][3], before[0][3] * 0.5) and torch.equal(grads[0][4:], before[0][4:])
    assert torch.equal(grads[1], before[1] * 0.25)
    assert torch.equal(grads[2][1], before[2][1] * 0.125) and torch.equal(grads[2][2:], before[2][2:])
