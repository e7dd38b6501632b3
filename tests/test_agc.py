"""Adaptive gradient clipping (gradfuse.adaptive_clip_grad_) against timm's function written out,
in fp64; rows that need no clipping bitwise untouched; exclusions, policies, compile."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import FUSED_CPU_BACKENDS, HALF_ULP, assert_unchanged, bits, snapshot, subnormal_step

import gradfuse
from benchmarks.taming import timm_adaptive_clip_grad


class Net(torch.nn.Module):
    """Conv (4-d weights), linear, norm (1-d), an embedding and a head: every kind of unit."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(30, 8)
        self.conv = torch.nn.Conv2d(3, 6, 3)
        self.norm = torch.nn.LayerNorm(8)
        self.fc = torch.nn.Linear(8, 16)
        self.head = torch.nn.Linear(16, 4)


def _net(dtype, seed=0):
    """Gradients whose unit norms straddle the bounds: some rows clip, some do not."""
    torch.manual_seed(seed)
    net = Net().to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    for p in net.parameters():
        rows = p.shape[0] if p.dim() > 1 else 1
        spread = torch.logspace(-4, -1, rows, dtype=torch.float64).reshape(-1, *[1] * (p.dim() - 1)) if p.dim() > 1 else 0.02
        p.grad = (torch.randn(p.shape, generator=g, dtype=torch.float64) * spread).to(dtype)
    return net


def _reference(net, exclude=(), **kw):
    """timm on fp64 copies of the weights and gradients (the excluded parameters left out)."""
    out = []
    for name, p in net.named_parameters():
        q = torch.nn.Parameter(p.detach().double().clone())
        q.grad = p.grad.double().clone()
        if not any(name.startswith(x.rstrip("*")) for x in exclude):
            timm_adaptive_clip_grad([q], **kw)
        out.append(q.grad)
    return out


TOL = {torch.float32: 2**-21, torch.float16: 4 * HALF_ULP[torch.float16], torch.bfloat16: 4 * HALF_ULP[torch.bfloat16], torch.float64: 2**-22}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("clip_factor, exclude", [(0.01, ()), (0.05, ("head.*",))])
def test_matches_timm_in_fp64_and_leaves_unclipped_rows_bitwise(backend, dtype, clip_factor, exclude):
    net = _net(dtype)
    before = [p.grad.clone() for p in net.parameters()]
    want = _reference(net, exclude, clip_factor=clip_factor)
    r = gradfuse.adaptive_clip_grad_(net.named_parameters(), clip_factor, exclude=exclude, backend=backend)
    clipped_rows = untouched_rows = 0
    for (name, p), b, w in zip(net.named_parameters(), before, want):
        got = p.grad
        rows = zip(got, b, w) if p.dim() > 1 else [(got, b, w)]
        for g_row, b_row, w_row in rows:
            if torch.equal(w_row, b_row.double()):  # timm leaves it: so must we, bit for bit
                assert bits(g_row).equal(bits(b_row)), name
                untouched_rows += 1
            else:
                atol = subnormal_step(dtype)
                torch.testing.assert_close(g_row.double(), w_row, rtol=TOL[dtype], atol=atol, msg=lambda m, name=name: f"{name}: {m}")
                clipped_rows += 1
    assert clipped_rows > 5 and untouched_rows > 5
    if exclude:
        assert bits(net.head.weight.grad).equal(bits(before[-2]))
    entries = [1 if p.dim() <= 1 or (exclude and name.startswith("head.")) else p.shape[0] for name, p in net.named_parameters()]
    assert r.tensor_scales.numel() == sum(entries)  # one per unit, an excluded gradient is one entry
    total = math.sqrt(sum(float(b.double().square().sum()) for b in before))
    assert float(r.total_norm) == pytest.approx(total, rel=1e-5) and float(r.clip_coef) < 1.0


def test_folds_to_one_row_per_gradient(backend):
    from gradfuse.agc import per_gradient, select

    net = _net(torch.float32)
    before = [p.grad.clone() for p in net.parameters()]
    u = select(list(net.named_parameters()), ())
    r = gradfuse.adaptive_clip_grad_(net, 0.01, backend=backend)
    folded = per_gradient(r, u.grad_rows)
    want = torch.tensor([float(b.double().norm()) for b in before])
    torch.testing.assert_close(folded.tensor_norms.double(), want.double(), rtol=1e-5, atol=0)
    assert folded.tensor_scales.shape == (len(before),) and float(folded.tensor_scales.min()) == pytest.approx(float(r.tensor_scales.min()))


@pytest.mark.parametrize("nonfinite", ["skip", "zero", "error", "propagate"])
def test_nonfinite_policies(backend, nonfinite):
    net = _net(torch.float32)
    net.fc.weight.grad[2, 3] = math.inf
    grads = [p.grad for p in net.parameters()]
    snap = snapshot(grads)
    if nonfinite == "error":
        with pytest.raises(RuntimeError, match="NaN or Inf"):
            gradfuse.adaptive_clip_grad_(net, nonfinite="error", backend=backend)
        assert_unchanged(grads, snap)
        return
    r = gradfuse.adaptive_clip_grad_(net, nonfinite=nonfinite, backend=backend)
    assert float(r.found_inf) == 1.0
    if nonfinite == "skip":
        assert_unchanged(grads, snap)
    elif nonfinite == "zero":
        assert all(not bool(g.any()) for g in grads)
    else:  # timm's: the Inf row becomes NaN (inf * 0), the other rows are clipped as usual
        assert torch.isnan(net.fc.weight.grad[2]).any() and torch.isfinite(net.fc.weight.grad[3]).all()


def test_bad_arguments_raise_before_touching_anything():
    net = _net(torch.float32)
    grads = [p.grad for p in net.parameters()]
    snap = snapshot(grads)
    for kwargs, error, match in [
        (dict(clip_factor=0.0), ValueError, r"clip_factor must be in \(0, inf\], got 0.0"),
        (dict(clip_factor="0.01"), TypeError, "clip_factor must be a real number, not str"),
        (dict(eps=-1.0), ValueError, r"eps must be in \[0, inf\], got -1.0"),
        (dict(exclude=[3]), TypeError, "exclude must be a name pattern"),
        (dict(nonfinite="ignore"), ValueError, "nonfinite"),
    ]:
        with pytest.raises(error, match=match):
            gradfuse.adaptive_clip_grad_(net, **kwargs)
        assert_unchanged(grads, snap)
    assert gradfuse.adaptive_clip_grad_(net, exclude="*") is None
    assert_unchanged(grads, snap)
    with pytest.raises(ValueError, match="AGC: clip_factor"):
        gradfuse.AGC(clip_factor=-1)


def test_compiled_step_with_agc_has_no_graph_breaks(backend):
    def run(compiled):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        params = list(model.parameters())

        def step(x, y):
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            r = gradfuse.adaptive_clip_grad_(model.named_parameters(), 0.02, exclude="2.*", backend=backend)
            with torch.no_grad():
                torch._foreach_add_(params, [p.grad for p in params], alpha=-0.1)
            for p in params:
                p.grad = None
            return loss.detach(), r.tensor_scales

        fn = torch.compile(step, fullgraph=True, backend="aot_eager") if compiled else step
        g = torch.Generator().manual_seed(1)
        out = [fn(torch.randn(8, 6, generator=g), 10 * torch.randn(8, 2, generator=g)) for _ in range(3)]
        return out, torch.cat([p.detach().reshape(-1) for p in params])

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        eager, eager_params = run(False)
        compiled, compiled_params = run(True)
    for (l1, s1), (l2, s2) in zip(eager, compiled):
        torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s2, s1, rtol=1e-5, atol=1e-6)
    assert float(eager[0][1].min()) < 1.0
    torch.testing.assert_close(compiled_params, eager_params, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
def test_agc_clipper_under_a_grad_scaler_reports_the_unscaled_norms(backend):
    """The per-layer norms a Clipper with AGC hands to its statistics are those of the unscaled
    gradients, as without AGC."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    clipper = gradfuse.Clipper(model, opt, max_norm=None, agc=gradfuse.AGC(0.01), scaler=scaler, backend=backend)
    loss = model(torch.randn(4, 8)).square().sum()
    scaler.scale(loss).backward()
    want = torch.stack([(q.grad.double() / 1024.0).norm() for q in model.parameters()])
    r = clipper.clip(loss)
    torch.testing.assert_close(r.tensor_norms.double(), want, rtol=1e-6, atol=0.0)
