"""GPU tests (``-m gpu``): the cuda and triton backends on CUDA tensors.

Skipped without a CUDA device. Parity with ``torch.nn.utils`` and an fp64 reference, NaN/Inf at
chunk edges, misaligned and non-contiguous views, a tensor over 2^31 elements, zero-size tensors,
determinism, CUDA graph capture and replay, torch.compile, no host syncs on the default path, and a
scale pass that leaves memory alone when nothing is clipped. Contract v2 (gradfuse/_abi.py): the
per-tensor statistics (S_t, max |x|, NaN/Inf counts) against the CPU backend and fp64, exact norms
for finite gradients whose squares leave fp32's range (the rare re-read of a chunk), layer-wise
factors, and the CUDA module's own checks on a machine with a device.
"""

from __future__ import annotations

import importlib
import math
import re

import pytest
import torch
import torch.nn.utils as tnu
from helpers import (
    GPU_BACKENDS,
    NORM_P_EDGES,
    assert_close_rel,
    assert_scaled,
    assert_unchanged,
    bits,
    param_with_grad,
    params_from,
    ref_coef,
    ref_norms,
    ref_norms_pow2_scaled,
    snapshot,
    twin_params,
)
from test_hardening import CASES as FINITE_EXTREMES
from test_semantics import compare_with_torch, gen

import gradfuse
from gradfuse import _abi, _backends, _engine, _plan

pytestmark = pytest.mark.gpu

INF = math.inf
DEV = "cuda"
NORM_TYPES = [2.0, 1.0, 3.5, INF, -INF, 0.5, 0.0, -1.0]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: GPU backends plus the reference on CUDA tensors (parity tests only)
PARITY_BACKENDS = GPU_BACKENDS + [pytest.param("torch", id="torch")]


def chunk(backend: str) -> int:
    return _backends.FUSED_BACKENDS[backend].chunk_size if backend != "torch" else 1 << 16


def cuda_gen(seed, shapes, dtype=torch.float32, scale=1.0, nonzero=True):
    return [g.to(DEV) for g in gen(seed, shapes, dtype=dtype, scale=scale, nonzero=nonzero)]


def fresh(grads):
    return params_from([g.clone() for g in grads])


def sizes_around_chunks(backend):
    c = chunk(backend)
    return [1, 3, 1025, c - 1, c, c + 1, 2 * c + 3, 5 * c + 777]


# ------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=lambda p: f"p={p}")
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_parity_with_torch_and_fp64(backend, norm_type, dtype):
    c = chunk(backend)
    grads = cuda_gen(1, [(7, 9), (1,), (c + 5,), (3 * c,), (130,)], dtype=dtype)
    total, _ = ref_norms(grads, norm_type)
    for max_norm in (total * 0.3, total * 2.0):
        _, gp, t, r = compare_with_torch(grads, max_norm, norm_type, backend=backend)
        assert r.device.type == "cuda"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=lambda p: f"p={p}")
def test_mixed_dtypes_per_tensor_norms(backend, norm_type):
    c = chunk(backend)
    grads = [g for i, d in enumerate(DTYPES) for g in cuda_gen(10 + i, [(c + 17,), (33,), (2 * c - 1,)], dtype=d, nonzero=norm_type < 0)]
    res = gradfuse.clip_grads(fresh(grads), 0.5, norm_type, apply=False, backend=backend)
    assert res.backend == backend
    want_total, want_per = ref_norms(grads, norm_type)
    rtol = 0.0 if norm_type in (INF, -INF, 0.0) else 1e-6 * max(1.0, 1.0 / abs(norm_type))
    assert_close_rel(float(res.total_norm), want_total, rtol, "total")
    for i, (got, want) in enumerate(zip(res.tensor_norms.tolist(), want_per)):
        assert_close_rel(got, want, rtol, f"tensor_norms[{i}]")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sizes_around_chunk_edges(backend, dtype):
    grads = [g for i, n in enumerate(sizes_around_chunks(backend)) for g in cuda_gen(20 + i, [(n,)], dtype=dtype)]
    _, gp, _, _ = compare_with_torch(grads, 1.0, backend=backend)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fp16_overflow_deviation_on_gpu(backend):
    grads = [torch.full((10**6,), 100.0, dtype=torch.float16, device=DEV)]
    tp, gp = twin_params(grads)
    t = tnu.clip_grad_norm_(tp, 1.0)
    r = gradfuse.clip_grad_norm_(gp, 1.0, backend=backend)
    assert float(r) == INF and r.dtype == torch.float16 and r.device.type == "cuda"
    assert bool(torch.isfinite(gp[0].grad).all())
    assert float(gp[0].grad.double().norm()) == pytest.approx(1.0, rel=2 * 2.0**-11)
    res = gradfuse.clip_grads(fresh(grads), 1.0, backend=backend)
    assert_close_rel(float(res.total_norm), 1e5, 1e-6)
    assert float(t) == INF  # torch's fp16 path


# ------------------------------------------------------------------------------------------------
# Non-finite values at chunk edges


def _positions(n, c):
    return {"first": 0, "last": n - 1, "tail": n - 2, "chunk_edge": c - 1, "after_edge": c}


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", ["first", "last", "tail", "chunk_edge", "after_edge"])
@pytest.mark.parametrize("bad", [math.nan, INF, -INF], ids=["nan", "inf", "-inf"])
def test_nonfinite_positions(backend, dtype, where, bad):
    c = chunk(backend)
    grads = cuda_gen(30, [(100,), (2 * c + 3,), (17,)], dtype=dtype)
    grads[1][_positions(2 * c + 3, c)[where]] = bad
    for norm_type in (2.0, 1.0, INF):
        res = gradfuse.clip_grads(fresh(grads), 1.0, norm_type, apply=False, backend=backend)
        assert float(res.found_inf) == 1.0
        total = float(res.total_norm)
        assert math.isnan(total) if (math.isnan(bad)) else total == INF
        per = res.tensor_norms.tolist()
        assert math.isfinite(per[0]) and math.isfinite(per[2]) and not math.isfinite(per[1])
        compare_with_torch(grads, 1.0, norm_type, backend=backend, check_ref=False)
    # the skip policy leaves everything alone (NaN payloads too)
    snap = snapshot(grads)
    params = params_from(grads)
    res = gradfuse.clip_grads(params, 1.0, nonfinite="skip", backend=backend)
    assert float(res.scale) == 1.0
    assert_unchanged(grads, snap)
    # zero: every gradient zeroed
    params = fresh(grads)
    gradfuse.clip_grads(params, 1.0, nonfinite="zero", backend=backend)
    assert all(not bool(p.grad.any()) for p in params)
    # error_if_nonfinite raises with torch's text, before touching anything
    with pytest.raises(RuntimeError, match=re.escape("The total norm of order 2.0 for gradients from `parameters` is non-finite")):
        gradfuse.clip_grad_norm_(params_from(grads), 1.0, error_if_nonfinite=True, backend=backend)
    assert_unchanged(grads, snap)


# ------------------------------------------------------------------------------------------------
# Layouts


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offset", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("n", [1, 7, 4099, 65537])
def test_misaligned_views(backend, dtype, offset, n):
    """Views at odd storage offsets (vectorised loads must not assume 16-byte alignment), and the
    memory around them untouched."""
    buf = cuda_gen(40, [(n + offset + 9,)], dtype=dtype)[0]
    view = buf[offset : offset + n]
    before = buf.clone()
    want_total, _ = ref_norms([view], 2.0)
    res = gradfuse.clip_grads([param_with_grad(view)], want_total * 0.5, backend=backend)
    assert res.backend == backend
    assert_close_rel(float(res.total_norm), want_total, 1e-6)
    assert_scaled(view, before[offset : offset + n], float(res.scale), ulps=1.0)
    assert_unchanged([buf[:offset], buf[offset + n :]], snapshot([before[:offset], before[offset + n :]]), "memory outside the view was written")


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "gaps", "column", "step2"])
def test_non_contiguous(backend, layout):
    g = torch.Generator(device=DEV).manual_seed(41)
    base = torch.randn(300, 257, generator=g, device=DEV)
    v = {
        "transposed": base.t(),
        "channels_last": torch.randn(4, 8, 33, 17, generator=g, device=DEV).contiguous(memory_format=torch.channels_last),
        "gaps": base[:, 3:200],
        "column": base[:, 5],
        "step2": torch.randn(70001, generator=g, device=DEV)[::2],
    }[layout]
    for dtype in DTYPES:
        compare_with_torch([v.to(dtype) if dtype != torch.float32 else v, cuda_gen(42, [(129,)], dtype=dtype)[0]], 0.5, backend=backend)


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, 0.5, 0.0])
def test_zero_size_tensors(backend, norm_type):
    grads = [torch.empty(0, device=DEV), cuda_gen(50, [(1000,)])[0], torch.empty(0, 3, device=DEV, dtype=torch.float16), torch.empty(0, device=DEV, dtype=torch.bfloat16)]
    _, _, _, r = compare_with_torch(grads, 0.5, norm_type, backend=backend)
    only_empty = [torch.empty(0, device=DEV), torch.empty(0, device=DEV, dtype=torch.float16)]
    _, _, t, r = compare_with_torch(only_empty, 0.5, norm_type, backend=backend)
    assert float(r) == 0.0


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
@pytest.mark.parametrize("norm_type", [INF, -INF, -1.0])
@pytest.mark.parametrize("foreach", [None, False])
def test_zero_size_errors_like_torch_on_cuda(backend, norm_type, foreach):
    grads = [cuda_gen(51, [(6,)])[0], torch.empty(0, device=DEV)]
    with pytest.raises(RuntimeError) as t_err:
        tnu.clip_grad_norm_(fresh(grads), 1.0, norm_type, foreach=foreach)
    with pytest.raises(RuntimeError) as g_err:
        gradfuse.clip_grad_norm_(fresh(grads), 1.0, norm_type, foreach=foreach, backend=backend)
    assert str(g_err.value) == str(t_err.value)


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
def test_several_devices_cpu_and_cuda(backend):
    """cpu + cuda gradients: the reference route, torch's result (total on the first device)."""
    grads = [cuda_gen(52, [(100,)])[0], gen(53, [(50,)])[0], cuda_gen(54, [(7,)], dtype=torch.float16)[0]]
    _, gp, t, r = compare_with_torch(grads, 0.5, backend=backend)
    assert r.device == grads[0].device
    assert gradfuse.clip_grads(fresh(grads), 0.5, backend=backend).backend == "torch"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_over_2_31_elements_bf16(backend):
    """One bf16 tensor of 2^31 + 2^20 + 3 elements (~4.3 GB): 32-bit offsets would wrap."""
    n = 2**31 + 2**20 + 3
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * 2:
        pytest.skip(f"needs ~{3 * n * 2 / 2**30:.1f} GiB of free GPU memory")
    x = torch.empty(n, dtype=torch.bfloat16, device=DEV)
    step = 1 << 28
    for s in range(0, n, step):  # small exact integers that depend on the position
        e = min(n, s + step)
        x[s:e] = ((torch.arange(s, e, device=DEV, dtype=torch.int64) % 7) - 3).to(torch.bfloat16)
    x[n - 1] = 100.0  # the largest element, past 2^31: found only if the tail is read
    x[2**31 + 5] = -64.0

    def fp64_sumsq(t):
        return sum(float(t[s : s + step].double().pow(2).sum()) for s in range(0, t.numel(), step))

    want = math.sqrt(fp64_sumsq(x))
    res = gradfuse.clip_grads([param_with_grad(x)], 2 * want, apply=False, backend=backend)
    assert_close_rel(float(res.total_norm), want, 1e-6, "L2 norm over 2^31 elements")
    res_inf = gradfuse.clip_grads([param_with_grad(x)], 1.0, INF, apply=False, backend=backend)
    assert float(res_inf.total_norm) == 100.0
    assert float(res.tensor_max_abs[0]) == 100.0 and res.tensor_counts.tolist() == [[0, 0]]
    x[2**31 + 7] = math.nan  # counted past 2^31, then restored
    res_nan = gradfuse.clip_grads([param_with_grad(x)], 1.0, apply=False, backend=backend)
    assert res_nan.tensor_counts.tolist() == [[1, 0]] and float(res_nan.found_inf) == 1.0
    x[2**31 + 7] = 0.0
    # clip: every element scaled, including past 2^31
    res = gradfuse.clip_grads([param_with_grad(x)], want / 4, backend=backend)
    assert float(x[n - 1]) == pytest.approx(100.0 * float(res.scale), rel=2**-8)
    assert float(x[2**31 + 5]) == pytest.approx(-64.0 * float(res.scale), rel=2**-8)
    assert_close_rel(math.sqrt(fp64_sumsq(x)), want / 4, 4e-3, "clipped norm")
    del x
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Determinism, graphs, compile, syncs


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_deterministic_over_100_runs(backend):
    c = chunk(backend)
    grads = [g for i, d in enumerate(DTYPES) for g in cuda_gen(60 + i, [(7 * c + 5,), (333,), (c,)], dtype=d)]
    params = params_from(grads)
    grads[3][5] = math.nan  # a chunk read twice (its NaN/Inf counted)
    grads[6][c + 1] = INF
    first = gradfuse.clip_grads(params, 1.0, apply=False, backend=backend)
    want = [bits(t) for t in (first.result, first.tensor_norms, first.tensor_partials, first.tensor_max_abs, first.tensor_counts)]
    for _ in range(100):
        r = gradfuse.clip_grads(params, 1.0, apply=False, backend=backend)
        got = [bits(t) for t in (r.result, r.tensor_norms, r.tensor_partials, r.tensor_max_abs, r.tensor_counts)]
        assert all(a.equal(b) for a, b in zip(got, want))
    grads[3][5], grads[6][c + 1] = 0.5, 0.5
    # and the clipped gradients: same bits from the same input
    outs = []
    for _ in range(5):
        ps = fresh(grads)
        gradfuse.clip_grad_norm_(ps, 0.1, backend=backend)
        outs.append([bits(p.grad) for p in ps])
    for o in outs[1:]:
        assert all(a.equal(b) for a, b in zip(o, outs[0]))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("fn", ["clip_grad_norm_", "clip_grads"])
def test_cuda_graph_capture_and_replay(backend, fn):
    c = chunk(backend)
    shapes = [(3 * c + 11,), (257,), (c,)]
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    static = [cuda_gen(70 + i, [s], dtype=d)[0] for i, (s, d) in enumerate(zip(shapes, dtypes))]
    params = params_from(static)

    def clip():
        if fn == "clip_grad_norm_":
            return gradfuse.clip_grad_norm_(params, 1.0, backend=backend)
        return gradfuse.clip_grads(params, 1.0, backend=backend).total_norm

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up: plan built and cached, kernels compiled
            clip()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = clip()
    for step in range(4):
        new = [cuda_gen(80 + step * 10 + i, [sh], dtype=d, scale=0.2 + step)[0] for i, (sh, d) in enumerate(zip(shapes, dtypes))]
        for dst, src in zip(static, new):
            dst.copy_(src)
        graph.replay()
        eager_params = fresh(new)
        want = gradfuse.clip_grad_norm_(eager_params, 1.0, backend=backend)
        torch.cuda.synchronize()
        assert float(out) == pytest.approx(float(want), rel=1e-6)
        assert bits(out.to(want.dtype)).equal(bits(want))
        for a, p in zip(static, eager_params):
            assert bits(a).equal(bits(p.grad)), f"step {step}: replayed clip differs from eager"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_fullgraph_cuda(backend):
    import copy

    from test_compile import batch, clip_fn, make_model, make_step, run_steps

    torch._dynamo.reset()
    eager_model = make_model().to(DEV)
    compiled_model = copy.deepcopy(eager_model)

    def on_cuda(step):
        return lambda x, y: step(x.to(DEV), y.to(DEV))

    eager = run_steps(on_cuda(make_step(eager_model, clip_fn("clip_grad_norm_", backend))))
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        explanation = torch._dynamo.explain(make_step(copy.deepcopy(eager_model), clip_fn("clip_grad_norm_", backend)))(*[t.to(DEV) for t in batch()])
        assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
        compiled = torch.compile(make_step(compiled_model, clip_fn("clip_grad_norm_", backend)), fullgraph=True)
        got = run_steps(on_cuda(compiled))
    for (l1, n1), (l2, n2) in zip(eager, got):
        assert l2 == pytest.approx(l1, rel=1e-5) and n2 == pytest.approx(n1, rel=1e-5)
    for a, b in zip(compiled_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("fn", ["clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grads_tensor_max_norm", "clip_grads_inv_scale", "per_tensor"])
def test_no_host_syncs_after_warm_up(backend, fn):
    c = chunk(backend)
    grads = [g for i, d in enumerate(DTYPES) for g in cuda_gen(90 + i, [(2 * c + 1,), (100,)], dtype=d)]
    params = params_from(grads)
    max_norm_t = torch.tensor(0.5, device=DEV)
    inv = torch.tensor(2.0**-8, device=DEV)

    def call():
        if fn == "clip_grad_norm_":
            return gradfuse.clip_grad_norm_(params, 0.5, backend=backend)
        if fn == "get_total_norm":
            return gradfuse.get_total_norm(grads, backend=backend)
        if fn == "clip_grads_with_norm_":
            return gradfuse.clip_grads_with_norm_(params, 0.5, torch.ones((), device=DEV) * 3, backend=backend)
        if fn == "clip_grads_tensor_max_norm":
            return gradfuse.clip_grads(params, max_norm_t, backend=backend).scale
        if fn == "per_tensor":
            return _engine.clip(grads, 0.5, 2.0, apply=True, backend=backend, per_tensor=True, inv_scale=inv).tensor_scales
        return gradfuse.clip_grads(params, 0.5, inv_scale=inv, nonfinite="skip", backend=backend).scale

    for _ in range(2):
        call()
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            call()
    finally:
        torch.cuda.set_sync_debug_mode(old)
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_max_norm_cuda_tensor_matches_float(backend):
    grads = cuda_gen(95, [(5000,), (17,)])
    p1, p2 = fresh(grads), fresh(grads)
    r1 = gradfuse.clip_grads(p1, 0.25, backend=backend)
    r2 = gradfuse.clip_grads(p2, torch.tensor(0.25, device=DEV), backend=backend)
    assert bits(r1.scale).equal(bits(r2.scale))
    for a, b in zip(p1, p2):
        assert bits(a.grad).equal(bits(b.grad))


@pytest.mark.parametrize("backend", PARITY_BACKENDS)
@pytest.mark.parametrize("max_norm", [torch.tensor([0.25]), torch.tensor(1), torch.tensor([[2]])], ids=["shape-1", "int", "int-1x1"])
def test_max_norm_cuda_tensor_of_any_one_element_shape_and_real_dtype(backend, max_norm):
    """torch takes these (an integer threshold too); a [1]-shaped one broke the reference's stack."""
    grads = cuda_gen(97, [(300,), (7,)])
    p1, p2 = fresh(grads), fresh(grads)
    t1 = gradfuse.clip_grad_norm_(p1, max_norm.item(), backend=backend)
    t2 = gradfuse.clip_grad_norm_(p2, max_norm.to(DEV), backend=backend)
    assert bits(t1).equal(bits(t2))
    for a, b in zip(p1, p2):
        assert bits(a.grad).equal(bits(b.grad))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_clip_leaves_memory_untouched(backend, dtype):
    """coef >= 1: the scale pass returns before touching memory. A write of x * 1.0 would flush
    subnormals under FTZ, canonicalise NaN payloads (skip policy) and could not preserve -0.0
    under some rewrites; every bit must survive."""
    c = chunk(backend)
    grads = cuda_gen(96, [(2 * c + 9,), (31,)], dtype=dtype, scale=1e-3)
    tiny = torch.finfo(dtype).tiny
    grads[0][0] = tiny / 4  # subnormal
    grads[0][1] = -tiny / 2
    grads[0][2] = -0.0
    grads[1][-1] = tiny / 8
    snap = snapshot(grads)
    params = params_from(grads)
    for _ in range(3):
        r = gradfuse.clip_grads(params, 1e6, backend=backend)
        assert float(r.scale) == 1.0
        assert_unchanged(grads, snap)
        gradfuse.clip_grad_norm_(params, INF, backend=backend)
        assert_unchanged(grads, snap)
    # NaN payloads survive the skip policy
    payload = {torch.float32: 0x7FC0_1234, torch.float16: 0x7E12, torch.bfloat16: 0x7FD2}[dtype]  # quiet NaNs, odd payloads
    grads[1].view({torch.float32: torch.int32}.get(dtype, torch.int16))[3] = payload
    snap = snapshot(grads)
    r = gradfuse.clip_grads(params, 1e-3, nonfinite="skip", backend=backend)
    assert float(r.found_inf) == 1.0
    assert_unchanged(grads, snap, "skip policy rewrote memory")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_plan_reuse_on_cuda(backend):
    _plan.PLANS.clear()
    grads = cuda_gen(97, [(1000,), (10,)])
    params = params_from(grads)
    for _ in range(3):
        gradfuse.clip_grad_norm_(params, 1.0, backend=backend)
    assert _plan.PLANS.misses == 1 and _plan.PLANS.hits == 2
    (plan,) = _plan.PLANS._plans.values()
    assert plan.addrs.device.type == "cuda" and int(plan.ticket) == 0


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_other_stream(backend):
    """Kernels run on the current stream: work queued on a side stream is ordered correctly."""
    grads = cuda_gen(98, [(1 << 20,)])
    params = params_from(grads)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        grads[0].mul_(3.0)
        r = gradfuse.clip_grads(params, 1.0, apply=False, backend=backend)
    torch.cuda.synchronize()
    assert_close_rel(float(r.total_norm), float(grads[0].double().norm()), 1e-6)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_amp_gradscaler_pattern(backend):
    """inv_scale from a GradScaler: gradients unscaled and clipped in one pass, found_inf on device."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32).to(DEV)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    x = torch.randn(16, 64, device=DEV)
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(x).float().pow(2).mean()
    scaler.scale(loss).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    inv = torch.tensor(1.0 / scaler.get_scale(), device=DEV)
    res = gradfuse.clip_grads(list(model.parameters()), 0.1, inv_scale=inv, nonfinite="skip", backend=backend)
    unscaled = [g.double() * float(inv) for g in grads]
    want = math.sqrt(sum(float(u.pow(2).sum()) for u in unscaled))
    assert_close_rel(float(res.total_norm), want, 1e-5)
    assert float(res.found_inf) == 0.0
    coef = ref_coef(want, 0.1)
    for p, u in zip(model.parameters(), unscaled):
        torch.testing.assert_close(p.grad.double(), u * coef, rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# Contract v2: per-tensor statistics, exact norms of finite extremes, layer-wise factors


def fp64_stats(g: torch.Tensor, p: float) -> tuple[float, float, int, int]:
    """fp64 reference of one gradient's (S_t, max |x|, NaN count, Inf count), on the CPU: S_t is
    the partial before the root (sum |x|^p; max/min |x|; the count of non-zeros)."""
    x = g.detach().cpu().double().reshape(-1)
    a = x.abs()
    if p == INF:
        s = float(a.max()) if x.numel() else 0.0
    elif p == -INF:
        s = float(a.min()) if x.numel() else INF
    elif p == 0.0:
        s = float((x != 0).sum())
    else:
        s = float(a.pow(p).sum())
    return s, float(a.max()) if x.numel() else 0.0, int(x.isnan().sum()), int(x.isinf().sum())


def _stat_grads(c: int) -> list[torch.Tensor]:
    """Mixed dtypes and sizes around chunk edges (one a misaligned view), NaN and Inf in some chunks
    (several per chunk, at chunk edges), clean tensors between them, and an empty one."""
    grads = [cuda_gen(110 + i, [(n,)], dtype=DTYPES[i % 3])[0] for i, n in enumerate([1, 7, c - 1, c, c + 1, 3 * c + 5, 1000])]
    buf = cuda_gen(120, [(2 * c + 9,)], dtype=torch.bfloat16)[0]
    grads += [buf[3 : 2 * c + 6], torch.empty(0, device=DEV)]
    grads[3][[0, 5, c - 1]] = torch.tensor([math.nan, math.nan, INF], device=DEV, dtype=grads[3].dtype)
    grads[5][[c - 1, c, 3 * c + 4]] = torch.tensor([-INF, math.nan, INF], device=DEV, dtype=grads[5].dtype)
    grads[7][c] = -INF
    return grads


def _cpu_backend_result(grads, *args, **kwargs):
    if "cpu" not in gradfuse.available_backends("cpu"):
        pytest.skip("the cpu backend is not built here")
    return _engine.clip([g.cpu() for g in grads], *args, apply=False, backend="cpu", **kwargs)


def _assert_same_floats(got: torch.Tensor, want: torch.Tensor, msg: str) -> None:
    """Equal values with NaN where NaN (NaN payloads may differ between backends)."""
    got, want = got.cpu(), want.cpu()
    assert torch.equal(got.isnan(), want.isnan()), f"{msg}: NaN positions {got.tolist()} vs {want.tolist()}"
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0)), f"{msg}: {got.tolist()} vs {want.tolist()}"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=lambda p: f"p={p}")
def test_per_tensor_statistics_match_the_cpu_backend_and_fp64(backend, norm_type):
    """tensor_partials, tensor_max_abs, tensor_counts in the same read as the norm: counts and max |x|
    exact, S_t to fp32 accuracy; the same figures as the CPU backend."""
    grads = _stat_grads(chunk(backend))  # no exact zeros (negative powers)
    r = _engine.clip(grads, 1.0, norm_type, apply=False, backend=backend, stats=True)
    assert r.backend == backend
    ref = [fp64_stats(g, norm_type) for g in grads]
    assert r.tensor_counts.tolist() == [[n, i] for _, _, n, i in ref]
    _assert_same_floats(r.tensor_max_abs, torch.tensor([m for _, m, _, _ in ref], dtype=torch.float32), "tensor_max_abs")
    rtol = 0.0 if norm_type in (INF, -INF, 0.0) else 5e-6 * max(1.0, abs(norm_type))
    for i, (got, (want, *_)) in enumerate(zip(r.tensor_partials.tolist(), ref)):
        assert_close_rel(got, want, rtol, f"tensor_partials[{i}]")
    assert float(r.found_inf) == 1.0
    cpu = _cpu_backend_result(grads, 1.0, norm_type, stats=True)
    assert torch.equal(r.tensor_counts.cpu(), cpu.tensor_counts)
    _assert_same_floats(r.tensor_max_abs, cpu.tensor_max_abs, "tensor_max_abs vs cpu")
    for i, (got, want) in enumerate(zip(r.tensor_norms.tolist(), cpu.tensor_norms.tolist())):
        assert_close_rel(got, want, 2 * rtol, f"tensor_norms[{i}] vs cpu")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", list(FINITE_EXTREMES))
@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
def test_finite_gradients_have_their_exact_norm_on_gpu(backend, case, p):
    """Squares beyond fp32 (3e19, 1e30) or below its normal range (1e-23): the chunk is re-read,
    scaled by a power of two; found_inf stays 0, the norm is right and the clip scales correctly."""
    grads = [g.to(DEV) for g in FINITE_EXTREMES[case]()]
    total, per = ref_norms(grads, p)
    before = [g.clone() for g in grads]
    r = gradfuse.clip_grads(params_from(grads), total / 4, p, nonfinite="error", backend=backend)
    assert float(r.found_inf) == 0.0
    assert_close_rel(float(r.total_norm), total, 2e-6, case)
    for got, want in zip(r.tensor_norms.tolist(), per):
        assert_close_rel(got, want, 2e-6, case)
    for i, (got, want) in enumerate(zip(r.tensor_partials.tolist(), [fp64_stats(b, p)[0] for b in before])):
        assert_close_rel(got, want, 4e-6, f"{case}: tensor_partials[{i}]")
    coef = ref_coef(total, total / 4)
    for g, b in zip(grads, before):
        assert_scaled(g, b, coef, ulps=1.0, rtol=4e-6, msg=case)
    again = gradfuse.clip_grads(params_from([b.clone() for b in before]), total / 4, p, apply=False, backend=backend)
    assert bits(again.result).equal(bits(r.result)) and bits(again.tensor_partials).equal(bits(r.tensor_partials))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_a_norm_beyond_fp32_clips_by_a_finite_factor_on_gpu(backend):
    """sqrt(100) * 1e38 = 1e39 is no fp32: the total reads inf, the clip scales by 1 / 1e39 (fp64)."""
    grads = [torch.full((100,), 1e38, device=DEV)]
    r = gradfuse.clip_grads(params_from(grads), 1.0, backend=backend)
    assert math.isinf(float(r.total_norm)) and float(r.found_inf) == 0.0
    torch.testing.assert_close(grads[0].cpu(), torch.full((100,), 0.1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("p", [0.01, 0.5, 1.0, 2.0, 4.5, 9.0, INF, -INF, 0.0, -1.0])
def test_found_inf_is_about_elements_on_gpu(backend, p):
    grads = [torch.ones(2000, device=DEV), torch.full((3 * chunk(backend),), 1e-30, device=DEV)]
    r = gradfuse.clip_grads(params_from(grads), 1.0, p, apply=False, backend=backend)
    assert float(r.found_inf) == 0.0
    grads[1][chunk(backend) + 2] = math.nan
    r = gradfuse.clip_grads(params_from(grads), 1.0, p, apply=False, backend=backend)
    assert float(r.found_inf) == 1.0 and r.tensor_counts.tolist() == [[0, 0], [1, 0]]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", list(NORM_P_EDGES))
def test_norm_p_edges_are_right_to_fp32_accuracy_on_gpu(backend, case):
    """fp32 terms of NORM_P: the root takes their p (fp32(3.3), not 3.3); p < 0 chunks whose fp32
    partial overflowed (a tiny |x|) or underflowed (only large |x|) are re-read in fp64; the scaled
    re-read's 2^(p e) never underflows on its own."""
    build, p, rtol = NORM_P_EDGES[case]
    grads = [g.to(DEV) for g in build()]
    total, per = ref_norms_pow2_scaled(grads, p)
    r = gradfuse.clip_grads(params_from(grads), 1.0, p, apply=False, backend=backend)
    assert float(r.found_inf) == 0.0
    assert_close_rel(float(r.total_norm), total, rtol, f"{case}: total", atol=2.0**-149)
    for i, (got, want) in enumerate(zip(r.tensor_norms.tolist(), per)):
        assert_close_rel(got, want, rtol, f"{case}: tensor_norms[{i}]", atol=2.0**-149)
    cpu = gradfuse.clip_grads(params_from([g.cpu() for g in grads]), 1.0, p, apply=False, backend="cpu")
    assert_close_rel(float(r.total_norm), float(cpu.total_norm), 2 * rtol, f"{case}: vs the cpu backend", atol=2.0**-149)


def _layer_grads(c: int, dtype) -> list[torch.Tensor]:
    return [
        torch.full((3 * c + 7,), 0.01, device=DEV, dtype=dtype),  # norm ~5.7: clipped, over several chunks
        cuda_gen(130, [(33,)], dtype=dtype, scale=1e-3, nonzero=False)[0],  # far under the bound: untouched
        cuda_gen(131, [(c + 1,)], dtype=dtype)[0],  # norm ~256: clipped
        torch.full((9,), -2.0, device=DEV, dtype=dtype),  # norm 6: clipped
    ]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inv_scale", [None, 0.25])
def test_per_tensor_factors_clip_each_gradient_to_its_own_bound_on_gpu(backend, dtype, inv_scale):
    """FLAG_WRITE/READ_TENSOR_SCALES: factor_t = min(1, max_norm / (norm_t + 1e-6)) * inv_scale from
    the finalize, applied per chunk by the scale pass; a gradient whose factor is 1 is not touched."""
    c = chunk(backend)
    grads = _layer_grads(c, dtype)
    before = [g.clone() for g in grads]
    inv = torch.tensor(inv_scale, device=DEV) if inv_scale is not None else None
    r = _engine.clip(grads, 2.0, 2.0, apply=True, backend=backend, per_tensor=True, inv_scale=inv)
    k = 1.0 if inv_scale is None else inv_scale
    norms = [ref_norms([b], 2.0)[0] * k for b in before]
    want = [ref_coef(n, 2.0) * k for n in norms]
    for i, (got, w) in enumerate(zip(r.tensor_scales.tolist(), want)):
        assert_close_rel(got, w, 2e-6, f"tensor_scales[{i}]")
    if inv_scale is None:
        assert float(r.tensor_scales[1]) == 1.0
        assert_unchanged(grads[1:2], snapshot(before[1:2]), "a gradient under its bound was written")
    for i, (g, b) in enumerate(zip(grads, before)):
        assert_scaled(g, b, float(r.tensor_scales[i]), ulps=1.0, msg=f"gradient {i}")
    if "cpu" in gradfuse.available_backends("cpu"):
        cpu = _engine.clip([b.cpu() for b in before], 2.0, 2.0, apply=False, backend="cpu", per_tensor=True, inv_scale=inv.cpu() if inv is not None else None)
        torch.testing.assert_close(r.tensor_scales.cpu(), cpu.tensor_scales, rtol=2e-6, atol=0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("policy", [_abi.POLICY_SKIP, _abi.POLICY_ZERO, _abi.POLICY_PROPAGATE])
def test_per_tensor_factors_follow_the_nonfinite_policy_on_gpu(backend, policy):
    c = chunk(backend)
    grads = _layer_grads(c, torch.float32)
    grads[2][c - 1] = math.nan
    snap = snapshot(grads)
    r = _engine.clip(grads, 2.0, 2.0, apply=True, backend=backend, per_tensor=True, policy=policy)
    assert float(r.found_inf) == 1.0
    if policy == _abi.POLICY_SKIP:
        assert r.tensor_scales.tolist() == [1.0] * 4
        assert_unchanged(grads, snap, "skip policy wrote memory")
    elif policy == _abi.POLICY_ZERO:
        assert r.tensor_scales.tolist() == [0.0] * 4
        assert all(not bool(g.any()) and not bool(g.isnan().any()) for g in grads)
    else:  # torch's: the NaN tensor's factor is NaN, the others are clipped as usual
        assert math.isnan(float(r.tensor_scales[2])) and bool(grads[2].isnan().all())
        assert float(r.tensor_scales[1]) == 1.0 and 0.0 < float(r.tensor_scales[0]) < 1.0


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_of_layer_wise_clipping(backend):
    c = chunk(backend)
    static = _layer_grads(c, torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            _engine.clip(static, 2.0, 2.0, apply=True, backend=backend, per_tensor=True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _engine.clip(static, 2.0, 2.0, apply=True, backend=backend, per_tensor=True)
    for step in range(3):
        new = [g * (0.5 + step) for g in _layer_grads(c, torch.bfloat16)]
        for dst, src in zip(static, new):
            dst.copy_(src)
        graph.replay()
        eager = [g.clone() for g in new]
        want = _engine.clip(eager, 2.0, 2.0, apply=True, backend=backend, per_tensor=True)
        torch.cuda.synchronize()
        assert bits(out.tensor_scales).equal(bits(want.tensor_scales))
        assert all(bits(a).equal(bits(b)) for a, b in zip(static, eager)), f"step {step}: replay differs from eager"


# ------------------------------------------------------------------------------------------------
# The CUDA module itself, with a device


def _cuda_target(grads):
    if "cuda" not in gradfuse.available_backends("cuda"):
        pytest.skip("the cuda backend is unavailable")
    return _engine.target(grads, tuple(g.dtype for g in grads), "cuda")


def test_cuda_module_names_a_bad_field_before_touching_memory():
    """With a device too, a bad descriptor field is a ValueError and no gradient is touched."""
    cuda = importlib.import_module("gradfuse._C_cuda")
    grads = cuda_gen(140, [(70000,), (5,)])
    at = _cuda_target(grads)
    outputs = {name: torch.zeros(n, dtype=dt, device=DEV) for name, n, dt in [
        ("result", 4, torch.float32), ("tensor_norms", 2, torch.float32), ("tensor_partials", 2, torch.float64),
        ("tensor_max_abs", 2, torch.float32), ("tensor_counts", 4, torch.int64), ("scale_ptr", 1, torch.float32)]}  # fmt: skip
    desc = _abi.ClipDesc.from_buffer_copy(at.plan.desc)
    for name, t in outputs.items():
        setattr(desc, name, t.data_ptr())
    desc.norm_kind, desc.p, desc.max_norm = _abi.NORM_L2, 2.0, 1.0
    snap = snapshot(grads)
    for field, value in [("norm_kind", 9), ("flags", 4), ("tensor_counts", 0), ("chunk_max_abs", 0), ("scale_ptr", 0)]:
        bad = _abi.ClipDesc.from_buffer_copy(desc)
        setattr(bad, field, value)
        call = cuda.scale if field == "scale_ptr" else cuda.reduce
        with pytest.raises(ValueError, match=field):
            call(bad.address(), 0, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert_unchanged(grads, snap)
    assert not bool(outputs["result"].any()), "an output was written"
    cuda.reduce(desc.address(), 0, torch.cuda.current_stream().cuda_stream)  # valid as it is
    assert_close_rel(float(outputs["result"][_abi.RESULT_TOTAL]), ref_norms(grads, 2.0)[0], 1e-6)


@pytest.mark.parametrize("table, value", [("dtypes", 7), ("chunk_start", -5), ("chunk_tensor", 9)])
def test_cuda_kernels_never_read_a_chunk_the_tables_do_not_describe(table, value):
    """The host cannot check device tables without a sync: a chunk with an unknown dtype tag, a start
    outside its tensor or a tensor index out of range is reported as one NaN element (found_inf) by
    the reduce and skipped by the scale; no memory outside a tensor is read or written."""
    _plan.PLANS.clear()
    grads = cuda_gen(141, [(100,), (3 * (1 << 16) + 1,)])
    at = _cuda_target(grads)
    getattr(at.plan, table)[1] = value  # tensor 1 / chunk 1 (tensor 1's first chunk)
    snap = snapshot(grads)
    try:
        r = _engine.measure(at, 1.0, 2.0, dtypes=(torch.float32, torch.float32))
        assert float(r.found_inf) == 1.0 and math.isnan(float(r.total_norm))
        nans = r.tensor_counts[:, 0].tolist()
        assert sum(nans) == (4 if table == "dtypes" else 1), nans
        _engine.apply_scale(at, torch.tensor(0.5, device=DEV))
        torch.cuda.synchronize()
        if table == "dtypes":
            assert_unchanged(grads[1:], snap[1:], "an unreadable tensor was scaled")
    finally:
        _plan.PLANS.clear()
