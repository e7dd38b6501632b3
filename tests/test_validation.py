"""Bad input fails before any gradient is read or written, with an error that names the argument and
the problem. Every case asserts the message and that the gradients kept every bit."""

from __future__ import annotations

import importlib.util
import math
import re

import pytest
import torch
import torch.nn.utils as tnu
from helpers import CPU_BACKENDS, assert_unchanged, params_from, snapshot

import gradfuse
from gradfuse import _backends


@pytest.fixture
def grads():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, generator=g) * 10, torch.randn(7, generator=g).half() * 10]


CLIPPERS = ["clip_grad_norm_", "clip_grads", "clip_grads_with_norm_"]


def call(fn: str, params, max_norm=1.0, **kw):
    if fn == "clip_grad_norm_":
        return gradfuse.clip_grad_norm_(params, max_norm, **kw)
    if fn == "clip_grads":
        return gradfuse.clip_grads(params, max_norm, **kw)
    if fn == "clip_grads_with_norm_":
        return gradfuse.clip_grads_with_norm_(params, max_norm, torch.tensor(100.0), **kw)
    if fn == "get_total_norm":
        return gradfuse.get_total_norm(params, **kw)
    raise AssertionError(fn)


# ------------------------------------------------------------------------------------------------
# max_norm


@pytest.mark.parametrize("fn", CLIPPERS)
@pytest.mark.parametrize(
    "max_norm,exc,pattern",
    [
        (-1.0, ValueError, r"max_norm must be >= 0, got -1\.0 \(a negative max_norm would flip the gradients' sign\)"),
        (-1, ValueError, r"max_norm must be >= 0, got -1\.0"),
        (-math.inf, ValueError, r"max_norm must be >= 0, got -inf"),
        (math.nan, ValueError, r"max_norm is NaN"),
        (torch.tensor(math.nan), ValueError, r"max_norm is NaN"),
        (torch.tensor(-2.0), ValueError, r"max_norm must be >= 0, got -2\.0"),
        ("abc", ValueError, r"max_norm must be a number, got the string 'abc'"),
        ("", ValueError, r"max_norm must be a number, got the string ''"),
        ("nan", ValueError, r"max_norm is NaN"),
        (None, TypeError, r"max_norm must be a real number, not NoneType"),
        ([1.0], TypeError, r"max_norm must be a real number, not list"),
        (True, TypeError, r"max_norm must be a real number, not bool"),
        (1 + 2j, TypeError, r"max_norm must be a real number, not complex"),
        (torch.tensor([1.0, 2.0]), ValueError, r"max_norm must be a number or a one-element tensor, got shape \[2\]"),
    ],
    ids=lambda x: repr(x) if not isinstance(x, type) else x.__name__,
)
def test_bad_max_norm(grads, fn, max_norm, exc, pattern):
    params = params_from(grads)
    snap = snapshot(grads)
    with pytest.raises(exc, match=rf"^{fn}: {pattern}"):
        call(fn, params, max_norm)
    assert_unchanged(grads, snap)


@pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_grads"])
def test_bad_max_norm_reported_even_without_grads(fn):
    """Arguments are checked before the early return for "no gradients"."""
    with pytest.raises(ValueError, match="max_norm must be >= 0"):
        call(fn, [torch.nn.Parameter(torch.ones(2))], -1.0)


@pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_grads", "get_total_norm"])
@pytest.mark.parametrize(
    "norm_type,exc,pattern",
    [
        (math.nan, ValueError, r"norm_type is NaN"),
        ("two", ValueError, r"norm_type must be a number, got the string 'two'"),
        (None, TypeError, r"norm_type must be a real number, not NoneType"),
    ],
    ids=repr,
)
def test_bad_norm_type(grads, fn, norm_type, exc, pattern):
    params = params_from(grads) if fn != "get_total_norm" else grads
    snap = snapshot(grads)
    with pytest.raises(exc, match=rf"^{fn}: {pattern}"):
        if fn == "get_total_norm":
            gradfuse.get_total_norm(params, norm_type)
        elif fn == "clip_grads":
            gradfuse.clip_grads(params, 1.0, norm_type)
        else:
            gradfuse.clip_grad_norm_(params, 1.0, norm_type)
    assert_unchanged(grads, snap)


@pytest.mark.parametrize("clip_value,exc,pattern", [(-0.5, ValueError, r"clip_value must be a number >= 0, got -0\.5"), ("x", ValueError, r"clip_value must be a number, got the string 'x'"), (math.nan, ValueError, r"clip_value must be a number >= 0, got nan")])
def test_bad_clip_value(grads, clip_value, exc, pattern):
    snap = snapshot(grads)
    with pytest.raises(exc, match=rf"^clip_grad_value_: {pattern}"):
        gradfuse.clip_grad_value_(params_from(grads), clip_value)
    assert_unchanged(grads, snap)


def test_bad_nonfinite_policy(grads):
    snap = snapshot(grads)
    with pytest.raises(ValueError, match=re.escape("clip_grads: nonfinite='ignore'; choose one of 'propagate', 'skip', 'zero', 'error'")):
        gradfuse.clip_grads(params_from(grads), 1.0, nonfinite="ignore")
    assert_unchanged(grads, snap)


# ------------------------------------------------------------------------------------------------
# parameters / tensors


@pytest.mark.parametrize("fn", CLIPPERS + ["clip_grad_value_"])
def test_non_tensor_item_in_parameters(grads, fn):
    params = params_from(grads)
    snap = snapshot(grads)
    bad = [params[0], 3, params[1]]
    with pytest.raises(TypeError, match=rf"^{fn}: parameters\[1\] is of type int, not a torch\.Tensor$"):
        if fn == "clip_grad_value_":
            gradfuse.clip_grad_value_(bad, 1.0)
        else:
            call(fn, bad, 0.1)
    assert_unchanged(grads, snap)


@pytest.mark.parametrize("fn", CLIPPERS)
def test_parameters_not_iterable(fn):
    with pytest.raises(TypeError, match=rf"^{fn}: parameters must be a tensor or an iterable of tensors, not int$"):
        call(fn, 5)


def test_none_in_get_total_norm(grads):
    snap = snapshot(grads)
    with pytest.raises(TypeError, match=re.escape("get_total_norm: tensors[1] is of type NoneType, not a torch.Tensor (pass gradients, e.g. [p.grad for p in params if p.grad is not None])")):
        gradfuse.get_total_norm([grads[0], None, grads[1]])
    with pytest.raises(TypeError, match=re.escape("get_total_norm: tensors[0] is of type str, not a torch.Tensor")):
        gradfuse.get_total_norm(["g"])
    assert_unchanged(grads, snap)
    with pytest.raises(RuntimeError):  # torch refuses too (with a less helpful message)
        tnu.get_total_norm([grads[0], None])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool], ids=str)
@pytest.mark.parametrize("fn", CLIPPERS + ["get_total_norm", "clip_grad_value_"])
def test_integer_and_bool_grads(grads, dtype, fn):
    holder = torch.zeros(3, dtype=dtype)
    holder.grad = torch.ones(3, dtype=dtype)
    params = params_from(grads) + [holder]
    snap = snapshot(grads + [holder.grad])
    pattern = rf"^{fn}: gradient 2 has dtype {re.escape(str(dtype))}; clipping needs floating-point or complex gradients$"
    with pytest.raises(TypeError, match=pattern):
        if fn == "get_total_norm":
            gradfuse.get_total_norm(grads + [holder.grad])
        elif fn == "clip_grad_value_":
            gradfuse.clip_grad_value_(params, 1.0)
        else:
            call(fn, params, 0.1)
    assert_unchanged(grads + [holder.grad], snap)


# ------------------------------------------------------------------------------------------------
# total_norm of clip_grads_with_norm_


@pytest.mark.parametrize(
    "total_norm,exc,pattern",
    [
        (2.0, TypeError, r"total_norm must be a 0-dim tensor \(as get_total_norm returns\), not float"),
        (torch.tensor([2.0]), RuntimeError, r"total_norm must be a 0-dim tensor \(as get_total_norm returns\), got shape \[1\]"),
        (torch.tensor([[2.0]]), RuntimeError, r"got shape \[1, 1\]"),
        (torch.tensor(2), TypeError, r"total_norm must be a floating-point tensor, got torch\.int64"),
        (torch.tensor(True), TypeError, r"total_norm must be a floating-point tensor, got torch\.bool"),
        (None, TypeError, r"not NoneType"),
    ],
    ids=["float", "1-D", "2-D", "int", "bool", "None"],
)
def test_bad_total_norm(grads, total_norm, exc, pattern):
    params = params_from(grads)
    snap = snapshot(grads)
    with pytest.raises(exc, match=rf"^clip_grads_with_norm_: .*{pattern}"):
        gradfuse.clip_grads_with_norm_(params, 1.0, total_norm)
    assert_unchanged(grads, snap)


def test_bad_total_norm_same_exception_type_as_torch(grads):
    for total_norm in (2.0, torch.tensor([2.0])):
        with pytest.raises(Exception) as t_err:
            tnu.clip_grads_with_norm_(params_from([g.clone() for g in grads]), 1.0, total_norm)
        with pytest.raises(Exception) as g_err:
            gradfuse.clip_grads_with_norm_(params_from(grads), 1.0, total_norm)
        assert type(g_err.value) is type(t_err.value)


# ------------------------------------------------------------------------------------------------
# backends


@pytest.mark.parametrize("fn", CLIPPERS + ["get_total_norm"])
@pytest.mark.parametrize("name", ["gpu", "fused", "", "cuda:0"])
def test_unknown_backend_argument(grads, fn, name):
    params = params_from(grads) if fn != "get_total_norm" else grads
    snap = snapshot(grads)
    msg = f"backend={name!r} is not a gradfuse backend; choose one of auto, cuda, triton, cpu, torch"
    with pytest.raises(ValueError, match=re.escape(msg)):
        call(fn, params, 0.1, backend=name)
    assert_unchanged(grads, snap)


@pytest.mark.parametrize("fn", CLIPPERS + ["get_total_norm"])
def test_unknown_backend_env_var(grads, fn, monkeypatch):
    monkeypatch.setenv("GRADFUSE_BACKEND", "Fastest")
    params = params_from(grads) if fn != "get_total_norm" else grads
    snap = snapshot(grads)
    msg = "GRADFUSE_BACKEND='fastest' is not a gradfuse backend; choose one of auto, cuda, triton, cpu, torch"
    with pytest.raises(ValueError, match=re.escape(msg)):
        call(fn, params, 0.1)
    assert_unchanged(grads, snap)
    # an explicit argument wins over a bad environment variable
    call(fn, params_from([g.clone() for g in grads]) if fn != "get_total_norm" else grads, 0.1, backend="torch")


def test_backend_names_are_case_and_space_insensitive(grads, monkeypatch):
    r1 = gradfuse.get_total_norm(grads, backend=" Torch ")
    monkeypatch.setenv("GRADFUSE_BACKEND", "TORCH")
    r2 = gradfuse.get_total_norm(grads)
    assert r1.item() == r2.item()


def _cuda_reason_words():
    """What the message must say: why (no module / CPU tensors) and how to get it."""
    if importlib.util.find_spec("gradfuse._C_cuda") is None:
        return ["gradfuse._C_cuda could not be imported", "GRADFUSE_CUDA=1 pip install"]
    return ["the cuda backend runs on CUDA tensors, not cpu"]


@pytest.mark.parametrize("fn", CLIPPERS + ["get_total_norm"])
@pytest.mark.parametrize("via", ["argument", "env"])
def test_requested_missing_backend_raises(grads, fn, via, monkeypatch):
    """cuda on CPU tensors: an explicit request is honoured or fails loudly (auto would fall back)."""
    params = params_from(grads) if fn != "get_total_norm" else grads
    snap = snapshot(grads)
    kw = {"backend": "cuda"} if via == "argument" else {}
    if via == "env":
        monkeypatch.setenv("GRADFUSE_BACKEND", "cuda")
    with pytest.raises(gradfuse.BackendUnavailableError, match=re.escape("gradfuse backend 'cuda' is unavailable: ")) as err:
        call(fn, params, 0.1, **kw)
    for words in _cuda_reason_words():
        assert words in str(err.value)
    assert isinstance(err.value, RuntimeError)
    assert_unchanged(grads, snap)


@pytest.mark.parametrize("name", ["cpu", "triton", "cuda"])
def test_fused_backend_on_meta_tensors_raises(name):
    p = torch.nn.Parameter(torch.empty(3, device="meta"))
    p.grad = torch.empty(3, device="meta")
    reason = _backends.FUSED_BACKENDS[name].unavailable_reason(torch.device("meta"))
    assert reason is not None
    with pytest.raises(gradfuse.BackendUnavailableError, match=re.escape(f"gradfuse backend {name!r} is unavailable: {reason}")):
        gradfuse.clip_grad_norm_([p], 1.0, backend=name)


def test_available_backends():
    cpu = gradfuse.available_backends("cpu")
    assert cpu[-1] == "torch" and "cuda" not in cpu
    assert set(cpu) <= set(gradfuse.BACKEND_NAMES) - {"auto"}
    assert gradfuse.available_backends(torch.device("meta")) == ["torch"]
    assert gradfuse.BACKEND_NAMES == ("auto", "cuda", "triton", "cpu", "torch")


def test_error_types_are_exported():
    assert issubclass(gradfuse.BackendUnavailableError, RuntimeError)
    assert gradfuse.BackendUnavailableError.__doc__


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_validation_identical_on_every_backend(grads, backend):
    snap = snapshot(grads)
    with pytest.raises(ValueError, match="max_norm is NaN"):
        gradfuse.clip_grad_norm_(params_from(grads), math.nan, backend=backend)
    with pytest.raises(TypeError, match="parameters\\[0\\] is of type float"):
        gradfuse.clip_grad_norm_([1.0], 1.0, backend=backend)
    assert_unchanged(grads, snap)
