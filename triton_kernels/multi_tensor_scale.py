"""Phase 2 of ``gradfuse._abi``: scale every gradient in place by the device scalar ``scale``.

Programs stride over the chunks of the plan (one program per chunk by default, or a persistent grid:
see PROGRAMS_PER_SM). Each program loads ``scale`` first and, when ``scale == 1``, returns without touching
gradient memory (a NaN scale is not == 1, so NaN propagates like torch).
Otherwise, for every element of its chunk::

    x = dtype(fp32(x) * scale)        one rounding to the gradient's dtype (round to nearest even)
    x = 0                             instead, when ZERO_IF_SCALE_IS_ZERO and scale == 0
                                      (POLICY_ZERO: NaN * 0 would stay NaN)

Same chunk walk as the reduce (head to the 16-byte boundary, unmasked aligned body, masked tail).
No host synchronisation: capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    DTYPE_F16,
    DTYPE_F32,
    check_device,
    f32_to_bf16_bits,
    head_length,
    interpreting,
    launch_context,
    load_f32,
)

# ---- tunables (to be tuned on the GPU; the chunk size is the plan's) ------------------------------
BLOCK_32 = 4096  # fp32 elements per step (BLOCK_32 / (32 * NUM_WARPS) per thread), all loads issued together
BLOCK_16 = 8192  # fp16 / bf16 elements per step (the same bytes)
NUM_WARPS = 8  # warps per program
# Grid: 0 = one program per chunk (fastest when scaling: 3.89 TB/s read+write on an H200, 7B bf16; but
# a skipped scale still launches every program: ~65 us for 100k chunks); N > 0 = persistent grid of
# min(num_chunks, SMs * N) programs striding over the chunks (a skip costs one wave, ~22 us with the
# launch; the scaling itself ran 2-5% slower with N = 2, 4, 8, 32).
PROGRAMS_PER_SM = 0
INTERPRET_PROGRAMS = 3  # the interpreter's grid (small, so the chunk striding is exercised)


@triton.jit
def _scale_block(ptrs, mask, s, MASKED: tl.constexpr, ZERO_IF_SCALE_IS_ZERO: tl.constexpr, BF16_BITS: tl.constexpr):
    """x = x * s in fp32 with one rounding back to the pointee type (or 0 when s == 0 and asked)."""
    y = load_f32(ptrs, mask, MASKED, BF16_BITS) * s
    if ZERO_IF_SCALE_IS_ZERO:
        y = tl.where(s == 0.0, 0.0, y)
    if BF16_BITS:
        out = f32_to_bf16_bits(y)
    else:
        out = y.to(ptrs.dtype.element_ty)
    if MASKED:
        tl.store(ptrs, out, mask=mask)
    else:
        tl.store(ptrs, out)


@triton.jit
def _scale_chunk(
    ptr,  # *fp32 / *fp16 / *bf16 (or *uint16 bf16 bits): element 0 of the chunk, scaled in place
    n,  # elements in the chunk (int32, > 0)
    s,  # fp32 scale
    ESIZE: tl.constexpr,
    BLOCK: tl.constexpr,
    ZERO_IF_SCALE_IS_ZERO: tl.constexpr,
    BF16_BITS: tl.constexpr,
):
    """One chunk: head (to the 16-byte boundary) + unmasked aligned body + masked tail."""
    idx = tl.arange(0, BLOCK)
    h = head_length(ptr.to(tl.int64), n, ESIZE)
    if h > 0:
        _scale_block(ptr + idx, idx < h, s, True, ZERO_IF_SCALE_IS_ZERO, BF16_BITS)

    body = tl.multiple_of(ptr + h, 16)  # 16-byte aligned (h elements past ptr)
    n_full = (n - h) // BLOCK
    for b in range(0, n_full):
        off = tl.multiple_of(b * BLOCK, BLOCK)
        _scale_block(body + off + idx, None, s, False, ZERO_IF_SCALE_IS_ZERO, BF16_BITS)

    tail = h + n_full * BLOCK
    if tail < n:
        _scale_block(ptr + tail + idx, idx < n - tail, s, True, ZERO_IF_SCALE_IS_ZERO, BF16_BITS)


@triton.jit(do_not_specialize=["num_chunks", "chunk_size"])
def _scale_kernel(
    addrs_ptr,  # *int64 [T]: address of element 0 of each tensor
    numels_ptr,  # *int64 [T]: elements per tensor
    dtypes_ptr,  # *int64 [T]: DTYPE_F32 | DTYPE_F16 | DTYPE_BF16
    chunk_tensor_ptr,  # *int64 [C]: tensor of each chunk
    chunk_start_ptr,  # *int64 [C]: first element of each chunk inside its tensor
    scale_ptr,  # *fp32 [1]: the scale (result[RESULT_SCALE] of the reduce)
    num_chunks,
    chunk_size,
    ZERO_IF_SCALE_IS_ZERO: tl.constexpr,
    BLOCK_32: tl.constexpr,
    BLOCK_16: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """x *= scale over chunks pid, pid + num_programs, ... (persistent), unless scale == 1."""
    s = tl.load(scale_ptr)
    if s == 1.0:  # nothing to do (a NaN scale is not == 1: it goes on and propagates)
        pass
    else:
        for c in range(tl.program_id(0), num_chunks, tl.num_programs(0)):
            t = tl.load(chunk_tensor_ptr + c)
            start = tl.load(chunk_start_ptr + c)  # int64: tensors may exceed 2^31 elements
            n = tl.minimum(tl.load(numels_ptr + t) - start, chunk_size).to(tl.int32)
            dt = tl.load(dtypes_ptr + t)
            addr = tl.load(addrs_ptr + t)
            # The dtype picks the pointer type (a runtime branch; each arm is a specialised copy).
            if dt == DTYPE_F32:
                f32_ptr = (addr + start * 4).to(tl.pointer_type(tl.float32))
                _scale_chunk(f32_ptr, n, s, 4, BLOCK_32, ZERO_IF_SCALE_IS_ZERO, False)
            elif dt == DTYPE_F16:
                f16_ptr = (addr + start * 2).to(tl.pointer_type(tl.float16))
                _scale_chunk(f16_ptr, n, s, 2, BLOCK_16, ZERO_IF_SCALE_IS_ZERO, False)
            elif INTERPRET:  # bf16 as raw bits: the interpreter rounds fp32 -> bf16 by truncation
                bits_ptr = (addr + start * 2).to(tl.pointer_type(tl.uint16))
                _scale_chunk(bits_ptr, n, s, 2, BLOCK_16, ZERO_IF_SCALE_IS_ZERO, True)
            else:
                bf16_ptr = (addr + start * 2).to(tl.pointer_type(tl.bfloat16))
                _scale_chunk(bf16_ptr, n, s, 2, BLOCK_16, ZERO_IF_SCALE_IS_ZERO, False)


_INTERPRET = interpreting(_scale_kernel)
_SM_COUNT: dict[int, int] = {}


def _num_programs(plan) -> int:
    if _INTERPRET:
        return min(plan.num_chunks, INTERPRET_PROGRAMS)
    if PROGRAMS_PER_SM <= 0:
        return plan.num_chunks
    index = plan.device.index if plan.device.index is not None else torch.cuda.current_device()
    sms = _SM_COUNT.get(index)
    if sms is None:  # a host-side property (no synchronisation), cached per device
        sms = _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return min(plan.num_chunks, sms * PROGRAMS_PER_SM)


def scale(plan, scale, zero_if_scale_is_zero) -> None:
    """Phase 2 over ``plan`` (one launch): grads *= ``scale`` (float32 [1] device tensor) in place.

    Never synchronises with the host: programs read ``scale`` on the device and skip when == 1.
    """
    check_device(plan.device, _INTERPRET)
    if plan.num_chunks == 0:
        return
    with launch_context(plan.device, _INTERPRET):
        _scale_kernel[(_num_programs(plan),)](
            plan.addrs, plan.numels, plan.dtypes, plan.chunk_tensor, plan.chunk_start, scale,
            plan.num_chunks, plan.chunk_size,
            ZERO_IF_SCALE_IS_ZERO=bool(zero_if_scale_is_zero),
            BLOCK_32=BLOCK_32,
            BLOCK_16=BLOCK_16,
            INTERPRET=_INTERPRET,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,  # nothing to fuse: x * scale is one rounding
        )  # fmt: skip
