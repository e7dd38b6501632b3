"""gradfuse.Clipper: one object per training loop. Skips (non-finite, spike) really skip with every
optimizer; trajectories against torch; counters; no host sync; thresholds; GradScaler; compile."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import CPU_BACKENDS, interpreted
from test_training import SyncCounter

import gradfuse

STEPS = 30
SPIKE_AT = 20
MAX_NORM = 1.0
TOL = dict(rtol=1e-5, atol=1e-6)

_gen = torch.Generator().manual_seed(7)
X = torch.randn(STEPS, 16, 6, generator=_gen)
Y = torch.randn(STEPS, 16, 1, generator=_gen)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 24), torch.nn.Tanh(), torch.nn.Linear(24, 1))


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, foreach=False),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, foreach=True),
    "adam-foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
}


def cases(names, interpreted_too):
    """(backend, name) params: every backend with every name, the Triton interpreter (about 0.1 s a
    launch) only with the names in ``interpreted_too``."""
    return [
        pytest.param(b.values[0], n, id=f"{b.id}-{n}", marks=b.marks)
        for b in CPU_BACKENDS for n in names if not interpreted(b.values[0]) or n in interpreted_too
    ]  # fmt: skip


def _loss(model, i, spikes=()):
    """The batch's loss; at the steps in ``spikes`` the targets are corrupted (a loss/norm spike)."""
    y = Y[i] * (300.0 if i in spikes else 1.0)
    return F.mse_loss(model(X[i]), y)


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _torch_run(opt_name, skip_steps):
    """The reference: torch's clip and step, the optimizer step left out at ``skip_steps``."""
    model = _model()
    opt = OPTIMIZERS[opt_name](model.parameters())
    traj = []
    for i in range(STEPS):
        _loss(model, i, spikes={SPIKE_AT}).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        if i not in skip_steps:
            opt.step()
        opt.zero_grad()
        traj.append(_flat(model))
    return traj


MODES = {"global": dict(), "layerwise": dict(layerwise=True), "agc": dict(max_norm=None, agc=gradfuse.AGC(0.02))}


def _spike_rule():
    return gradfuse.SpikeRule(sigma=6.0, window=16, warmup=8)


@pytest.mark.parametrize("backend, opt_name", cases(list(OPTIMIZERS), ["sgd-momentum", "adamw-fused"]))
def test_injected_spike_is_skipped_exactly_there(backend, opt_name):
    """The acceptance run: a spike at one step is skipped (parameters bitwise unchanged by it), every
    other step is torch's clip + step, the counters say so, and the loop never syncs the host
    (except the one read of the skip flag for an optimizer that cannot skip on the device)."""
    model = _model()
    opt = OPTIMIZERS[opt_name](model.parameters())
    clipper = gradfuse.Clipper(model, opt, MAX_NORM, spike=_spike_rule(), backend=backend)
    fused = opt_name.endswith("fused")
    traj = []
    for i in range(STEPS):
        loss = _loss(model, i, spikes={SPIKE_AT})
        loss.backward()
        before = _flat(model)
        syncs = SyncCounter()
        with syncs:
            clipper.clip(loss)
        assert syncs.count == 0
        with syncs:
            clipper.optimizer_step()
        if fused:
            assert syncs.count == 0
        after = _flat(model)
        assert torch.equal(after, before) == (i == SPIKE_AT), f"step {i}"
        opt.zero_grad()
        traj.append(after)
    ref = _torch_run(opt_name, skip_steps={SPIKE_AT})
    for i, (a, b) in enumerate(zip(traj, ref)):
        torch.testing.assert_close(a, b, **TOL, msg=lambda m, i=i: f"step {i}: {m}")
    counts = clipper.stats()
    assert counts["steps"] == STEPS and counts["spike_steps"] == 1 and counts["skipped_steps"] == 1
    assert counts["nonfinite_steps"] == 0 and counts["consecutive_bad"] == 0
    if not opt_name.startswith("sgd"):  # torch's momentum-free state: nothing else to compare
        assert all(int(opt.state[p]["step"]) == STEPS - 1 for p in model.parameters())  # the skipped step did not count


@pytest.mark.parametrize("backend, opt_name", cases(["sgd", "sgd-momentum", "adamw-foreach", "adamw-fused"], ["sgd", "adamw-fused"]))
def test_nonfinite_step_is_skipped_with_every_optimizer(backend, opt_name):
    model = _model()
    opt = OPTIMIZERS[opt_name](model.parameters())
    state_before = None
    clipper = gradfuse.Clipper(model, opt, MAX_NORM, backend=backend)  # nonfinite="skip" is the default
    for i in range(6):
        _loss(model, i).backward()
        if i == 4:
            model[0].weight.grad[0, 0] = math.nan
            before, state_before = _flat(model), copy.deepcopy(opt.state_dict()["state"])
        clipper.step()
        if i == 4:
            assert torch.equal(_flat(model), before)
            for k, st in opt.state_dict()["state"].items():
                for key, val in st.items():
                    if isinstance(val, torch.Tensor):
                        assert torch.equal(val, state_before[k][key]), (k, key)
        opt.zero_grad()
    assert torch.isfinite(_flat(model)).all()
    assert clipper.stats()["skipped_steps"] == 1 == clipper.stats()["nonfinite_steps"]


@pytest.mark.parametrize("backend, opt_name", cases(["adamw-fused", "adamw-foreach"], ["adamw-fused"]))
def test_grad_scaler_skips_a_spike_without_backing_the_scale_off(backend, opt_name):
    def run(spike_rule):
        model = _model()
        opt = OPTIMIZERS[opt_name](model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=5)
        clipper = gradfuse.Clipper(model, opt, MAX_NORM, spike=spike_rule, scaler=scaler, backend=backend)
        traj, scales = [], []
        for i in range(STEPS):
            loss = _loss(model, i, spikes={SPIKE_AT})
            scaler.scale(loss).backward()
            if i == 25:
                model[0].weight.grad[0, 0] = math.inf  # an overflow: skipped and backed off
            clipper.step(loss)
            scaler.update()
            opt.zero_grad()
            traj.append(_flat(model))
            scales.append(scaler.get_scale())
        return traj, scales, clipper.stats()

    traj, scales, counts = run(_spike_rule())
    assert torch.equal(traj[SPIKE_AT], traj[SPIKE_AT - 1]) and torch.equal(traj[25], traj[24])
    assert scales[SPIKE_AT] >= scales[SPIKE_AT - 1]  # a spike is not an overflow
    assert scales[25] == scales[24] / 2
    assert (counts["spike_steps"], counts["nonfinite_steps"], counts["skipped_steps"]) == (1, 1, 2)
    _, plain_scales, _ = run(None)
    assert plain_scales == scales  # the scaler's schedule is that of a run without the rule


def test_adaptive_threshold_objects_work_with_every_mode(backend):
    """The issue's case: a threshold object and safe skipping together (OptimizerClipper refused)."""
    for kwargs in (dict(), dict(layerwise=True), dict(layerwise="module")):
        model = _model()
        opt = OPTIMIZERS["adamw-fused"](model.parameters())
        threshold = gradfuse.ZScoreThreshold(max_norm=5.0, warmup_steps=5, z_thresh=1.0)
        clipper = gradfuse.Clipper(model, opt, threshold, nonfinite="skip", backend=backend, **kwargs)
        for i in range(12):
            _loss(model, i).backward()
            clipper.step()
            opt.zero_grad()
        bound = threshold.threshold(torch.device("cpu"))
        assert bound.shape == (() if not kwargs else (4,) if kwargs["layerwise"] is True else (2,))
        assert float(bound.max()) < 5.0 and clipper.stats()["clipped_steps"] > 0


def test_layerwise_and_agc_clipper_match_the_functions(backend):
    for kwargs, fn in (
        (dict(layerwise=True), lambda m: gradfuse.clip_grad_norm_per_tensor_(m, 0.3, backend=backend)),
        (dict(max_norm=None, agc=gradfuse.AGC(0.02, exclude="2.*")), lambda m: gradfuse.adaptive_clip_grad_(m, 0.02, exclude="2.*", backend=backend)),
    ):  # fmt: skip
        a, b = _model(), _model()
        opt_a, opt_b = OPTIMIZERS["sgd"](a.parameters()), OPTIMIZERS["sgd"](b.parameters())
        clipper = gradfuse.Clipper(a, opt_a, **({"max_norm": 0.3} | kwargs), backend=backend)
        for i in range(5):
            _loss(a, i).backward()
            _loss(b, i).backward()
            r = clipper.step()
            fn(b)
            opt_b.step()
            assert r.tensor_norms.shape == (4,)  # one row per gradient, AGC's units folded
            for m, o in ((a, opt_a), (b, opt_b)):
                o.zero_grad()
        assert torch.equal(_flat(a), _flat(b))


@pytest.mark.parametrize("backend, mode", cases(["layerwise", "agc"], []))
def test_grad_scaler_unscales_in_the_same_pass_for_layerwise_and_agc(backend, mode):
    """Under a GradScaler the factors include 1/scale: the same as scaler.unscale_ then the function."""
    fn = {"layerwise": lambda m: gradfuse.clip_grad_norm_per_tensor_(m, 0.3, backend=backend),
          "agc": lambda m: gradfuse.adaptive_clip_grad_(m, 0.02, backend=backend)}[mode]  # fmt: skip
    a, b = _model(), _model()
    opt_a, opt_b = OPTIMIZERS["adamw-foreach"](a.parameters()), OPTIMIZERS["adamw-foreach"](b.parameters())
    sa, sb = (torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2))
    clipper = gradfuse.Clipper(a, opt_a, **({"max_norm": 0.3} | MODES[mode]), scaler=sa, backend=backend)
    for i in range(4):
        sa.scale(_loss(a, i)).backward()
        sb.scale(_loss(b, i)).backward()
        clipper.step()
        sb.unscale_(opt_b)
        fn(b)
        sb.step(opt_b)
        for s_, o in ((sa, opt_a), (sb, opt_b)):
            s_.update()
            o.zero_grad()
    torch.testing.assert_close(_flat(a), _flat(b), **TOL)


def test_bad_arguments_name_the_problem():
    model = _model()
    opt = OPTIMIZERS["sgd"](model.parameters())
    other = torch.nn.Linear(2, 2)
    cases = [
        (dict(parameters=other), ValueError, "optimizer parameter 0 is not among `parameters`"),
        (dict(agc=gradfuse.AGC()), ValueError, "pass max_norm=None"),
        (dict(max_norm=None, agc=0.01), TypeError, "agc must be a gradfuse.AGC"),
        (dict(spike=6.0), TypeError, "spike must be a gradfuse.SpikeRule"),
        (dict(max_bad_steps=0), ValueError, "max_bad_steps must be an integer >= 1"),
        (dict(rollback=gradfuse.Rollback()), ValueError, "rollback= needs"),
        (dict(layerwise=3), TypeError, "group_by must be"),
        (dict(layerwise=None), TypeError, "layerwise must be False, True, 'module' or a callable"),
        (dict(nonfinite="ignore"), ValueError, "nonfinite"),
        (dict(max_norm=-1.0), ValueError, "max_norm must be >= 0"),
        (dict(spike=_spike_rule(), history=gradfuse.NormHistory(4)), ValueError, "fewer than the spike rule's window"),
    ]
    for kwargs, error, match in cases:
        kwargs = {"parameters": model} | kwargs
        with pytest.raises(error, match=match):
            gradfuse.Clipper(kwargs.pop("parameters"), opt, **kwargs)
    for bad, match in [(dict(sigma=0), "sigma"), (dict(window=1), "window"), (dict(window=8, warmup=9), "warmup")]:
        with pytest.raises(ValueError, match=f"SpikeRule: {match}"):
            gradfuse.SpikeRule(**bad)
    with pytest.raises(ValueError, match="Rollback: keep"):
        gradfuse.Rollback(keep=0)


def test_no_gradients_steps_the_optimizer_and_returns_none(backend):
    model = _model()
    opt = OPTIMIZERS["sgd"](model.parameters())
    clipper = gradfuse.Clipper(model, opt, MAX_NORM, spike=_spike_rule(), backend=backend)
    assert clipper.step() is None
    assert clipper.stats()["steps"] == 0


@pytest.mark.parametrize("backend, mode", cases(list(MODES), ["global"]))
def test_compiled_clip_has_no_graph_breaks_and_matches_eager(backend, mode):
    """forward, backward and Clipper.clip (threshold, policy, spike rule, counters, hand-off) in one
    fullgraph=True graph; the fused step outside it (torch's step hooks are compile-disabled)."""

    def run(compiled):
        torch._dynamo.reset()
        model = _model()
        opt = OPTIMIZERS["adamw-fused"](model.parameters())
        clipper = gradfuse.Clipper(model, opt, **({"max_norm": MAX_NORM} | MODES[mode]), spike=_spike_rule(), backend=backend)

        def fwd_bwd_clip(x, y):
            loss = F.mse_loss(model(x), y)
            loss.backward()
            clipper.clip(loss)
            return loss.detach()

        fn = torch.compile(fwd_bwd_clip, fullgraph=True, backend="aot_eager") if compiled else fwd_bwd_clip
        traj = []
        for i in range(STEPS):
            fn(X[i], Y[i] * (300.0 if i == SPIKE_AT else 1.0))
            clipper.optimizer_step()
            opt.zero_grad()
            traj.append(_flat(model))
        return traj, clipper.stats()

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        eager, eager_counts = run(False)
        compiled, compiled_counts = run(True)
    assert eager_counts == compiled_counts and eager_counts["spike_steps"] == 1
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, **TOL)
    assert torch.equal(compiled[SPIKE_AT], compiled[SPIKE_AT - 1])


@pytest.mark.gpu
def test_cuda_spike_skip_and_rollback_make_no_host_sync():
    """On CUDA with a fused AdamW: the spike is skipped on the device, the counters and snapshots
    cost no sync (torch's sync debug mode set to error around every clipper call)."""
    for backend in gradfuse.available_backends("cuda"):
        model = _model().cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        clipper = gradfuse.Clipper(model, opt, MAX_NORM, spike=_spike_rule(), max_bad_steps=8,
                                   rollback=gradfuse.Rollback(every=5), backend=backend)  # fmt: skip
        traj = []
        for i in range(STEPS):
            y = (Y[i] * (300.0 if i == SPIKE_AT else 1.0)).cuda()
            loss = F.mse_loss(model(X[i].cuda()), y)
            loss.backward()
            torch.cuda.set_sync_debug_mode("error")
            try:
                clipper.step(loss)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            opt.zero_grad()
            traj.append(_flat(model))
        assert torch.equal(traj[SPIKE_AT], traj[SPIKE_AT - 1]) and not torch.equal(traj[SPIKE_AT + 1], traj[SPIKE_AT])
        counts = clipper.stats()
        assert (counts["spike_steps"], counts["skipped_steps"], counts["rollbacks"]) == (1, 1, 0), backend
