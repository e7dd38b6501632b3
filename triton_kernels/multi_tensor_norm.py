"""Phase 1 of ``gradfuse._abi``: every gradient read once, norms and the clip scale in one launch.

One program per chunk of the plan (grid = num_chunks, at least 1). Each program:

1. reads its chunk (fp32/fp16/bf16, chosen by the tensor's dtype tag; the int64 address becomes a
   typed pointer in the kernel) with unmasked 16-byte loads in the body, accumulating in fp32 per
   lane, and writes ``chunk_partials[c]`` and ``chunk_nonfinite[c]``::

       NORM_L2: sum x^2      NORM_L1: sum |x|      NORM_P: sum |x|^p
       NORM_INF: max |x|     NORM_NEG_INF: min |x| (NaN if the chunk holds a NaN)
       NORM_L0: count of x != 0 (exact: a chunk holds < 2^24 elements)

2. takes a ticket (``atomic_add(ticket, 1)``, acq_rel, after a CTA barrier so the whole program's
   stores are released). The program that draws the last ticket reduces the partials, in a fixed
   order and in fp64, into (the ``_finalize`` formulas)::

       S_t    = sum / max / min over the chunks of t of chunk_partials
       norm_t = S_t ** (1/p) * inv_scale      (sqrt for L2, S_t for L1/INF/NEG_INF, S_t unscaled for L0)
       total  = (sum_t S_t) ** (1/p) * inv_scale   (max_t / min_t for +-inf; L0: #{t : S_t != 0})
       found_inf = any(chunk_nonfinite)
       coef  = min(max_norm / (fp32(total) + 1e-6), 1)   (NaN propagates, as torch.clamp)
       scale = coef * inv_scale, or 1 (POLICY_SKIP) / 0 (POLICY_ZERO) when found_inf

   and resets the ticket to 0 for the next call.

The finalize is a segmented scan over the flat chunk array (chunks are ordered by tensor; a segment
opens where chunk_tensor changes), FINAL_BLOCK chunks per step, the next step's loads in flight
during this step's scan: O(num_chunks / FINAL_BLOCK) vector steps whatever the number or the sizes
of the tensors (2048 tensors or 100k chunks: tens of microseconds), and the same tree on every run
(deterministic bits; the bits depend on FINAL_BLOCK and the chunk size). Empty tensors own no chunk;
a first pass writes their norms (the norm of an empty sum or max: 0; of an empty min: +inf).

No host synchronisation: capturable in a CUDA graph.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from gradfuse import _abi

from ._common import (
    CLIP_EPS,
    DTYPE_F16,
    DTYPE_F32,
    NORM_INF,
    NORM_L0,
    NORM_L1,
    NORM_L2,
    NORM_NEG_INF,
    NORM_P,
    POLICY_SKIP,
    POLICY_ZERO,
    RESULT_COEF,
    RESULT_FOUND_INF,
    RESULT_SCALE,
    RESULT_TOTAL,
    as_f64,
    check_device,
    f64_bits,
    head_length,
    interpreting,
    launch_context,
    load_f32,
)

# ---- tunables (chunk size and warps to be tuned on the GPU) ----------------------------------------
CHUNK_SIZE = 1 << 16  # elements per chunk (one program); the plan is built with it
BLOCK = 2048  # elements per vector access (BLOCK / (32 * NUM_WARPS) per thread)
UNROLL_32 = 2  # vector accesses in flight per step of the body loop, fp32 gradients
UNROLL_16 = 4  # the same for fp16 / bf16 gradients (same bytes in flight)
NUM_WARPS = 8  # warps per program of the reduce kernel
FINAL_BLOCK = 512  # chunks per step of the finalize scan (run by the last program; 1024 costs registers)


# ---- per-element accumulation ---------------------------------------------------------------------
def _identity(norm_kind: int) -> float:
    """The neutral element of a partial (IDENT constexpr): 0 for sums and max, +inf for min."""
    return float("inf") if norm_kind == _abi.NORM_NEG_INF else 0.0


@triton.jit
def _pow_abs(ax, p, INTERPRET: tl.constexpr):
    """|x|^p in fp32 (libdevice powf on the GPU; exp2/log2 in fp64 in the interpreter)."""
    if INTERPRET:
        a = ax.to(tl.float64)
        r = tl.exp2(tl.log2(a) * p.to(tl.float64))
        return r.to(tl.float32)
    else:
        return libdevice.pow(ax, p)


@triton.jit
def _accumulate(acc, amax, x, mask, p, NORM: tl.constexpr, IDENT: tl.constexpr, MASKED: tl.constexpr,
                INTERPRET: tl.constexpr):
    """Fold fp32 elements ``x`` into the per-lane partials ``acc`` and ``amax``.

    amax: max |x| per lane, NaN-propagating (max.NaN.f32): it tells +-inf and NaN apart at the end,
    and is the partial itself for NORM_INF (``acc`` is then unused).
    """
    ax = tl.abs(x)
    amax = tl.maximum(amax, ax, propagate_nan=tl.PropagateNan.ALL)
    if NORM == NORM_L2:
        acc = acc + x * x
    elif NORM == NORM_L1:
        acc = acc + ax
    elif NORM == NORM_P:
        v = _pow_abs(ax, p, INTERPRET)
        if MASKED:
            v = tl.where(mask, v, 0.0)  # 0^p is +inf for p < 0
        acc = acc + v
    elif NORM == NORM_L0:
        acc = acc + tl.where(x != 0.0, 1.0, 0.0)
    elif NORM == NORM_NEG_INF:
        if MASKED:
            ax = tl.where(mask, ax, float("inf"))
        acc = tl.minimum(acc, ax)  # NaN is restored from amax at the end
    return acc, amax


@triton.jit
def _reduce_chunk(
    ptr,  # *fp32 / *fp16 / *bf16 (or *uint16 bf16 bits): element 0 of the chunk
    c,  # chunk index
    n,  # elements in the chunk (int32, > 0)
    p,  # fp32 exponent (NORM_P)
    partials_ptr,  # *fp32 [C]: chunk_partials
    nonfinite_ptr,  # *int32 [C]: chunk_nonfinite
    ESIZE: tl.constexpr,
    NORM: tl.constexpr,
    IDENT: tl.constexpr,
    BLOCK: tl.constexpr,
    UNROLL: tl.constexpr,
    BF16_BITS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """One chunk: head (to the 16-byte boundary) + unmasked aligned body + masked tail.

    Masked-off lanes load 0, which leaves every partial unchanged except |0|^p (p < 0) and min:
    those two are masked explicitly.
    """
    idx = tl.arange(0, BLOCK)
    acc = tl.full([BLOCK], IDENT, tl.float32)
    amax = tl.zeros([BLOCK], tl.float32)

    h = head_length(ptr.to(tl.int64), n, ESIZE)
    if h > 0:
        m = idx < h
        x = load_f32(ptr + idx, m, True, BF16_BITS)
        acc, amax = _accumulate(acc, amax, x, m, p, NORM, IDENT, True, INTERPRET)

    body = tl.multiple_of(ptr + h, 16)  # 16-byte aligned (h elements past ptr)
    STEP: tl.constexpr = BLOCK * UNROLL
    n_full = (n - h) // STEP
    for b in range(0, n_full):
        off = tl.multiple_of(b * STEP, STEP)
        for u in tl.static_range(UNROLL):
            x = load_f32(body + off + u * BLOCK + idx, None, False, BF16_BITS)
            acc, amax = _accumulate(acc, amax, x, None, p, NORM, IDENT, False, INTERPRET)

    for tail in range(h + n_full * STEP, n, BLOCK):
        m = idx < n - tail
        x = load_f32(ptr + tail + idx, m, True, BF16_BITS)
        acc, amax = _accumulate(acc, amax, x, m, p, NORM, IDENT, True, INTERPRET)

    has_nan = tl.max(tl.where(amax != amax, 1, 0), axis=0)
    big = tl.max(amax, axis=0)  # NaN lanes may be dropped here (maxnum); has_nan keeps them
    has_inf = tl.where(big == float("inf"), 1, 0)
    if NORM == NORM_INF:
        part = tl.where(has_nan != 0, float("nan"), big)
    elif NORM == NORM_NEG_INF:
        part = tl.where(has_nan != 0, float("nan"), tl.min(acc, axis=0))
    else:
        part = tl.sum(acc, axis=0)  # NaN propagates through the sums (L0 counts a NaN as non-zero)
    tl.store(partials_ptr + c, part)
    tl.store(nonfinite_ptr + c, tl.maximum(has_nan, has_inf))


# ---- finalize (last program) ----------------------------------------------------------------------
@triton.jit
def _max_nan(a, b):
    """max that propagates NaN (either NaN operand gives NaN)."""
    return tl.where(a != a, a, tl.where(a > b, a, b))


@triton.jit
def _min_nan(a, b):
    """min that propagates NaN."""
    return tl.where(a != a, a, tl.where(a < b, a, b))


@triton.jit
def _combine(a, b, NORM: tl.constexpr):
    """How two partials of the same tensor combine: max (INF), min (NEG_INF), else sum."""
    if NORM == NORM_INF:
        return _max_nan(a, b)
    elif NORM == NORM_NEG_INF:
        return _min_nan(a, b)
    else:
        return a + b


@triton.jit
def _seg_sum(av, af, bv, bf):
    """Segmented-scan operator for sums: a segment restarts where the flag is set."""
    return tl.where(bf != 0, bv, av + bv), tl.maximum(af, bf)


@triton.jit
def _seg_max(av, af, bv, bf):
    return tl.where(bf != 0, bv, _max_nan(av, bv)), tl.maximum(af, bf)


@triton.jit
def _seg_min(av, af, bv, bf):
    return tl.where(bf != 0, bv, _min_nan(av, bv)), tl.maximum(af, bf)


@triton.jit
def _finish(s, p, inv, NORM: tl.constexpr, INTERPRET: tl.constexpr):
    """fp64 norm from its partial S: S^(1/p) * inv (sqrt for L2, S for L1/+-inf, S unscaled for L0)."""
    if NORM == NORM_L2:
        if INTERPRET:
            r = tl.sqrt(s) * inv
        else:
            r = libdevice.sqrt(s) * inv  # __nv_sqrt: IEEE fp64
    elif NORM == NORM_P:
        if INTERPRET:
            r = tl.exp2(tl.log2(s) / p) * inv
        else:
            r = libdevice.pow(s, 1.0 / p) * inv
    elif NORM == NORM_L0:
        r = s
    else:
        r = s * inv
    return r


@triton.jit
def _load_scan_block(
    partials_ptr,  # *fp32 [C]: chunk_partials
    nonfinite_ptr,  # *int32 [C]: chunk_nonfinite
    ct32_ptr,  # *int32 [2C]: chunk_tensor as int32 pairs (low word first)
    c0,  # first chunk of the block
    num_chunks,
    lane,  # arange(0, FINAL_BLOCK)
    IDENT: tl.constexpr,
):
    """One finalize block: partials, nonfinite flags, and the tensors of chunks c-1, c, c+1.

    Chunks past the end read IDENT / 0 / tensor -2; the tensor before chunk 0 and after the last one
    read -1, so the first chunk opens a tensor and the last one closes it.
    """
    c = c0 + lane
    m = c < num_chunks
    v = tl.load(partials_ptr + c, mask=m, other=IDENT, cache_modifier=".cg")
    bad = tl.load(nonfinite_ptr + c, mask=m, other=0, cache_modifier=".cg")
    t_prev = tl.load(ct32_ptr + 2 * (c - 1), mask=m & (c > 0), other=-1)
    t_cur = tl.load(ct32_ptr + 2 * c, mask=m, other=-2)
    t_next = tl.load(ct32_ptr + 2 * (c + 1), mask=c + 1 < num_chunks, other=-1)
    return v, bad, t_prev, t_cur, t_next


@triton.jit
def _finalize(
    partials_ptr,  # *fp32 [C]: chunk_partials
    nonfinite_ptr,  # *int32 [C]: chunk_nonfinite
    tcb_ptr,  # *int64 [T+1]: tensor_chunk_begin
    chunk_tensor_ptr,  # *int64 [C]: tensor of each chunk
    max_norm_ptr,  # *fp32 [1]: device max_norm (read when HAS_MAX_NORM_TENSOR)
    inv_scale_ptr,  # *fp32 [1]: device inv_scale (read when HAS_INV_SCALE)
    tensor_norms_ptr,  # *fp32 [T]: out, per-tensor norms
    result_ptr,  # *fp32 [4]: out, total / found_inf / coef / scale
    num_tensors,
    num_chunks,
    p,  # fp64 norm exponent
    max_norm,  # fp64 max_norm (when not HAS_MAX_NORM_TENSOR)
    policy,
    NORM: tl.constexpr,
    IDENT: tl.constexpr,
    HAS_MAX_NORM_TENSOR: tl.constexpr,
    HAS_INV_SCALE: tl.constexpr,
    FINAL_BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Per-tensor norms, total, found_inf, coef and scale from the partials (fp64, fixed order)."""
    if HAS_INV_SCALE:
        inv = tl.load(inv_scale_ptr).to(tl.float64)
    else:
        inv = tl.full([], 1.0, tl.float64)
    if HAS_MAX_NORM_TENSOR:
        max_norm = tl.load(max_norm_ptr).to(tl.float64)
    lane = tl.arange(0, FINAL_BLOCK)

    # Empty tensors own no chunk: their norm is the norm of the identity.
    empty_norm = _finish(tl.full([FINAL_BLOCK], IDENT, tl.float64), p, inv, NORM, INTERPRET).to(tl.float32)
    for t0 in range(0, num_tensors, FINAL_BLOCK):
        t = t0 + lane
        m = t < num_tensors
        first = tl.load(tcb_ptr + t, mask=m, other=0)
        end = tl.load(tcb_ptr + t + 1, mask=m, other=0)
        tl.store(tensor_norms_ptr + t, empty_norm, mask=m & (first == end))

    # Segmented scan over the chunks, FINAL_BLOCK at a time; `carry` is the running partial of the
    # tensor still open at the end of the previous step. The next step's loads are issued before
    # this step's scan (software pipelining: the loop is latency-bound). Totals and flags are
    # accumulated per lane and reduced once at the end (still a fixed order).
    ct32_ptr = chunk_tensor_ptr.to(tl.pointer_type(tl.int32))  # low words: tensor indices < 2^31
    v_n, bad_n, tp_n, tc_n, tx_n = _load_scan_block(
        partials_ptr, nonfinite_ptr, ct32_ptr, 0, num_chunks, lane, IDENT
    )
    carry = tl.full([], IDENT, tl.float64)
    if NORM == NORM_L0:
        totals = tl.zeros([FINAL_BLOCK], tl.float64)
    else:
        totals = tl.full([FINAL_BLOCK], IDENT, tl.float64)
    found = tl.zeros([FINAL_BLOCK], tl.int32)
    for c0 in range(0, num_chunks, FINAL_BLOCK):
        v = v_n.to(tl.float64)
        bad = bad_n
        t_prev = tp_n
        t_cur = tc_n
        t_next = tx_n
        v_n, bad_n, tp_n, tc_n, tx_n = _load_scan_block(
            partials_ptr, nonfinite_ptr, ct32_ptr, c0 + FINAL_BLOCK, num_chunks, lane, IDENT
        )
        is_first = t_cur != t_prev  # also true past the end (t_cur = -2)
        is_last = (c0 + lane < num_chunks) & (t_next != t_cur)
        v = tl.where((lane == 0) & (t_cur == t_prev), _combine(carry, v, NORM), v)
        flags = is_first.to(tl.int32)
        if NORM == NORM_INF:
            s, flags = tl.associative_scan((v, flags), 0, _seg_max)
        elif NORM == NORM_NEG_INF:
            s, flags = tl.associative_scan((v, flags), 0, _seg_min)
        else:
            s, flags = tl.associative_scan((v, flags), 0, _seg_sum)
        tl.store(tensor_norms_ptr + t_cur, _finish(s, p, inv, NORM, INTERPRET).to(tl.float32), mask=is_last)
        if NORM == NORM_INF:
            totals = _max_nan(totals, tl.where(is_last, s, IDENT))
        elif NORM == NORM_NEG_INF:
            totals = _min_nan(totals, tl.where(is_last, s, IDENT))
        elif NORM == NORM_L0:
            totals = totals + tl.where(is_last, tl.where(s != 0.0, 1.0, 0.0), 0.0).to(tl.float64)
        else:
            totals = totals + tl.where(is_last, s, 0.0)
        carry = tl.sum(tl.where(lane == FINAL_BLOCK - 1, s, 0.0), axis=0)
        found = tl.maximum(found, bad)

    if NORM == NORM_INF:
        total = tl.reduce(totals, 0, _max_nan)
    elif NORM == NORM_NEG_INF:
        total = tl.reduce(totals, 0, _min_nan)
    else:
        total = tl.sum(totals, axis=0)
    found = tl.max(found, axis=0)

    if NORM == NORM_L0:
        total_norm = total
    else:
        total_norm = _finish(total, p, inv, NORM, INTERPRET)
    total32 = total_norm.to(tl.float32)
    coef = max_norm / (total32.to(tl.float64) + CLIP_EPS)
    coef = tl.where(coef > 1.0, 1.0, coef)  # clamp(max=1); NaN > 1 is false: NaN stays
    scale = coef * inv
    found_inf = found > 0
    scale = tl.where(found_inf & (policy == POLICY_SKIP), 1.0, scale)
    scale = tl.where(found_inf & (policy == POLICY_ZERO), 0.0, scale)
    tl.store(result_ptr + RESULT_TOTAL, total32)
    tl.store(result_ptr + RESULT_FOUND_INF, found_inf.to(tl.float32))
    tl.store(result_ptr + RESULT_COEF, coef.to(tl.float32))
    tl.store(result_ptr + RESULT_SCALE, scale.to(tl.float32))


# ---- the kernel -----------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["num_tensors", "num_chunks", "chunk_size", "p_bits", "max_norm_bits", "policy"])
def _norm_kernel(
    addrs_ptr,  # *int64 [T]: address of element 0 of each tensor
    numels_ptr,  # *int64 [T]: elements per tensor
    dtypes_ptr,  # *int64 [T]: DTYPE_F32 | DTYPE_F16 | DTYPE_BF16
    tcb_ptr,  # *int64 [T+1]: tensor_chunk_begin
    chunk_tensor_ptr,  # *int64 [C]: tensor of each chunk
    chunk_start_ptr,  # *int64 [C]: first element of each chunk inside its tensor
    partials_ptr,  # *fp32 [C]: workspace, per-chunk partials
    nonfinite_ptr,  # *int32 [C]: workspace, per-chunk nonfinite flags
    ticket_ptr,  # *int32 [1]: workspace, 0 between calls
    max_norm_ptr,  # *fp32 [1]: device max_norm, or a dummy (HAS_MAX_NORM_TENSOR=False)
    inv_scale_ptr,  # *fp32 [1]: device inv_scale, or a dummy (HAS_INV_SCALE=False)
    tensor_norms_ptr,  # *fp32 [T]: out, per-tensor norms
    result_ptr,  # *fp32 [4]: out, RESULT_TOTAL / FOUND_INF / COEF / SCALE
    num_tensors,
    num_chunks,
    chunk_size,
    p_bits,  # the norm exponent as the bits of a double
    max_norm_bits,  # max_norm as the bits of a double
    policy,  # POLICY_PROPAGATE / SKIP / ZERO
    NORM: tl.constexpr,
    IDENT: tl.constexpr,  # neutral partial: 0.0, or +inf for NORM_NEG_INF
    HAS_MAX_NORM_TENSOR: tl.constexpr,
    HAS_INV_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
    UNROLL_32: tl.constexpr,
    UNROLL_16: tl.constexpr,
    FINAL_BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Chunk partials of the norm, then (last program) norms, total, found_inf, coef and scale."""
    c = tl.program_id(0)
    p64 = as_f64(p_bits)
    p = p64.to(tl.float32)
    if c < num_chunks:
        t = tl.load(chunk_tensor_ptr + c)
        start = tl.load(chunk_start_ptr + c)  # int64: tensors may exceed 2^31 elements
        n = tl.minimum(tl.load(numels_ptr + t) - start, chunk_size).to(tl.int32)
        dt = tl.load(dtypes_ptr + t)
        addr = tl.load(addrs_ptr + t)
        # The dtype picks the pointer type (a runtime branch; each arm is a specialised copy).
        if dt == DTYPE_F32:
            f32_ptr = (addr + start * 4).to(tl.pointer_type(tl.float32))
            _reduce_chunk(f32_ptr, c, n, p, partials_ptr, nonfinite_ptr,
                          4, NORM, IDENT, BLOCK, UNROLL_32, False, INTERPRET)
        elif dt == DTYPE_F16:
            f16_ptr = (addr + start * 2).to(tl.pointer_type(tl.float16))
            _reduce_chunk(f16_ptr, c, n, p, partials_ptr, nonfinite_ptr,
                          2, NORM, IDENT, BLOCK, UNROLL_16, False, INTERPRET)
        elif INTERPRET:  # bf16 as raw bits: the interpreter's bf16 conversions are not exact
            bits_ptr = (addr + start * 2).to(tl.pointer_type(tl.uint16))
            _reduce_chunk(bits_ptr, c, n, p, partials_ptr, nonfinite_ptr,
                          2, NORM, IDENT, BLOCK, UNROLL_16, True, INTERPRET)
        else:
            bf16_ptr = (addr + start * 2).to(tl.pointer_type(tl.bfloat16))
            _reduce_chunk(bf16_ptr, c, n, p, partials_ptr, nonfinite_ptr,
                          2, NORM, IDENT, BLOCK, UNROLL_16, False, INTERPRET)

    # Every thread's stores happen before this program's ticket (release); the last ticket's
    # acquire makes every program's partials visible to the finalize.
    tl.debug_barrier()
    done = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if done == tl.num_programs(0) - 1:
        _finalize(
            partials_ptr, nonfinite_ptr, tcb_ptr, chunk_tensor_ptr,
            max_norm_ptr, inv_scale_ptr, tensor_norms_ptr, result_ptr,
            num_tensors, num_chunks, p64, as_f64(max_norm_bits), policy,
            NORM, IDENT, HAS_MAX_NORM_TENSOR, HAS_INV_SCALE, FINAL_BLOCK, INTERPRET,
        )  # fmt: skip
        tl.store(ticket_ptr, 0)


_INTERPRET = interpreting(_norm_kernel)


def reduce(plan, norm_kind, p, max_norm, max_norm_tensor, inv_scale, policy, tensor_norms, result) -> None:
    """Phase 1 over ``plan`` (one launch): fills ``tensor_norms`` [T] and ``result`` [4] (float32).

    ``max_norm_tensor`` / ``inv_scale``: None or float32 one-element tensors on the plan's device.
    Never synchronises with the host.
    """
    check_device(plan.device, _INTERPRET)
    dummy = result  # any valid fp32 pointer, never read
    grid = (max(plan.num_chunks, 1),)
    with launch_context(plan.device, _INTERPRET):
        _norm_kernel[grid](
            plan.addrs, plan.numels, plan.dtypes, plan.tensor_chunk_begin, plan.chunk_tensor, plan.chunk_start,
            plan.chunk_partials, plan.chunk_nonfinite, plan.ticket,
            dummy if max_norm_tensor is None else max_norm_tensor,
            dummy if inv_scale is None else inv_scale,
            tensor_norms, result,
            plan.num_tensors, plan.num_chunks, plan.chunk_size,
            f64_bits(p), f64_bits(max_norm), int(policy),
            NORM=int(norm_kind),
            IDENT=_identity(norm_kind),
            HAS_MAX_NORM_TENSOR=max_norm_tensor is not None,
            HAS_INV_SCALE=inv_scale is not None,
            BLOCK=BLOCK,
            UNROLL_32=UNROLL_32,
            UNROLL_16=UNROLL_16,
            FINAL_BLOCK=FINAL_BLOCK,
            INTERPRET=_INTERPRET,
            num_warps=NUM_WARPS,
            enable_fp_fusion=True,  # acc + x * x as one fma (explicit: Triton 3.10 changes the default)
        )  # fmt: skip
