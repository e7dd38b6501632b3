"""Pieces shared by the gradfuse Triton kernels: ABI constants, element access, the launch context.

Every table, workspace and output buffer reaches a kernel as the int64 address the descriptor holds
(``gradfuse._abi.ClipDesc``); the kernel casts it to a typed pointer
(``addr.to(tl.pointer_type(tl.float32))``), as it does for the gradient addresses of the ``addrs``
table; ``resolve_chunk`` turns chunk c into its tensor's dtype, address and length, or UNREADABLE.
A chunk of a gradient is streamed through three regions, so the hot loop has no mask and aligned,
wide loads (STEP = BLOCK * UNROLL elements per step of the body: the reduce's UNROLL_32 /
UNROLL_16, 1 for the scale)::

    head  [0, h)                     h < 16 bytes / element size: elements before the first 16-byte
                                     boundary (0 for every allocation torch makes; views may have some)
    body  [h, h + n_full * STEP)     unmasked BLOCK-wide accesses from a 16-byte aligned pointer,
                                     UNROLL of them per step
    tail  [h + n_full * STEP, n)     fewer than STEP elements: at most UNROLL masked BLOCK-wide
                                     accesses (one for the scale)

Elements are read and written through ``load_f32`` / ``store_f32``, ``|x|^y`` is ``pow_abs``, and
reductions and scans with a combine function of our own are ``block_reduce`` / ``block_scan``.
Under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) these names are bound to the stand-ins
of ``_interpreter.py`` instead (the interpreter converts bf16 inexactly, has no libdevice, and runs
such combine functions one element at a time), so the kernels themselves have no interpreter
branch.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.interpreter import InterpretedFunction

from gradfuse import _abi

# ABI constants as constexprs (globals read inside @triton.jit functions must be constexpr).
DTYPE_F32 = tl.constexpr(_abi.DTYPE_F32)
DTYPE_F16 = tl.constexpr(_abi.DTYPE_F16)
DTYPE_BF16 = tl.constexpr(_abi.DTYPE_BF16)
UNREADABLE = tl.constexpr(-1)  # resolve_chunk's dtype of a chunk the tables do not describe
MAX_CHUNK_SIZE = 1 << 30  # every backend's limit (the CUDA kernels index inside a chunk with int32)

POLICY_PROPAGATE = tl.constexpr(_abi.POLICY_PROPAGATE)
POLICY_SKIP = tl.constexpr(_abi.POLICY_SKIP)
POLICY_ZERO = tl.constexpr(_abi.POLICY_ZERO)

RESULT_TOTAL = tl.constexpr(_abi.RESULT_TOTAL)
RESULT_FOUND_INF = tl.constexpr(_abi.RESULT_FOUND_INF)
RESULT_COEF = tl.constexpr(_abi.RESULT_COEF)
RESULT_SCALE = tl.constexpr(_abi.RESULT_SCALE)

CLIP_EPS = tl.constexpr(_abi.CLIP_EPS)
RESCAN_TERM_LOG2 = tl.constexpr(_abi.RESCAN_TERM_LOG2)
TINY_TERM = tl.constexpr(2.0**_abi.RESCAN_TERM_LOG2)  # NORM_P, p < 0: a partial below it is re-read

ALIGN_BYTES = tl.constexpr(16)  # the width of one vector access (ld.global.v4.b32)


def fail(message: str):
    """A descriptor field the kernels cannot run with: raised before any memory is touched."""
    raise ValueError(f"gradfuse.triton_kernels: {message}")


# ---- element access (the GPU versions; see the module docstring for the interpreter's) ------------
@triton.jit
def load_f32(ptrs, mask):
    """Gradient elements as fp32; with a mask, masked-off lanes read 0."""
    if mask is None:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=mask, other=0)
    return x.to(tl.float32)


@triton.jit
def store_f32(ptrs, y, mask):
    """fp32 values ``y`` into gradient elements, one rounding to their dtype (to nearest even)."""
    out = y.to(ptrs.dtype.element_ty)
    if mask is None:
        tl.store(ptrs, out)
    else:
        tl.store(ptrs, out, mask=mask)


@triton.jit
def pow_abs(x, y):
    """|x|^y in the dtype of x and y (libdevice: powf for fp32, pow for fp64)."""
    return libdevice.pow(tl.abs(x), y)


#: The kernels were built by Triton's interpreter (TRITON_INTERPRET=1 when triton decorated them):
#: they run on CPU tensors only; otherwise on CUDA tensors only.
INTERPRETED = isinstance(load_f32, InterpretedFunction)


def annotated(kernel):
    """Decorates a kernel whose scalar parameters are typed by annotations (``addr: tl.int64``,
    ``p: tl.float64``): Triton's GPU build honours them as they are (its interpreter does not)."""
    return kernel


block_reduce = tl.reduce  # over a block, with a combine function of our own
block_scan = tl.associative_scan

if INTERPRETED:
    from ._interpreter import annotated, block_reduce, block_scan, load_f32, pow_abs, store_f32  # noqa: F401, F811


# ---- NaN-propagating max / min, for the reductions (torch.max / min propagate NaN) ---------------
@triton.jit
def max_nan(a, b):
    """max(a, b), NaN if either is NaN."""
    return tl.where(a != a, a, tl.where(a > b, a, b))


@triton.jit
def min_nan(a, b):
    """min(a, b), NaN if either is NaN."""
    return tl.where(a != a, a, tl.where(a < b, a, b))


# ---- the chunk walk ----------------------------------------------------------------------------
@triton.jit
def head_length(ptr, n):
    """Elements of the chunk at ``ptr`` (``n`` elements) before its first 16-byte boundary."""
    ESIZE: tl.constexpr = ptr.dtype.element_ty.primitive_bitwidth // 8
    VEC: tl.constexpr = ALIGN_BYTES // ESIZE
    mis = ((ptr.to(tl.int64) % ALIGN_BYTES) // ESIZE).to(tl.int32)
    return tl.minimum((VEC - mis) % VEC, n)


@triton.jit
def resolve_chunk(c, num_tensors, chunk_size, addrs_ptr, numels_ptr, dtypes_ptr, chunk_tensor_ptr, chunk_start_ptr):
    """Chunk c of the plan as (t, addr, n, dt): its tensor, the int64 address of its first element,
    its element count (int32) and its dtype tag, or dt = UNREADABLE (n = 0) when the tables do not
    describe a chunk the kernels can read: a tensor index outside [0, T), a start outside its tensor
    or an unknown tag. The host cannot check device tables without a sync and a kernel cannot raise:
    the reduce reports such a chunk as one NaN element, the scale skips it, and neither touches
    memory outside a tensor (CUDA's chunk_walk.cuh resolve; the *_ptr are the typed tables)."""
    t = tl.load(chunk_tensor_ptr + c)
    start = tl.load(chunk_start_ptr + c)  # int64: tensors may exceed 2^31 elements
    ok = (t >= 0) & (t < num_tensors)
    row = tl.where(ok, t, 0)  # tensor 0 exists: check_plan refuses chunks without tensors
    numel = tl.load(numels_ptr + row)
    dt = tl.load(dtypes_ptr + row)
    addr = tl.load(addrs_ptr + row)
    ok = ok & (start >= 0) & (start < numel) & ((dt == DTYPE_F32) | (dt == DTYPE_F16) | (dt == DTYPE_BF16))
    n = tl.where(ok, tl.minimum(numel - start, chunk_size), 0).to(tl.int32)  # chunk_size <= 2^30
    base = addr + start * tl.where(dt == DTYPE_F32, 4, 2)
    return t, base, n, tl.where(ok, dt, UNREADABLE)


# ---- host side -----------------------------------------------------------------------------------
def check_device(device: torch.device) -> None:
    """Raw addresses are dereferenced where the kernel runs: host memory for the interpreter."""
    if INTERPRETED and device.type != "cpu":
        raise RuntimeError(
            "gradfuse.triton_kernels runs in Triton's interpreter (TRITON_INTERPRET=1), which reads "
            f"host memory: it needs CPU tensors, not {device.type} tensors"
        )
    if not INTERPRETED and device.type != "cuda":
        raise RuntimeError(
            f"gradfuse.triton_kernels runs on CUDA tensors, not {device.type} tensors "
            "(set TRITON_INTERPRET=1 before importing triton to interpret them on the CPU)"
        )


def launch_context(device: torch.device):
    """The context a launch runs in: the plan's CUDA device; numpy quiet about inf/NaN when interpreted."""
    if INTERPRETED:
        return np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore")
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def require(desc: _abi.ClipDesc, *fields: str) -> None:
    """Every named address field of ``desc`` is set (not 0)."""
    for name in fields:
        if getattr(desc, name) == 0:
            fail(f"{name} is 0")


def check_plan(desc: _abi.ClipDesc) -> None:
    """The plan fields both phases read: sizes, flags, and the tables of a plan with chunks."""
    if not 1 <= desc.chunk_size <= MAX_CHUNK_SIZE:
        fail(f"chunk_size must be in [1, 2^30], got {desc.chunk_size}")
    if desc.num_chunks < 0:
        fail(f"num_chunks must be >= 0, got {desc.num_chunks}")
    if desc.num_tensors < 0:
        fail(f"num_tensors must be >= 0, got {desc.num_tensors}")
    if desc.num_chunks > 0 and desc.num_tensors == 0:
        fail(f"num_chunks is {desc.num_chunks} but num_tensors is 0")
    if desc.flags & ~(_abi.FLAG_WRITE_TENSOR_SCALES | _abi.FLAG_READ_TENSOR_SCALES):
        fail(f"flags {desc.flags} has bits outside FLAG_WRITE_TENSOR_SCALES | FLAG_READ_TENSOR_SCALES")
    if desc.num_chunks > 0:
        require(desc, "addrs", "numels", "dtypes", "chunk_tensor", "chunk_start")
