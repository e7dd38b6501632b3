// The norm operations of the reduce, per norm kind (gradfuse/_abi.py's NORM_*): the per-element
// term and its fp32 accumulation, the combine and its identity, the fp64 side of the finalize
// (combine, root, the fold of tensors into the total), and the fixed-tree warp / block reductions.
//
// An "op" here is a struct with `using T` (a 32-bit type), `identity()` and `combine(a, b)`
// (commutative, so both lanes of a shuffle-xor pair compute the same bits).
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "gradfuse_abi.h"
#include "tuning.h"

namespace gradfuse::cuda {

// ---- NaN-propagating max / min (torch.max/min propagate NaN; fmaxf would drop it) --------------

// PTX max.NaN / min.NaN (sm_80+): the canonical NaN if either input is NaN.
__device__ __forceinline__ float fmax_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float d;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
#else
  return (a != a || b != b) ? a + b : fmaxf(a, b);
#endif
}
__device__ __forceinline__ float fmin_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float d;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
#else
  return (a != a || b != b) ? a + b : fminf(a, b);
#endif
}
__device__ __forceinline__ double dmax_nan(double a, double b) { return (a != a || b != b) ? a + b : fmax(a, b); }
__device__ __forceinline__ double dmin_nan(double a, double b) { return (a != a || b != b) ? a + b : fmin(a, b); }

__device__ __forceinline__ float inf32() { return __int_as_float(0x7f800000); }
__device__ __forceinline__ double inf64() { return __longlong_as_double(0x7ff0000000000000LL); }

// True for +-Inf and NaN (a NaN compares false).
__device__ __forceinline__ bool not_finite(float x) { return !(fabsf(x) <= FLT_MAX); }

// ---- ops of the block reductions -----------------------------------------------------------------

struct MaxAbsOp {  // max |x| over |x| >= 0 values, NaN propagating
  using T = float;
  __device__ static float identity() { return 0.0f; }
  __device__ static float combine(float a, float b) { return fmax_nan(a, b); }
};

struct FloatSumOp {
  using T = float;
  __device__ static float identity() { return 0.0f; }
  __device__ static float combine(float a, float b) { return a + b; }
};

struct IntSumOp {
  using T = int;
  __device__ static int identity() { return 0; }
  __device__ static int combine(int a, int b) { return a + b; }
};

struct DoubleSumOp {
  using T = double;
  __device__ static double identity() { return 0.0; }
  __device__ static double combine(double a, double b) { return a + b; }
};

// NORM_P's order as its terms see it, which its root takes too (gradfuse/_abi.py): fp32(p), every
// term being an fp32 powf (or, re-read, fp64 from that fp32 p); p itself where fp32(p) is 0 or inf
// (|p| beyond fp32's range).
__device__ __forceinline__ double term_order(double p) {
  const float p32 = static_cast<float>(p);
  return (p32 == 0.0f || isinf(p32)) ? p : static_cast<double>(p32);
}

// ---- the norm kinds --------------------------------------------------------------------------------

// Norm<KIND>: the chunk partial P_c accumulated per thread in fp32 (L0: an exact int count) and
// combined by the block tree; then, in fp64, the combine over chunks and tensors and the root.
//   L2 sum x^2 | L1 sum |x| | P sum |x|^p | INF max |x| | NEG_INF min |x| | L0 #{x != 0}
template <int KIND>
struct Norm {
  static_assert(KIND >= abi::NORM_L2 && KIND <= abi::NORM_L0, "unknown norm kind");
  using T = std::conditional_t<KIND == abi::NORM_L0, int, float>;
  // NORM_INF's partial is the chunk's max |x| itself, which every kind tracks: no second tracker.
  static constexpr bool kTermIsMaxAbs = KIND == abi::NORM_INF;
  // Sums of powers of |x| (L2, L1, P): their fp32 terms can overflow or underflow for finite
  // inputs, and such a chunk is re-read exactly (reduce.cu).
  static constexpr bool kPowerSum = KIND == abi::NORM_L2 || KIND == abi::NORM_L1 || KIND == abi::NORM_P;

  __device__ static T identity() {
    if constexpr (KIND == abi::NORM_NEG_INF) return inf32();
    else return T(0);
  }
  // The exponent of the terms |x|^power (p: the descriptor's p).
  __device__ static float power(float p) {
    if constexpr (KIND == abi::NORM_L2) return 2.0f;
    else if constexpr (KIND == abi::NORM_L1) return 1.0f;
    else return p;
  }
  // Fold one element into the thread's partial.
  __device__ static T add(T v, float x, float p) {
    if constexpr (KIND == abi::NORM_L2) return fmaf(x, x, v);
    else if constexpr (KIND == abi::NORM_L1) return v + fabsf(x);
    else if constexpr (KIND == abi::NORM_P) return v + powf(fabsf(x), p);
    else if constexpr (KIND == abi::NORM_INF) return fmax_nan(v, fabsf(x));
    else if constexpr (KIND == abi::NORM_NEG_INF) return fmin_nan(v, fabsf(x));
    else return v + (x != 0.0f ? 1 : 0);  // NaN != 0 counts, like torch
  }
  __device__ static T combine(T a, T b) {
    if constexpr (KIND == abi::NORM_INF) return fmax_nan(a, b);
    else if constexpr (KIND == abi::NORM_NEG_INF) return fmin_nan(a, b);
    else return a + b;
  }

  // fp64: chunks into S_t, and (fold) tensors into the running total.
  __device__ static double identity64() { return KIND == abi::NORM_NEG_INF ? inf64() : 0.0; }
  __device__ static double combine64(double a, double b) {
    if constexpr (KIND == abi::NORM_INF) return dmax_nan(a, b);
    else if constexpr (KIND == abi::NORM_NEG_INF) return dmin_nan(a, b);
    else return a + b;
  }
  // The total combines S_t over tensors; L0's total is the number of tensors with S_t != 0.
  __device__ static double fold_tensor(double acc, double S) {
    if constexpr (KIND == abi::NORM_L0) return acc + (S != 0.0 ? 1.0 : 0.0);
    else return combine64(acc, S);
  }
  // norm = root(S) * scale: sqrt (L2), S^(1/p) (P, with the p of its terms: term_order), S (L1,
  // INF, NEG_INF, L0); L0 is never scaled. p: the descriptor's.
  __device__ static double root(double S, double p) {
    if constexpr (KIND == abi::NORM_L2) return sqrt(S);
    else if constexpr (KIND == abi::NORM_P) return pow(S, 1.0 / term_order(p));
    else return S;
  }
  __device__ static double norm_scale(double inv_scale) { return KIND == abi::NORM_L0 ? 1.0 : inv_scale; }
};

// fp64 sum * 2^(power * e), without forming 2^(power * e) (which may leave fp64's range although
// the product does not): exact for an integer power * e (L2, L1), ~1 ulp otherwise.
__device__ __forceinline__ double times_pow2(float sum, float power, int e) {
  const double t = static_cast<double>(power) * e;
  const double k = floor(t);
  return ldexp(static_cast<double>(sum) * exp2(t - k), static_cast<int>(k));
}

// ---- fixed-tree reductions -------------------------------------------------------------------------

template <class Op>
__device__ __forceinline__ typename Op::T warp_allreduce(typename Op::T v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v = Op::combine(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <class T>
__device__ __forceinline__ float as_word(T v) {
  if constexpr (std::is_same_v<T, int>) return __int_as_float(v);
  else return v;
}
template <class T>
__device__ __forceinline__ T from_word(float w) {
  if constexpr (std::is_same_v<T, int>) return __float_as_int(w);
  else return w;
}

struct NoOp {  // the absent second value of a one-value block reduction
  using T = int;
};

// Block-wide all-reduce of one or two values (kReduceThreads threads): a shuffle-xor tree in each
// warp, then every warp reduces the warp results with the same tree, so every thread of the block
// ends with the same bits (a decision taken on them is block-uniform) after a single barrier. The
// warp results are double-buffered: a warp may write call k+1's while others still read call k's;
// it cannot reach call k+2 before every warp has passed call k+1's barrier, i.e. read call k's.
class BlockReducer {
 public:
  static constexpr int kWarps = kReduceThreads / kWarpSize;
  struct Scratch {
    float word[2][2][kWarps];
    double wide[kWarps];  // allreduce_sum64's warp results
  };

  __device__ explicit BlockReducer(Scratch& s) : s_(s) {}

  template <class A, class B = NoOp>
  __device__ void allreduce(typename A::T& a, typename B::T& b) {
    constexpr bool kTwo = !std::is_same_v<B, NoOp>;
    const int lane = threadIdx.x & (kWarpSize - 1);
    const int warp = threadIdx.x / kWarpSize;
    a = warp_allreduce<A>(a);
    if constexpr (kTwo) b = warp_allreduce<B>(b);
    if (lane == 0) {
      s_.word[parity_][0][warp] = as_word(a);
      if constexpr (kTwo) s_.word[parity_][1][warp] = as_word(b);
    }
    __syncthreads();
    a = lane < kWarps ? from_word<typename A::T>(s_.word[parity_][0][lane]) : A::identity();
    a = warp_allreduce<A>(a);
    if constexpr (kTwo) {
      b = lane < kWarps ? from_word<typename B::T>(s_.word[parity_][1][lane]) : B::identity();
      b = warp_allreduce<B>(b);
    }
    parity_ ^= 1;
  }

  template <class A>
  __device__ void allreduce(typename A::T& a) {
    int unused = 0;
    allreduce<A, NoOp>(a, unused);
  }

  // One fp64 sum, by the same trees (the rare fp64 re-read); the second barrier keeps the next
  // call's writes of `wide` after every warp's reads of this one.
  __device__ void allreduce_sum64(double& v) {
    const int lane = threadIdx.x & (kWarpSize - 1);
    const int warp = threadIdx.x / kWarpSize;
    v = warp_allreduce<DoubleSumOp>(v);
    if (lane == 0) s_.wide[warp] = v;
    __syncthreads();
    v = lane < kWarps ? s_.wide[lane] : 0.0;
    v = warp_allreduce<DoubleSumOp>(v);
    __syncthreads();
  }

 private:
  Scratch& s_;
  int parity_ = 0;
};

}  // namespace gradfuse::cuda
