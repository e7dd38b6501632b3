"""The kernel contract shared by every fused backend (cpu, cuda, triton), declared once.

Everything a kernel is told travels in one record, the *clip descriptor* (``DESCRIPTOR`` below):
the plan's tables, its workspace, the call's parameters and the output buffers, each an 8-byte
field (an address, an int64 or a double), so the layout has no padding and is the same in Python
(``ClipDesc``, a ctypes structure), in C++ and in CUDA (``csrc/gradfuse_abi.h``, generated from
this file by ``python gradfuse/_abi.py > csrc/gradfuse_abi.h``; a test checks the committed header
is what this file generates). The Triton launchers read the same record field by field. Adding a
field is one line in ``DESCRIPTOR`` plus the kernels that use it.

Plan tables (built by ``gradfuse._plan``; one device; int64)::

    addrs[T]                  address of element 0 of tensor t (the start of its dense span)
    numels[T]                 elements in tensor t
    dtypes[T]                 DTYPE_F32 | DTYPE_F16 | DTYPE_BF16
    tensor_chunk_begin[T + 1] chunks of tensor t are [tensor_chunk_begin[t], tensor_chunk_begin[t+1])
    chunk_tensor[C]           tensor index of chunk c (chunks are ordered by tensor, then offset)
    chunk_start[C]            first element of chunk c inside its tensor; the chunk holds
                              min(chunk_size, numels[t] - chunk_start[c]) elements

    Every backend refuses chunk_size outside [1, 2^30] and num_chunks > 0 with num_tensors == 0.

Workspace (owned by the plan, reused between calls; one stream at a time per plan)::

    chunk_partials float64[C]   P_c: the chunk's partial of the norm (NORM_* below), in fp64
    chunk_max_abs  float32[C]   max |x| over the chunk, NaN if the chunk holds a NaN
    chunk_counts   int32[2C]    [2c] NaN elements, [2c + 1] +-Inf elements of chunk c (exact)
    ticket         int32[1]     zero between calls; the last block of the reduce resets it

Outputs (per call, on the plan's device)::

    tensor_norms    float32[T]  norm_t
    tensor_partials float64[T]  S_t, the tensor's partial before the root and before inv_scale
    tensor_max_abs  float32[T]  max |x| of tensor t (NaN if it holds a NaN; 0 for an empty tensor)
    tensor_counts   int64[2T]   [2t] NaN elements, [2t + 1] +-Inf elements of tensor t
    tensor_scales   float32[T]  per-tensor factors: written by the reduce under
                                FLAG_WRITE_TENSOR_SCALES, read by the scale under
                                FLAG_READ_TENSOR_SCALES (else unused, may be 0)
    result          float32[4]  RESULT_TOTAL, RESULT_FOUND_INF (0.0 / 1.0), RESULT_COEF, RESULT_SCALE

Reduce (phase 1, one launch). Every element is read once on the fast path, its term accumulated in
fp32 (the CPU: NORM_P's terms in fp64); max |x| is tracked per element. A chunk (the CPU decides per
2048-element block of a chunk, and for its last partial row: "chunk" below means that unit there)
is read a second time only when the fast path cannot be trusted, which finite training gradients
never trigger:

* it holds a NaN or Inf (max |x| is not finite): its NaN and Inf elements are counted;
* (NORM_L2, NORM_L1, NORM_P with p > 0) its fp32 partial overflowed although every element is
  finite, or its largest term is tiny (0 < max_abs and p * log2(max_abs) < RESCAN_TERM_LOG2), where
  fp32 squares lose digits to underflow: the chunk is re-accumulated exactly enough, in fp64 or as
  sum (|x| * 2^-e)^p with 2^e the power of two at max_abs, times 2^(p e) in fp64 without forming
  2^(p e) (one rounding, gradual underflow). The CPU's fp64 NORM_P terms flush below 2^-1022: its
  block is re-read the same way when its fp64 sum is below 2^-958 (any p);
* (NORM_P with p < 0, CUDA and Triton) its fp32 partial is inf (|x|^p of a tiny |x| overflowed) or
  below 2^RESCAN_TERM_LOG2 (every |x| large) although every element is finite: the chunk is
  re-accumulated with every term in fp64 (a zero element gives inf either way: torch's answer).

NORM_P's terms and root use one p: the descriptor's (fp64) on the CPU; fp32(p) on CUDA and Triton,
whose terms are fp32 (p itself where fp32(p) is 0 or inf). S_t is the sum of those terms: the same
on every backend for a p that fp32 holds (2.5, 3, -1, ...), else within ~|ln|x|| * 2^-24 relative;
the norms agree to fp32 accuracy either way.

So the norm is right to fp32 accuracy for every finite input (|p| <= 8; beyond, |x|^p may overflow
fp64), as far as S_t is a normal fp64 (where it is below 2^-1022, it keeps the digits fp64's
subnormals hold), and ``found_inf`` means a NaN or Inf element, never an overflow. A chunk whose
table entries the GPU kernels cannot read (unknown dtype tag, tensor index or start out of range:
the host checks the tables only on the CPU) counts as one NaN element and is never read or scaled.

The last block to finish (ticket counter) combines the partials in a fixed order, in fp64, so the
same input gives the same bits on every run::

    S_t    = combine over chunks of t of P_c   (sum; max for NORM_INF, min for NORM_NEG_INF, with
                                               NaN propagating; the identity for an empty tensor)
    norm_t = root(S_t) * inv_scale             (root: sqrt for L2, S^(1/p) for P, S for L1/INF/
                                               NEG_INF; NORM_L0: S_t, the count of non-zeros, unscaled)
    total  = root(combine_t S_t) * inv_scale   (NORM_L0: the number of tensors with S_t != 0)
    found_inf = any chunk count != 0
    coef   = max_norm / (t32 + CLIP_EPS), t32 = fp32(total) (fp64 total when t32 overflows to inf),
             evaluated in fp64, then clamped to <= 1 with NaN propagating (torch.clamp)
    scale  = coef * inv_scale                 POLICY_PROPAGATE (torch's behaviour)
             found_inf ? 1 : coef * inv_scale   POLICY_SKIP (the scale pass leaves grads alone;
                                                             with inv_scale the optimizer skips)
             found_inf ? 0 : coef * inv_scale   POLICY_ZERO (the scale pass writes zeros)

    FLAG_WRITE_TENSOR_SCALES (layer-wise clipping): tensor_scales[t] = the same formulas with
             norm_t in place of total (coef_t = min(1, max_norm / (fp32(norm_t) + CLIP_EPS)), the
             fp64 norm_t where fp32 overflows; then inv_scale and the policy, found_inf global)

``max_norm`` is the double field, or the float32 device scalar at ``max_norm_ptr`` when that is not
0 (adaptive thresholds stay on the device). ``inv_scale`` (AMP's 1/loss_scale) is the float32
device scalar at ``inv_scale_ptr``, or 1 when that is 0. Every rounding to fp32 happens once.

Scale (phase 2, one launch). The factor of chunk c is ``*scale_ptr``, or
``tensor_scales[chunk_tensor[c]]`` under FLAG_READ_TENSOR_SCALES. A chunk whose factor is exactly 1
is not touched (a NaN factor is not 1, so NaN propagates like torch). Otherwise ``x = x * s`` in
fp32 with one rounding to the gradient's dtype, or ``x = 0`` when ``zero_if_scale_is_zero`` is set
and ``s == 0`` (POLICY_ZERO: NaN * 0 would stay NaN).
"""

from __future__ import annotations

import ctypes
import sys
from typing import NamedTuple

DTYPE_F32 = 0
DTYPE_F16 = 1
DTYPE_BF16 = 2

NORM_L2 = 0  # partial: sum x^2
NORM_L1 = 1  # partial: sum |x|
NORM_P = 2  # partial: sum |x|^p
NORM_INF = 3  # partial: max |x|
NORM_NEG_INF = 4  # partial: min |x|
NORM_L0 = 5  # partial: count of x != 0

POLICY_PROPAGATE = 0
POLICY_SKIP = 1
POLICY_ZERO = 2

FLAG_WRITE_TENSOR_SCALES = 1  # reduce: also write the per-tensor clip factors (layer-wise clipping)
FLAG_READ_TENSOR_SCALES = 2  # scale: one factor per tensor, from tensor_scales

RESULT_TOTAL = 0
RESULT_FOUND_INF = 1
RESULT_COEF = 2
RESULT_SCALE = 3
RESULT_SIZE = 4

CLIP_EPS = 1e-6  # torch's: coef = max_norm / (total + 1e-6)
RESCAN_TERM_LOG2 = -100.0  # a chunk whose largest term |x|^p is below 2^-100 is re-read exactly

#: Every integer constant of the contract, in the order the header lists them.
CONSTANTS = (
    "DTYPE_F32", "DTYPE_F16", "DTYPE_BF16",
    "NORM_L2", "NORM_L1", "NORM_P", "NORM_INF", "NORM_NEG_INF", "NORM_L0",
    "POLICY_PROPAGATE", "POLICY_SKIP", "POLICY_ZERO",
    "FLAG_WRITE_TENSOR_SCALES", "FLAG_READ_TENSOR_SCALES",
    "RESULT_TOTAL", "RESULT_FOUND_INF", "RESULT_COEF", "RESULT_SCALE", "RESULT_SIZE",
)  # fmt: skip
FLOAT_CONSTANTS = ("CLIP_EPS", "RESCAN_TERM_LOG2")


class Field(NamedTuple):
    name: str
    kind: str  # "addr" (uint64 address, 0 = absent), "i64" or "f64"
    doc: str


#: The clip descriptor: one record for both phases, every field 8 bytes.
DESCRIPTOR = (
    # plan tables (cached with the plan)
    Field("addrs", "addr", "int64[T]: address of element 0 of tensor t"),
    Field("numels", "addr", "int64[T]: elements of tensor t"),
    Field("dtypes", "addr", "int64[T]: DTYPE_* of tensor t"),
    Field("tensor_chunk_begin", "addr", "int64[T+1]: chunks of t are [begin[t], begin[t+1])"),
    Field("chunk_tensor", "addr", "int64[C]: tensor of chunk c"),
    Field("chunk_start", "addr", "int64[C]: first element of chunk c inside its tensor"),
    Field("num_tensors", "i64", "T"),
    Field("num_chunks", "i64", "C (0: the reduce only writes the outputs, the scale does nothing)"),
    Field("chunk_size", "i64", "elements of a full chunk (the last chunk of a tensor may be shorter)"),
    # workspace (cached with the plan)
    Field("chunk_partials", "addr", "float64[C]: P_c"),
    Field("chunk_max_abs", "addr", "float32[C]: max |x| of chunk c, NaN if it holds a NaN"),
    Field("chunk_counts", "addr", "int32[2C]: NaN and Inf elements of chunk c"),
    Field("ticket", "addr", "int32[1]: 0 on entry, reset to 0 by the reduce's last block"),
    # call parameters
    Field("norm_kind", "i64", "NORM_*"),
    Field("p", "f64", "the norm's order (NORM_P)"),
    Field("max_norm", "f64", "clipping threshold when max_norm_ptr is 0"),
    Field("max_norm_ptr", "addr", "float32[1]: threshold on the device, or 0"),
    Field("inv_scale_ptr", "addr", "float32[1]: AMP's inverse loss scale on the device, or 0 (= 1)"),
    Field("policy", "i64", "POLICY_*: the scale on a step with a NaN/Inf"),
    Field("flags", "i64", "FLAG_* bits"),
    Field("zero_if_scale_is_zero", "i64", "scale: 1 writes zeros (not x * 0) where the factor is 0"),
    # outputs (per call)
    Field("tensor_norms", "addr", "float32[T]: norm_t"),
    Field("tensor_partials", "addr", "float64[T]: S_t (before the root and inv_scale)"),
    Field("tensor_max_abs", "addr", "float32[T]: max |x| of tensor t"),
    Field("tensor_counts", "addr", "int64[2T]: NaN and Inf elements of tensor t"),
    Field("tensor_scales", "addr", "float32[T]: per-tensor factors (FLAG_*_TENSOR_SCALES), or 0"),
    Field("result", "addr", "float32[RESULT_SIZE]: total, found_inf, coef, scale"),
    Field("scale_ptr", "addr", "float32[1]: the scale pass's factor (without FLAG_READ_TENSOR_SCALES)"),
)

_CTYPES = {"addr": ctypes.c_uint64, "i64": ctypes.c_int64, "f64": ctypes.c_double}
_CTYPE_NAMES = {"addr": "uint64_t", "i64": "int64_t", "f64": "double"}


class ClipDesc(ctypes.Structure):
    """The clip descriptor as a C struct in host memory; kernels receive its address."""

    _fields_ = [(f.name, _CTYPES[f.kind]) for f in DESCRIPTOR]

    def address(self) -> int:
        return ctypes.addressof(self)


assert ctypes.sizeof(ClipDesc) == 8 * len(DESCRIPTOR)



def norm_kind(p: float) -> int:
    """Map a float norm type to its NORM_* code."""
    if p == 2.0:
        return NORM_L2
    if p == 1.0:
        return NORM_L1
    if p == float("inf"):
        return NORM_INF
    if p == float("-inf"):
        return NORM_NEG_INF
    if p == 0.0:
        return NORM_L0
    return NORM_P


def c_header() -> str:
    """csrc/gradfuse_abi.h: the constants and the descriptor struct for C++ and CUDA."""
    lines = [
        "// GENERATED from gradfuse/_abi.py by `python gradfuse/_abi.py > csrc/gradfuse_abi.h`: do not edit.",
        "// The kernel contract (formulas, tables, outputs) is documented there.",
        "#pragma once",
        "",
        "#include <cstddef>",
        "#include <cstdint>",
        "",
        "namespace gradfuse::abi {",
        "",
    ]
    lines += [f"constexpr int64_t {name} = {globals()[name]};" for name in CONSTANTS]
    lines += [f"constexpr double {name} = {globals()[name]!r};" for name in FLOAT_CONSTANTS]
    lines += ["", "// Every field is 8 bytes: no padding, the same layout as gradfuse._abi.ClipDesc.", "struct ClipDesc {"]
    width = max(len(f"{_CTYPE_NAMES[f.kind]} {f.name};") for f in DESCRIPTOR)
    lines += [f"  {f'{_CTYPE_NAMES[f.kind]} {f.name};':<{width}}  // {f.doc}" for f in DESCRIPTOR]
    lines += ["};", "", f"static_assert(sizeof(ClipDesc) == {8 * len(DESCRIPTOR)}, \"ClipDesc layout\");"]
    lines += [f'static_assert(offsetof(ClipDesc, {f.name}) == {8 * i}, "ClipDesc::{f.name}");' for i, f in enumerate(DESCRIPTOR)]
    lines += ["", "}  // namespace gradfuse::abi", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(c_header())
