"""Phase 1 of ``gradfuse._abi``: every gradient read once; norms, statistics and the clip scale.

One program per chunk of the plan (grid = num_chunks, at least 1). Each program:

1. reads its chunk (fp32/fp16/bf16 by the tensor's dtype tag; the int64 address becomes a typed
   pointer in the kernel) with unmasked 16-byte loads in the body, folding every element into
   fp32 lanes (``KIND.fold``, ``_norm_kinds``) and into a per-lane max |x| (max.NaN.f32, every
   kind); the lanes give the chunk's fp64 partial P_c and max |x|;
2. decides once, from those two, whether the chunk must be read a second time (never for finite
   gradients of ordinary magnitude, so the fast path stays one read and has no per-element test):

   * max |x| not finite: its NaN and Inf elements are counted (else the counts are 0);
   * L2 / L1 / P with p > 0, chunk finite, and P_c overflowed (|x| > ~1.8e19 for squares) or
     0 < max_abs with p * log2(max_abs) < RESCAN_TERM_LOG2 (fp32 terms near the subnormals):
     P_c = sum over the chunk of term(|x| 2^-e) in fp32, times 2^(p e) in fp64 (``_times_pow2``:
     no 2^(p e) of its own, which could underflow), with 2^e the power of two at max_abs: exact
     to fp32 accuracy for every finite input (p <= 8);
   * P with p < 0, chunk finite, and P_c overflowed (|x|^p of a tiny |x|) or is below
     2^RESCAN_TERM_LOG2 (only large |x|): P_c = the sum with every term in fp64 (a zero element
     still gives inf, torch's answer: norm 0);
   * INF, NEG_INF, L0: no such re-read (max, min and counts are exact);

   and writes chunk_partials[c], chunk_max_abs[c], chunk_counts[2c : 2c + 2] (a chunk the tables
   do not describe, ``resolve_chunk``: NaN, NaN, 1 NaN element, never read);
3. takes a ticket (``atomic_add(ticket, 1)``, acq_rel, after a CTA barrier so the whole program's
   stores are released). The program that draws the last ticket runs ``_finalize.finalize`` and
   resets the ticket to 0 for the next call.

NORM_P's terms use fp32(p) (the ``p`` the chunk functions get), and so does the root
(``_norm_kinds._term_order``). One launch, no host synchronisation, no allocation: capturable in a
CUDA graph.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from gradfuse import _abi

from ._common import (
    DTYPE_BF16,
    DTYPE_F16,
    DTYPE_F32,
    RESCAN_TERM_LOG2,
    TINY_TERM,
    annotated,
    check_device,
    check_plan,
    fail,
    head_length,
    launch_context,
    load_f32,
    pow_abs,
    require,
    resolve_chunk,
)
from ._finalize import finalize
from ._norm_kinds import NORM_KINDS

# ---- tunables (the chunk size is the plan's: gradfuse._backends.TritonBackend.chunk_size) -----------
# Measured on an H200 (benchmarks/NOTES.md): BLOCK and NUM_WARPS with the chunk size.
BLOCK = 2048  # elements per vector access (BLOCK / (32 * NUM_WARPS) per thread)
UNROLL_32 = 2  # vector accesses in flight per step of the body loop, fp32 gradients
UNROLL_16 = 4  # the same for fp16 / bf16 gradients (same bytes in flight)
NUM_WARPS = 8  # warps per program of the reduce kernel
FINAL_BLOCK = 512  # chunks per step of the finalize scan (run by the last program)
# Register caps, not yet measured on a GPU (set from ptxas's counts for sm_90 and the occupancy
# they allow): 80 lets 3 programs of 8 warps share an SM (65536 registers), as the measured v1
# kernel had (72); the chunk loop takes ~62, the v2 finalize, run by one program per call, would
# take ~106 and spills the excess instead. NORM_P (powf, compute-bound): 128, 2 programs per SM,
# one reload from L1 per loop step (uncapped, Triton 3.6 takes 172: 1 per SM).
MAX_REGISTERS = 80
MAX_REGISTERS_POW = 128


# ---- the fast path ------------------------------------------------------------------------------
@triton.jit
def _read_chunk(
    ptr,  # *fp32 | *fp16 | *bf16 [n]: the chunk
    n,  # int32: elements in the chunk (> 0)
    p,  # fp32: the order of the terms
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """The fast path: head (to the 16-byte boundary) + unmasked aligned body + masked tail.
    Returns the fp32 lanes (KIND.fold) and the per-lane max |x| (NaN-propagating: max.NaN.f32).

    Masked-off lanes load 0, which max |x| ignores; their fold is undone (0^p is inf for p < 0).
    """
    idx = tl.arange(0, BLOCK)
    acc = tl.full([BLOCK], KIND.identity, tl.float32)
    amax = tl.zeros([BLOCK], tl.float32)

    h = head_length(ptr, n)
    if h > 0:
        m = idx < h
        x = load_f32(ptr + idx, m)
        amax = tl.maximum(amax, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
        acc = tl.where(m, KIND.fold(acc, x, p), acc)

    body = tl.multiple_of(ptr + h, 16)  # 16-byte aligned (h elements past ptr)
    STEP: tl.constexpr = BLOCK * UNROLL
    n_full = (n - h) // STEP
    for b in range(0, n_full):
        off = tl.multiple_of(b * STEP, STEP)
        for u in tl.static_range(UNROLL):
            x = load_f32(body + off + u * BLOCK + idx, None)
            amax = tl.maximum(amax, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
            acc = KIND.fold(acc, x, p)

    for tail in range(h + n_full * STEP, n, BLOCK):
        m = idx < n - tail
        x = load_f32(ptr + tail + idx, m)
        amax = tl.maximum(amax, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
        acc = tl.where(m, KIND.fold(acc, x, p), acc)
    return acc, amax


# ---- the rare second read ----------------------------------------------------------------------
@triton.jit
def _count_nonfinite(ptr, n, BLOCK: tl.constexpr):
    """The NaN and the +-Inf elements of a chunk (``ptr``: *fp32 | *fp16 | *bf16 [n])."""
    idx = tl.arange(0, BLOCK)
    nans = tl.zeros([BLOCK], tl.int32)
    infs = tl.zeros([BLOCK], tl.int32)
    for off in range(0, n, BLOCK):
        x = load_f32(ptr + off + idx, idx < n - off)  # masked-off lanes read 0, a finite value
        nans += (x != x).to(tl.int32)
        infs += (tl.abs(x) == float("inf")).to(tl.int32)
    return tl.sum(nans, axis=0), tl.sum(infs, axis=0)


@triton.jit
def _exponent(m):
    """e with 2^e <= m < 2^(e+1), from the bits of a finite fp32 m > 0 (subnormals scaled first)."""
    bits = m.to(tl.int32, bitcast=True)
    subnormal = bits < 0x00800000
    bits = tl.where(subnormal, (m * 16777216.0).to(tl.int32, bitcast=True), bits)  # * 2^24, exact
    return (bits >> 23) - tl.where(subnormal, 127 + 24, 127)


@triton.jit
def _pow2_f32(k):
    """2^k in fp32, exactly, for integer -126 <= k <= 127."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _pow2_f64(k):
    """2^k in fp64, exactly, for integer -1022 <= k <= 1023."""
    return ((k.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit
def _times_pow2(s, power, e):
    """s * 2^(power e) in fp64 (s >= 1, power: fp64, e: int32) without forming 2^(power e), which
    may leave fp64's range where the product does not: one rounding, gradual underflow (CUDA's
    times_pow2). 2^k is applied as two exact halves, the first product staying normal."""
    t = power * e.to(tl.float64)
    k = tl.floor(t)
    v = s * pow_abs(tl.full([], 2.0, tl.float64), t - k)  # 2^frac, in [1, 2)
    k1 = k.to(tl.int32) >> 1
    return (v * _pow2_f64(k1)) * _pow2_f64(k.to(tl.int32) - k1)


@triton.jit
def _exact_partial(ptr, n, max_abs, p, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """P_c of a finite chunk (``ptr``: *fp32 | *fp16 | *bf16 [n]) whose fp32 terms overflow or
    underflow: sum term(|x| 2^-e) in fp32 times 2^(p e) in fp64, 2^e <= max_abs < 2^(e+1).

    The scaled elements are below 2, their terms below 2^p: no overflow, and the largest terms
    keep every digit. 2^-e is applied as two exact fp32 factors (2^149 has no fp32 form), and term
    is multiplicative (|x|^p, p the kind's order), so only fp32 rounding remains.
    """
    e = _exponent(max_abs)
    half = (-e) >> 1
    down_hi = _pow2_f32(half)
    down_lo = _pow2_f32(-e - half)
    idx = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for off in range(0, n, BLOCK):
        x = load_f32(ptr + off + idx, idx < n - off)  # masked-off lanes read 0: term 0 for p > 0
        acc = KIND.fold(acc, x * down_hi * down_lo, p)
    return _times_pow2(tl.sum(acc.to(tl.float64), axis=0), p.to(tl.float64), e)


@triton.jit
def _fp64_partial(ptr, n, p, BLOCK: tl.constexpr):
    """P_c of a finite chunk for NORM_P with p < 0 whose fp32 partial left fp32's range: sum |x|^p
    with every term in fp64 (p: the fast path's fp32 p). Masked-off lanes add nothing."""
    idx = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float64)
    p64 = p.to(tl.float64)
    for off in range(0, n, BLOCK):
        m = idx < n - off
        x = load_f32(ptr + off + idx, m).to(tl.float64)
        acc += tl.where(m, pow_abs(x, p64), 0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _reduce_chunk(
    ptr,  # *fp32 | *fp16 | *bf16 [n]: the chunk
    n,  # int32: elements in the chunk (> 0)
    c,  # the chunk's index
    p,  # fp32: the order of the terms
    partials_ptr,  # *fp64 [C]: chunk_partials
    max_abs_ptr,  # *fp32 [C]: chunk_max_abs
    counts_ptr,  # *int32 [2C]: chunk_counts
    KIND: tl.constexpr,
    BLOCK: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """One chunk's workspace entries: the fast path, then (rarely) a second read."""
    acc, amax = _read_chunk(ptr, n, p, KIND, BLOCK, UNROLL)
    # max |x| of the chunk: tl.max drops NaN lanes (maxnum), the NaN flag restores them.
    max_abs = tl.where(tl.max((amax != amax).to(tl.int32), axis=0) != 0, float("nan"), tl.max(amax, axis=0))
    partial = KIND.partial(acc, max_abs)
    nans = tl.zeros([], tl.int32)
    infs = tl.zeros([], tl.int32)
    if max_abs < float("inf"):  # finite: no NaN, no Inf
        if KIND.exact:
            overflowed = partial == float("inf")
            tiny = (max_abs > 0.0) & (p * tl.log2(max_abs) < RESCAN_TERM_LOG2)
            if (p > 0.0) & (overflowed | tiny):
                partial = _exact_partial(ptr, n, max_abs, p, KIND, BLOCK)
        if KIND.exact_negative:
            if (p < 0.0) & ((partial == float("inf")) | (partial < TINY_TERM)):
                partial = _fp64_partial(ptr, n, p, BLOCK)
    else:
        nans, infs = _count_nonfinite(ptr, n, BLOCK)
    tl.store(partials_ptr + c, partial)
    tl.store(max_abs_ptr + c, max_abs)
    tl.store(counts_ptr + 2 * c, nans)
    tl.store(counts_ptr + 2 * c + 1, infs)


# ---- the kernel ---------------------------------------------------------------------------------
# Every address argument is the descriptor field of the same name: an int64 holding the address of
# the buffer described in its comment (0 where the field is absent). Doubles are fp64 scalars.
_RUNTIME = ["addrs", "numels", "dtypes", "tensor_chunk_begin", "chunk_tensor", "chunk_start",
            "num_tensors", "num_chunks", "chunk_size", "chunk_partials", "chunk_max_abs", "chunk_counts",
            "ticket", "p", "max_norm", "max_norm_ptr", "inv_scale_ptr", "policy", "tensor_norms",
            "tensor_partials", "tensor_max_abs", "tensor_counts", "tensor_scales", "result"]  # fmt: skip


@annotated
@triton.jit(do_not_specialize=_RUNTIME)
def _reduce_kernel(
    addrs: tl.int64,  # *int64 [T]: address of element 0 of each tensor
    numels: tl.int64,  # *int64 [T]: elements per tensor
    dtypes: tl.int64,  # *int64 [T]: DTYPE_F32 | DTYPE_F16 | DTYPE_BF16
    tensor_chunk_begin: tl.int64,  # *int64 [T+1]: chunks of tensor t are [begin[t], begin[t+1])
    chunk_tensor: tl.int64,  # *int64 [C]: tensor of each chunk
    chunk_start: tl.int64,  # *int64 [C]: first element of each chunk inside its tensor
    num_tensors: tl.int64,  # T
    num_chunks: tl.int64,  # C
    chunk_size: tl.int64,
    chunk_partials: tl.int64,  # *fp64 [C]: workspace, P_c
    chunk_max_abs: tl.int64,  # *fp32 [C]: workspace, max |x| per chunk
    chunk_counts: tl.int64,  # *int32 [2C]: workspace, NaN and Inf elements per chunk
    ticket: tl.int64,  # *int32 [1]: workspace, 0 between calls
    p: tl.float64,  # the norm's order (NORM_P; the kind's own for L2 / L1)
    max_norm: tl.float64,  # the clipping threshold, unless max_norm_ptr
    max_norm_ptr: tl.int64,  # *fp32 [1]: the threshold on the device, or 0
    inv_scale_ptr: tl.int64,  # *fp32 [1]: AMP's inverse loss scale, or 0 (= 1)
    policy: tl.int64,  # POLICY_*
    tensor_norms: tl.int64,  # *fp32 [T]: out
    tensor_partials: tl.int64,  # *fp64 [T]: out, S_t
    tensor_max_abs: tl.int64,  # *fp32 [T]: out
    tensor_counts: tl.int64,  # *int64 [2T]: out, NaN and Inf elements per tensor
    tensor_scales: tl.int64,  # *fp32 [T]: out under FLAG_WRITE_TENSOR_SCALES, else 0
    result: tl.int64,  # *fp32 [RESULT_SIZE]: out, total / found_inf / coef / scale
    KIND: tl.constexpr,  # _norm_kinds.NormKind of the descriptor's norm_kind
    WRITE_SCALES: tl.constexpr,  # flags & FLAG_WRITE_TENSOR_SCALES
    BLOCK: tl.constexpr,
    UNROLL_32: tl.constexpr,
    UNROLL_16: tl.constexpr,
    FINAL_BLOCK: tl.constexpr,
):
    """Chunk c's workspace entries, then (last program) every output."""
    partials_ptr = chunk_partials.to(tl.pointer_type(tl.float64))
    max_abs_ptr = chunk_max_abs.to(tl.pointer_type(tl.float32))
    counts_ptr = chunk_counts.to(tl.pointer_type(tl.int32))
    ticket_ptr = ticket.to(tl.pointer_type(tl.int32))
    p32 = p.to(tl.float32)

    c = tl.program_id(0).to(tl.int64)  # int64: 2 * c indexes chunk_counts
    if c < num_chunks:
        _t, addr, n, dt = resolve_chunk(
            c, num_tensors, chunk_size, addrs.to(tl.pointer_type(tl.int64)), numels.to(tl.pointer_type(tl.int64)),
            dtypes.to(tl.pointer_type(tl.int64)), chunk_tensor.to(tl.pointer_type(tl.int64)),
            chunk_start.to(tl.pointer_type(tl.int64)),
        )  # fmt: skip
        # The dtype picks the pointer type (a runtime branch; each arm is a specialised copy).
        if dt == DTYPE_F32:
            x32 = addr.to(tl.pointer_type(tl.float32))
            _reduce_chunk(x32, n, c, p32, partials_ptr, max_abs_ptr, counts_ptr, KIND, BLOCK, UNROLL_32)
        elif dt == DTYPE_F16:
            x16 = addr.to(tl.pointer_type(tl.float16))
            _reduce_chunk(x16, n, c, p32, partials_ptr, max_abs_ptr, counts_ptr, KIND, BLOCK, UNROLL_16)
        elif dt == DTYPE_BF16:
            xb16 = addr.to(tl.pointer_type(tl.bfloat16))
            _reduce_chunk(xb16, n, c, p32, partials_ptr, max_abs_ptr, counts_ptr, KIND, BLOCK, UNROLL_16)
        else:  # UNREADABLE: one NaN element, never read (found_inf), as the CUDA kernel reports it
            tl.store(partials_ptr + c, float("nan"))
            tl.store(max_abs_ptr + c, float("nan"))
            tl.store(counts_ptr + 2 * c, 1)
            tl.store(counts_ptr + 2 * c + 1, 0)

    # Every thread's stores happen before this program's ticket (release); the last ticket's
    # acquire makes every program's workspace entries visible to the finalize.
    tl.debug_barrier()
    done = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if done == tl.num_programs(0) - 1:
        inv = tl.full([], 1.0, tl.float64)
        if inv_scale_ptr != 0:
            inv = tl.load(inv_scale_ptr.to(tl.pointer_type(tl.float32))).to(tl.float64)
        threshold = max_norm
        if max_norm_ptr != 0:
            threshold = tl.load(max_norm_ptr.to(tl.pointer_type(tl.float32))).to(tl.float64)
        finalize(
            tensor_chunk_begin.to(tl.pointer_type(tl.int64)), chunk_tensor.to(tl.pointer_type(tl.int64)),
            partials_ptr, max_abs_ptr, counts_ptr,
            tensor_norms.to(tl.pointer_type(tl.float32)), tensor_partials.to(tl.pointer_type(tl.float64)),
            tensor_max_abs.to(tl.pointer_type(tl.float32)), tensor_counts.to(tl.pointer_type(tl.int64)),
            tensor_scales.to(tl.pointer_type(tl.float32)), result.to(tl.pointer_type(tl.float32)),
            num_tensors, num_chunks, p, threshold, inv, policy, KIND, WRITE_SCALES, FINAL_BLOCK,
        )  # fmt: skip
        tl.store(ticket_ptr, 0)


# ---- launcher -----------------------------------------------------------------------------------
def _check(desc: _abi.ClipDesc) -> None:
    """The descriptor fields the reduce reads, before any memory is touched. The tables' contents
    are the plan's (gradfuse._plan builds and checks them); reading them here would synchronise."""
    check_plan(desc)
    if desc.norm_kind not in NORM_KINDS:
        fail(f"norm_kind {desc.norm_kind} is not one of NORM_L2 (0) .. NORM_L0 (5)")
    if desc.norm_kind == _abi.NORM_P and not (math.isfinite(desc.p) and desc.p != 0.0):
        fail(f"NORM_P needs a finite non-zero p, got {desc.p} (use NORM_INF/NEG_INF/L0)")
    if desc.policy not in (_abi.POLICY_PROPAGATE, _abi.POLICY_SKIP, _abi.POLICY_ZERO):
        fail(f"policy {desc.policy} is not one of POLICY_PROPAGATE (0), SKIP (1), ZERO (2)")
    require(desc, "result", "tensor_chunk_begin", "ticket")
    if desc.num_tensors > 0:
        require(desc, "addrs", "numels", "dtypes", "tensor_norms", "tensor_partials", "tensor_max_abs", "tensor_counts")
        if desc.flags & _abi.FLAG_WRITE_TENSOR_SCALES:
            require(desc, "tensor_scales")
    if desc.num_chunks > 0:
        require(desc, "chunk_partials", "chunk_max_abs", "chunk_counts")


def config(norm_kind: int, write_scales: bool) -> dict:
    """The reduce kernel's constexprs and compile options for one variant (what a launch compiles)."""
    return dict(
        KIND=NORM_KINDS[norm_kind],
        WRITE_SCALES=write_scales,
        BLOCK=BLOCK,
        UNROLL_32=UNROLL_32,
        UNROLL_16=UNROLL_16,
        FINAL_BLOCK=FINAL_BLOCK,
        num_warps=NUM_WARPS,
        maxnreg=MAX_REGISTERS_POW if norm_kind == _abi.NORM_P else MAX_REGISTERS,
        enable_fp_fusion=True,  # acc + x * x as one fma (explicit: Triton 3.10 changes the default)
    )


def reduce(desc: _abi.ClipDesc, device: torch.device) -> None:
    """Phase 1 of ``desc`` (one launch on ``device``): the workspace, then every output. Never
    synchronises with the host."""
    check_device(device)
    _check(desc)
    d = desc
    order = NORM_KINDS[d.norm_kind].order
    with launch_context(device):
        _reduce_kernel[(max(d.num_chunks, 1),)](
            d.addrs, d.numels, d.dtypes, d.tensor_chunk_begin, d.chunk_tensor, d.chunk_start,
            d.num_tensors, d.num_chunks, d.chunk_size,
            d.chunk_partials, d.chunk_max_abs, d.chunk_counts, d.ticket,
            d.p if order is None else order, d.max_norm, d.max_norm_ptr, d.inv_scale_ptr, d.policy,
            d.tensor_norms, d.tensor_partials, d.tensor_max_abs, d.tensor_counts, d.tensor_scales, d.result,
            **config(d.norm_kind, bool(d.flags & _abi.FLAG_WRITE_TENSOR_SCALES)),
        )  # fmt: skip
