"""Pieces shared by the gradfuse Triton kernels: ABI constants, typed access to raw addresses.

The plan hands every gradient as an int64 address plus a dtype tag (``gradfuse._abi``). A kernel
turns the address into a typed pointer inside the kernel (``addr.to(tl.pointer_type(tl.float16))``)
and streams a chunk through three regions, so the hot loop has no mask and aligned, wide loads::

    head  [0, h)                  h < 16 bytes / element size: elements before the first 16-byte
                                  boundary (0 for every allocation torch makes; views may have some)
    body  [h, h + n_full * BLOCK)  unmasked BLOCK-wide accesses from a 16-byte aligned pointer
    tail  [h + n_full * BLOCK, n)  one masked BLOCK-wide access

Interpreter (TRITON_INTERPRET=1, CPU tensors): the interpreter has no libdevice and rounds fp32 to
bf16 by truncation, so the kernels take an ``INTERPRET`` constexpr that swaps in exact numpy-friendly
equivalents (bf16 handled as its bit pattern with explicit round-to-nearest-even; pow as
exp2/log2 in fp64). The GPU build never compiles those branches.
"""

from __future__ import annotations

import contextlib
import struct

import numpy as np
import torch
import triton
import triton.language as tl

from gradfuse import _abi

# ABI constants as constexprs (globals read inside @triton.jit functions must be constexpr).
DTYPE_F32 = tl.constexpr(_abi.DTYPE_F32)
DTYPE_F16 = tl.constexpr(_abi.DTYPE_F16)
DTYPE_BF16 = tl.constexpr(_abi.DTYPE_BF16)

NORM_L2 = tl.constexpr(_abi.NORM_L2)
NORM_L1 = tl.constexpr(_abi.NORM_L1)
NORM_P = tl.constexpr(_abi.NORM_P)
NORM_INF = tl.constexpr(_abi.NORM_INF)
NORM_NEG_INF = tl.constexpr(_abi.NORM_NEG_INF)
NORM_L0 = tl.constexpr(_abi.NORM_L0)

POLICY_SKIP = tl.constexpr(_abi.POLICY_SKIP)
POLICY_ZERO = tl.constexpr(_abi.POLICY_ZERO)

RESULT_TOTAL = tl.constexpr(_abi.RESULT_TOTAL)
RESULT_FOUND_INF = tl.constexpr(_abi.RESULT_FOUND_INF)
RESULT_COEF = tl.constexpr(_abi.RESULT_COEF)
RESULT_SCALE = tl.constexpr(_abi.RESULT_SCALE)

CLIP_EPS = tl.constexpr(_abi.CLIP_EPS)

ALIGN_BYTES = tl.constexpr(16)  # the width of one vector access (ld.global.v4.b32)


def interpreting(kernel) -> bool:
    """Whether ``kernel`` (a @triton.jit object) runs in Triton's interpreter."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every supported triton has it
        return False
    return isinstance(kernel, InterpretedFunction)


def check_device(device: torch.device, interpret: bool) -> None:
    """Raw addresses are dereferenced where the kernel runs: host memory for the interpreter."""
    if interpret and device.type != "cpu":
        raise RuntimeError(
            "gradfuse.triton_kernels runs in Triton's interpreter (TRITON_INTERPRET=1), which reads "
            f"host memory: it needs CPU tensors, not {device.type} tensors"
        )
    if not interpret and device.type != "cuda":
        raise RuntimeError(
            f"gradfuse.triton_kernels runs on CUDA tensors, not {device.type} tensors "
            "(set TRITON_INTERPRET=1 before importing triton to interpret them on the CPU)"
        )


def launch_context(device: torch.device, interpret: bool):
    """The context a launch runs in: the plan's CUDA device; numpy quiet about inf/NaN when interpreted."""
    if interpret:
        return np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore")
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def f64_bits(x: float) -> int:
    """The bits of a Python float as a signed int64: passes a double to a kernel without rounding."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@triton.jit
def as_f64(bits):
    """Inverse of ``f64_bits`` inside a kernel (small values arrive as int32: widen first)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def load_f32(ptrs, mask, MASKED: tl.constexpr, BF16_BITS: tl.constexpr):
    """Load gradient elements as fp32. BF16_BITS: ``ptrs`` are uint16 bf16 bit patterns (interpreter)."""
    if MASKED:
        x = tl.load(ptrs, mask=mask, other=0)
    else:
        x = tl.load(ptrs)
    if BF16_BITS:
        return (x.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def f32_to_bf16_bits(y):
    """fp32 -> bf16 bit pattern, round to nearest even, NaN kept NaN (the interpreter truncates)."""
    bits = y.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return tl.where(y != y, quiet_nan, rounded).to(tl.uint16)


@triton.jit
def head_length(addr, n, ESIZE: tl.constexpr):
    """Elements of a chunk that starts at byte address ``addr`` before its first 16-byte boundary."""
    VEC: tl.constexpr = ALIGN_BYTES // ESIZE
    mis = ((addr % ALIGN_BYTES) // ESIZE).to(tl.int32)
    return tl.minimum((VEC - mis) % VEC, n)
