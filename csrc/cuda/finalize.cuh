// The reduce's finalize, run by its last block (reduce.cu): chunk results -> per-tensor outputs ->
// total, found_inf, coef, scale (the formulas of gradfuse/_abi.py), in fp64 and in a fixed order,
// so the same input gives the same bits on every run.
//
// Order: tensors in tiles of kReduceThreads; in a tile, thread j combines tensor tile+j alone when it
// has <= kFinalizeSmallChunks chunks (in chunk order), else the tensor goes to a list built in
// tensor order (ballot + prefix) that warps take round-robin (lane l combines chunks l, l+32, ... in
// order, then a shuffle-xor tree). Totals: per thread (small tensors) and per warp (big ones),
// combined by a shuffle-xor tree, then over warps in order by thread 0. Small tensors cost ~one L2
// round trip per tile: thousands of them finish in microseconds.
#pragma once

#include "chunk_walk.cuh"
#include "norm_ops.cuh"

namespace gradfuse::cuda {

struct Int64SumOp {
  using T = long long;
  __device__ static long long combine(long long a, long long b) { return a + b; }
};

template <int KIND>
struct Combine64Op {
  using T = double;
  __device__ static double combine(double a, double b) { return Norm<KIND>::combine64(a, b); }
};

// One tensor's chunks combined: S_t, max |x|, NaN and Inf elements.
struct TensorStats {
  double S;
  float max_abs;
  long long nans;
  long long infs;
};

// Chunks first, first + stride, ... < end, in that order, kFinalizeUnroll loaded before they are
// combined. Read with ld.global.cg (L2, never a stale L1 line): other blocks wrote them during this
// launch. The counts are left at 0: a chunk's counts are non-zero exactly when its max |x| is not
// finite, so count_chunks reads them only for a tensor whose max |x| is not finite (rare; and this
// loop keeps its registers for loads in flight).
template <int KIND>
__device__ __forceinline__ TensorStats combine_chunks(const ClipDesc& d, long long first, long long end, int stride) {
  using N = Norm<KIND>;
  constexpr int U = kFinalizeUnroll;
  const double* partials = at<const double>(d.chunk_partials);
  const float* max_abs = at<const float>(d.chunk_max_abs);
  TensorStats s{N::identity64(), 0.0f, 0, 0};
  for (long long c = first; c < end; c += static_cast<long long>(U) * stride) {
    double v[U];
    float m[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const long long cu = c + static_cast<long long>(u) * stride;
      v[u] = cu < end ? __ldcg(partials + cu) : 0.0;
      m[u] = cu < end ? __ldcg(max_abs + cu) : 0.0f;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (c + static_cast<long long>(u) * stride < end) {
        s.S = N::combine64(s.S, v[u]);
        s.max_abs = fmax_nan(s.max_abs, m[u]);
      }
    }
  }
  return s;
}

// The NaN and Inf counts of the same chunks, into s.
__device__ __forceinline__ void count_chunks(const ClipDesc& d, long long first, long long end, int stride, TensorStats& s) {
  const int* counts = at<const int>(d.chunk_counts);
  for (long long c = first; c < end; c += stride) {
    s.nans += __ldcg(counts + 2 * c);
    s.infs += __ldcg(counts + 2 * c + 1);
  }
}

// A small tensor, by one thread: chunks [b, e) in order.
template <int KIND>
__device__ __forceinline__ TensorStats thread_tensor_stats(const ClipDesc& d, long long b, long long e) {
  TensorStats s = combine_chunks<KIND>(d, b, e, 1);
  if (not_finite(s.max_abs)) count_chunks(d, b, e, 1, s);
  return s;
}

// A big tensor, by one warp (lane l: chunks b + l, b + l + 32, ...): the same bits in every lane.
template <int KIND>
__device__ __forceinline__ TensorStats warp_tensor_stats(const ClipDesc& d, long long b, long long e) {
  const int lane = threadIdx.x & (kWarpSize - 1);
  TensorStats s = combine_chunks<KIND>(d, b + lane, e, kWarpSize);
  s.S = warp_allreduce<Combine64Op<KIND>>(s.S);
  s.max_abs = warp_allreduce<MaxAbsOp>(s.max_abs);
  if (not_finite(s.max_abs)) {  // warp-uniform
    count_chunks(d, b + lane, e, kWarpSize, s);
    s.nans = warp_allreduce<Int64SumOp>(s.nans);
    s.infs = warp_allreduce<Int64SumOp>(s.infs);
  }
  return s;
}

// min(1, max_norm / (t + CLIP_EPS)) in fp64 with NaN kept (torch.clamp(max=1)); t is the norm
// rounded to fp32, or the fp64 norm where that rounding overflows (so 1e39 clips by ~max_norm/1e39).
__device__ __forceinline__ double clip_coef(double max_norm, double norm) {
  const float t32 = static_cast<float>(norm);
  const double t = isinf(t32) ? norm : static_cast<double>(t32);
  const double coef = max_norm / (t + abi::CLIP_EPS);
  return coef > 1.0 ? 1.0 : coef;
}

// The factor the scale pass applies, after the non-finite policy.
__device__ __forceinline__ float factor(double coef, double inv_scale, bool found_inf, int64_t policy) {
  if (found_inf && policy == abi::POLICY_SKIP) return 1.0f;
  if (found_inf && policy == abi::POLICY_ZERO) return 0.0f;
  return static_cast<float>(coef * inv_scale);
}

struct FinalizeParams {
  double inv_scale;  // *inv_scale_ptr, or 1
  double max_norm;   // *max_norm_ptr, or the descriptor's max_norm
  bool write_scales;
};

// Tensor t's outputs. Its factor (FLAG_WRITE_TENSOR_SCALES) is written before found_inf is known,
// as if none were found; finalize rewrites every factor when the policy says otherwise.
template <int KIND>
__device__ __forceinline__ void write_tensor(const ClipDesc& d, long long t, const TensorStats& s, const FinalizeParams& f) {
  using N = Norm<KIND>;
  const double norm = N::root(s.S, d.p) * N::norm_scale(f.inv_scale);
  const float norm32 = static_cast<float>(norm);
  at<double>(d.tensor_partials)[t] = s.S;
  at<float>(d.tensor_norms)[t] = norm32;
  at<float>(d.tensor_max_abs)[t] = s.max_abs;
  at<long long>(d.tensor_counts)[2 * t] = s.nans;
  at<long long>(d.tensor_counts)[2 * t + 1] = s.infs;
  if (f.write_scales) at<float>(d.tensor_scales)[t] = factor(clip_coef(f.max_norm, norm32), f.inv_scale, false, d.policy);
}

template <int KIND>
__device__ __forceinline__ void finalize(const ClipDesc& d) {
  using N = Norm<KIND>;
  constexpr int kWarps = kReduceThreads / kWarpSize;
  __shared__ int s_count[kWarps];
  __shared__ long long s_t[kReduceThreads], s_b[kReduceThreads], s_e[kReduceThreads];
  __shared__ double s_total[kWarps];
  const int tid = threadIdx.x;
  const int lane = tid & (kWarpSize - 1);
  const int warp = tid / kWarpSize;
  const long long T = d.num_tensors;
  const long long* tensor_chunk_begin = at<const long long>(d.tensor_chunk_begin);
  // In shared memory rather than registers: the combine loops below need every register.
  __shared__ FinalizeParams f;
  if (tid == 0) {
    f.inv_scale = d.inv_scale_ptr ? static_cast<double>(__ldg(at<const float>(d.inv_scale_ptr))) : 1.0;
    f.max_norm = d.max_norm_ptr ? static_cast<double>(__ldg(at<const float>(d.max_norm_ptr))) : d.max_norm;
    f.write_scales = (d.flags & abi::FLAG_WRITE_TENSOR_SCALES) != 0;
  }
  __syncthreads();

  double thread_total = N::identity64();  // small tensors of this thread
  double warp_total = N::identity64();    // big tensors of this warp (same bits in every lane)
  int bad = 0;                            // a NaN/Inf element in a tensor this thread wrote
  for (long long tile = 0; tile < T; tile += kReduceThreads) {
    const long long t = tile + tid;
    bool big = false;
    long long b = 0, e = 0;
    if (t < T) {
      b = __ldg(tensor_chunk_begin + t);
      e = __ldg(tensor_chunk_begin + t + 1);
      if (e - b <= kFinalizeSmallChunks) {
        const TensorStats s = thread_tensor_stats<KIND>(d, b, e);
        write_tensor<KIND>(d, t, s, f);
        thread_total = N::fold_tensor(thread_total, s.S);
        bad |= (s.nans | s.infs) != 0;
      } else {
        big = true;
      }
    }
    // Compact the big tensors of this tile into s_t/s_b/s_e, in tensor order.
    const unsigned ballot = __ballot_sync(0xffffffffu, big);
    if (lane == 0) s_count[warp] = __popc(ballot);
    __syncthreads();
    int offset = 0, num_big = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const int k = s_count[w];
      offset += (w < warp) ? k : 0;
      num_big += k;
    }
    if (big) {
      const int j = offset + __popc(ballot & ((1u << lane) - 1u));
      s_t[j] = t;
      s_b[j] = b;
      s_e[j] = e;
    }
    __syncthreads();
    for (int j = warp; j < num_big; j += kWarps) {  // warp-uniform loop
      const TensorStats s = warp_tensor_stats<KIND>(d, s_b[j], s_e[j]);
      if (lane == 0) {
        write_tensor<KIND>(d, s_t[j], s, f);
        bad |= (s.nans | s.infs) != 0;
      }
      warp_total = N::fold_tensor(warp_total, s.S);
    }
    __syncthreads();  // s_count / s_t / s_b / s_e are rewritten by the next tile
  }

  double v = warp_allreduce<Combine64Op<KIND>>(thread_total);
  v = N::combine64(v, warp_total);
  if (lane == 0) s_total[warp] = v;
  // The barrier also orders every write_tensor above before the rewrite of the factors below.
  const bool found_inf = __syncthreads_or(bad) != 0;
  if (found_inf && f.write_scales && d.policy != abi::POLICY_PROPAGATE) {
    for (long long t = tid; t < T; t += kReduceThreads) at<float>(d.tensor_scales)[t] = factor(0.0, 0.0, true, d.policy);
  }
  if (tid == 0) {
    double acc = s_total[0];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) acc = N::combine64(acc, s_total[w]);
    const double total = N::root(acc, d.p) * N::norm_scale(f.inv_scale);  // L0: acc is the tensor count
    const double coef = clip_coef(f.max_norm, total);
    float* result = at<float>(d.result);
    result[abi::RESULT_TOTAL] = static_cast<float>(total);
    result[abi::RESULT_FOUND_INF] = found_inf ? 1.0f : 0.0f;
    result[abi::RESULT_COEF] = static_cast<float>(coef);
    result[abi::RESULT_SCALE] = factor(coef, f.inv_scale, found_inf, d.policy);
  }
}

}  // namespace gradfuse::cuda
