"""What each norm kind (``gradfuse._abi.NORM_*``) does, as small @triton.jit helpers.

``NORM_KINDS[kind]`` is a ``NormKind`` record; the reduce kernel receives it as one constexpr
(``KIND``) and calls ``KIND.fold(...)``, ``KIND.root(...)``, ..., so the kernels are written once
for every kind and each compiled copy holds only its kind's code::

    kind          fold (per element, fp32)   partial P_c (fp64)   combine   root(S) * inv
    NORM_L2       acc + x^2                  sum of the lanes     sum       sqrt(S) * inv
    NORM_L1       acc + |x|                  sum                  sum       S * inv
    NORM_P        acc + |x|^p                sum                  sum       S^(1/p) * inv  (p: fp32(p))
    NORM_INF      (max |x| is kept anyway)   max |x|              max       S * inv
    NORM_NEG_INF  min(acc, |x|)              min (NaN if any)     min       S * inv
    NORM_L0       acc + (x != 0)             sum (exact counts)   sum       S (unscaled)

max and min propagate NaN; a sum carries NaN and Inf like torch's (L0 counts a NaN as non-zero).
For the sums of powers (L2, L1, P) ``fold(acc, x, p) = acc + term(x)`` with ``term(x) = |x|^p``
multiplicative, which the exact re-read of a chunk relies on (``exact``; for p < 0,
``exact_negative``: every term again in fp64). NORM_P's terms take fp32(p), the kernel's ``p``
operand, and so does its root (``_term_order``), so terms and root use one p. The total is
``root(combine over t of total_term(S_t))``: S_t itself, or for L0 the count of tensors with
S_t != 0.
"""

from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

from gradfuse import _abi

from ._common import block_reduce, block_scan, max_nan, min_nan, pow_abs


class NormKind(NamedTuple):
    """One norm kind's helpers (``KIND`` in the kernels)."""

    identity: float  # the neutral partial: an empty tensor's S_t
    order: float | None  # the p of the terms |x|^p when the kind fixes it; None: the descriptor's p
    exact: bool  # P_c is re-read exactly when fp32 terms overflow or underflow (for p > 0)
    fold: triton.JITFunction  # fold(acc, x, p) -> acc: one element per lane into the fp32 lanes
    partial: triton.JITFunction  # partial(acc, max_abs) -> P_c in fp64 from the lanes
    combine: triton.JITFunction  # combine(a, b): two fp64 partials of one tensor
    scan: triton.JITFunction  # scan(v, max_abs, nans, infs, opens): the segmented scan of combine
    reduce: triton.JITFunction  # reduce(v): combine over a block's lanes, in a fixed tree
    root: triton.JITFunction  # root(S, p, inv) -> the norm
    total_term: triton.JITFunction  # total_term(S_t): what tensor t adds to the total's partial
    exact_negative: bool = False  # NORM_P, p < 0: a finite chunk whose fp32 partial left fp32's range is re-read in fp64


# ---- per element ------------------------------------------------------------------------------
@triton.jit
def _fold_square(acc, x, p):
    return acc + x * x  # one fma


@triton.jit
def _fold_abs(acc, x, p):
    return acc + tl.abs(x)


@triton.jit
def _fold_pow(acc, x, p):
    return acc + pow_abs(x, p)


@triton.jit
def _fold_nothing(acc, x, p):
    return acc  # NORM_INF: the partial is max |x|, tracked for every kind


@triton.jit
def _fold_min(acc, x, p):
    return tl.minimum(acc, tl.abs(x))  # drops NaN: partial_min restores it from max |x|


@triton.jit
def _fold_nonzero(acc, x, p):
    return acc + tl.where(x != 0.0, 1.0, 0.0)  # exact: a lane counts far fewer than 2^24


# ---- per chunk ------------------------------------------------------------------------------
@triton.jit
def _partial_sum(acc, max_abs):
    return tl.sum(acc.to(tl.float64), axis=0)


@triton.jit
def _partial_max(acc, max_abs):
    return max_abs.to(tl.float64)


@triton.jit
def _partial_min(acc, max_abs):
    return tl.where(max_abs != max_abs, max_abs, tl.min(acc, axis=0)).to(tl.float64)


# ---- per tensor: combine, segmented scan, block reduction of one of sum / max / min ------------
@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _segment(v, am, an, ai, af, bv, bm, bn, bi, bf):
    """The segmented-scan step of every kind: b opens a new tensor where its flag is set, else b
    joins a's (v: a's and b's partials already combined); max |x| and the counts go along."""
    opens = bf != 0
    return (
        tl.where(opens, bv, v),
        tl.where(opens, bm, max_nan(am, bm)),
        tl.where(opens, bn, an + bn),
        tl.where(opens, bi, ai + bi),
        tl.maximum(af, bf),
    )


@triton.jit
def _segment_sum(av, am, an, ai, af, bv, bm, bn, bi, bf):
    return _segment(av + bv, am, an, ai, af, bv, bm, bn, bi, bf)


@triton.jit
def _segment_max(av, am, an, ai, af, bv, bm, bn, bi, bf):
    return _segment(max_nan(av, bv), am, an, ai, af, bv, bm, bn, bi, bf)


@triton.jit
def _segment_min(av, am, an, ai, af, bv, bm, bn, bi, bf):
    return _segment(min_nan(av, bv), am, an, ai, af, bv, bm, bn, bi, bf)


@triton.jit
def _scan_sum(v, m, nans, infs, opens):
    return block_scan((v, m, nans, infs, opens), 0, _segment_sum)


@triton.jit
def _scan_max(v, m, nans, infs, opens):
    return block_scan((v, m, nans, infs, opens), 0, _segment_max)


@triton.jit
def _scan_min(v, m, nans, infs, opens):
    return block_scan((v, m, nans, infs, opens), 0, _segment_min)


@triton.jit
def _reduce_sum(v):
    return tl.sum(v, axis=0)


@triton.jit
def _reduce_max(v):
    return block_reduce(v, 0, max_nan)


@triton.jit
def _reduce_min(v):
    return block_reduce(v, 0, min_nan)


# ---- the norm ---------------------------------------------------------------------------------
@triton.jit
def _root_sqrt(s, p, inv):
    return tl.sqrt(s) * inv  # fp64: sqrt.rn.f64, correctly rounded


@triton.jit
def _term_order(p):
    """NORM_P's order as its fp32 terms see it, which the root takes too: fp32(p), or p itself
    where fp32(p) is 0 or inf (|p| beyond fp32's range). p: fp64."""
    p32 = p.to(tl.float32)
    return tl.where((p32 == 0.0) | (tl.abs(p32) == float("inf")), p, p32.to(tl.float64))


@triton.jit
def _root_p(s, p, inv):
    return pow_abs(s, 1.0 / _term_order(p)) * inv


@triton.jit
def _root_none(s, p, inv):
    return s * inv


@triton.jit
def _root_count(s, p, inv):
    return s  # L0: a count, never scaled


@triton.jit
def _same(s):
    return s


@triton.jit
def _nonzero(s):
    return tl.where(s != 0.0, 1.0, 0.0).to(s.dtype)


_SUM = dict(combine=_add, scan=_scan_sum, reduce=_reduce_sum)
_MAX = dict(combine=max_nan, scan=_scan_max, reduce=_reduce_max)
_MIN = dict(combine=min_nan, scan=_scan_min, reduce=_reduce_min)

NORM_KINDS = {
    _abi.NORM_L2: NormKind(0.0, 2.0, True, _fold_square, _partial_sum, **_SUM, root=_root_sqrt, total_term=_same),
    _abi.NORM_L1: NormKind(0.0, 1.0, True, _fold_abs, _partial_sum, **_SUM, root=_root_none, total_term=_same),
    _abi.NORM_P: NormKind(
        0.0, None, True, _fold_pow, _partial_sum, **_SUM, root=_root_p, total_term=_same, exact_negative=True
    ),
    _abi.NORM_INF: NormKind(0.0, 1.0, False, _fold_nothing, _partial_max, **_MAX, root=_root_none, total_term=_same),
    _abi.NORM_NEG_INF: NormKind(
        float("inf"), 1.0, False, _fold_min, _partial_min, **_MIN, root=_root_none, total_term=_same
    ),
    _abi.NORM_L0: NormKind(0.0, 1.0, False, _fold_nonzero, _partial_sum, **_SUM, root=_root_count, total_term=_nonzero),
}
