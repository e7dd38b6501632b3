"""Stand-ins for Triton's interpreter (TRITON_INTERPRET=1), bound by ``_common`` in place of the GPU
versions of the same names; the GPU build never sees them. The bf16 conversions are bit-exact;
``pow_abs`` is not (exp2(y log2|x|) in fp64, where the GPU has libdevice's pow).

What the interpreter (numpy underneath) gets wrong, and what replaces it here:

* bf16 -> fp32 loses bf16 subnormals, and fp32 -> bf16 truncates: bf16 is widened and rounded on
  its bit pattern (round to nearest even, NaN kept NaN), as the GPU's cvt instructions do;
* no libdevice: |x|^y as exp2(y * log2|x|) in fp64 (IEEE pow's special cases come out of numpy's
  log2/exp2: 0^y = 0 or inf, inf^y = inf or 0, NaN^y = NaN);
* ``tl.reduce`` / ``tl.associative_scan`` with a combine function of our own call it once per
  element, from Python (seconds for one 512-lane scan): ``block_reduce`` and ``block_scan`` apply
  it to whole arrays, log2(n) times (a pairwise tree; a Hillis-Steele scan), the order a GPU
  uses too (the bits of a sum may differ from the GPU's, never between runs);
* scalar arguments are typed by their values, not by the parameters' annotations (a float is
  fp32, a small int int32): ``annotated`` types them as the GPU build does (``tl.int64``: int64,
  ``tl.float64``: fp64, so an address or a double arrives whole).
"""

from __future__ import annotations

import inspect

import numpy as np
import triton
import triton.language as tl
from triton.runtime.interpreter import TensorHandle
from triton.runtime.jit import _normalize_ty


@triton.jit
def _bf16_to_f32(x):
    return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _f32_to_bf16(y):
    """fp32 -> bf16, round to nearest even on the bits, NaN kept a quiet NaN."""
    bits = y.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    quiet_nan = (bits >> 16) | 0x40
    return tl.where(y != y, quiet_nan, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def load_f32(ptrs, mask):
    """Gradient elements as fp32; with a mask, masked-off lanes read 0."""
    if mask is None:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=mask, other=0)
    if x.dtype == tl.bfloat16:
        return _bf16_to_f32(x)
    return x.to(tl.float32)


@triton.jit
def store_f32(ptrs, y, mask):
    """fp32 values ``y`` into gradient elements, one rounding to their dtype (to nearest even)."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        out = _f32_to_bf16(y)
    else:
        out = y.to(ptrs.dtype.element_ty)
    if mask is None:
        tl.store(ptrs, out)
    else:
        tl.store(ptrs, out, mask=mask)


@triton.jit
def pow_abs(x, y):
    """|x|^y in the dtype of x, computed in fp64."""
    r = tl.exp2(tl.log2(tl.abs(x).to(tl.float64)) * y.to(tl.float64))
    return r.to(x.dtype)


_SCALARS = {"i64": (np.int64, tl.int64), "fp64": (np.float64, tl.float64)}


class annotated:  # noqa: N801 - stands in for the decorator of the same name in _common
    """``kernel[grid](*args, **constexprs)`` with each positional scalar typed by its parameter's
    annotation (``tl.int64`` / ``tl.float64``), as the GPU build types it."""

    def __init__(self, kernel):
        self.kernel = kernel
        params = inspect.signature(kernel.fn).parameters.values()
        self._types = [_SCALARS.get(_normalize_ty(p.annotation)) for p in params]

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            typed = [a if ty is None else _scalar(a, *ty) for a, ty in zip(args, self._types)]
            return launch(*typed, **kwargs)

        return run


def _scalar(value, np_dtype, tl_dtype):
    return tl.tensor(TensorHandle(np.array([value], dtype=np_dtype), tl_dtype), tl_dtype)


def _like(x, data):
    """A block of x's dtype holding ``data``."""
    return tl.tensor(TensorHandle(np.ascontiguousarray(data), x.handle.dtype), tl.block_type(x.type.scalar, list(data.shape)))


def _results(out) -> list:
    return list(out) if isinstance(out, tuple) else [out]


def block_reduce(input, axis, combine_fn):
    """tl.reduce of 1-D blocks: combine_fn over halves until one element is left."""
    xs = _results(input)
    assert axis == 0 and xs[0].handle.data.ndim == 1, "1-D blocks only"
    while xs[0].handle.data.shape[0] > 1:
        n = xs[0].handle.data.shape[0]
        half, odd = n // 2, n % 2
        a = [_like(x, x.handle.data[:half]) for x in xs]
        b = [_like(x, x.handle.data[half : 2 * half]) for x in xs]
        paired = _results(combine_fn(*a, *b))
        if odd:  # the last element waits for the next round
            paired = [_like(x, np.concatenate([p.handle.data, x.handle.data[-1:]])) for x, p in zip(xs, paired)]
        xs = paired
    scalars = [tl.tensor(TensorHandle(x.handle.data[:1].copy(), x.handle.dtype), x.dtype) for x in xs]
    return scalars[0] if isinstance(input, tl.tensor) else tuple(scalars)


def block_scan(input, axis, combine_fn):
    """tl.associative_scan of 1-D blocks: element i combined with element i - d, d = 1, 2, 4, ..."""
    xs = _results(input)
    assert axis == 0 and xs[0].handle.data.ndim == 1, "1-D blocks only"
    n = xs[0].handle.data.shape[0]
    d = 1
    while d < n:
        earlier = [_like(x, np.roll(x.handle.data, d)) for x in xs]  # lanes < d: discarded below
        combined = _results(combine_fn(*earlier, *xs))
        keep = np.arange(n) < d
        xs = [_like(x, np.where(keep, x.handle.data, c.handle.data)) for x, c in zip(xs, combined)]
        d *= 2
    return xs[0] if isinstance(input, tl.tensor) else tuple(xs)
