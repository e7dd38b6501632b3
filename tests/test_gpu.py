"""GPU tests (``-m gpu``): the cuda and triton backends on CUDA tensors.

Skipped without a CUDA device. Parity with ``torch.nn.utils`` and an fp64 reference, NaN/Inf at
chunk edges, misaligned and non-contiguous views, a tensor over 2^31 elements, zero-size tensors,
determinism, CUDA graph capture and replay, torch.compile, no host syncs on the default path, and a
scale pass that leaves memory alone when nothing is clipped.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.utils as tnu
from helpers import (
    GPU_BACKENDS,
    assert_close_rel,
    assert_scaled,
    assert_unchanged,
    bits,
    param_with_grad,
    params_from,
    ref_coef,
    ref_norms,
    snapshot,
    twin_params,
)
from test_semantics import compare_with_torch, gen

import gradfuse
from gradfuse import _backends, _plan

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
    first = gradfuse.clip_grads(params, 1.0, apply=False, backend=backend)
    t0, n0 = bits(first.total_norm), bits(first.tensor_norms)
    for _ in range(100):
        r = gradfuse.clip_grads(params, 1.0, apply=False, backend=backend)
        assert bits(r.total_norm).equal(t0)
        assert bits(r.tensor_norms).equal(n0)
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
@pytest.mark.parametrize("fn", ["clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grads_tensor_max_norm", "clip_grads_inv_scale"])
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
