"""Drop-in exception parity, audited against torch 2.13: for every bad input torch rejects, each
gradfuse drop-in raises an exception of torch's type (gradfuse's own message); where gradfuse
rejects what torch accepts, the case is in DEVIATIONS (and the README's deviations table), and the
test checks that torch really accepts it. Gradients stay bitwise unchanged on every gradfuse error.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.utils as tnu

import gradfuse


class Obj:
    """Not a tensor, but has a ``.grad`` (that is not a tensor either)."""

    grad = 5


def _params(dtype=torch.float32, grad=None, device="cpu"):
    """Two parameters with gradients; ``grad`` replaces the first gradient."""
    out = []
    for i in range(2):
        p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float32 if dtype in (torch.int64, torch.bool) else dtype, device=device))
        p.grad = (torch.arange(3, device=device) + 1 + i).to(dtype)
        out.append(p)
    if grad is not None:
        out[0].grad = grad
    return out


def _grads(**kw):
    return [p.grad for p in _params(**kw)]


def _empty_param():
    p = torch.nn.Parameter(torch.zeros(0))
    p.grad = torch.zeros(0)
    return [p]


def _int_param():
    p = torch.zeros(3, dtype=torch.int64)
    p.grad = torch.ones(3, dtype=torch.int64)
    return [p]


def _nan_param():
    return _params(grad=torch.tensor([math.nan, 1.0, 2.0]))


def _sparse_param():
    return _params(grad=torch.ones(3).to_sparse())


def _meta_param():
    p = torch.nn.Parameter(torch.zeros(3, device="meta"))
    p.grad = torch.zeros(3, device="meta")
    return [p]


T2 = lambda: torch.tensor(2.0)  # noqa: E731  a total norm

# (label, call): call(fn) makes fresh inputs and calls fn on them. Every case: torch 2.13 raises.
NORM_CASES = [
    ("parameters None", lambda f: f(None, 1.0)),
    ("parameters an int", lambda f: f(5, 1.0)),
    ("parameters a string", lambda f: f("abc", 1.0)),
    ("None in parameters", lambda f: f([None], 1.0)),
    ("a float in parameters", lambda f: f([1.0], 1.0)),
    (".grad not a tensor", lambda f: f([Obj()], 1.0)),
    ("integer gradients", lambda f: f(_int_param(), 1.0)),
    ("max_norm 'abc'", lambda f: f(_params(), "abc")),
    ("max_norm ''", lambda f: f(_params(), "")),
    ("max_norm None", lambda f: f(_params(), None)),
    ("max_norm a list", lambda f: f(_params(), [1.0])),
    ("max_norm complex", lambda f: f(_params(), 1 + 2j)),
    ("max_norm an object", lambda f: f(_params(), object())),
    ("max_norm a 2-element tensor", lambda f: f(_params(), torch.tensor([1.0, 2.0]))),
    ("norm_type 'fro'", lambda f: f(_params(), 1.0, "fro")),
    ("norm_type 'nuc'", lambda f: f(_params(), 1.0, "nuc")),
    ("norm_type 'two'", lambda f: f(_params(), 1.0, "two")),
    ("norm_type ''", lambda f: f(_params(), 1.0, "")),
    ("norm_type None", lambda f: f(_params(), 1.0, None)),
    ("norm_type complex", lambda f: f(_params(), 1.0, 1j)),
    ("norm_type a list", lambda f: f(_params(), 1.0, [2])),
    ("norm_type an object", lambda f: f(_params(), 1.0, object())),
    ("norm_type a 2-element tensor", lambda f: f(_params(), 1.0, torch.tensor([2.0, 2.0]))),
    ("error_if_nonfinite and a NaN", lambda f: f(_nan_param(), 1.0, 2.0, True)),
    ("inf norm of an empty gradient", lambda f: f(_empty_param(), 1.0, math.inf)),
    ("-inf norm of an empty gradient", lambda f: f(_empty_param(), 1.0, -math.inf)),
    ("inf norm of an empty gradient, foreach=False", lambda f: f(_empty_param(), 1.0, math.inf, False, False)),
    ("sparse gradient", lambda f: f(_sparse_param(), 1.0)),
    ("foreach=True on meta tensors", lambda f: f(_meta_param(), 1.0, 2.0, False, True)),
]
TOTAL_NORM_CASES = [
    ("tensors None", lambda f: f(None)),
    ("tensors an int", lambda f: f(5)),
    ("None in tensors", lambda f: f([None])),
    ("a float in tensors", lambda f: f([1.0])),
    ("tensors a string", lambda f: f("abc")),
    ("integer tensors", lambda f: f([torch.ones(3, dtype=torch.int64)])),
    ("bool tensors", lambda f: f([torch.ones(3, dtype=torch.bool)])),
    ("norm_type 'fro'", lambda f: f(_grads(), "fro")),
    ("norm_type 'two'", lambda f: f(_grads(), "two")),
    ("norm_type None", lambda f: f(_grads(), None)),
    ("norm_type complex", lambda f: f(_grads(), 1j)),
    ("error_if_nonfinite and an inf", lambda f: f([torch.tensor([math.inf])], 2.0, True)),
    ("inf norm of an empty tensor", lambda f: f([torch.zeros(0)], math.inf)),
    ("sparse tensor", lambda f: f([torch.ones(3).to_sparse()])),
]
WITH_NORM_CASES = [
    ("parameters None", lambda f: f(None, 1.0, T2())),
    ("None in parameters", lambda f: f([None], 1.0, T2())),
    ("a float in parameters", lambda f: f([1.0], 1.0, T2())),
    ("integer gradients", lambda f: f(_int_param(), 1.0, T2())),
    ("total_norm a float", lambda f: f(_params(), 1.0, 2.0)),
    ("total_norm None", lambda f: f(_params(), 1.0, None)),
    ("total_norm of shape [2]", lambda f: f(_params(), 1.0, torch.tensor([2.0, 3.0]))),
    ("total_norm of shape [1]", lambda f: f(_params(), 1.0, torch.tensor([2.0]))),
    ("max_norm 'abc'", lambda f: f(_params(), "abc", T2())),
    ("max_norm None", lambda f: f(_params(), None, T2())),
    ("max_norm a list", lambda f: f(_params(), [1.0], T2())),
    ("max_norm complex", lambda f: f(_params(), 1j, T2())),
    ("max_norm a 2-element tensor", lambda f: f(_params(), torch.tensor([1.0, 2.0]), T2())),
]
VALUE_CASES = [
    ("parameters None", lambda f: f(None, 1.0)),
    ("parameters an int", lambda f: f(5, 1.0)),
    ("None in parameters", lambda f: f([None], 1.0)),
    ("a float in parameters", lambda f: f([1.0], 1.0)),
    ("no parameters", lambda f: f([], 1.0)),
    ("no gradients", lambda f: f([torch.nn.Parameter(torch.zeros(2))], 1.0)),
    ("integer gradients", lambda f: f(_int_param(), 1.0)),
    ("clip_value 'x'", lambda f: f(_params(), "x")),
    ("clip_value None", lambda f: f(_params(), None)),
    ("clip_value a list", lambda f: f(_params(), [1.0])),
    ("clip_value complex", lambda f: f(_params(), 1j)),
    ("clip_value a 2-element tensor", lambda f: f(_params(), torch.tensor([1.0, 2.0]))),
    ("sparse gradient", lambda f: f(_sparse_param(), 1.0)),
    ("foreach=True on meta tensors", lambda f: f(_meta_param(), 1.0, True)),
]
CASES = [
    *((name, label, call) for name in ("clip_grad_norm_", "clip_grad_norm") for label, call in NORM_CASES),
    *(("get_total_norm", label, call) for label, call in TOTAL_NORM_CASES),
    *(("clip_grads_with_norm_", label, call) for label, call in WITH_NORM_CASES),
    *(("clip_grad_value_", label, call) for label, call in VALUE_CASES),
]

# What gradfuse rejects and torch 2.13 accepts (README, "Deviations from torch"): exception type.
DEVIATIONS = [
    ("clip_grad_norm_", "max_norm -1", lambda f: f(_params(), -1.0), ValueError),
    ("clip_grad_norm_", "max_norm NaN", lambda f: f(_params(), math.nan), ValueError),
    ("clip_grad_norm_", "max_norm True", lambda f: f(_params(), True), TypeError),
    ("clip_grad_norm_", "norm_type NaN", lambda f: f(_params(), 1.0, math.nan), ValueError),
    ("clip_grad_norm_", "norm_type True", lambda f: f(_params(), 1.0, True), TypeError),
    ("get_total_norm", "norm_type NaN", lambda f: f(_grads(), math.nan), ValueError),
    ("get_total_norm", "norm_type True", lambda f: f(_grads(), True), TypeError),
    ("clip_grads_with_norm_", "max_norm -1", lambda f: f(_params(), -1.0, T2()), ValueError),
    ("clip_grads_with_norm_", "max_norm True", lambda f: f(_params(), True, T2()), TypeError),
    ("clip_grads_with_norm_", "an integer total_norm", lambda f: f(_params(), 1.0, torch.tensor(2)), TypeError),
    ("clip_grad_value_", "clip_value -1", lambda f: f(_params(), -1.0), ValueError),
    ("clip_grad_value_", "clip_value NaN", lambda f: f(_params(), math.nan), ValueError),
    ("clip_grad_value_", "clip_value True", lambda f: f(_params(), True), TypeError),
]


def _raised(fn, call):
    """The exception ``call(fn)`` raised (None if none), and the gradients it was given, before and after."""
    seen = {}

    def spy(*args, **kwargs):
        params = args[0] if args else None
        items = params if isinstance(params, list) else []
        grads = [p.grad if isinstance(p, torch.nn.Parameter) else p for p in items]  # get_total_norm: the grads
        seen["grads"] = [(g, g.clone()) for g in grads if isinstance(g, torch.Tensor) and g.device.type == "cpu" and not g.is_sparse]
        return fn(*args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clip_grad_norm's deprecation
        try:
            call(spy)
        except Exception as e:
            return e, seen.get("grads", [])
    return None, seen.get("grads", [])


@pytest.mark.parametrize("name,label,call", CASES, ids=[f"{n}-{label}" for n, label, _ in CASES])
def test_gradfuse_raises_torchs_exception_type(name, label, call):
    torch_exc, _ = _raised(getattr(tnu, name), call)
    assert torch_exc is not None, f"torch.nn.utils.{name} accepts {label}: this case belongs in DEVIATIONS or nowhere"
    ours, grads = _raised(getattr(gradfuse, name), call)
    assert ours is not None, f"gradfuse.{name} accepts {label}; torch raises {torch_exc!r}"
    assert isinstance(ours, type(torch_exc)), f"{label}: torch raises {type(torch_exc).__name__}, gradfuse {ours!r}"
    for g, before in grads:
        assert torch.equal(g, before) or (g.isnan() == before.isnan()).all(), f"{label}: gradients touched"


@pytest.mark.parametrize("name,label,call,exc", DEVIATIONS, ids=[f"{n}-{label}" for n, label, _, _ in DEVIATIONS])
def test_documented_deviations_torch_accepts_gradfuse_rejects(name, label, call, exc):
    torch_exc, _ = _raised(getattr(tnu, name), call)
    assert torch_exc is None, f"torch.nn.utils.{name} now rejects {label} ({torch_exc!r}): move it to CASES"
    ours, grads = _raised(getattr(gradfuse, name), call)
    assert type(ours) is exc, f"{label}: {ours!r}"
    assert grads and all(torch.equal(g, before) for g, before in grads)


def test_not_a_tensor_is_both_gradfuses_type_error_and_torchs_attribute_error():
    with pytest.raises(TypeError, match=r"tensors\[0\] is of type NoneType, not a torch.Tensor") as info:
        gradfuse.get_total_norm([None])
    assert isinstance(info.value, AttributeError)
    with pytest.raises(RuntimeError, match=r"gradient 0 has dtype torch.int64") as info:
        gradfuse.clip_grad_norm_(_int_param(), 1.0)
    assert isinstance(info.value, TypeError)


def test_numbers_torch_takes_are_taken():
    """Accepted forms are not errors: a numeric string, a one-element tensor, numpy and torch scalars."""
    for max_norm in ("1.5", torch.tensor(1.5), torch.tensor([1.5]), np.float32(1.5), np.float64(1.5), np.int64(2)):
        ours, theirs = _params(), _params()
        torch.testing.assert_close(gradfuse.clip_grad_norm_(ours, max_norm), tnu.clip_grad_norm_(theirs, max_norm))
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.grad, b.grad)
    for norm_type in ("inf", "-inf", "2"):
        torch.testing.assert_close(gradfuse.get_total_norm(_grads(), norm_type), tnu.get_total_norm(_grads(), norm_type))
