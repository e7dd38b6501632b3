// GENERATED from gradfuse/_abi.py by `python gradfuse/_abi.py > csrc/gradfuse_abi.h`: do not edit.
// The kernel contract (formulas, tables, outputs) is documented there.
#pragma once

#include <cstddef>
#include <cstdint>

namespace gradfuse::abi {

constexpr int64_t DTYPE_F32 = 0;
constexpr int64_t DTYPE_F16 = 1;
constexpr int64_t DTYPE_BF16 = 2;
constexpr int64_t NORM_L2 = 0;
constexpr int64_t NORM_L1 = 1;
constexpr int64_t NORM_P = 2;
constexpr int64_t NORM_INF = 3;
constexpr int64_t NORM_NEG_INF = 4;
constexpr int64_t NORM_L0 = 5;
constexpr int64_t POLICY_PROPAGATE = 0;
constexpr int64_t POLICY_SKIP = 1;
constexpr int64_t POLICY_ZERO = 2;
constexpr int64_t FLAG_WRITE_TENSOR_SCALES = 1;
constexpr int64_t FLAG_READ_TENSOR_SCALES = 2;
constexpr int64_t RESULT_TOTAL = 0;
constexpr int64_t RESULT_FOUND_INF = 1;
constexpr int64_t RESULT_COEF = 2;
constexpr int64_t RESULT_SCALE = 3;
constexpr int64_t RESULT_SIZE = 4;
constexpr double CLIP_EPS = 1e-06;
constexpr double RESCAN_TERM_LOG2 = -100.0;

// Every field is 8 bytes: no padding, the same layout as gradfuse._abi.ClipDesc.
struct ClipDesc {
  uint64_t addrs;                 // int64[T]: address of element 0 of tensor t
  uint64_t numels;                // int64[T]: elements of tensor t
  uint64_t dtypes;                // int64[T]: DTYPE_* of tensor t
  uint64_t tensor_chunk_begin;    // int64[T+1]: chunks of t are [begin[t], begin[t+1])
  uint64_t chunk_tensor;          // int64[C]: tensor of chunk c
  uint64_t chunk_start;           // int64[C]: first element of chunk c inside its tensor
  int64_t num_tensors;            // T
  int64_t num_chunks;             // C (0: the reduce only writes the outputs, the scale does nothing)
  int64_t chunk_size;             // elements of a full chunk (the last chunk of a tensor may be shorter)
  uint64_t chunk_partials;        // float64[C]: P_c
  uint64_t chunk_max_abs;         // float32[C]: max |x| of chunk c, NaN if it holds a NaN
  uint64_t chunk_counts;          // int32[2C]: NaN and Inf elements of chunk c
  uint64_t ticket;                // int32[1]: 0 on entry, reset to 0 by the reduce's last block
  int64_t norm_kind;              // NORM_*
  double p;                       // the norm's order (NORM_P)
  double max_norm;                // clipping threshold when max_norm_ptr is 0
  uint64_t max_norm_ptr;          // float32[1]: threshold on the device, or 0
  uint64_t inv_scale_ptr;         // float32[1]: AMP's inverse loss scale on the device, or 0 (= 1)
  int64_t policy;                 // POLICY_*: the scale on a step with a NaN/Inf
  int64_t flags;                  // FLAG_* bits
  int64_t zero_if_scale_is_zero;  // scale: 1 writes zeros (not x * 0) where the factor is 0
  uint64_t tensor_norms;          // float32[T]: norm_t
  uint64_t tensor_partials;       // float64[T]: S_t (before the root and inv_scale)
  uint64_t tensor_max_abs;        // float32[T]: max |x| of tensor t
  uint64_t tensor_counts;         // int64[2T]: NaN and Inf elements of tensor t
  uint64_t tensor_scales;         // float32[T]: per-tensor factors (FLAG_*_TENSOR_SCALES), or 0
  uint64_t result;                // float32[RESULT_SIZE]: total, found_inf, coef, scale
  uint64_t scale_ptr;             // float32[1]: the scale pass's factor (without FLAG_READ_TENSOR_SCALES)
};

static_assert(sizeof(ClipDesc) == 224, "ClipDesc layout");
static_assert(offsetof(ClipDesc, addrs) == 0, "ClipDesc::addrs");
static_assert(offsetof(ClipDesc, numels) == 8, "ClipDesc::numels");
static_assert(offsetof(ClipDesc, dtypes) == 16, "ClipDesc::dtypes");
static_assert(offsetof(ClipDesc, tensor_chunk_begin) == 24, "ClipDesc::tensor_chunk_begin");
static_assert(offsetof(ClipDesc, chunk_tensor) == 32, "ClipDesc::chunk_tensor");
static_assert(offsetof(ClipDesc, chunk_start) == 40, "ClipDesc::chunk_start");
static_assert(offsetof(ClipDesc, num_tensors) == 48, "ClipDesc::num_tensors");
static_assert(offsetof(ClipDesc, num_chunks) == 56, "ClipDesc::num_chunks");
static_assert(offsetof(ClipDesc, chunk_size) == 64, "ClipDesc::chunk_size");
static_assert(offsetof(ClipDesc, chunk_partials) == 72, "ClipDesc::chunk_partials");
static_assert(offsetof(ClipDesc, chunk_max_abs) == 80, "ClipDesc::chunk_max_abs");
static_assert(offsetof(ClipDesc, chunk_counts) == 88, "ClipDesc::chunk_counts");
static_assert(offsetof(ClipDesc, ticket) == 96, "ClipDesc::ticket");
static_assert(offsetof(ClipDesc, norm_kind) == 104, "ClipDesc::norm_kind");
static_assert(offsetof(ClipDesc, p) == 112, "ClipDesc::p");
static_assert(offsetof(ClipDesc, max_norm) == 120, "ClipDesc::max_norm");
static_assert(offsetof(ClipDesc, max_norm_ptr) == 128, "ClipDesc::max_norm_ptr");
static_assert(offsetof(ClipDesc, inv_scale_ptr) == 136, "ClipDesc::inv_scale_ptr");
static_assert(offsetof(ClipDesc, policy) == 144, "ClipDesc::policy");
static_assert(offsetof(ClipDesc, flags) == 152, "ClipDesc::flags");
static_assert(offsetof(ClipDesc, zero_if_scale_is_zero) == 160, "ClipDesc::zero_if_scale_is_zero");
static_assert(offsetof(ClipDesc, tensor_norms) == 168, "ClipDesc::tensor_norms");
static_assert(offsetof(ClipDesc, tensor_partials) == 176, "ClipDesc::tensor_partials");
static_assert(offsetof(ClipDesc, tensor_max_abs) == 184, "ClipDesc::tensor_max_abs");
static_assert(offsetof(ClipDesc, tensor_counts) == 192, "ClipDesc::tensor_counts");
static_assert(offsetof(ClipDesc, tensor_scales) == 200, "ClipDesc::tensor_scales");
static_assert(offsetof(ClipDesc, result) == 208, "ClipDesc::result");
static_assert(offsetof(ClipDesc, scale_ptr) == 216, "ClipDesc::scale_ptr");

}  // namespace gradfuse::abi
