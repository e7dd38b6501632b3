"""The kernel contract shared by every fused backend (cpu, cuda, triton).

All three backends take the same plan tables and write the same outputs, so they cross-check each
other and the Python side never branches on the backend after choosing it.

Plan tables (built by ``gradfuse._plan``; one device; int64 unless noted)::

    addrs[T]                  address of element 0 of tensor t (the start of its dense span)
    numels[T]                 elements in tensor t
    dtypes[T]                 DTYPE_F32 | DTYPE_F16 | DTYPE_BF16
    tensor_chunk_begin[T + 1] chunks of tensor t are [tensor_chunk_begin[t], tensor_chunk_begin[t+1])
    chunk_tensor[C]           tensor index of chunk c (chunks are ordered by tensor, then offset)
    chunk_start[C]            first element of chunk c inside its tensor; the chunk holds
                              min(chunk_size, numels[t] - chunk_start[c]) elements

Workspace owned by the plan (reused between calls; one stream at a time per plan)::

    chunk_partials  float32[C]   per-chunk partial of the norm (see NORM_*), NaN if the chunk has a NaN
                                 for the max/min norms
    chunk_nonfinite int32[C]     1 if the chunk holds a NaN or +-Inf, else 0
    ticket          int32[1]     zero between calls; the last block of the reduce resets it

Outputs (fresh per call, float32, on the plan's device)::

    tensor_norms[T]              per-tensor norm (times inv_scale when given)
    result[4]                    RESULT_TOTAL, RESULT_FOUND_INF (0.0 / 1.0), RESULT_COEF, RESULT_SCALE

Reduce (phase 1, one launch): every element read once, accumulated in fp32; the last block to
finish (ticket counter) combines the partials in a fixed order, in fp64, so the same input gives the
same bits on every run:

    S_t   = sum over chunks of t of chunk_partials   (max for NORM_INF, min for NORM_NEG_INF)
    norm_t = S_t ** (1/p) * inv_scale                (NORM_L2: sqrt; NORM_L1 / INF / NEG_INF: S_t;
                                                      NORM_L0: S_t, the count of non-zeros, no scale)
    total = (sum_t S_t) ** (1/p) * inv_scale         (NORM_INF: max_t, NORM_NEG_INF: min_t,
                                                      NORM_L0: number of tensors with norm_t != 0)
    found_inf = any(chunk_nonfinite)
    coef  = max_norm / (fp32(total) + 1e-6) evaluated in fp64 on the fp32-rounded total, then
            clamped to <= 1 with NaN propagating (torch.clamp); coef and scale are rounded to fp32
            once, so every backend gives the same coef bits for the same fp32 total
    scale = coef * inv_scale                 POLICY_PROPAGATE (torch's behaviour)
            found_inf ? 1 : coef * inv_scale   POLICY_SKIP (the scale pass then leaves grads alone;
                                                          with inv_scale the optimizer skips the step)
            found_inf ? 0 : coef * inv_scale   POLICY_ZERO (the scale pass writes zeros)

``max_norm`` comes from the float argument, or from a float32 device scalar when its address is
non-zero (adaptive thresholds stay on the device). ``inv_scale`` (AMP's 1/loss_scale) comes from a
float32 device scalar when its address is non-zero, else 1.

Scale (phase 2, one launch): every block reads ``scale`` first; if ``scale == 1`` it returns
without touching gradient memory (the coefficient is clamped to 1, so this is "no clipping needed";
a NaN scale is not 1, so NaN propagates like torch; an AMP ``inv_scale`` above 1 is applied). Otherwise
``x = x * scale`` in fp32 with one rounding to the gradient's dtype, or ``x = 0`` when
``zero_if_scale_is_zero`` is set and ``scale == 0`` (POLICY_ZERO: NaN * 0 would stay NaN).
"""

import torch

DTYPE_F32 = 0
DTYPE_F16 = 1
DTYPE_BF16 = 2
DTYPE_TAGS = {torch.float32: DTYPE_F32, torch.float16: DTYPE_F16, torch.bfloat16: DTYPE_BF16}

NORM_L2 = 0  # partial: sum x^2
NORM_L1 = 1  # partial: sum |x|
NORM_P = 2  # partial: sum |x|^p
NORM_INF = 3  # partial: max |x|
NORM_NEG_INF = 4  # partial: min |x|
NORM_L0 = 5  # partial: count of x != 0

POLICY_PROPAGATE = 0
POLICY_SKIP = 1
POLICY_ZERO = 2

RESULT_TOTAL = 0
RESULT_FOUND_INF = 1
RESULT_COEF = 2
RESULT_SCALE = 3
RESULT_SIZE = 4

CLIP_EPS = 1e-6  # torch's: coef = max_norm / (total + 1e-6)


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
