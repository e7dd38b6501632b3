"""Training integration (gradfuse.training): trajectories against torch, policies, counters, no host
syncs, GradScaler composition, torch.compile, CUDA graphs.

Every trajectory test trains the same small MLP for 20 steps twice, once with torch's reference
sequence (``clip_grad_norm_`` then ``step``; under AMP ``scaler.unscale_`` + ``clip_grad_norm_`` +
``scaler.step`` + ``scaler.update``) and once with gradfuse, and compares the parameters after
every step (and the loss scale, exactly).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import gradfuse
from gradfuse import _handoff
from gradfuse.training import (
    NonFiniteCounter,
    OptimizerClipper,
    clip_grad_norm_for_optimizer_,
    handoff_unsupported_reason,
    unscale_and_clip_,
)

STEPS = 20
MAX_NORM = 0.5
TOL = dict(rtol=1e-5, atol=1e-5, equal_nan=True)

_gen = torch.Generator().manual_seed(1234)
X = torch.randn(STEPS, 16, 6, generator=_gen)
Y = 4 * torch.randn(STEPS, 16, 1, generator=_gen)  # large targets: the clip is active most steps


def _model(device="cpu"):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 24), torch.nn.Tanh(), torch.nn.Linear(24, 1)).to(device)


OPTIMIZERS = {
    # scale pass (cannot take the scale)
    "sgd-foreach": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, foreach=True),
    "adam-forloop": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=False),
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    # hand-off (fused=True)
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.05, fused=True),
    "sgd-fused": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True, fused=True),
    "adagrad-fused": lambda ps: torch.optim.Adagrad(ps, lr=0.05, fused=True),
}
FUSED = [k for k in OPTIMIZERS if k.endswith("-fused")]
NOT_FUSED = [k for k in OPTIMIZERS if not k.endswith("-fused")]


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _poison(model, value: float) -> None:
    with torch.no_grad():
        next(model.parameters()).grad[0, 0] = value


def _train(opt_name, clip_and_step, *, bad_steps=None, scaler=None, steps=STEPS, device="cpu"):
    """Trajectory of the parameters; ``bad_steps``: {step: inf or nan} written into a gradient
    after backward. ``clip_and_step(model, opt, scaler, step)`` does the rest of the step."""
    model = _model(device)
    opt = OPTIMIZERS[opt_name](model.parameters())
    traj, scales = [], []
    for i in range(steps):
        loss = F.mse_loss(model(X[i].to(device)), Y[i].to(device))
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if bad_steps and i in bad_steps:
            _poison(model, bad_steps[i])
        clip_and_step(model, opt, scaler, i)
        traj.append(_flat(model))
        if scaler is not None:
            scales.append(scaler.get_scale())
        opt.zero_grad()
        assert getattr(opt, "grad_scale", None) is None and getattr(opt, "found_inf", None) is None
    assert id(opt) not in _handoff.PENDING
    return traj, scales, opt


def _assert_same(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(y, x, **TOL, msg=lambda m, i=i: f"step {i}: {m}")


def torch_clip_step(model, opt, scaler, i):
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    opt.step()


class SyncCounter(TorchDispatchMode):
    """Counts the ops that copy a device value to the host."""

    SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default, torch.ops.aten.is_nonzero.default}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNC_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------------------------------
# Clip for the optimizer: scale pass and hand-off, against torch
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_trajectory_matches_torch(backend, opt_name):
    results = []

    def gradfuse_step(model, opt, scaler, i):
        results.append(clip_grad_norm_for_optimizer_(opt, MAX_NORM, backend=backend))
        opt.step()

    ref, _, _ = _train(opt_name, torch_clip_step)
    got, _, _ = _train(opt_name, gradfuse_step)
    _assert_same(ref, got)
    assert sum(float(r.clip_coef) < 1 for r in results) >= STEPS // 2  # the clip was active


@pytest.mark.parametrize("opt_name", FUSED)
def test_fused_optimizer_takes_the_scale_and_grads_are_read_once(backend, opt_name):
    model = _model()
    opt = OPTIMIZERS[opt_name](model.parameters())
    F.mse_loss(model(X[0]), Y[0]).backward()
    before = [p.grad.clone() for p in model.parameters()]
    r = clip_grad_norm_for_optimizer_(opt, MAX_NORM, backend=backend)
    assert float(r.clip_coef) < 1
    for p, g in zip(model.parameters(), before):  # no scale pass: the gradients are untouched
        assert torch.equal(p.grad, g)
    assert getattr(opt, "grad_scale", None) is None  # set only for the duration of the step
    seen = {}
    handle = opt.register_step_pre_hook(lambda o, a, k: seen.update(grad_scale=getattr(o, "grad_scale", None)))
    try:
        opt.step()
    finally:
        handle.remove()
    assert seen["grad_scale"] is not None and seen["grad_scale"].dtype == torch.float32
    torch.testing.assert_close(seen["grad_scale"], r.scale.reciprocal().float())
    assert getattr(opt, "grad_scale", None) is None and getattr(opt, "found_inf", None) is None


def test_handoff_false_uses_the_scale_pass(backend):
    model = _model()
    opt = OPTIMIZERS["adamw-fused"](model.parameters())
    F.mse_loss(model(X[0]), Y[0]).backward()
    ref = [p.grad.clone() for p in model.parameters()]
    norm = torch.nn.utils.get_total_norm(ref)
    clip_grad_norm_for_optimizer_(opt, MAX_NORM, handoff=False, backend=backend)
    coef = min(1.0, MAX_NORM / (float(norm) + 1e-6))
    for p, g in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, g * coef)
    assert id(opt) not in _handoff.PENDING


def test_scale_is_consumed_by_exactly_one_step(backend):
    """clip, step, step: the second step must not divide again by a stale scale. (torch's fused
    kernels store the divided gradient back into p.grad, so both sides step twice on the clipped
    gradients, as with torch's in-place clip.)"""

    def ref_step(model, opt, scaler, i):
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        opt.step()

    def gf_step(model, opt, scaler, i):
        clip_grad_norm_for_optimizer_(opt, MAX_NORM, backend=backend)
        clip_grad_norm_for_optimizer_(opt, MAX_NORM, backend=backend)  # a repeat replaces, never compounds
        opt.step()
        opt.step()

    ref, _, _ = _train("adamw-fused", ref_step, steps=5)
    got, _, _ = _train("adamw-fused", gf_step, steps=5)
    _assert_same(ref, got)


def test_handoff_unsupported_reasons():
    ps = list(_model().parameters())
    assert handoff_unsupported_reason(torch.optim.AdamW(ps, fused=True)) is None
    assert handoff_unsupported_reason(torch.optim.SGD(ps, lr=0.1, fused=True)) is None
    assert "fused=True" in handoff_unsupported_reason(torch.optim.AdamW(ps, foreach=True))
    assert "fused=True" in handoff_unsupported_reason(torch.optim.Adam(ps))
    assert "does not read grad_scale" in handoff_unsupported_reason(torch.optim.RMSprop(ps))

    class Custom(torch.optim.AdamW):
        def step(self, closure=None):
            return super().step(closure)

    assert "overrides" in handoff_unsupported_reason(Custom(ps, fused=True))

    class Plain(torch.optim.AdamW):  # a subclass that keeps torch's step is fine
        pass

    assert handoff_unsupported_reason(Plain(ps, fused=True)) is None
    mixed = torch.optim.Adam(ps[:2], fused=True)
    mixed.add_param_group({"params": ps[2:], "fused": False})
    assert "param group 1" in handoff_unsupported_reason(mixed)
    with pytest.raises(ValueError, match="handoff=True"):
        clip_grad_norm_for_optimizer_(torch.optim.Adam(ps), 1.0, handoff=True)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        clip_grad_norm_for_optimizer_(ps, 1.0)


def test_foreign_grad_scale_is_not_overwritten():
    model = _model()
    opt = OPTIMIZERS["adamw-fused"](model.parameters())
    F.mse_loss(model(X[0]), Y[0]).backward()
    opt.grad_scale = torch.tensor(2.0)
    with pytest.raises(RuntimeError, match="already set"):
        clip_grad_norm_for_optimizer_(opt, MAX_NORM)
    del opt.grad_scale


def test_step_with_closure_after_handoff_refuses():
    model = _model()
    opt = OPTIMIZERS["adamw-fused"](model.parameters())

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(X[1]), Y[1])
        loss.backward()
        return loss

    closure()
    clip_grad_norm_for_optimizer_(opt, MAX_NORM)
    before = _flat(model)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(closure)
    assert torch.equal(_flat(model), before) and id(opt) not in _handoff.PENDING
    assert getattr(opt, "grad_scale", None) is None
    opt.step(closure)  # nothing pending: a plain closure step


def test_no_grads_returns_none():
    model = _model()
    opt = OPTIMIZERS["adamw-fused"](model.parameters())
    assert clip_grad_norm_for_optimizer_(opt, MAX_NORM) is None
    assert id(opt) not in _handoff.PENDING


# --------------------------------------------------------------------------------------------------
# Non-finite policies (no GradScaler)
# --------------------------------------------------------------------------------------------------

BAD = {4: math.inf, 5: math.nan, 11: -math.inf}


@pytest.mark.parametrize("opt_name", ["adamw-fused", "sgd-fused", "adamw-foreach"])
def test_propagate_matches_torch_on_nonfinite_grads(backend, opt_name):
    def gf(model, opt, scaler, i):
        clip_grad_norm_for_optimizer_(opt, MAX_NORM, backend=backend)
        opt.step()

    ref, _, _ = _train(opt_name, torch_clip_step, bad_steps={7: math.inf})
    got, _, _ = _train(opt_name, gf, bad_steps={7: math.inf})
    assert not torch.isfinite(ref[-1]).all()  # torch poisons the parameters; so does gradfuse, alike
    _assert_same(ref, got)


def _ref_skip(model, opt, scaler, i):
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    if torch.isfinite(norm):
        opt.step()


def _ref_zero(model, opt, scaler, i):
    params = list(model.parameters())
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if torch.isfinite(norm):
        torch.nn.utils.clip_grads_with_norm_(params, MAX_NORM, norm)
    else:
        for p in params:
            p.grad.zero_()
    opt.step()


@pytest.mark.parametrize("opt_name", ["adamw-fused", "adam-fused", "sgd-fused"])
def test_skip_skips_the_step_on_the_device(backend, opt_name):
    results = []

    def gf(model, opt, scaler, i):
        results.append(clip_grad_norm_for_optimizer_(opt, MAX_NORM, nonfinite="skip", backend=backend))
        opt.step()

    ref, _, ref_opt = _train(opt_name, _ref_skip, bad_steps=BAD)
    got, _, got_opt = _train(opt_name, gf, bad_steps=BAD)
    _assert_same(ref, got)
    assert torch.isfinite(got[-1]).all()
    assert [float(r.found_inf) for r in results] == [1.0 if i in BAD else 0.0 for i in range(STEPS)]
    for p_ref, p_got in zip(ref_opt.param_groups[0]["params"], got_opt.param_groups[0]["params"]):
        for key, value in ref_opt.state[p_ref].items():  # step counts rolled back, moments untouched
            torch.testing.assert_close(got_opt.state[p_got][key], value, **TOL)


@pytest.mark.parametrize("opt_name", ["adamw-fused", "sgd-fused", "adamw-foreach"])
def test_zero_zeroes_and_steps(backend, opt_name):
    def gf(model, opt, scaler, i):
        r = clip_grad_norm_for_optimizer_(opt, MAX_NORM, nonfinite="zero", backend=backend)
        if i in BAD:
            assert float(r.scale) == 0.0
        opt.step()

    ref, _, _ = _train(opt_name, _ref_zero, bad_steps=BAD)
    got, _, _ = _train(opt_name, gf, bad_steps=BAD)
    _assert_same(ref, got)
    assert torch.isfinite(got[-1]).all()


def test_skip_needs_an_optimizer_that_can_skip():
    model = _model()
    opt = OPTIMIZERS["adamw-foreach"](model.parameters())
    F.mse_loss(model(X[0]), Y[0]).backward()
    with pytest.raises(ValueError, match="nonfinite='skip'"):
        clip_grad_norm_for_optimizer_(opt, MAX_NORM, nonfinite="skip")
    opt = OPTIMIZERS["adamw-fused"](model.parameters())
    with pytest.raises(ValueError, match="nonfinite='skip'"):
        clip_grad_norm_for_optimizer_(opt, MAX_NORM, nonfinite="skip", handoff=False)


@pytest.mark.parametrize("opt_name", ["adamw-foreach", "adamw-fused"])
def test_optimizer_clipper_skip(backend, opt_name):
    """OptimizerClipper handles skip for any optimizer (a host read in step() where it must)."""
    clippers = {}

    def gf(model, opt, scaler, i):
        c = clippers.setdefault(id(opt), OptimizerClipper(opt, MAX_NORM, nonfinite="skip", backend=backend))
        syncs = SyncCounter()
        with syncs:
            c.clip()
        assert syncs.count == 0
        with syncs:
            c.step()
        if opt_name == "adamw-fused":  # skipped on the device; the other reads found_inf once
            assert syncs.count == 0

    ref, _, _ = _train(opt_name, _ref_skip, bad_steps=BAD)
    got, _, _ = _train(opt_name, gf, bad_steps=BAD)
    _assert_same(ref, got)
    (clipper,) = clippers.values()
    counts = clipper.counter.as_dict()
    assert counts["steps"] == STEPS and counts["nonfinite_steps"] == len(BAD)
    assert counts["consecutive_nonfinite"] == 0


def test_error_raises_once_before_touching_anything(backend):
    model = _model()
    opt = OPTIMIZERS["adamw-fused"](model.parameters())
    F.mse_loss(model(X[0]), Y[0]).backward()
    _poison(model, math.nan)
    before = [p.grad.clone() for p in model.parameters()]
    counter = SyncCounter()
    with counter, pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_for_optimizer_(opt, MAX_NORM, nonfinite="error", backend=backend)
    assert counter.count == 1  # the one documented sync
    for p, g in zip(model.parameters(), before):
        torch.testing.assert_close(p.grad, g, equal_nan=True)
    assert id(opt) not in _handoff.PENDING and getattr(opt, "grad_scale", None) is None
    # finite gradients: error behaves like propagate, after the same single sync
    opt.zero_grad()
    F.mse_loss(model(X[0]), Y[0]).backward()
    counter = SyncCounter()
    with counter:
        r = clip_grad_norm_for_optimizer_(opt, MAX_NORM, nonfinite="error", backend=backend)
    assert counter.count == 1 and float(r.found_inf) == 0.0


# --------------------------------------------------------------------------------------------------
# Counters
# --------------------------------------------------------------------------------------------------


def test_nonfinite_counter_counts(backend):
    model = _model()
    opt = OPTIMIZERS["adamw-fused"](model.parameters())
    counter = NonFiniteCounter()
    bad = {3: math.inf, 7: math.nan, 8: math.inf, 9: math.nan}
    clipped = 0
    for i in range(12):
        F.mse_loss(model(X[i]), Y[i]).backward()
        if i in bad:
            _poison(model, bad[i])
        r = clip_grad_norm_for_optimizer_(opt, 100.0 if i % 2 else MAX_NORM, nonfinite="skip", backend=backend)
        counter.update(r)
        clipped += int(i not in bad and float(r.clip_coef) < 1)
        opt.step()
        opt.zero_grad()
        if i == 9:
            assert int(counter.consecutive_nonfinite) == 3
    assert counter.as_dict() == {"steps": 12, "nonfinite_steps": 4, "clipped_steps": clipped, "consecutive_nonfinite": 0}
    assert 0 < clipped < 8
    state = counter.state_dict()
    other = NonFiniteCounter()
    other.load_state_dict(state)
    assert other.as_dict() == counter.as_dict()
    counter.reset()
    assert counter.as_dict() == dict.fromkeys(NonFiniteCounter.FIELDS, 0)
    assert NonFiniteCounter().as_dict()["steps"] == 0
    counter.update(None)  # a clip with no gradients counts nothing
    assert int(counter.steps) == 0


# --------------------------------------------------------------------------------------------------
# No host syncs on the default paths
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opt_name, nonfinite",
    [(o, n) for o in ("adamw-fused", "adamw-foreach") for n in ("propagate", "skip", "zero") if (o, n) != ("adamw-foreach", "skip")],
)
def test_no_host_sync(backend, opt_name, nonfinite):
    model = _model()
    opt = OPTIMIZERS[opt_name](model.parameters())
    counter = NonFiniteCounter("cpu")
    for i in range(3):
        F.mse_loss(model(X[i]), Y[i]).backward()
        if i == 1:
            _poison(model, math.inf)
        syncs = SyncCounter()
        with syncs:
            r = clip_grad_norm_for_optimizer_(opt, MAX_NORM, nonfinite=nonfinite, backend=backend)
            counter.update(r)
        assert syncs.count == 0
        opt.step()  # the hooks add no sync either (torch's fused CPU step itself has none)
        opt.zero_grad()


@pytest.mark.parametrize("opt_name", ["adamw-fused", "adamw-foreach"])
def test_no_host_sync_under_grad_scaler(backend, opt_name):
    model = _model()
    opt = OPTIMIZERS[opt_name](model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    clipper = OptimizerClipper(opt, MAX_NORM, scaler=scaler, backend=backend)
    for i in range(3):
        scaler.scale(F.mse_loss(model(X[i]), Y[i])).backward()
        syncs = SyncCounter()
        with syncs:
            clipper.clip()
        assert syncs.count == 0
        clipper.step()
        scaler.update()
        opt.zero_grad()


def test_sync_counter_sees_syncs():
    syncs = SyncCounter()
    with syncs:
        float(torch.ones(()))
        bool(torch.ones(()))
    assert syncs.count >= 2


# --------------------------------------------------------------------------------------------------
# GradScaler: unscale + check + norm + clip in one pass
# --------------------------------------------------------------------------------------------------

SCALER_BAD = {4: math.inf, 9: math.nan, 10: math.inf}


def _scaler():
    return torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)


def _torch_amp_step(model, opt, scaler, i):
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    scaler.step(opt)
    scaler.update()


@pytest.mark.parametrize(
    "opt_name, handoff, nonfinite",
    [
        ("adamw-fused", None, "propagate"),  # handed to the fused step
        ("adamw-fused", False, "propagate"),  # the scale pass before a fused step
        ("sgd-fused", None, "propagate"),
        ("adamw-foreach", None, "propagate"),  # scale pass; GradScaler skips after its .item()
        ("sgd-foreach", None, "propagate"),
        ("adamw-fused", None, "skip"),  # the policies only change the gradients of skipped steps
        ("adamw-fused", None, "zero"),
        ("adamw-fused", False, "zero"),
        ("adamw-foreach", None, "skip"),
        ("adamw-foreach", None, "zero"),
    ],
)
def test_grad_scaler_matches_torch(backend, opt_name, handoff, nonfinite):
    results = []

    def gf(model, opt, scaler, i):
        results.append(unscale_and_clip_(scaler, opt, MAX_NORM, nonfinite=nonfinite, handoff=handoff, backend=backend))
        scaler.step(opt)
        scaler.update()

    ref, ref_scales, _ = _train(opt_name, _torch_amp_step, bad_steps=SCALER_BAD, scaler=_scaler())
    got, got_scales, _ = _train(opt_name, gf, bad_steps=SCALER_BAD, scaler=_scaler())
    _assert_same(ref, got)
    assert got_scales == ref_scales  # skip + backoff + growth, exactly
    assert len(set(ref_scales)) > 2
    assert [float(r.found_inf) for r in results] == [1.0 if i in SCALER_BAD else 0.0 for i in range(STEPS)]
    for i, r in enumerate(results):  # the norm is of the unscaled gradients
        if i not in SCALER_BAD:
            assert float(r.total_norm) < 1e3


@pytest.mark.parametrize("opt_name", ["adamw-fused", "adamw-foreach"])
def test_grad_scaler_via_optimizer_clipper_and_scaler_argument(backend, opt_name):
    clippers = {}

    def via_clipper(model, opt, scaler, i):
        c = clippers.setdefault(id(opt), OptimizerClipper(opt, MAX_NORM, scaler=scaler, backend=backend))
        c.clip()
        c.step()
        scaler.update()

    def via_argument(model, opt, scaler, i):
        clip_grad_norm_for_optimizer_(opt, MAX_NORM, scaler=scaler, backend=backend)
        scaler.step(opt)
        scaler.update()

    ref, ref_scales, _ = _train(opt_name, _torch_amp_step, bad_steps=SCALER_BAD, scaler=_scaler())
    for fn in (via_clipper, via_argument):
        got, got_scales, _ = _train(opt_name, fn, bad_steps=SCALER_BAD, scaler=_scaler())
        _assert_same(ref, got)
        assert got_scales == ref_scales
    (clipper,) = clippers.values()
    assert clipper.counter.as_dict()["nonfinite_steps"] == len(SCALER_BAD)


def test_grad_scaler_state_after_unscale_and_clip(backend):
    model = _model()
    opt = OPTIMIZERS["adamw-fused"](model.parameters())
    scaler = _scaler()
    scaler.scale(F.mse_loss(model(X[0]), Y[0])).backward()
    _poison(model, math.inf)
    unscale_and_clip_(scaler, opt, MAX_NORM, backend=backend)
    from torch.amp.grad_scaler import OptState

    state = scaler._per_optimizer_states[id(opt)]
    assert state["stage"] is OptState.UNSCALED
    (found,) = state["found_inf_per_device"].values()
    assert found.dtype == torch.float32 and found.dim() == 0 and float(found) == 1.0
    with pytest.raises(RuntimeError, match="already been called"):
        unscale_and_clip_(scaler, opt, MAX_NORM)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)
    before = _flat(model)
    scaler.step(opt)  # skipped on the device
    assert torch.equal(_flat(model), before)
    with pytest.raises(RuntimeError, match="after step"):
        unscale_and_clip_(scaler, opt, MAX_NORM)
    scaler.update()
    assert scaler.get_scale() == 2.0**11


def test_grad_scaler_errors():
    model = _model()
    opt = OPTIMIZERS["adamw-foreach"](model.parameters())
    scaler = torch.amp.GradScaler("cpu")
    F.mse_loss(model(X[0]), Y[0]).backward()
    with pytest.raises(AssertionError, match="scaler.scale"):
        unscale_and_clip_(scaler, opt, MAX_NORM)
    scaler.scale(torch.ones(()))
    half = torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))
    half.grad = torch.ones(3, dtype=torch.float16)
    with pytest.raises(ValueError, match="FP16"):
        unscale_and_clip_(scaler, torch.optim.SGD([half], lr=0.1), MAX_NORM)

    class Sharded(torch.amp.GradScaler):
        def unscale_(self, optimizer):
            return super().unscale_(optimizer)

    with pytest.raises(TypeError, match="overrides GradScaler.unscale_"):
        unscale_and_clip_(Sharded("cpu"), opt, MAX_NORM)
    with pytest.raises(TypeError, match="GradScaler"):
        unscale_and_clip_(object(), opt, MAX_NORM)


@pytest.mark.parametrize("opt_name", ["adamw-fused", "adamw-foreach"])
def test_disabled_grad_scaler_is_plain_clipping(backend, opt_name):
    def gf(model, opt, scaler, i):
        unscale_and_clip_(scaler, opt, MAX_NORM, backend=backend)
        scaler.step(opt)  # a disabled scaler just calls opt.step(); the hooks clean up
        scaler.update()

    ref, _, _ = _train(opt_name, torch_clip_step)
    got, _, _ = _train(opt_name, gf, scaler=torch.amp.GradScaler("cpu", enabled=False))
    _assert_same(ref, got)


def test_clip_without_scaler_then_scaler_step_refuses():
    """clip_grad_norm_for_optimizer_ without scaler= clips scaled grads; GradScaler.step (READY)
    would then unscale on top: the pre-step hook refuses instead of stepping wrongly."""
    model = _model()
    opt = OPTIMIZERS["adamw-fused"](model.parameters())
    scaler = _scaler()
    scaler.scale(F.mse_loss(model(X[0]), Y[0])).backward()
    clip_grad_norm_for_optimizer_(opt, MAX_NORM)
    before = _flat(model)
    with pytest.raises(RuntimeError, match="unscale_and_clip_"):
        scaler.step(opt)
    assert torch.equal(_flat(model), before)
    for name in ("grad_scale", "found_inf"):
        if hasattr(opt, name):
            delattr(opt, name)


def test_user_steps_directly_after_unscale_and_clip(backend):
    """Bypassing scaler.step (opt.step() after unscale_and_clip_): the clip still applies once."""

    def ref(model, opt, scaler, i):
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        scaler.update()

    def gf(model, opt, scaler, i):
        unscale_and_clip_(scaler, opt, MAX_NORM, backend=backend)
        opt.step()
        scaler.update()

    a, sa, _ = _train("adamw-fused", ref, scaler=_scaler(), steps=6)
    b, sb, _ = _train("adamw-fused", gf, scaler=_scaler(), steps=6)
    _assert_same(a, b)
    assert sa == sb


# --------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------


def _compile_config():
    return torch._dynamo.config.patch(trace_autograd_ops=True)


def test_compile_fullgraph_training_step(backend):
    """forward, backward, gradfuse clip, counters and the optimizer update in one fullgraph=True
    graph (torch's Optimizer.step always graph-breaks, so the update is torch's functional AdamW)."""
    from torch.optim.adamw import adamw

    def run(compiled):
        torch._dynamo.reset()
        model = _model()
        params = list(model.parameters())
        exp_avgs = [torch.zeros_like(p) for p in params]
        exp_avg_sqs = [torch.zeros_like(p) for p in params]
        steps = [torch.zeros((), dtype=torch.float32) for _ in params]
        counter = NonFiniteCounter("cpu")

        def step(x, y, poison):
            loss = F.mse_loss(model(x), y) * poison
            loss.backward()
            r = gradfuse.clip_grads(params, MAX_NORM, nonfinite="zero", backend=backend)
            counter.update(r)
            with torch.no_grad():
                adamw(
                    params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], steps, foreach=False,
                    capturable=False, amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-2, weight_decay=0.1,
                    eps=1e-8, maximize=False, differentiable=False, has_complex=False,
                )  # fmt: skip
            for p in params:
                p.grad = None
            return loss.detach(), r.total_norm

        fn = torch.compile(step, fullgraph=True) if compiled else step
        out = []
        for i in range(5):
            poison = torch.tensor(math.inf if i == 2 else 1.0)
            loss, norm = fn(X[i], Y[i], poison)
            out.append((_flat(model), norm))
        return out, counter.as_dict()

    with _compile_config():
        eager, eager_counts = run(False)
        compiled, compiled_counts = run(True)
    for (pa, na), (pb, nb) in zip(eager, compiled):
        torch.testing.assert_close(pb, pa, **TOL)
        torch.testing.assert_close(nb, na, **TOL)
    assert eager_counts == compiled_counts == {"steps": 5, "nonfinite_steps": 1, "clipped_steps": 4, "consecutive_nonfinite": 0}


@pytest.mark.parametrize("mode", ["handoff", "grad_scaler"])
def test_compile_fullgraph_clip_for_optimizer(backend, mode):
    """clip_grad_norm_for_optimizer_ / unscale_and_clip_ inside a fullgraph=True region, the fused
    step (compile-disabled in torch) and GradScaler (on compile's skip list) outside it."""

    def run(compiled):
        torch._dynamo.reset()
        model = _model()
        opt = OPTIMIZERS["adamw-fused"](model.parameters())
        scaler = _scaler() if mode == "grad_scaler" else None
        if scaler is not None:
            scaler.scale(torch.ones(()))  # creates the scale tensor outside the compiled region
        counter = NonFiniteCounter("cpu")

        def fwd_bwd_clip(x, y, poison):
            loss = F.mse_loss(model(x), y) * poison
            if scaler is not None:
                (loss * scaler._scale).backward()
                r = unscale_and_clip_(scaler, opt, MAX_NORM, backend=backend)
            else:
                loss.backward()
                r = clip_grad_norm_for_optimizer_(opt, MAX_NORM, nonfinite="skip", backend=backend)
            counter.update(r)
            return loss.detach()

        fn = torch.compile(fwd_bwd_clip, fullgraph=True) if compiled else fwd_bwd_clip
        traj, scales = [], []
        for i in range(6):
            fn(X[i], Y[i], torch.tensor(math.inf if i == 3 else 1.0))
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
                scales.append(scaler.get_scale())
            else:
                opt.step()
            opt.zero_grad()
            traj.append(_flat(model))
        return traj, scales, counter.as_dict()

    with _compile_config():
        a, sa, ca = run(False)
        b, sb, cb = run(True)
    _assert_same(a, b)
    assert sa == sb and ca == cb and ca["nonfinite_steps"] == 1


def test_compiled_optimizer_step_takes_the_scale(backend):
    def run(compiled):
        torch._dynamo.reset()
        model = _model()
        opt = OPTIMIZERS["adamw-fused"](model.parameters())
        step = torch.compile(opt.step) if compiled else opt.step
        for i in range(4):
            F.mse_loss(model(X[i]), Y[i]).backward()
            clip_grad_norm_for_optimizer_(opt, MAX_NORM, backend=backend)
            step()
            opt.zero_grad()
        return [_flat(model)]

    ref, _, _ = _train("adamw-fused", torch_clip_step, steps=4)
    _assert_same(ref[-1:], run(True))


def test_global_hooks_add_no_graph_break_to_compiled_steps():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), foreach=True)
    F.mse_loss(model(X[0]), Y[0]).backward()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(opt.step)()
    assert explained.graph_break_count == 0


# --------------------------------------------------------------------------------------------------
# GPU: CUDA graphs and GradScaler on CUDA
# --------------------------------------------------------------------------------------------------


def _gpu_backends():
    return [b for b in gradfuse.available_backends("cuda")] if torch.cuda.is_available() else ["torch"]


@pytest.mark.gpu
@pytest.mark.parametrize("opt_kind", ["fused", "capturable"])
def test_cuda_graph_captures_the_training_step(opt_kind):
    """Forward, backward, clip handed to (or scaled for) the optimizer, and its step, captured in one
    CUDA graph and replayed: the same trajectory as torch's clip run eagerly, no host sync."""
    for backend in _gpu_backends():
        device = "cuda"
        model = _model(device)
        ref_model = copy.deepcopy(model)
        kind = dict(fused=True) if opt_kind == "fused" else dict(foreach=True)

        def make(ps):
            return torch.optim.AdamW(ps, lr=torch.tensor(1e-2, device=device), weight_decay=0.1, capturable=True, **kind)

        opt, ref_opt = make(model.parameters()), make(ref_model.parameters())
        x, y = X[0].to(device).clone(), Y[0].to(device).clone()

        def step():
            opt.zero_grad(set_to_none=False)
            F.mse_loss(model(x), y).backward()
            clip_grad_norm_for_optimizer_(opt, MAX_NORM, backend=backend)
            opt.step()

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: optimizer state, plans; 3 real steps on X[0]
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        syncs = SyncCounter()
        with torch.cuda.graph(graph), syncs:  # recorded, not run
            step()
        assert syncs.count == 0
        for i in range(4, 8):
            x.copy_(X[i].to(device))
            y.copy_(Y[i].to(device))
            graph.replay()

        for i in [0, 0, 0, 4, 5, 6, 7]:
            ref_opt.zero_grad(set_to_none=False)
            F.mse_loss(ref_model(X[i].to(device)), Y[i].to(device)).backward()
            torch.nn.utils.clip_grad_norm_(ref_model.parameters(), MAX_NORM)
            ref_opt.step()
        torch.cuda.synchronize()
        torch.testing.assert_close(_flat(model), _flat(ref_model), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("opt_name", ["adamw-fused", "adamw-foreach"])
def test_grad_scaler_on_cuda_matches_torch(opt_name):
    for backend in _gpu_backends():

        def gf(model, opt, scaler, i):
            unscale_and_clip_(scaler, opt, MAX_NORM, backend=backend)
            scaler.step(opt)
            scaler.update()

        ref, ref_scales, _ = _train(opt_name, _torch_amp_step, bad_steps=SCALER_BAD, device="cuda",
                                    scaler=torch.amp.GradScaler("cuda", init_scale=2.0**12, growth_interval=3))  # fmt: skip
        got, got_scales, _ = _train(opt_name, gf, bad_steps=SCALER_BAD, device="cuda",
                                    scaler=torch.amp.GradScaler("cuda", init_scale=2.0**12, growth_interval=3))  # fmt: skip
        for a, b in zip(ref, got):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, equal_nan=True)
        assert got_scales == ref_scales
