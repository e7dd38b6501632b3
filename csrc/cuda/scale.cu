// Phase 2, scale_kernel (one launch): x = x * s in fp32 with one rounding to the gradient's dtype,
// or x = 0 when zero_if_scale_is_zero and s == 0 (POLICY_ZERO: NaN * 0 would stay NaN).
//
// s is *scale_ptr, or under FLAG_READ_TENSOR_SCALES the factor of the chunk's tensor (loaded with
// the chunk's tensor row, one chunk ahead). A chunk whose factor is exactly 1 is not touched (a NaN
// factor is not 1, so NaN propagates like torch): with one factor, every block returns at once.
//
// Launched with min(C, SMs * kScaleBlocksPerSM) blocks of kScaleThreads (nothing when C == 0).
// Chunks are taken from the end: the reduce's blocks finish on the highest chunks, which are the
// ones most likely still in L2 when this pass starts.

#include "chunk_walk.cuh"
#include "kernels.h"

namespace gradfuse::cuda {
namespace {

struct MulOp {
  static constexpr bool kReads = true;
  static constexpr bool kWrites = true;
  float s;
  __device__ float operator()(float x) const { return __fmul_rn(x, s); }
};

struct ZeroOp {  // +0.0 in every dtype, without reading the old values
  static constexpr bool kReads = false;
  static constexpr bool kWrites = true;
  __device__ float operator()(float) const { return 0.0f; }
};

class ScaleBody {
 public:
  __device__ ScaleBody(float scale, bool per_tensor, bool zero_if_scale_is_zero)
      : scale_(scale), per_tensor_(per_tensor), zero_(zero_if_scale_is_zero) {}

  __device__ void read(const Chunk& ch) {
    const float s = per_tensor_ ? ch.factor : scale_;
    if (s == 1.0f) return;  // block-uniform: an unreadable chunk has n == 0 and is not walked
    if (zero_ && s == 0.0f) {
      ZeroOp op;
      walk_chunk<kScaleThreads, kScaleUnroll>(ch, op);
    } else {
      MulOp op{s};
      walk_chunk<kScaleThreads, kScaleUnroll>(ch, op);
    }
  }

  __device__ void finish(long long, const Chunk&) {}

 private:
  float scale_;
  bool per_tensor_;
  bool zero_;
};

__global__ void __launch_bounds__(kScaleThreads, kScaleBlocksPerSM) scale_kernel(const ClipDesc d) {
  const bool per_tensor = (d.flags & abi::FLAG_READ_TENSOR_SCALES) != 0;
  float scale = 1.0f;
  if (!per_tensor) {
    scale = __ldg(at<const float>(d.scale_ptr));  // written by an earlier kernel on this stream
    if (scale == 1.0f) return;                    // no gradient traffic; NaN is not 1 and propagates
  }
  ScaleBody body(scale, per_tensor, d.zero_if_scale_is_zero != 0);
  for_each_chunk</*kFromEnd=*/true>(d, per_tensor ? at<const float>(d.tensor_scales) : nullptr, body);
}

}  // namespace

const void* scale_kernel_entry() { return reinterpret_cast<const void*>(&scale_kernel); }

}  // namespace gradfuse::cuda
