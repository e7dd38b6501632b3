"""Regression tests of issue #15 (an adversarial audit), on every backend that runs on CPU tensors.

1. fused in-place writes bump autograd's version counter;
2. a plan-cache hit still routes subclasses and gradients that require grad to the reference;
3. overlapping views at different addresses take the reference path (torch's semantics);
4. ``found_inf`` means a NaN/Inf element on every backend, for every p;
5. 0-d numpy arrays and numpy/torch scalars as ``max_norm`` / ``norm_type``;
6. the norm of finite gradients never overflows or underflows (squares outside fp32's range);
7. NORM_P where its terms leave fp32's or fp64's range, and terms and root use one p.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import (
    CPU_BACKENDS,
    FUSED_CPU_BACKENDS,
    NORM_P_EDGES,
    assert_close_rel,
    assert_scaled,
    assert_unchanged,
    param_with_grad,
    params_from,
    ref_coef,
    ref_norms,
    ref_norms_pow2_scaled,
    snapshot,
)

import gradfuse
from gradfuse import _engine, _plan

# --------------------------------------------------------------------------------------------------
# 1. autograd sees the in-place writes


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_clip_bumps_the_version_counter_of_saved_gradients(backend):
    """The audit's case: a graph that saved a gradient must refuse to backpropagate through the
    clipped values, exactly as after torch's own in-place multiply."""
    w = torch.nn.Parameter(torch.zeros(4))
    z = torch.ones(4, requires_grad=True)
    w.grad = torch.full((4,), 3.0)
    y = (z * w.grad).sum()
    version = w.grad._version
    gradfuse.clip_grad_norm_([w], 1.0, backend=backend)
    assert w.grad._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_scaling_entry_point_bumps_the_version(backend):
    grads = [torch.full((5,), 2.0), torch.full((3,), 1.0, dtype=torch.bfloat16)]
    params = params_from(grads)
    before = [g._version for g in grads]
    gradfuse.clip_grads_with_norm_(params, 0.5, torch.tensor(10.0), backend=backend)
    mid = [g._version for g in grads]
    assert all(m > b for m, b in zip(mid, before))
    gradfuse.clip_grads(params, 0.1, backend=backend)
    assert all(g._version > m for g, m in zip(grads, mid))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_measuring_alone_leaves_the_version(backend):
    g = torch.randn(100)
    version = g._version
    gradfuse.get_total_norm([g], backend=backend)
    gradfuse.clip_grads([param_with_grad(g)], 1.0, apply=False, backend=backend)
    assert g._version == version


# --------------------------------------------------------------------------------------------------
# 2. plan-cache hits keep the eligibility rules


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
def test_cache_hit_with_a_gradient_that_now_requires_grad(backend):
    p = torch.nn.Parameter(torch.zeros(64))
    g = torch.randn(64)
    p.grad = g
    assert gradfuse.clip_grads([p], math.inf, backend=backend).backend == backend
    g.requires_grad_(True)
    assert gradfuse.clip_grads([p], math.inf, backend=backend).backend == "torch"


class _Tagged(torch.Tensor):
    pass


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
def test_cache_hit_with_a_subclass_at_the_cached_address(backend):
    g = torch.randn(32)
    assert gradfuse.clip_grads([param_with_grad(g)], math.inf, backend=backend).backend == backend
    sub = torch.Tensor._make_subclass(_Tagged, g)  # the same storage, so the same fingerprint
    assert sub.data_ptr() == g.data_ptr()
    assert gradfuse.clip_grads([param_with_grad(sub)], math.inf, backend=backend).backend == "torch"


# --------------------------------------------------------------------------------------------------
# 3. overlapping views


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_overlapping_views_take_the_reference_path_with_torchs_result(backend):
    def views():
        buf = torch.arange(1.0, 11.0)
        return buf, [buf[0:6], buf[4:10]]  # elements 4 and 5 belong to both

    assert _plan.overlap_reason(views()[1]) == "gradients 0 and 1 share memory"
    assert _plan.overlap_reason([torch.zeros(4), torch.zeros(4)]) is None
    ours, theirs = views(), views()
    got = gradfuse.clip_grad_norm_(params_from(ours[1]), 1.0, backend=backend)
    want = torch.nn.utils.clip_grad_norm_(params_from(theirs[1]), 1.0)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    torch.testing.assert_close(ours[0], theirs[0], rtol=2e-6, atol=0)  # the shared ones scaled twice, as torch
    assert gradfuse.clip_grads(params_from(views()[1]), 1.0, backend=backend).backend == "torch"


# --------------------------------------------------------------------------------------------------
# 4. found_inf is about elements


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.01, 0.5, 1.0, 2.0, 4.5, 9.0, math.inf, -math.inf, 0.0])
def test_found_inf_is_zero_for_finite_gradients_for_every_p(backend, p):
    grads = [torch.ones(2000)]
    snap = snapshot(grads)
    r = gradfuse.clip_grads(params_from(grads), 1e300 if p != 0.01 else 1.0, p, nonfinite="skip", backend=backend)
    assert float(r.found_inf) == 0.0
    if p == 0.01:  # 2000^100 overflows the norm (as in torch): the step is clipped, not skipped
        assert float(r.scale) == 0.0
    else:
        assert_unchanged(grads, snap)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("p", [0.01, 2.0, 9.0])
def test_found_inf_is_one_for_a_nan_or_inf_element(backend, bad, p):
    g = torch.ones(300)
    g[177] = bad
    r = gradfuse.clip_grads([param_with_grad(g)], 1.0, p, apply=False, backend=backend)
    assert float(r.found_inf) == 1.0


# --------------------------------------------------------------------------------------------------
# 5. numpy and torch scalars


SCALARS = [np.array(1.0), np.array(2), np.float32(1.0), np.float16(0.5), np.int64(3), np.uint8(2), torch.tensor(1.5),
           torch.tensor(2), np.float64(0.25)]  # fmt: skip


@pytest.mark.parametrize("value", SCALARS, ids=lambda v: f"{type(v).__name__}-{v}")
def test_numpy_and_torch_scalars_as_max_norm_and_norm_type(value):
    def run(fn, **kw):
        p = param_with_grad(torch.arange(1.0, 6.0))
        return float(fn([p], **kw)), p.grad.clone()

    for kw in ({"max_norm": value}, {"max_norm": 1.0, "norm_type": value}):
        got_norm, got = run(gradfuse.clip_grad_norm_, **kw)
        want_norm, want = run(torch.nn.utils.clip_grad_norm_, **kw)
        assert got_norm == pytest.approx(want_norm, rel=1e-6)
        torch.testing.assert_close(got, want, rtol=2e-6, atol=0)


@pytest.mark.parametrize("value, error", [(np.array([1.0, 2.0]), TypeError), (np.bool_(True), TypeError), (np.array(np.nan), ValueError)])
def test_bad_numpy_values_are_refused_before_anything_is_touched(value, error):
    g = torch.randn(5)
    snap = snapshot([g])
    with pytest.raises(error, match="max_norm"):
        gradfuse.clip_grad_norm_([param_with_grad(g)], value)
    assert_unchanged([g], snap)


# --------------------------------------------------------------------------------------------------
# 6. squares outside fp32's range

CASES = {
    "tiny 1e-23 (fp32 squares are 0)": lambda: [torch.full((1000,), 1e-23)],
    "tiny bf16": lambda: [torch.full((3000,), 1e-25).bfloat16()],
    "huge 3e19 (fp32 squares overflow)": lambda: [torch.full((100,), 3e19)],
    "huge 1e30 and ordinary": lambda: [torch.full((4100,), 1e30), torch.randn(70)],
    "huge bf16": lambda: [torch.full((5000,), 1e30).bfloat16()],
    "one huge block among ordinary ones": lambda: [torch.cat([torch.full((2048,), 1e25), torch.ones(5000)])],
    "mixed magnitudes in one tensor": lambda: [torch.tensor([1e20, 1e-20, 1.0, -3e19] * 700)],
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
def test_finite_gradients_have_their_exact_norm_and_are_clipped(backend, case, p):
    grads = CASES[case]()
    total, per = ref_norms(grads, p)
    before = [g.clone() for g in grads]
    r = gradfuse.clip_grads(params_from(grads), total / 4, p, nonfinite="error", backend=backend)
    assert float(r.found_inf) == 0.0
    assert_close_rel(float(r.total_norm), total, 2e-6, case)
    for got, want in zip(r.tensor_norms.tolist(), per):
        assert_close_rel(got, want, 2e-6, case)
    coef = ref_coef(total, total / 4)  # torch's: the 1e-6 dominates a tiny norm
    for g, b in zip(grads, before):
        assert_scaled(g, b, coef, ulps=1.0, rtol=4e-6, msg=case)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_norm_beyond_fp32_still_clips_by_a_finite_factor(backend):
    """sqrt(100) * 1e38 = 1e39 is no fp32: the total reads inf (torch's dtype), yet the clip scales
    by max_norm / 1e39 (computed in fp64), not by 0."""
    grads = [torch.full((100,), 1e38)]
    r = gradfuse.clip_grads(params_from(grads), 1.0, backend=backend)
    assert math.isinf(float(r.total_norm)) and float(r.found_inf) == 0.0
    torch.testing.assert_close(grads[0], torch.full((100,), 0.1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_statistics_of_nan_and_inf_elements(backend):
    grads = [torch.randn(5000), torch.randn(70, dtype=torch.bfloat16), torch.zeros(0), torch.randn(3000)]
    grads[0][[0, 2047, 2048, 4999]] = torch.tensor([math.nan, math.inf, -math.inf, math.nan])
    grads[1][69] = -math.inf
    r = _engine.clip(grads, 1.0, 2.0, apply=False, backend=backend, stats=True)
    assert r.tensor_counts.tolist() == [[2, 2], [0, 1], [0, 0], [0, 0]]
    max_abs = r.tensor_max_abs.tolist()
    assert math.isnan(max_abs[0]) and max_abs[1] == math.inf and max_abs[2] == 0.0
    assert max_abs[3] == float(grads[3].abs().max())
    assert r.tensor_max_abs.dtype == torch.float32 and r.tensor_partials.dtype == torch.float64
    assert r.tensor_partials[3].item() == pytest.approx(float(grads[3].double().pow(2).sum()), rel=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_tensor_norm_beyond_fp32_gets_a_finite_layerwise_factor(backend):
    """The per-tensor factor follows the total's rule: fp32(norm_t), or the fp64 norm where fp32 overflows."""
    grads = [torch.full((100,), 1e38), torch.full((4,), 0.1)]
    r = _engine.clip(grads, 1.0, 2.0, apply=True, backend=backend, per_tensor=True)
    assert r.tensor_scales[0].item() == pytest.approx(1e-39, rel=1e-3) and r.tensor_scales[1].item() == 1.0
    torch.testing.assert_close(grads[0], torch.full((100,), 0.1), rtol=1e-3, atol=0)


# --------------------------------------------------------------------------------------------------
# 7. NORM_P at the edges of fp32 and fp64 (tests/helpers.py's NORM_P_EDGES)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(NORM_P_EDGES))
def test_norm_p_edges_are_right_to_fp32_accuracy(backend, case):
    """Against fp64 on gradients scaled by a power of two (exact): p = 3.3 on 1e30 (the root takes
    the terms' p), p < 0 with a tiny or only large values (fp32 terms overflow / underflow: re-read
    in fp64), p = 8 under fp64's normal range (scaled re-read, no 2^(p e) of its own)."""
    build, p, rtol = NORM_P_EDGES[case]
    if backend == "torch" and "subnormals" in case:
        pytest.skip("the torch reference sums fp64 terms of ~3 subnormal ulps each (~1% off)")
    grads = build()
    total, per = ref_norms_pow2_scaled(grads, p)
    r = gradfuse.clip_grads(params_from(grads), 1.0, p, apply=False, backend=backend)
    assert float(r.found_inf) == 0.0, "finite values are not NaN/Inf"
    assert_close_rel(float(r.total_norm), total, rtol, f"{case}: total", atol=2.0**-149)
    for i, (got, want) in enumerate(zip(r.tensor_norms.tolist(), per)):
        assert_close_rel(got, want, rtol, f"{case}: tensor_norms[{i}]", atol=2.0**-149)
