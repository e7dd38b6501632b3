// Phase 1, reduce_kernel<KIND> (one launch, persistent grid, mixed fp32/fp16/bf16): the chunk
// results of gradfuse/_abi.py, then (last block, finalize.cuh) the per-tensor outputs and result.
//
// Per chunk c, block-uniform:
//   fast path, the only read for finite gradients of ordinary magnitude: each thread folds its
//     elements' terms in fp32 (Norm<KIND>::add; L0 counts in int) and their max |x| (max.NaN, for
//     every kind: NORM_INF's term is that max); one block all-reduce of both (fixed trees);
//   then, once per chunk and on block-uniform values, the rare second read of the chunk:
//     max |x| not finite -> its NaN and Inf elements are counted (chunk_counts);
//     L2 / L1 / P with p > 0, max |x| finite, and the fp32 partial overflowed or max |x| is so
//     small that the largest term is below 2^RESCAN_TERM_LOG2 -> the chunk is re-accumulated as
//     sum (|x| 2^-e)^p in fp32, 2^e the power of two at max |x| (every scaled term <= 1), times
//     2^(p e) in fp64 (times_pow2: no 2^(p e) is formed, so no underflow of its own);
//     P with p < 0, max |x| finite, and the fp32 partial overflowed (|x|^p of a tiny |x|) or is
//     below 2^RESCAN_TERM_LOG2 (only large |x|) -> the chunk is re-accumulated with every term in
//     fp64 (Pow64Op; a zero element still gives inf, torch's answer: norm 0).
//     So the norm of every finite input is right to fp32 accuracy. INF, NEG_INF and L0 are not
//     re-read for exactness: max, min and counts are exact.
//   NORM_P's terms use fp32(p) (powf), and so does the root in the finalize (term_order).
//   chunk_partials[c] = P_c (fp64), chunk_max_abs[c], chunk_counts[2c], [2c + 1].
//
// Blocks need not be co-resident: the last block is found with a ticket, nobody waits. Launched
// with min(C, SMs * kReduceBlocksPerSM) blocks (at least one: with no chunks it still writes the
// outputs) of kReduceThreads.

#include "chunk_walk.cuh"
#include "finalize.cuh"
#include "kernels.h"
#include "norm_ops.cuh"

namespace gradfuse::cuda {
namespace {

// The fast path: the term and max |x| of every element.
template <int KIND>
struct FastOp {
  static constexpr bool kReads = true;
  static constexpr bool kWrites = false;
  using N = Norm<KIND>;
  typename N::T v;  // partial (NORM_INF: max |x|)
  float m;          // max |x| (not tracked for NORM_INF)
  float p;
  __device__ float operator()(float x) {
    v = N::add(v, x, p);
    if constexpr (!N::kTermIsMaxAbs) m = fmax_nan(m, fabsf(x));
    return x;
  }
};

// Second read of a chunk holding a NaN or Inf: count them.
struct CountOp {
  static constexpr bool kReads = true;
  static constexpr bool kWrites = false;
  int nans;
  int infs;
  __device__ float operator()(float x) {
    nans += x != x ? 1 : 0;
    infs += fabsf(x) == inf32() ? 1 : 0;
    return x;
  }
};

// Second read of a finite chunk whose fp32 terms overflow or underflow: the terms of
// y = |x| * 2^-e, with 2^-e = lo * hi split so that both are normal floats (e is in [-148, 128]);
// both multiplications are exact whenever y is a normal float.
template <int KIND>
struct ScaledOp {
  static constexpr bool kReads = true;
  static constexpr bool kWrites = false;
  float lo;
  float hi;
  float p;
  float v;
  __device__ float operator()(float x) {
    v = Norm<KIND>::add(v, (fabsf(x) * lo) * hi, p);
    return x;
  }
};

// Second read of a finite NORM_P chunk with p < 0 whose fp32 partial left fp32's range: every
// term |x|^p in fp64, exp2(p log2|x|) (0 -> inf, as pow).
struct Pow64Op {
  static constexpr bool kReads = true;
  static constexpr bool kWrites = false;
  double p;
  double v;
  __device__ float operator()(float x) {
    v += exp2(p * log2(static_cast<double>(fabsf(x))));
    return x;
  }
};

__device__ __forceinline__ float pow2f(int k) { return __int_as_float((k + 127) << 23); }  // k in [-126, 127]

template <int KIND>
class ReduceBody {
 public:
  using N = Norm<KIND>;

  __device__ ReduceBody(const ClipDesc& d, BlockReducer::Scratch& scratch) : d_(d), red_(scratch) {
    p_ = static_cast<float>(d.p);
    const float power = N::power(p_);
    // The scaled re-read is for sums of positive powers; p < 0 has fp64_partial (file comment).
    exact_ = N::kPowerSum && power > 0.0f;
    // max |x| below tiny_: the largest term |x|^power is below 2^RESCAN_TERM_LOG2.
    tiny_ = exact_ ? static_cast<float>(exp2(abi::RESCAN_TERM_LOG2 / power)) : 0.0f;
  }

  __device__ void read(const Chunk& ch) {
    op_ = FastOp<KIND>{N::identity(), 0.0f, p_};
    walk_chunk<kReduceThreads, kReduceUnroll>(ch, op_);
  }

  __device__ void finish(long long c, const Chunk& ch) {
    typename N::T v = op_.v;
    float max_abs = op_.m;
    if constexpr (N::kTermIsMaxAbs) {
      red_.allreduce<N>(v);
      max_abs = v;
    } else {
      red_.allreduce<N, MaxAbsOp>(v, max_abs);
    }
    double partial = static_cast<double>(v);
    int nans = 0, infs = 0;
    if (ch.dtype == kUnreadable) {  // see chunk_walk.cuh: one NaN element, never read
      partial = __longlong_as_double(0x7ff8000000000000LL);
      max_abs = __int_as_float(0x7fffffff);
      nans = 1;
    } else if (not_finite(max_abs)) {
      CountOp count{0, 0};
      walk_chunk<kReduceThreads, kReduceUnroll>(ch, count);
      red_.allreduce<IntSumOp, IntSumOp>(count.nans, count.infs);
      nans = count.nans;
      infs = count.infs;
    } else if constexpr (N::kPowerSum) {
      if (exact_ && (not_finite(v) || (max_abs > 0.0f && max_abs < tiny_))) partial = exact_partial(ch, max_abs);
      if constexpr (KIND == abi::NORM_P) {
        const float tiny_sum = pow2f(static_cast<int>(abi::RESCAN_TERM_LOG2));
        if (!exact_ && p_ < 0.0f && !(v >= tiny_sum && v <= FLT_MAX)) partial = fp64_partial(ch);
      }
    }
    if (threadIdx.x == 0) {
      at<double>(d_.chunk_partials)[c] = partial;
      at<float>(d_.chunk_max_abs)[c] = max_abs;
      at<int>(d_.chunk_counts)[2 * c] = nans;
      at<int>(d_.chunk_counts)[2 * c + 1] = infs;
    }
  }

 private:
  // sum (|x| 2^-e)^power in fp32 (every term <= 1), times 2^(power e) in fp64.
  __device__ double exact_partial(const Chunk& ch, float max_abs) {
    int e = 0;
    frexpf(max_abs, &e);  // max_abs = f 2^e, f in [0.5, 1)
    const int k = -e / 2;
    ScaledOp<KIND> op{pow2f(k), pow2f(-e - k), p_, 0.0f};
    walk_chunk<kReduceThreads, kReduceUnroll>(ch, op);
    red_.allreduce<FloatSumOp>(op.v);
    return times_pow2(op.v, N::power(p_), e);
  }

  // NORM_P, p < 0: sum |x|^p with every term in fp64 (fp32(p), as the fast path's).
  __device__ double fp64_partial(const Chunk& ch) {
    Pow64Op op{static_cast<double>(p_), 0.0};
    walk_chunk<kReduceThreads, kReduceUnroll>(ch, op);
    red_.allreduce_sum64(op.v);
    return op.v;
  }

  const ClipDesc& d_;
  BlockReducer red_;
  FastOp<KIND> op_;
  float p_;
  float tiny_;
  bool exact_;
};

template <int KIND>
__global__ void __launch_bounds__(kReduceThreads, kReduceBlocksPerSM) reduce_kernel(const ClipDesc d) {
  __shared__ BlockReducer::Scratch scratch;
  __shared__ int s_is_last;
  ReduceBody<KIND> body(d, scratch);
  for_each_chunk</*kFromEnd=*/false>(d, nullptr, body);

  // Ticket: thread 0 wrote every chunk result of this block. Release them device-wide, then count
  // the block in; the block that takes the last ticket acquires everyone's writes and finalizes.
  int* ticket = at<int>(d.ticket);
  if (threadIdx.x == 0) {
    __threadfence();
    const int prev = atomicAdd(ticket, 1);
    const int last = prev == static_cast<int>(gridDim.x) - 1;
    if (last) __threadfence();
    s_is_last = last;
  }
  __syncthreads();
  if (!s_is_last) return;
  finalize<KIND>(d);
  if (threadIdx.x == 0) atomicExch(ticket, 0);  // every other block has taken its ticket: safe to reset
}

}  // namespace

const void* reduce_kernel_for(int64_t norm_kind) {
  switch (norm_kind) {
    case abi::NORM_L2: return reinterpret_cast<const void*>(&reduce_kernel<abi::NORM_L2>);
    case abi::NORM_L1: return reinterpret_cast<const void*>(&reduce_kernel<abi::NORM_L1>);
    case abi::NORM_P: return reinterpret_cast<const void*>(&reduce_kernel<abi::NORM_P>);
    case abi::NORM_INF: return reinterpret_cast<const void*>(&reduce_kernel<abi::NORM_INF>);
    case abi::NORM_NEG_INF: return reinterpret_cast<const void*>(&reduce_kernel<abi::NORM_NEG_INF>);
    case abi::NORM_L0: return reinterpret_cast<const void*>(&reduce_kernel<abi::NORM_L0>);
    default: return nullptr;
  }
}

}  // namespace gradfuse::cuda
