// The two phases of the kernel contract (gradfuse/_abi.py) on the CPU: reduce (per-chunk partials,
// per-tensor norms, total, found_inf, coef, scale) and scale (x *= scale unless scale == 1), over the
// plan tables of gradfuse/_plan.py, threaded over chunks.
#pragma once

#include <cstdint>

namespace gradfuse::cpu {

// The plan tables, by address (int64 unless noted). See gradfuse/_abi.py.
struct Plan {
  const int64_t* addrs;
  const int64_t* numels;
  const int64_t* dtypes;
  const int64_t* tensor_chunk_begin;  // [num_tensors + 1]; reduce only
  const int64_t* chunk_tensor;
  const int64_t* chunk_start;
  int64_t num_tensors;  // reduce only (the scale phase is not given it)
  int64_t num_chunks;
  int64_t chunk_size;
};

struct ReduceParams {
  int norm_kind;             // NormKind
  double p;                  // the norm's order (NORM_P)
  double max_norm;           // used when max_norm_ptr is null
  const float* max_norm_ptr;  // optional float32 scalar
  const float* inv_scale_ptr;  // optional float32 scalar (AMP's 1/loss_scale), else 1
  int policy;                // Policy
};

struct ReduceOutputs {
  float* chunk_partials;     // [num_chunks]
  int32_t* chunk_nonfinite;  // [num_chunks]
  float* tensor_norms;       // [num_tensors]
  float* result;             // [4]: total, found_inf, coef, scale
};

// Both throw std::invalid_argument for malformed arguments (a bad dtype tag or norm kind, a chunk
// outside its tensor, a null table) before touching any gradient. num_threads < 1 means 1.
void reduce(const Plan& plan, const ReduceParams& params, const ReduceOutputs& out, int num_threads);
void scale(const Plan& plan, const float* scale_ptr, bool zero_if_scale_is_zero, int num_threads);

}  // namespace gradfuse::cpu
