"""Phase 2 of ``gradfuse._abi``: every gradient scaled in place by its chunk's factor.

Programs stride over the chunks of the plan (one program per chunk by default, or a persistent grid:
see PROGRAMS_PER_SM). The factor of chunk c is the device scalar ``*scale_ptr``, or with
FLAG_READ_TENSOR_SCALES its tensor's ``tensor_scales[chunk_tensor[c]]`` (layer-wise clipping). A
factor of exactly 1 leaves the gradient memory untouched: a program returns at once when the one
scalar is 1, or skips the chunks whose tensor's factor is (a NaN factor is not 1, so NaN
propagates like torch). Otherwise, for every element of the chunk::

    x = dtype(fp32(x) * s)            one rounding to the gradient's dtype (round to nearest even)
    x = 0                             instead, when zero_if_scale_is_zero and s == 0
                                      (POLICY_ZERO: NaN * 0 would stay NaN)

Same chunk walk as the reduce (head to the 16-byte boundary, unmasked aligned body, masked tail).
A chunk the tables do not describe (``_common.resolve_chunk``: unknown dtype tag, tensor index or
start out of range) is skipped, as the CUDA kernel skips it.
One launch, no host synchronisation, no allocation: capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gradfuse import _abi

from ._common import (
    DTYPE_BF16,
    DTYPE_F16,
    DTYPE_F32,
    INTERPRETED,
    annotated,
    check_device,
    check_plan,
    head_length,
    launch_context,
    load_f32,
    require,
    resolve_chunk,
    store_f32,
)

# ---- tunables (the chunk size is the plan's) ---------------------------------------------------
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
def _scale_block(ptrs, mask, s, ZERO_IF_SCALE_IS_ZERO: tl.constexpr):
    """x = x * s in fp32 with one rounding back to the gradient's dtype (or 0 when s == 0 and asked)."""
    y = load_f32(ptrs, mask) * s
    if ZERO_IF_SCALE_IS_ZERO:
        y = tl.where(s == 0.0, 0.0, y)
    store_f32(ptrs, y, mask)


@triton.jit
def _scale_chunk(
    ptr,  # *fp32 | *fp16 | *bf16 [n]: the chunk, scaled in place
    n,  # int32: elements in the chunk (> 0)
    s,  # fp32: the factor
    BLOCK: tl.constexpr,
    ZERO_IF_SCALE_IS_ZERO: tl.constexpr,
):
    """One chunk: head (to the 16-byte boundary) + unmasked aligned body + masked tail."""
    idx = tl.arange(0, BLOCK)
    h = head_length(ptr, n)
    if h > 0:
        _scale_block(ptr + idx, idx < h, s, ZERO_IF_SCALE_IS_ZERO)

    body = tl.multiple_of(ptr + h, 16)  # 16-byte aligned (h elements past ptr)
    n_full = (n - h) // BLOCK
    for b in range(0, n_full):
        off = tl.multiple_of(b * BLOCK, BLOCK)
        _scale_block(body + off + idx, None, s, ZERO_IF_SCALE_IS_ZERO)

    tail = h + n_full * BLOCK
    if tail < n:
        _scale_block(ptr + tail + idx, idx < n - tail, s, ZERO_IF_SCALE_IS_ZERO)


@triton.jit
def _scale_chunk_at(
    addr,  # int64: the chunk's first element (resolve_chunk)
    n,  # int32: its elements
    dt,  # its dtype tag, or UNREADABLE
    s,  # fp32: the factor
    BLOCK_32: tl.constexpr,
    BLOCK_16: tl.constexpr,
    ZERO_IF_SCALE_IS_ZERO: tl.constexpr,
):
    """One resolved chunk, scaled by s; an unreadable one is left alone."""
    # The dtype picks the pointer type (a runtime branch; each arm is a specialised copy).
    if dt == DTYPE_F32:
        _scale_chunk(addr.to(tl.pointer_type(tl.float32)), n, s, BLOCK_32, ZERO_IF_SCALE_IS_ZERO)
    elif dt == DTYPE_F16:
        _scale_chunk(addr.to(tl.pointer_type(tl.float16)), n, s, BLOCK_16, ZERO_IF_SCALE_IS_ZERO)
    elif dt == DTYPE_BF16:
        _scale_chunk(addr.to(tl.pointer_type(tl.bfloat16)), n, s, BLOCK_16, ZERO_IF_SCALE_IS_ZERO)


# Every address argument is the descriptor field of the same name: an int64 holding the address of
# the buffer described in its comment (0 where the field is absent).
@annotated
@triton.jit(do_not_specialize=["addrs", "numels", "dtypes", "chunk_tensor", "chunk_start", "num_tensors",
                               "num_chunks", "chunk_size", "tensor_scales", "scale_ptr"])  # fmt: skip
def _scale_kernel(
    addrs: tl.int64,  # *int64 [T]: address of element 0 of each tensor
    numels: tl.int64,  # *int64 [T]: elements per tensor
    dtypes: tl.int64,  # *int64 [T]: DTYPE_F32 | DTYPE_F16 | DTYPE_BF16
    chunk_tensor: tl.int64,  # *int64 [C]: tensor of each chunk
    chunk_start: tl.int64,  # *int64 [C]: first element of each chunk inside its tensor
    num_tensors: tl.int64,  # T
    num_chunks: tl.int64,  # C
    chunk_size: tl.int64,
    tensor_scales: tl.int64,  # *fp32 [T]: the factor of each tensor (PER_TENSOR), or 0
    scale_ptr: tl.int64,  # *fp32 [1]: the factor of every chunk (not PER_TENSOR), or 0
    PER_TENSOR: tl.constexpr,  # FLAG_READ_TENSOR_SCALES
    ZERO_IF_SCALE_IS_ZERO: tl.constexpr,
    BLOCK_32: tl.constexpr,
    BLOCK_16: tl.constexpr,
):
    """x *= factor over chunks pid, pid + num_programs, ... (persistent), skipping factors of 1."""
    addrs_ptr = addrs.to(tl.pointer_type(tl.int64))
    numels_ptr = numels.to(tl.pointer_type(tl.int64))
    dtypes_ptr = dtypes.to(tl.pointer_type(tl.int64))
    chunk_tensor_ptr = chunk_tensor.to(tl.pointer_type(tl.int64))
    chunk_start_ptr = chunk_start.to(tl.pointer_type(tl.int64))
    if PER_TENSOR:
        scales_ptr = tensor_scales.to(tl.pointer_type(tl.float32))
        for c in range(tl.program_id(0), num_chunks, tl.num_programs(0)):
            t = tl.load(chunk_tensor_ptr + c)
            s = tl.load(scales_ptr + tl.where((t >= 0) & (t < num_tensors), t, 0))  # an unreadable t: skipped below
            if s != 1.0:
                _t, addr, n, dt = resolve_chunk(c, num_tensors, chunk_size, addrs_ptr, numels_ptr, dtypes_ptr,
                                                chunk_tensor_ptr, chunk_start_ptr)  # fmt: skip
                _scale_chunk_at(addr, n, dt, s, BLOCK_32, BLOCK_16, ZERO_IF_SCALE_IS_ZERO)
    else:
        s = tl.load(scale_ptr.to(tl.pointer_type(tl.float32)))
        if s != 1.0:  # else nothing to do
            for c in range(tl.program_id(0), num_chunks, tl.num_programs(0)):
                _t, addr, n, dt = resolve_chunk(c, num_tensors, chunk_size, addrs_ptr, numels_ptr, dtypes_ptr,
                                                chunk_tensor_ptr, chunk_start_ptr)  # fmt: skip
                _scale_chunk_at(addr, n, dt, s, BLOCK_32, BLOCK_16, ZERO_IF_SCALE_IS_ZERO)


_SM_COUNT: dict[int, int] = {}


def _num_programs(num_chunks: int, device: torch.device) -> int:
    if INTERPRETED:
        return min(num_chunks, INTERPRET_PROGRAMS)
    if PROGRAMS_PER_SM <= 0:
        return num_chunks
    index = device.index if device.index is not None else torch.cuda.current_device()
    sms = _SM_COUNT.get(index)
    if sms is None:  # a host-side property (no synchronisation), cached per device
        sms = _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return min(num_chunks, sms * PROGRAMS_PER_SM)


def _check(desc: _abi.ClipDesc) -> None:
    """The descriptor fields the scale reads, before any memory is touched (the tables' contents
    are the plan's: reading them here would synchronise)."""
    check_plan(desc)
    require(desc, "tensor_scales" if desc.flags & _abi.FLAG_READ_TENSOR_SCALES else "scale_ptr")


def config(per_tensor: bool, zero_if_scale_is_zero: bool) -> dict:
    """The scale kernel's constexprs and compile options for one variant (what a launch compiles)."""
    return dict(
        PER_TENSOR=per_tensor,
        ZERO_IF_SCALE_IS_ZERO=zero_if_scale_is_zero,
        BLOCK_32=BLOCK_32,
        BLOCK_16=BLOCK_16,
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,  # nothing to fuse: x * s is one rounding
    )


def scale(desc: _abi.ClipDesc, device: torch.device) -> None:
    """Phase 2 of ``desc`` (one launch on ``device``): the gradients scaled in place. Never
    synchronises with the host: the programs read the factors on the device."""
    check_device(device)
    _check(desc)
    if desc.num_chunks == 0:
        return
    d = desc
    with launch_context(device):
        _scale_kernel[(_num_programs(d.num_chunks, device),)](
            d.addrs, d.numels, d.dtypes, d.chunk_tensor, d.chunk_start, d.num_tensors, d.num_chunks, d.chunk_size,
            d.tensor_scales, d.scale_ptr,
            **config(bool(d.flags & _abi.FLAG_READ_TENSOR_SCALES), bool(d.zero_if_scale_is_zero)),
        )  # fmt: skip
