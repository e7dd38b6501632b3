"""gradfuse.patch_torch(): torch's clipping names route through gradfuse, and come back bit for bit."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.utils as tnu
import torch.nn.utils.clip_grad as tnu_clip_grad

import gradfuse
from gradfuse import _patch, ops
from gradfuse import clip as gradfuse_clip

NAMES = ("clip_grad_norm_", "clip_grad_norm", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_")
MODULES = (tnu, tnu_clip_grad)


def _current() -> dict:
    return {(m.__name__, n): getattr(m, n) for m in MODULES for n in NAMES if hasattr(m, n)}


@pytest.fixture(autouse=True)
def torch_restored():
    """Every test leaves torch as it found it, even when it fails half-way."""
    before = _current()
    yield before
    while _patch._active:
        _patch._active[0].undo()
    for (module_name, name), fn in before.items():
        setattr(next(m for m in MODULES if m.__name__ == module_name), name, fn)


def _params(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(n, dtype=dtype)) for n in (300, 7, 64)]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * 3).to(dtype)
    return params


def test_every_name_is_routed_and_undo_restores_the_same_objects(torch_restored):
    before = torch_restored
    assert tnu.clip_grad_norm_ is tnu_clip_grad.clip_grad_norm_  # torch re-exports one object
    handle = gradfuse.patch_torch()
    try:
        patched = _current()
        assert set(patched) == set(before)  # no name added that torch does not have
        for (module_name, name), fn in patched.items():
            assert fn is getattr(gradfuse, name), (module_name, name)
        # torch.nn.utils.clip_grad spells two of them privately; those stay torch's own
        assert tnu_clip_grad._get_total_norm is before[("torch.nn.utils", "get_total_norm")]
    finally:
        handle.undo()
    after = _current()
    assert all(after[k] is before[k] for k in before)
    assert not handle.active and "undone" in repr(handle)


def test_patched_calls_run_gradfuse_and_match_torch(monkeypatch):
    reference = _params()
    want = tnu.clip_grad_norm_(reference, 1.0)
    calls = []
    real_clip = ops.clip.eager  # the engine's clip, as every public function calls it
    monkeypatch.setattr(ops.clip, "eager", lambda *a, **k: calls.append(1) or real_clip(*a, **k))
    with gradfuse.patch_torch():
        ours = _params()
        got = torch.nn.utils.clip_grad_norm_(ours, 1.0)
        norm = torch.nn.utils.get_total_norm([p.grad for p in ours])
    assert len(calls) == 2  # both went through gradfuse's engine
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(norm, torch.tensor(1.0), rtol=1e-5, atol=0)  # clipped to max_norm
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_patched_clip_grad_value_does_not_recurse_and_clamps():
    reference = _params()
    tnu.clip_grad_value_(reference, 0.5)
    with gradfuse.patch_torch():
        assert torch.nn.utils.clip_grad_value_ is gradfuse.clip_grad_value_
        ours = _params()
        torch.nn.utils.clip_grad_value_(ours, 0.5)  # torch's name, gradfuse's function: no RecursionError
        torch.nn.utils.clip_grad.clip_grad_value_(ours, 0.5)
        with pytest.raises(ValueError, match="clip_value must be a number >= 0"):  # gradfuse's check, not torch's flip
            torch.nn.utils.clip_grad_value_(ours, -1.0)
    for a, b in zip(ours, reference):
        assert torch.equal(a.grad, b.grad)
    assert gradfuse_clip._torch_clip_grad_value_ is tnu.clip_grad_value_  # torch's, captured at import


def test_patched_clip_grads_with_norm_and_deprecated_alias():
    reference = _params()
    total = tnu.get_total_norm([p.grad for p in reference])
    tnu.clip_grads_with_norm_(reference, 2.0, total)
    with gradfuse.patch_torch():
        ours = _params()
        torch.nn.utils.clip_grads_with_norm_(ours, 2.0, total)
        with pytest.warns(FutureWarning, match="gradfuse.clip_grad_norm"):
            again = torch.nn.utils.clip_grad_norm(_params(), 2.0)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(again, total, rtol=1e-6, atol=0)


def test_idempotent_and_nested_handles_compose(torch_restored):
    original = torch_restored[("torch.nn.utils", "clip_grad_norm_")]
    outer = gradfuse.patch_torch()
    inner = gradfuse.patch_torch()  # changes nothing, a handle of its own
    assert inner is not outer and tnu.clip_grad_norm_ is gradfuse.clip_grad_norm_
    inner.undo()
    assert tnu.clip_grad_norm_ is gradfuse.clip_grad_norm_  # the outer patch still holds
    inner.undo()  # a second undo of the same handle does nothing
    assert tnu.clip_grad_norm_ is gradfuse.clip_grad_norm_
    outer.undo()
    assert tnu.clip_grad_norm_ is original
    with gradfuse.patch_torch() as handle:
        with gradfuse.patch_torch():
            pass
        assert handle.active and tnu.clip_grad_value_ is gradfuse.clip_grad_value_
    assert tnu.clip_grad_value_ is torch_restored[("torch.nn.utils", "clip_grad_value_")]


def test_undo_after_an_exception_in_the_block(torch_restored):
    with pytest.raises(RuntimeError, match="boom"):
        with gradfuse.patch_torch():
            raise RuntimeError("boom")
    assert tnu.get_total_norm is torch_restored[("torch.nn.utils", "get_total_norm")]


def test_undo_leaves_a_later_replacement_in_place(torch_restored):
    def someone_elses(*args, **kwargs):
        return torch.tensor(math.nan)

    handle = gradfuse.patch_torch()
    tnu.clip_grad_norm_ = someone_elses
    handle.undo()
    assert tnu.clip_grad_norm_ is someone_elses  # not ours to take back
    assert tnu.clip_grad_value_ is torch_restored[("torch.nn.utils", "clip_grad_value_")]


def test_patched_torch_raises_gradfuse_errors_before_touching_grads():
    params = _params()
    snap = [p.grad.clone() for p in params]
    with gradfuse.patch_torch(), warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="max_norm must be >= 0"):
            torch.nn.utils.clip_grad_norm_(params, -1.0)
    assert all(torch.equal(p.grad, s) for p, s in zip(params, snap))
