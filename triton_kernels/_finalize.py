"""The end of phase 1, run by the reduce's last program: every output from the chunk workspace.

In fp64 and in a fixed order (the same bits on every run), the formulas of ``gradfuse._abi``::

    S_t, max |x|_t, NaN / Inf counts_t  = combine over the chunks of t (empty tensor: identity, 0, 0)
    norm_t = root(S_t) * inv             tensor_scales[t] = fp32(coef(norm_t) * inv)  (FLAG_WRITE_TENSOR_SCALES)
    total  = root(combine_t total_term(S_t)) * inv
    found_inf = any chunk count != 0
    coef(x) = min(1, max_norm / (fp32(x) + CLIP_EPS)) in fp64 (NaN kept; fp64 x where fp32(x) is inf)
    scale  = coef(total) * inv, then the policy: found_inf ? 1 (SKIP) / 0 (ZERO); the same policy
             then overwrites every tensor_scales[t]

The chunks are ordered by tensor, so the per-tensor values are a segmented scan over the flat chunk
array (a segment opens where chunk_tensor changes), FINAL_BLOCK chunks per step with the next
step's loads in flight, and the running values of the tensor still open at the end of a step
carried into the next one: O(num_chunks / FINAL_BLOCK) vector steps whatever the number and sizes
of the tensors. The bits depend on FINAL_BLOCK and the chunk size, never on the run.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import (
    CLIP_EPS,
    POLICY_PROPAGATE,
    POLICY_SKIP,
    POLICY_ZERO,
    RESULT_COEF,
    RESULT_FOUND_INF,
    RESULT_SCALE,
    RESULT_TOTAL,
    block_reduce,
    max_nan,
)


@triton.jit
def _clip_coef(max_norm, norm):
    """min(1, max_norm / (t + CLIP_EPS)) in fp64, t = fp32(norm), or norm itself where that is inf."""
    t32 = norm.to(tl.float32)
    t = tl.where(t32 == float("inf"), norm, t32.to(tl.float64))
    coef = max_norm / (t + CLIP_EPS)
    return tl.where(coef > 1.0, 1.0, coef)  # clamp(max=1): NaN > 1 is false, so NaN stays


@triton.jit
def _with_policy(factor, found_inf, policy):
    """The scale pass's factor on a step with a NaN/Inf: 1 (POLICY_SKIP), 0 (POLICY_ZERO), or as is."""
    factor = tl.where(found_inf & (policy == POLICY_SKIP), 1.0, factor)
    return tl.where(found_inf & (policy == POLICY_ZERO), 0.0, factor)


@triton.jit
def _store_tensors(
    t,  # int32 | int64 [FINAL_BLOCK]: tensor indices
    mask,  # int1 [FINAL_BLOCK]: the lanes that hold a tensor's final values (t in [0, T))
    s,  # fp64 [FINAL_BLOCK]: S_t
    max_abs,  # fp32 [FINAL_BLOCK]
    nans,  # int64 [FINAL_BLOCK]
    infs,  # int64 [FINAL_BLOCK]
    tensor_norms_ptr,  # *fp32 [T]
    tensor_partials_ptr,  # *fp64 [T]
    tensor_max_abs_ptr,  # *fp32 [T]
    tensor_counts_ptr,  # *int64 [2T]: NaN, Inf per tensor
    tensor_scales_ptr,  # *fp32 [T]: written when WRITE_SCALES
    p,  # fp64: the norm's order
    inv,  # fp64: inv_scale
    max_norm,  # fp64
    KIND: tl.constexpr,
    WRITE_SCALES: tl.constexpr,  # FLAG_WRITE_TENSOR_SCALES
):
    """Every per-tensor output of the tensors in ``mask``."""
    t = t.to(tl.int64)  # 2 * t indexes tensor_counts
    norm64 = KIND.root(s, p, inv)
    tl.store(tensor_partials_ptr + t, s, mask=mask)
    tl.store(tensor_norms_ptr + t, norm64.to(tl.float32), mask=mask)
    tl.store(tensor_max_abs_ptr + t, max_abs, mask=mask)
    tl.store(tensor_counts_ptr + 2 * t, nans, mask=mask)
    tl.store(tensor_counts_ptr + 2 * t + 1, infs, mask=mask)
    if WRITE_SCALES:
        scale = _clip_coef(max_norm, norm64) * inv  # fp32(norm_t), or the fp64 norm where that overflows
        tl.store(tensor_scales_ptr + t, scale.to(tl.float32), mask=mask)


@triton.jit
def _load_chunks(
    partials_ptr,  # *fp64 [C]: chunk_partials
    max_abs_ptr,  # *fp32 [C]: chunk_max_abs
    counts_ptr,  # *int32 [2C]: chunk_counts
    ct32_ptr,  # *int32 [2C]: chunk_tensor as int32 pairs (low word first; tensor indices < 2^31)
    c0,  # the first chunk of the step
    num_chunks,
    lane,  # int32 [FINAL_BLOCK]: arange
    KIND: tl.constexpr,
):
    """One step's chunks: their partials, max |x| and counts, and the tensors of chunks c-1, c, c+1.

    Chunks past the end read the identity and tensor -2; the tensor before chunk 0 and after the
    last chunk read -1, so the first chunk opens a tensor and the last one closes it. ``.cg``: the
    other programs wrote these, read them from L2.
    """
    c = c0 + lane.to(tl.int64)  # int64: 2 * c indexes chunk_counts
    m = c < num_chunks
    v = tl.load(partials_ptr + c, mask=m, other=KIND.identity, cache_modifier=".cg")
    mx = tl.load(max_abs_ptr + c, mask=m, other=0.0, cache_modifier=".cg")
    nans = tl.load(counts_ptr + 2 * c, mask=m, other=0, cache_modifier=".cg")
    infs = tl.load(counts_ptr + 2 * c + 1, mask=m, other=0, cache_modifier=".cg")
    t_prev = tl.load(ct32_ptr + 2 * (c - 1), mask=m & (c > 0), other=-1)
    t_cur = tl.load(ct32_ptr + 2 * c, mask=m, other=-2)
    t_next = tl.load(ct32_ptr + 2 * (c + 1), mask=c + 1 < num_chunks, other=-1)
    return v, mx, nans, infs, t_prev, t_cur, t_next


@triton.jit
def _later(av, am, an, ai, al, bv, bm, bn, bi, bl):
    """Of two lanes' values, those of the later lane (al, bl: lane indices)."""
    b = bl > al
    return tl.where(b, bv, av), tl.where(b, bm, am), tl.where(b, bn, an), tl.where(b, bi, ai), tl.where(b, bl, al)


@triton.jit
def finalize(
    tcb_ptr,  # *int64 [T+1]: tensor_chunk_begin
    chunk_tensor_ptr,  # *int64 [C]: chunk_tensor
    partials_ptr,  # *fp64 [C]: chunk_partials
    max_abs_ptr,  # *fp32 [C]: chunk_max_abs
    counts_ptr,  # *int32 [2C]: chunk_counts
    tensor_norms_ptr,  # *fp32 [T]
    tensor_partials_ptr,  # *fp64 [T]
    tensor_max_abs_ptr,  # *fp32 [T]
    tensor_counts_ptr,  # *int64 [2T]
    tensor_scales_ptr,  # *fp32 [T]: written under FLAG_WRITE_TENSOR_SCALES
    result_ptr,  # *fp32 [RESULT_SIZE]
    num_tensors,
    num_chunks,
    p,  # fp64: the norm's order
    max_norm,  # fp64: the clipping threshold
    inv,  # fp64: inv_scale
    policy,  # POLICY_*
    KIND: tl.constexpr,  # NormKind
    WRITE_SCALES: tl.constexpr,  # FLAG_WRITE_TENSOR_SCALES
    FINAL_BLOCK: tl.constexpr,
):
    """Per-tensor outputs, total, found_inf, coef and scale from the chunk workspace."""
    lane = tl.arange(0, FINAL_BLOCK)
    zeros = tl.zeros([FINAL_BLOCK], tl.int64)

    # Tensors without elements own no chunk: their values are the identities.
    for t0 in range(0, num_tensors, FINAL_BLOCK):
        t = t0 + lane
        m = t < num_tensors
        empty = m & (tl.load(tcb_ptr + t, mask=m, other=0) == tl.load(tcb_ptr + t + 1, mask=m, other=0))
        _store_tensors(
            t, empty, tl.full([FINAL_BLOCK], KIND.identity, tl.float64), tl.zeros([FINAL_BLOCK], tl.float32),
            zeros, zeros, tensor_norms_ptr, tensor_partials_ptr, tensor_max_abs_ptr, tensor_counts_ptr,
            tensor_scales_ptr, p, inv, max_norm, KIND, WRITE_SCALES,
        )  # fmt: skip

    # The segmented scan. carry_*: the running values of the tensor still open after the last
    # step; totals and found: per lane, reduced once at the end (still a fixed order).
    ct32_ptr = chunk_tensor_ptr.to(tl.pointer_type(tl.int32))
    v_n, mx_n, nans_n, infs_n, tp_n, tc_n, tx_n = _load_chunks(
        partials_ptr, max_abs_ptr, counts_ptr, ct32_ptr, 0, num_chunks, lane, KIND
    )
    carry_v = tl.full([], KIND.identity, tl.float64)
    carry_m = tl.zeros([], tl.float32)
    carry_n = tl.zeros([], tl.int64)
    carry_i = tl.zeros([], tl.int64)
    totals = tl.full([FINAL_BLOCK], KIND.identity, tl.float64)
    found = tl.zeros([FINAL_BLOCK], tl.int32)
    for c0 in range(0, num_chunks, FINAL_BLOCK):
        v, mx, nans, infs, t_prev, t_cur, t_next = v_n, mx_n, nans_n, infs_n, tp_n, tc_n, tx_n
        v_n, mx_n, nans_n, infs_n, tp_n, tc_n, tx_n = _load_chunks(
            partials_ptr, max_abs_ptr, counts_ptr, ct32_ptr, c0 + FINAL_BLOCK, num_chunks, lane, KIND
        )
        found = found | ((nans | infs) != 0).to(tl.int32)
        s, mx, nans32, infs32, opened = KIND.scan(v, mx, nans, infs, (t_cur != t_prev).to(tl.int32))
        # The lanes before the first tensor that opens in this step continue the carried one.
        goes_on = opened == 0
        s = tl.where(goes_on, KIND.combine(carry_v, s), s)
        mx = tl.where(goes_on, max_nan(carry_m, mx), mx)
        nans = tl.where(goes_on, carry_n, 0) + nans32.to(tl.int64)  # a step's counts fit int32
        infs = tl.where(goes_on, carry_i, 0) + infs32.to(tl.int64)

        closes = (c0 + lane < num_chunks) & (t_next != t_cur)  # the tensor's last chunk
        # A chunk_tensor entry outside [0, T) (an unreadable chunk: a NaN) reaches the total but
        # writes no tensor's outputs.
        _store_tensors(
            t_cur, closes & (t_cur >= 0) & (t_cur < num_tensors), s, mx, nans, infs, tensor_norms_ptr, tensor_partials_ptr, tensor_max_abs_ptr,
            tensor_counts_ptr, tensor_scales_ptr, p, inv, max_norm, KIND, WRITE_SCALES,
        )  # fmt: skip
        totals = KIND.combine(totals, tl.where(closes, KIND.total_term(s), KIND.identity))
        carry_v, carry_m, carry_n, carry_i, _ = block_reduce((s, mx, nans, infs, lane), 0, _later)

    total = KIND.root(KIND.reduce(totals), p, inv)
    found_inf = tl.max(found, axis=0) != 0
    coef = _clip_coef(max_norm, total)
    tl.store(result_ptr + RESULT_TOTAL, total.to(tl.float32))
    tl.store(result_ptr + RESULT_FOUND_INF, found_inf.to(tl.float32))
    tl.store(result_ptr + RESULT_COEF, coef.to(tl.float32))
    tl.store(result_ptr + RESULT_SCALE, _with_policy(coef * inv, found_inf, policy).to(tl.float32))

    # The policy overrides every per-tensor factor too (rare: a step with a NaN/Inf). The barrier
    # orders these stores after the scan's, which other threads of this program made.
    if WRITE_SCALES:
        if found_inf & (policy != POLICY_PROPAGATE):
            tl.debug_barrier()
            fill = tl.where(policy == POLICY_SKIP, 1.0, 0.0).to(tl.float32)
            for t0 in range(0, num_tensors, FINAL_BLOCK):
                t = t0 + lane
                tl.store(tensor_scales_ptr + t, tl.zeros([FINAL_BLOCK], tl.float32) + fill, mask=t < num_tensors)
