"""Property tests: random gradient lists against an fp64 reference, on every CPU backend.

Each example is a list of tensors (odd sizes, 0 included, sizes around the backend's chunk size,
fp32/fp16/bf16 mixed in one call, optional exact zeros, NaN/Inf at random positions), a norm type
and a max_norm above or below the norm. ``gradfuse.clip_grads`` must give:

* total and per-tensor norms within 1e-6 relative of fp64 (fp32 accumulation; exact for inf/-inf/0);
* ``found_inf`` = any NaN/Inf element; ``clip_coef`` = min(1, max_norm / (total + 1e-6));
* clipped gradients equal to ``(g.double() * scale).to(dtype)`` within one rounding, and gradients
  that must not change (scale >= 1, skip policy, apply=False, errors) bitwise unchanged;
* the same bits on every run;
* the non-finite policies and ``inv_scale`` of ``gradfuse._abi``.
"""

from __future__ import annotations

import math
import re
import pytest
import torch
from helpers import (
    CPU_BACKENDS,
    assert_close_rel,
    assert_scaled,
    assert_unchanged,
    bits,
    chunk_size,
    interpreted,
    max_numel,
    params_from,
    ref_coef,
    ref_norms,
    snapshot,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradfuse

INF = math.inf
NORM_TYPES = [2.0, 1.0, INF, -INF, 3.5, 0.5, 0.0, -1.0]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BASE_SIZES = [0, 1, 2, 3, 5, 17, 64, 255, 1024, 1025, 4099]


def sizes_for(backend: str) -> list[int]:
    sizes = list(BASE_SIZES)
    c = chunk_size(backend)
    if c is not None:  # tensors ending exactly at, just before and just after chunk boundaries
        for n in (c - 1, c, c + 1, 2 * c + 3):
            if n <= min(max_numel(backend), 1 << 18):
                sizes.append(n)
    return sizes


def examples(backend: str, n: int) -> int:
    return max(4, n // 4) if interpreted(backend) else n


def hyp_settings(backend: str, n: int):
    return settings(
        max_examples=examples(backend, n),
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


class Case:
    """One example (a plain class: hypothesis prints its short repr, not every element)."""

    def __init__(self, grads: list[torch.Tensor], norm_type: float, max_norm: float, recipe: str = ""):
        self.grads, self.norm_type, self.max_norm, self.recipe = grads, norm_type, max_norm, recipe

    def __repr__(self):
        desc = ", ".join(f"{str(g.dtype)[6:]}[{g.numel()}]" for g in self.grads)
        bad = [(i, k, float(g[k])) for i, g in enumerate(self.grads) for k in (~torch.isfinite(g)).nonzero().flatten().tolist()]
        return f"Case([{desc}], p={self.norm_type}, max_norm={self.max_norm!r}, nonfinite={bad}, {self.recipe})"


@st.composite
def cases(draw, backend: str, nonfinite: str = "sometimes", norm_types=NORM_TYPES, max_tensors: int = 6) -> Case:
    sizes = sizes_for(backend)
    n = draw(st.integers(1, max_tensors))
    big = sizes[len(BASE_SIZES):]

    def size():  # chunk-boundary sizes in about one tensor of eight (they cost time)
        return draw(st.sampled_from(big)) if big and draw(st.integers(0, 7)) == 0 else draw(st.sampled_from(BASE_SIZES))

    specs = [(size(), draw(st.sampled_from(DTYPES))) for _ in range(n)]
    seed = draw(st.integers(0, 2**32 - 1))
    log10_scale = draw(st.sampled_from([-3.0, -1.0, 0.0, 0.5, 2.0]))
    zeros = draw(st.sampled_from(["none", "some", "tensor"]))
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for i, (size, dtype) in enumerate(specs):
        x = torch.randn(size, generator=gen, dtype=torch.float64) * 10.0**log10_scale
        if zeros == "some":
            x[torch.rand(size, generator=gen) < 0.2] = 0.0
        elif zeros == "tensor" and i == 0:
            x.zero_()
        grads.append(x.to(dtype))
    want_bad = {"never": False, "always": True, "sometimes": draw(st.booleans())}[nonfinite]
    if want_bad:
        candidates = [i for i, g in enumerate(grads) if g.numel()]
        if candidates:
            for _ in range(draw(st.integers(1, 3))):
                t = draw(st.sampled_from(candidates))
                pos = draw(st.sampled_from(["first", "last", "random"]))
                k = {"first": 0, "last": grads[t].numel() - 1}.get(pos) if pos != "random" else draw(st.integers(0, grads[t].numel() - 1))
                grads[t][k] = draw(st.sampled_from([math.nan, INF, -INF]))
    p = draw(st.sampled_from(norm_types))
    if (p == INF or p < 0) and any(g.numel() == 0 for g in grads):
        total = math.nan  # raises; max_norm does not matter
    else:
        total, _ = ref_norms(grads, p)
    mode = draw(st.sampled_from(["below", "above", "inf", "zero", "equal"]))
    if mode == "inf":
        max_norm = INF
    elif mode == "zero":
        max_norm = 0.0
    elif not math.isfinite(total) or total == 0.0:
        max_norm = draw(st.sampled_from([0.5, 1.0, 100.0]))
    else:
        max_norm = total * {"below": draw(st.sampled_from([0.01, 0.3, 0.999])), "above": draw(st.sampled_from([1.001, 2.0, 1e3])), "equal": 1.0}[mode]
    return Case(grads, p, max_norm, f"seed={seed}, log10_scale={log10_scale}, zeros={zeros}")


def raises_for_empty(case: Case) -> bool:
    return (case.norm_type == INF or case.norm_type < 0) and any(g.numel() == 0 for g in case.grads)


def norm_rtol(p: float) -> float:
    """fp32 accumulation: 1e-6 relative, scaled by 1/p where the p-th root amplifies it."""
    if p in (INF, -INF, 0.0):
        return 0.0  # a max/min/count is exact
    return 1e-6 * max(1.0, 1.0 / abs(p))


def check_norms(res, case: Case, inv_scale: float = 1.0, loose: bool = False) -> None:
    """Norms vs fp64. ``loose``: 10x the accuracy tolerance, for tests about something else."""
    want_total, want_per = ref_norms(case.grads, case.norm_type)
    s = inv_scale if case.norm_type != 0.0 else 1.0
    rtol = norm_rtol(case.norm_type) * (10.0 if loose else 1.0) + (2.0**-24 if s != 1.0 else 0.0)
    assert res.total_norm.dtype == torch.float32 and res.total_norm.shape == torch.Size([])
    assert_close_rel(float(res.total_norm), want_total * s, rtol, lambda: f"total of {case}")
    assert res.tensor_norms.dtype == torch.float32
    assert res.tensor_norms.shape == (len(case.grads),)
    for i, (got, want) in enumerate(zip(res.tensor_norms.tolist(), want_per)):
        assert_close_rel(got, want * s, rtol, lambda i=i: f"tensor_norms[{i}] of {case}")
    want_found = any(bool((~torch.isfinite(g)).any()) for g in case.grads)
    assert float(res.found_inf) == float(want_found), case
    assert res.norm_dtype == (torch.float32 if len({g.dtype for g in case.grads}) > 1 else case.grads[0].dtype)


def check_coef(res, case: Case) -> None:
    total32 = float(res.total_norm)
    want = ref_coef(total32, case.max_norm)
    assert_close_rel(float(res.clip_coef), want, 2.0**-21, lambda: f"clip_coef of {case}")
    assert math.isnan(float(res.clip_coef)) or float(res.clip_coef) <= 1.0


def check_applied(grads_after, case: Case, snap, scale: float) -> None:
    """The scale pass: untouched bits when scale >= 1, else one rounding of g * scale."""
    if scale >= 1.0:
        assert_unchanged(grads_after, snap, lambda: f"scale {scale} >= 1 but gradients changed: {case}")
        return
    for i, (a, b) in enumerate(zip(grads_after, case.grads)):
        assert_scaled(a, b, scale, ulps=1.0, msg=lambda i=i: f"gradient {i} of {case}, scale {scale}")


def run_clip(case: Case, backend: str, **kw):
    params = params_from([g.clone() for g in case.grads])
    res = gradfuse.clip_grads(params, case.max_norm, case.norm_type, backend=backend, **kw)
    return res, [p.grad for p in params]


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_norms_coef_and_clipped_grads(backend):
    @hyp_settings(backend, 60)
    @given(case=cases(backend))
    def prop(case):
        snap = snapshot(case.grads)
        if raises_for_empty(case):
            params = params_from([g.clone() for g in case.grads])
            with pytest.raises(RuntimeError, match="on an empty tensor because the operation does not have an identity"):
                gradfuse.clip_grads(params, case.max_norm, case.norm_type, backend=backend)
            assert_unchanged([p.grad for p in params], snap)
            return
        res, after = run_clip(case, backend)
        assert res.backend == backend
        check_norms(res, case)
        check_coef(res, case)
        scale = float(res.scale)
        assert bits(res.scale).equal(bits(res.clip_coef)), "propagate, no inv_scale: scale == coef"
        check_applied(after, case, snap, scale)

    prop()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_finite_norms_match_fp64(backend):
    """No NaN/Inf: a denser sample of the accuracy property, including chunk-boundary sizes."""

    @hyp_settings(backend, 40)
    @given(case=cases(backend, nonfinite="never", norm_types=[2.0, 1.0, 3.5, INF, 0.5]))
    def prop(case):
        params = params_from([g.clone() for g in case.grads])
        if raises_for_empty(case):
            return
        res = gradfuse.clip_grads(params, case.max_norm, case.norm_type, apply=False, backend=backend)
        check_norms(res, case)
        assert float(res.found_inf) == 0.0
        assert_unchanged([p.grad for p in params], snapshot(case.grads), "apply=False changed gradients")
        # the drop-in returns the same value in torch's dtype
        r = gradfuse.get_total_norm(case.grads, case.norm_type, backend=backend)
        assert r.dtype == res.norm_dtype
        assert bits(r).equal(bits(res.total_norm.to(r.dtype)))

    prop()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_deterministic(backend):
    @hyp_settings(backend, 20)
    @given(case=cases(backend))
    def prop(case):
        if raises_for_empty(case):
            return
        r1, g1 = run_clip(case, backend)
        r2, g2 = run_clip(case, backend)
        for a, b in ((r1.total_norm, r2.total_norm), (r1.tensor_norms, r2.tensor_norms), (r1.clip_coef, r2.clip_coef), (r1.found_inf, r2.found_inf)):
            assert bits(a).equal(bits(b)), case
        for a, b in zip(g1, g2):
            assert bits(a).equal(bits(b)), case
        # the cached plan and a fresh one agree too
        gradfuse._plan.PLANS.clear()
        r3, _ = run_clip(case, backend)
        assert bits(r3.total_norm).equal(bits(r1.total_norm))

    prop()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("policy", ["propagate", "skip", "zero", "error"])
def test_nonfinite_policies(backend, policy):
    @hyp_settings(backend, 24)
    @given(case=cases(backend, nonfinite="sometimes", max_tensors=4))
    def prop(case):
        if raises_for_empty(case):
            return
        snap = snapshot(case.grads)
        found = any(bool((~torch.isfinite(g)).any()) for g in case.grads)
        want_total, _ = ref_norms(case.grads, case.norm_type)
        params = params_from([g.clone() for g in case.grads])
        after = [p.grad for p in params]
        if policy == "error" and not math.isfinite(want_total):
            msg = f"The total norm of order {float(case.norm_type)} for gradients from `parameters` is non-finite"
            with pytest.raises(RuntimeError, match=re.escape(msg)):
                gradfuse.clip_grads(params, case.max_norm, case.norm_type, nonfinite=policy, backend=backend)
            assert_unchanged(after, snap, "error policy touched gradients before raising")
            return
        res = gradfuse.clip_grads(params, case.max_norm, case.norm_type, nonfinite=policy, backend=backend)
        check_norms(res, case, loose=True)
        check_coef(res, case)
        scale = float(res.scale)
        if found and policy == "skip":
            assert scale == 1.0
            assert_unchanged(after, snap, "skip policy changed gradients")
        elif found and policy == "zero":
            assert scale == 0.0
            for g in after:
                assert not bool(g.any()), "zero policy left non-zeros (or NaNs)"
        else:
            assert bits(res.scale).equal(bits(res.clip_coef))
            check_applied(after, case, snap, scale)
            if found and case.norm_type > 0:  # torch's behaviour: a NaN/Inf in the norm poisons or zeroes
                assert math.isnan(scale) or scale == 0.0

    prop()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inv_scale(backend):
    """total = ||g|| * inv_scale (AMP's unscale folded in), scale = min(1, max_norm / (total + 1e-6))
    * inv_scale applied to the gradients, per-tensor norms scaled too (not the p=0 counts)."""

    @hyp_settings(backend, 24)
    @given(
        case=cases(backend, nonfinite="never", norm_types=[2.0, 1.0, INF, 0.0, 3.5], max_tensors=4),
        inv=st.sampled_from([2.0**-16, 0.5, 1.0 / 3.0, 1.0, 4.0]),
    )
    def prop(case, inv):
        if raises_for_empty(case):
            return
        snap = snapshot(case.grads)
        # max_norm was drawn around the norm of the gradients: move it to the unscaled norm
        case = Case(case.grads, case.norm_type, case.max_norm * (inv if case.norm_type != 0.0 else 1.0))
        inv_t = torch.tensor(inv, dtype=torch.float32)
        res, after = run_clip(case, backend, inv_scale=inv_t)
        check_norms(res, case, inv_scale=float(inv_t), loose=True)
        check_coef(res, case)
        want_scale = float(torch.tensor(float(res.clip_coef), dtype=torch.float32) * inv_t)
        assert_close_rel(float(res.scale), want_scale, 2.0**-23, lambda: f"scale of {case}")
        assert float(inv_t) == float(torch.tensor(inv, dtype=torch.float32))  # the caller's tensor is not modified
        if float(res.scale) == 1.0:
            assert_unchanged(after, snap)
        else:
            for i, (a, b) in enumerate(zip(after, case.grads)):
                assert_scaled(a, b, float(res.scale), ulps=1.0, msg=lambda i=i: f"gradient {i} of {case} (inv_scale {inv})")

    prop()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inv_scale_found_inf_skip(backend):
    """GradScaler's pattern: with nonfinite='skip' and a NaN, nothing is touched and found_inf is 1."""
    grads = [torch.randn(100), torch.randn(37, dtype=torch.float16)]
    grads[1][5] = math.nan
    snap = snapshot(grads)
    params = params_from(grads)
    res = gradfuse.clip_grads(params, 1.0, nonfinite="skip", inv_scale=torch.tensor(2.0**-10), backend=backend)
    assert float(res.found_inf) == 1.0 and float(res.scale) == 1.0
    assert_unchanged(grads, snap)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_found_inf_is_about_elements_not_overflow(backend):
    """found_inf flags NaN/Inf elements (GradScaler's convention); finite fp32 gradients whose sum of
    squares leaves fp32 (torch: an inf total, gradients zeroed) have their exact norm and are clipped."""
    grads = [torch.full((16,), 1e30)]
    res, after = run_clip(Case(grads, 2.0, 1.0), backend, nonfinite="skip")
    assert float(res.found_inf) == 0.0
    assert float(res.total_norm) == pytest.approx(4e30, rel=1e-6)
    assert float(after[0][0]) == pytest.approx(0.25, rel=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_max_norm_tensor_equals_float(backend):
    grads = [torch.randn(50), torch.randn(7, dtype=torch.bfloat16)]
    r1, g1 = run_clip(Case(grads, 2.0, 0.5), backend)
    params = params_from([g.clone() for g in grads])
    r2 = gradfuse.clip_grads(params, torch.tensor(0.5), 2.0, backend=backend)
    assert bits(r1.scale).equal(bits(r2.scale))
    for a, p in zip(g1, params):
        assert bits(a).equal(bits(p.grad))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_same_bits_for_any_thread_count(backend):
    """The fixed-order reduction does not depend on how many threads ran the chunks."""
    c = chunk_size(backend) or 4096
    g = torch.Generator().manual_seed(7)
    grads = [torch.randn(3 * c + 11, generator=g), torch.randn(c - 1, generator=g).half(), torch.randn(2 * c, generator=g).bfloat16(), torch.randn(5, generator=g)]
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            res, after = run_clip(Case(grads, 2.0, 1.0), backend)
            results.append((bits(res.total_norm), bits(res.tensor_norms), [bits(a) for a in after]))
    finally:
        torch.set_num_threads(old)
    for total, norms, after in results[1:]:
        assert total.equal(results[0][0]) and norms.equal(results[0][1])
        assert all(a.equal(b) for a, b in zip(after, results[0][2]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("inv", [4.0, 1.0, 0.5])
def test_inv_scale_unscales_without_clipping(backend, inv):
    """No clipping (coef 1): the gradients are still unscaled, scale = inv_scale, also above 1
    (a GradScaler whose scale fell below 1 after overflows hands inv_scale > 1)."""
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([0.5, -0.25], dtype=torch.bfloat16)]
    res, after = run_clip(Case(grads, 2.0, 1e6), backend, inv_scale=torch.tensor(inv))
    assert float(res.clip_coef) == 1.0
    assert float(res.scale) == inv
    for a, b in zip(after, grads):
        assert bits(a).equal(bits((b.double() * inv).to(b.dtype))), (a, b * inv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("p", [0.5, 1.0, 2.0, 4.0, 10.0, INF, -INF, 0.0])
@pytest.mark.parametrize("bad", [None, math.nan, INF, -INF])
def test_reference_found_inf_for_every_p(dtype, p, bad):
    """The reference reads found_inf off its fp64 total where that is exact (0 < p <= 4, narrow
    dtypes) and takes a max-|x| pass elsewhere: either way it flags NaN/Inf elements, never the
    overflow of finite values (the largest finite value of the dtype, raised to p = 10, overflows
    even fp64)."""
    big = torch.finfo(dtype).max
    grads = [torch.full((16,), big, dtype=dtype), torch.tensor([1.0, 2.0, 1.0 if bad is None else bad], dtype=dtype)]
    res, _ = run_clip(Case(grads, p, 1.0), "torch", nonfinite="skip")
    assert float(res.found_inf) == (0.0 if bad is None else 1.0)
