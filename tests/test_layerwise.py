"""Layer-wise clipping (gradfuse.clip_grad_norm_per_tensor_): each gradient, or each group, clipped to
its own bound in one read plus one scale pass; against an fp64 reference; untouched gradients
bitwise unchanged; policies, errors, the custom ops and torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import HALF_ULP, assert_unchanged, bits, params_from, snapshot, small, subnormal_step

import gradfuse
from gradfuse import _abi

#: relative tolerance of a clipped gradient vs the fp64 reference: the factor is fp32 (from an
#: fp32-rounded norm; fp32 for fp64 gradients too, as the contract's tensor_scales), then one rounding to the gradient's dtype.
TOL = {dtype: 4 * HALF_ULP[dtype] + 2**-22 for dtype in (torch.float32, torch.float16, torch.bfloat16)} | {torch.float64: 2**-22}


def _grads(backend, dtype=torch.float32, seed=0):
    """Gradients of mixed sizes and magnitudes: some need clipping at max_norm 1, some do not."""
    g = torch.Generator().manual_seed(seed)
    shapes, scales = [(small(3000, backend),), (40, 30), (7,), (5, 4, 3), (1,)], [0.01, 0.3, 2.0, 0.001, 5.0]
    return [(torch.randn(s, generator=g, dtype=torch.float64) * a).to(dtype) for s, a in zip(shapes, scales)]


def _ref_factors(grads, max_norm, p=2.0, groups=None):
    """fp64: min(1, max_norm / (norm + 1e-6)) per gradient, the norm that of its group."""
    partial = [float(torch.linalg.vector_norm(g.double(), p)) for g in grads]
    groups = groups or list(range(len(grads)))
    norm = {}
    for k, n in zip(groups, partial):
        norm[k] = max(norm.get(k, 0.0), n) if p == math.inf else norm.get(k, 0.0) + n**p
    norm = {k: v if p == math.inf else v ** (1 / p) for k, v in norm.items()}
    return [min(1.0, max_norm / (norm[k] + 1e-6)) for k in groups]


def _assert_clipped(after, before, factors, dtype):
    for i, (a, b, f) in enumerate(zip(after, before, factors)):
        if f == 1.0:
            assert bits(a).equal(bits(b)), f"gradient {i} needs no clipping but changed"
        else:
            atol = subnormal_step(dtype)  # results in the subnormal range round to its spacing
            torch.testing.assert_close(a.double(), b.double() * f, rtol=TOL[dtype], atol=atol, msg=lambda m, i=i: f"gradient {i}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_each_gradient_clipped_to_its_own_bound(backend, dtype, norm_type):
    grads = _grads(backend, dtype)
    before = [g.clone() for g in grads]
    max_norm = 1.0 if norm_type != 1.0 else 10.0
    r = gradfuse.clip_grad_norm_per_tensor_(params_from(grads), max_norm, norm_type, backend=backend)
    want = _ref_factors(before, max_norm, norm_type)
    assert 0 < sum(f < 1 for f in want) < len(want)  # some clipped, some not
    _assert_clipped(grads, before, want, dtype)
    torch.testing.assert_close(r.tensor_scales.double(), torch.tensor(want, dtype=torch.float64), rtol=2**-22, atol=0)
    assert float(r.clip_coef) == pytest.approx(min(want), rel=1e-6)
    for got, b in zip(r.tensor_norms.tolist(), before):
        assert got == pytest.approx(float(torch.linalg.vector_norm(b.double(), norm_type)), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_by_module_uses_each_modules_norm(backend, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3), torch.nn.Linear(3, 3)).to(dtype)
    for i, p in enumerate(model.parameters()):
        p.grad = (torch.randn(p.shape, dtype=torch.float64) * [0.02, 0.02, 1.0, 1.0, 0.01, 0.01][i]).to(dtype)
    before = [p.grad.clone() for p in model.parameters()]
    r = gradfuse.clip_grad_norm_per_tensor_(model.named_parameters(), 0.5, group_by="module", backend=backend)
    want = _ref_factors(before, 0.5, groups=[0, 0, 2, 2, 3, 3])
    assert want[0] == 1.0 and want[2] < 1.0 and want[4] == 1.0
    _assert_clipped([p.grad for p in model.parameters()], before, want, dtype)
    assert r.tensor_scales.tolist()[0] == r.tensor_scales.tolist()[1] == 1.0


def test_group_by_callable_and_groups_of_one_give_the_kernels_factors(backend):
    """Factors from tensor_partials on the device equal the kernels' finalize, bit for bit."""
    grads = _grads(backend)
    by_kernel = gradfuse.clip_grad_norm_per_tensor_(params_from([g.clone() for g in grads]), 1.0, backend=backend)
    params = params_from([g.clone() for g in grads])
    by_group = gradfuse.clip_grad_norm_per_tensor_(params, 1.0, group_by=lambda name: name, backend=backend)
    assert bits(by_group.tensor_scales).equal(bits(by_kernel.tensor_scales))
    one = gradfuse.clip_grad_norm_per_tensor_(params_from([g.clone() for g in grads]), 1.0, group_by=lambda name: 0, backend=backend)
    total = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    assert one.tensor_scales.tolist() == [pytest.approx(1.0 / (total + 1e-6), rel=1e-6)] * len(grads)  # one group: the global clip


@pytest.mark.parametrize("nonfinite", ["skip", "zero", "propagate", "error"])
def test_nonfinite_policies(backend, nonfinite):
    for group_by in (None, "module"):
        grads = _grads(backend)
        grads[1][3, 4] = math.nan
        snap = snapshot(grads)
        params = params_from(grads)
        if nonfinite == "error":
            with pytest.raises(RuntimeError, match="non-finite"):
                gradfuse.clip_grad_norm_per_tensor_(params, 1.0, group_by=group_by, nonfinite="error", backend=backend)
            assert_unchanged(grads, snap)
            continue
        r = gradfuse.clip_grad_norm_per_tensor_(params, 1.0, group_by=group_by, nonfinite=nonfinite, backend=backend)
        assert float(r.found_inf) == 1.0
        if nonfinite == "skip":
            assert_unchanged(grads, snap)
        elif nonfinite == "zero":
            assert all(not bool(g.any()) for g in grads)
        elif group_by is None:  # torch's behaviour: the NaN gradient's factor is NaN, the others are clipped by their own
            assert torch.isnan(grads[1]).all() and torch.isfinite(grads[0]).all()


def test_bad_arguments_raise_before_touching_anything():
    grads = _grads("torch")
    snap = snapshot(grads)
    params = params_from(grads)
    for kwargs, error, match in [
        (dict(max_norm=-1.0), ValueError, "max_norm must be >= 0"),
        (dict(max_norm=1.0, group_by=3), TypeError, "group_by must be None, 'module' or a callable"),
        (dict(max_norm=1.0, nonfinite="ignore"), ValueError, "nonfinite"),
        (dict(max_norm=1.0, norm_type="two"), ValueError, "norm_type"),
    ]:
        with pytest.raises(error, match=match):
            gradfuse.clip_grad_norm_per_tensor_(params, **kwargs)
        assert_unchanged(grads, snap)
    with pytest.raises(TypeError, match=r"clip_grad_norm_per_tensor_: parameters\[0\] is of type int"):
        gradfuse.clip_grad_norm_per_tensor_([1], 1.0)
    assert gradfuse.clip_grad_norm_per_tensor_([torch.nn.Parameter(torch.ones(2))], 1.0) is None


@pytest.mark.parametrize("variant", ["per_tensor", "rows"])
def test_opcheck_clip_and_scale_with_per_tensor_and_rows(backend, variant):
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(5, 3, generator=g), torch.randn(4, generator=g).half(), torch.randn(2, 7, generator=g).bfloat16()]
    rows = [5, 1, 2] if variant == "rows" else None
    entries = 8 if rows else 3
    torch.library.opcheck(torch.ops.gradfuse.clip_.default, (grads, 0.5, None, 2.0, True, _abi.POLICY_PROPAGATE, None, backend, True, rows))
    factors = torch.linspace(0.25, 1.0, entries)
    torch.library.opcheck(torch.ops.gradfuse.scale_.default, (grads, factors, False, backend, True, rows))


@pytest.mark.parametrize("group_by", [None, "module"])
def test_compiled_training_step_clips_layerwise_without_graph_breaks(backend, group_by):
    """forward, backward, layer-wise clip and an SGD update in one fullgraph=True graph, as eager."""

    def run(compiled):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        params = list(model.parameters())

        def step(x, y):
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            r = gradfuse.clip_grad_norm_per_tensor_(model.named_parameters(), 0.05, group_by=group_by, backend=backend)
            with torch.no_grad():
                torch._foreach_add_(params, [p.grad for p in params], alpha=-0.1)
            for p in params:
                p.grad = None
            return loss.detach(), r.tensor_scales

        fn = torch.compile(step, fullgraph=True, backend="aot_eager") if compiled else step
        g = torch.Generator().manual_seed(1)
        out = [fn(torch.randn(8, 6, generator=g), torch.randn(8, 2, generator=g)) for _ in range(3)]
        return out, torch.cat([p.detach().reshape(-1) for p in params])

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        eager, eager_params = run(False)
        compiled, compiled_params = run(True)
    for (l1, s1), (l2, s2) in zip(eager, compiled):
        torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s2, s1, rtol=1e-5, atol=1e-6)
    assert float(eager[0][1].min()) < 1.0  # it did clip
    torch.testing.assert_close(compiled_params, eager_params, rtol=1e-5, atol=1e-6)
