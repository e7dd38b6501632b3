// The reduce and scale kernels, written once over a vector traits type `Vec`.
//
// Textually included by kernels_avx512.cpp, kernels_avx2.cpp and kernels_generic.cpp inside their
// own namespace, after `#pragma GCC target(...)` and the definition of `Vec` (so every function here
// is compiled for that instruction set). Include the standard headers (<cmath>, <cstring>),
// float_bits.h and kernels.h (which brings gradfuse_abi.h) before the pragma, never from here. No
// include guard on purpose.
//
// Vec provides, for W = Vec::kWidth fp32 lanes (F) and int32 lanes (I):
//   zero, set1, set1_i, load_f32/_f16 (unaligned, to fp32), max_abs_u16 (|x| bit patterns of 2W
//   16-bit words folded into an I register, two per lane), max_of_halves (the larger 16-bit half of
//   each 32-bit lane), load_row_bf16 (a 64-element row in the
//   lane order of load_row, its max_abs_u16 folded into an I register), store_f32/_f16 (from fp32, round to nearest even), scale_bf16 (2W bf16
//   times s in place, round to nearest even), store (W floats), store_i (W int32s), add, mul,
//   fmadd (a * b + c), abs_bits(v, 0x7fffffff mask) (|x| as an int32 bit pattern), as_float (bit
//   cast), max_i, min_i, count_nonzero(cnt, a) (cnt + (a != 0)).
//
// Numerics of the reduce (the why of the layout):
//   * A row is kLanes = 64 consecutive elements; each element feeds the same fp32 lane on every
//     instruction set (AVX-512: 4 registers, AVX2: 8, generic: 16; see load_row), so AVX2 and
//     AVX-512 give the same bits.
//   * Each lane sums kBlockRows = 32 terms in fp32, then is added to its fp64 lane: the fp32 error
//     stays ~1e-7 relative per block and the blocks combine exactly enough in fp64 (sum x^2 over
//     10^6 values of 100 is exact, where one fp32 accumulator is off by 6e-4).
//   * max |x| (every kind: it is the chunk's max_abs), min and count are exact integer reductions
//     over the |x| bit patterns, which order like the values; NaN patterns order above Inf, so
//     max_bits > Inf's marks a NaN and max_bits >= Inf's a non-finite value. Their lane layout does
//     not matter.
//   * A block is read a second time only when its fast-path result cannot be used as it is: it
//     holds a NaN/Inf (its NaN and Inf elements are counted), or (L2, L1) its fp32 lane sums
//     overflowed although every element is finite, or its max |x| is so small that fp32 squares
//     lose digits to underflow (kTinyBits): then its terms are re-added in fp64, which holds the
//     square of every finite fp32 value. Finite gradients of ordinary magnitude never take it.
//   * |x|^p is computed and summed in fp64 (add_pow_abs), each of the 64 lanes in row order, per
//     block, then added to the span's lanes. A finite block (or the last partial row) whose terms
//     are all tiny (their sum below kTinyPowSum, where add_pow_abs's flush of terms under 2^-1022
//     to 0 could matter) is read again scaled by a power of two (rescan_tiny_pow), as the GPU
//     backends re-read such a chunk.

namespace {

using F = Vec::F;
using I = Vec::I;

constexpr int kW = Vec::kWidth;
constexpr int kLanes = 64;
constexpr int kRegs = kLanes / kW;
constexpr int64_t kBlockRows = 32;
constexpr int32_t kInfBits = 0x7f800000;

static_assert(kLanes % kW == 0, "a row must be whole vectors");

template <int64_t D>
struct Storage {
  using T = uint16_t;  // fp16 and bf16
};
template <>
struct Storage<DTYPE_F32> {
  using T = float;
};

// W elements as fp32 (fp32 and fp16; bf16 rows go through load_row_bf16).
template <int64_t D>
inline F load(const typename Storage<D>::T* p) {
  static_assert(D != DTYPE_BF16, "bf16 is loaded by rows");
  if constexpr (D == DTYPE_F32) return Vec::load_f32(p);
  else return Vec::load_f16(p);
}

// One element, for the tail of a span (memcpy: any alignment).
template <int64_t D>
inline float load_one(const typename Storage<D>::T* p) {
  typename Storage<D>::T v;
  std::memcpy(&v, p, sizeof v);
  if constexpr (D == DTYPE_F32) return v;
  else if constexpr (D == DTYPE_F16) return f16_to_f32(v);
  else return bf16_to_f32(v);
}

// A row as kRegs vectors whose lanes are the fp32 lanes 0..63 in order. fp32 and fp16: element i
// is lane i. bf16: even and odd elements split from whole 64-byte (32-element) loads, which a shift
// or a mask turns into fp32 with no shuffle (half the work per element of widening 16 to 32 bits);
// element i = 32h + j lands on lane 32h + 16 (j & 1) + j / 2 (row_lane), on every instruction set.
// For the 16-bit types the |x| bit patterns of the row's raw words are folded into mx16 on the way
// (two per 32-bit lane: see max_bits_of_halves); fp32 rows leave it alone.
template <int64_t D>
inline void load_row(const typename Storage<D>::T* row, F* v, I& mx16) {
  if constexpr (D == DTYPE_BF16) {
    Vec::load_row_bf16(row, v, mx16);
  } else {
    for (int j = 0; j < kRegs; ++j) v[j] = load<D>(row + j * kW);
    if constexpr (D == DTYPE_F16) {
      for (int j = 0; j < kRegs / 2; ++j) mx16 = Vec::max_abs_u16(mx16, row + 2 * kW * j);
    }
  }
}

template <int64_t D>
inline int row_lane(int i) {
  if constexpr (D == DTYPE_BF16) return (i & 32) + ((i & 1) << 4) + ((i & 31) >> 1);
  else return i;
}

#include "kernels_pow.h"  // add_pow_abs, times_pow2, kTinyPowSum

// NORM_P: `lanes` holds the fp64 lane sums of the finite elements [i0, i1) of x. When every term is
// tiny (their sum below kTinyPowSum, 0 included, and max |x| > 0) they are recomputed as
// (|x| 2^-e)^p with 2^e the power of two above max |x| (exact scaling; the largest terms keep every
// digit), element i into lane (i - i0) % kLanes, and their sum times 2^(p e) into lane 0
// (times_pow2: one rounding per block, as the GPU's one per chunk, where the result is subnormal).
// For p < 0 a tiny sum means every |x| is large, so the scaled terms stay near 1 too.
template <int64_t D>
inline void rescan_tiny_pow(const typename Storage<D>::T* x, int64_t i0, int64_t i1, int32_t max_bits, double p, double* lanes) {
  double sum = 0.0;
  for (int l = 0; l < kLanes; ++l) sum += lanes[l];
  if (!(max_bits > 0 && sum < kTinyPowSum)) return;  // NaN / Inf sums are kept as they are
  int e = 0;
  std::frexp(float_of(static_cast<uint32_t>(max_bits)), &e);  // max |x| = f 2^e, f in [0.5, 1)
  const double down = std::ldexp(1.0, -e);
  for (int l = 0; l < kLanes; ++l) lanes[l] = 0.0;
  for (int64_t i = i0; i < i1; ++i) {
    F64x8 term = splat(0.0);
    add_pow_abs(splat(static_cast<double>(load_one<D>(x + i)) * down), p, term);
    lanes[(i - i0) % kLanes] += term[0];
  }
  double scaled = 0.0;
  for (int l = 0; l < kLanes; ++l) {
    scaled += lanes[l];
    lanes[l] = 0.0;
  }
  lanes[0] = times_pow2(scaled, p, e);
}

// Per-lane fp64 sums, the order-free integer reductions and the non-finite counts of one span.
struct SpanAcc {
  double sum[kLanes] = {};
  int64_t count = 0;
  int32_t max_bits = 0;         // max |x| bit pattern: 0 is max's identity
  int32_t min_bits = kInfBits;  // min |x| bit pattern: +Inf is min's identity
  int64_t nan_count = 0;
  int64_t inf_count = 0;
};

inline int32_t hmax(I v) {
  int32_t lanes[kW];
  Vec::store_i(lanes, v);
  int32_t m = lanes[0];
  for (int l = 1; l < kW; ++l) m = lanes[l] > m ? lanes[l] : m;
  return m;
}

inline int32_t hmin(I v) {
  int32_t lanes[kW];
  Vec::store_i(lanes, v);
  int32_t m = lanes[0];
  for (int l = 1; l < kW; ++l) m = lanes[l] < m ? lanes[l] : m;
  return m;
}

inline int64_t hsum(I v) {
  int32_t lanes[kW];
  Vec::store_i(lanes, v);
  int64_t s = 0;
  for (int l = 0; l < kW; ++l) s += lanes[l];
  return s;
}

// The |x| bit pattern of one element, and its count into acc's NaN / Inf counts.
inline void count_nonfinite(int32_t a, SpanAcc& acc) {
  acc.nan_count += a > kInfBits;
  acc.inf_count += a == kInfBits;
}

// Second reads of a block (rare: never for finite gradients of ordinary magnitude), element by
// element in row order; element i of a row feeds lane row_lane(i), as on the fast path.
template <int64_t D>
inline void count_block(const typename Storage<D>::T* x, int64_t r0, int64_t r1, SpanAcc& acc) {
  for (int64_t i = r0 * kLanes; i < r1 * kLanes; ++i)
    count_nonfinite(static_cast<int32_t>(bits_of(load_one<D>(x + i)) & 0x7fffffffu), acc);
}

// The term of one element in fp64: exact for every finite fp32 value (squares of 3.4e38 and of
// 1.4e-45 are normal doubles), where the fp32 term would overflow or lose digits to underflow.
template <int K>
inline double term64(float f) {
  const double d = f;
  if constexpr (K == NORM_L2) return d * d;
  else return std::fabs(d);
}

template <int64_t D, int K>
inline void add_block_fp64(const typename Storage<D>::T* x, int64_t r0, int64_t r1, SpanAcc& acc) {
  for (int64_t r = r0; r < r1; ++r)
    for (int i = 0; i < kLanes; ++i) acc.sum[row_lane<D>(i)] += term64<K>(load_one<D>(x + r * kLanes + i));
}

// Below this |x| bit pattern the largest fp32 term |x|^p of a block is under 2^RESCAN_TERM_LOG2,
// where fp32 squares run into the subnormals: such a block is re-added in fp64.
template <int K>
constexpr int32_t kTinyBits = static_cast<int32_t>(127 + static_cast<int>(RESCAN_TERM_LOG2 / (K == NORM_L2 ? 2 : 1))) << 23;

// The largest of the 16-bit |x| patterns held in the lane halves of v, as an fp32 |x| pattern
// (folded in the register first: a scalar walk over every half costs more than the block's reads).
template <int64_t D>
inline int32_t max_bits_of_halves(I v) {
  const uint16_t h = static_cast<uint16_t>(hmax(Vec::max_of_halves(v)));
  return static_cast<int32_t>(bits_of(D == DTYPE_BF16 ? bf16_to_f32(h) : f16_to_f32(h)));  // NaN stays NaN
}

// Rows [r0, r1) of x (r1 - r0 <= kBlockRows): fp32 lane sums added to acc.sum, integer reductions
// merged into acc. max |x| is kept for every kind (it is the chunk's max_abs): per fp32 lane for
// fp32, and for the 16-bit types on their raw words, two per 32-bit lane (half the work).
template <int64_t D, int K>
inline void reduce_block(const typename Storage<D>::T* x, int64_t r0, int64_t r1, double p, SpanAcc& acc) {
  constexpr bool kWide = D == DTYPE_F32;
  const I abs_mask = Vec::set1_i(0x7fffffff);
  F s[kRegs];
  for (int j = 0; j < kRegs; ++j) s[j] = Vec::zero();
  I mx = Vec::set1_i(0);
  I mn = Vec::set1_i(kInfBits);
  I cnt = Vec::set1_i(0);
  double pow_sum[kLanes] = {};  // NORM_P: the block's fp64 lane sums
  for (int64_t r = r0; r < r1; ++r) {
    const typename Storage<D>::T* row = x + r * kLanes;
    F v[kRegs];
    load_row<D>(row, v, mx);
    if constexpr (K == NORM_P) {
      float xs[kLanes];
      for (int j = 0; j < kRegs; ++j) {
        if constexpr (kWide) mx = Vec::max_i(mx, Vec::abs_bits(v[j], abs_mask));
        Vec::store(xs + j * kW, v[j]);
      }
      for (int l = 0; l < kLanes; l += kPowLanes) {
        F32x8 xv;
        F64x8 sum;
        std::memcpy(&xv, xs + l, sizeof xv);
        std::memcpy(&sum, pow_sum + l, sizeof sum);
        add_pow_abs(__builtin_convertvector(xv, F64x8), p, sum);
        std::memcpy(pow_sum + l, &sum, sizeof sum);
      }
    } else {
      for (int j = 0; j < kRegs; ++j) {
        if constexpr (K == NORM_L2) s[j] = Vec::fmadd(v[j], v[j], s[j]);
        if constexpr (kWide || K == NORM_L1 || K == NORM_NEG_INF || K == NORM_L0) {
          const I a = Vec::abs_bits(v[j], abs_mask);
          if constexpr (kWide) mx = Vec::max_i(mx, a);
          if constexpr (K == NORM_L1) s[j] = Vec::add(s[j], Vec::as_float(a));
          else if constexpr (K == NORM_NEG_INF) mn = Vec::min_i(mn, a);
          else if constexpr (K == NORM_L0) cnt = Vec::count_nonzero(cnt, a);
        }
      }
    }
  }
  const int32_t block_max = kWide ? hmax(mx) : max_bits_of_halves<D>(mx);
  const bool finite = block_max < kInfBits;
  if (!finite) count_block<D>(x, r0, r1, acc);
  acc.max_bits = block_max > acc.max_bits ? block_max : acc.max_bits;
  if constexpr (K == NORM_P) {
    if (finite) rescan_tiny_pow<D>(x, r0 * kLanes, r1 * kLanes, block_max, p, pow_sum);
    for (int l = 0; l < kLanes; ++l) acc.sum[l] += pow_sum[l];
  }
  if constexpr (K == NORM_L2 || K == NORM_L1) {
    float lanes[kLanes];
    I lane_bits = Vec::set1_i(0);
    for (int j = 0; j < kRegs; ++j) {
      Vec::store(lanes + j * kW, s[j]);
      lane_bits = Vec::max_i(lane_bits, Vec::abs_bits(s[j], abs_mask));
    }
    // Finite elements whose fp32 sum overflowed, or whose squares are near the subnormals: the
    // block again in fp64 (a NaN/Inf element is left to the sums, which carry it as torch does).
    const bool overflowed = hmax(lane_bits) >= kInfBits;
    if (finite && (overflowed || (block_max > 0 && block_max < kTinyBits<K>))) {
      add_block_fp64<D, K>(x, r0, r1, acc);
    } else {
      for (int l = 0; l < kLanes; ++l) acc.sum[l] += lanes[l];
    }
  }
  if constexpr (K == NORM_NEG_INF) {
    const int32_t block_min = hmin(mn);
    acc.min_bits = block_min < acc.min_bits ? block_min : acc.min_bits;
  }
  if constexpr (K == NORM_L0) acc.count += hsum(cnt);
}

template <int K>
inline SpanPartial finish(const SpanAcc& acc) {
  const bool has_nan = acc.max_bits > kInfBits;
  double value;
  if constexpr (K == NORM_INF) {
    value = has_nan ? __builtin_nan("") : float_of(static_cast<uint32_t>(acc.max_bits));
  } else if constexpr (K == NORM_NEG_INF) {
    value = has_nan ? __builtin_nan("") : float_of(static_cast<uint32_t>(acc.min_bits));
  } else if constexpr (K == NORM_L0) {
    value = static_cast<double>(acc.count);
  } else {
    value = 0.0;
    for (int l = 0; l < kLanes; ++l) value += acc.sum[l];  // fixed order: same bits every run
  }
  return {value, static_cast<uint32_t>(acc.max_bits), acc.nan_count, acc.inf_count};
}

template <int64_t D, int K>
SpanPartial reduce_span(const void* data, int64_t n, double p) {
  using T = typename Storage<D>::T;
  const T* x = static_cast<const T*>(data);
  SpanAcc acc;
  const int64_t rows = n / kLanes;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlockRows)
    reduce_block<D, K>(x, r0, r0 + kBlockRows < rows ? r0 + kBlockRows : rows, p, acc);
  // The last partial row, element by element into the lanes a whole row would use, the terms in
  // fp64 (exact, as the blocks' second read; NORM_P's re-read like a block's when tiny).
  double pow_tail[kLanes] = {};
  int32_t tail_max = 0;
  for (int64_t i = rows * kLanes; i < n; ++i) {
    const float f = load_one<D>(x + i);
    const int32_t a = static_cast<int32_t>(bits_of(f) & 0x7fffffffu);
    const int l = row_lane<D>(static_cast<int>(i - rows * kLanes));
    tail_max = a > tail_max ? a : tail_max;
    count_nonfinite(a, acc);
    if constexpr (K == NORM_L2 || K == NORM_L1) acc.sum[l] += term64<K>(f);
    else if constexpr (K == NORM_P) {
      F64x8 term = splat(0.0);
      add_pow_abs(splat(f), p, term);
      pow_tail[l] += term[0];
    }
    else if constexpr (K == NORM_NEG_INF) acc.min_bits = a < acc.min_bits ? a : acc.min_bits;
    else if constexpr (K == NORM_L0) acc.count += a != 0;
  }
  acc.max_bits = tail_max > acc.max_bits ? tail_max : acc.max_bits;
  if constexpr (K == NORM_P) {
    if (tail_max < kInfBits) rescan_tiny_pow<D>(x, rows * kLanes, n, tail_max, p, pow_tail);
    for (int l = 0; l < kLanes; ++l) acc.sum[l] += pow_tail[l];
  }
  return finish<K>(acc);
}

template <int64_t D>
SpanPartial reduce_dtype(const void* data, int64_t n, int kind, double p) {
  switch (kind) {
    case NORM_L2: return reduce_span<D, NORM_L2>(data, n, p);
    case NORM_L1: return reduce_span<D, NORM_L1>(data, n, p);
    case NORM_P: return reduce_span<D, NORM_P>(data, n, p);
    case NORM_INF: return reduce_span<D, NORM_INF>(data, n, p);
    case NORM_NEG_INF: return reduce_span<D, NORM_NEG_INF>(data, n, p);
    default: return reduce_span<D, NORM_L0>(data, n, p);  // the caller validated kind
  }
}

SpanPartial reduce(const void* data, int64_t n, int64_t dtype, int kind, double p) {
  switch (dtype) {
    case DTYPE_F32: return reduce_dtype<DTYPE_F32>(data, n, kind, p);
    case DTYPE_F16: return reduce_dtype<DTYPE_F16>(data, n, kind, p);
    default: return reduce_dtype<DTYPE_BF16>(data, n, kind, p);  // the caller validated dtype
  }
}

// Elements per scale_step: bf16 goes in pairs of vectors (Vec::scale_bf16).
template <int64_t D>
constexpr int kScaleStep = D == DTYPE_BF16 ? 2 * kW : kW;

// p[0 .. kScaleStep<D>) *= s in fp32, one rounding back to the dtype.
template <int64_t D>
inline void scale_step(typename Storage<D>::T* p, F s) {
  if constexpr (D == DTYPE_F32) Vec::store_f32(p, Vec::mul(Vec::load_f32(p), s));
  else if constexpr (D == DTYPE_F16) Vec::store_f16(p, Vec::mul(Vec::load_f16(p), s));
  else Vec::scale_bf16(p, s);
}

template <int64_t D>
void scale_span(void* data, int64_t n, float s) {
  using T = typename Storage<D>::T;
  constexpr int kStep = kScaleStep<D>;
  T* x = static_cast<T*>(data);
  const F vs = Vec::set1(s);
  int64_t i = 0;
  for (; i + 4 * kStep <= n; i += 4 * kStep) {
    for (int u = 0; u < 4; ++u) scale_step<D>(x + i + u * kStep, vs);
  }
  for (; i + kStep <= n; i += kStep) scale_step<D>(x + i, vs);
  if (i < n) {  // the last partial step, through a padded copy (same rounding as the body)
    T buf[kStep] = {};
    const size_t bytes = static_cast<size_t>(n - i) * sizeof(T);
    std::memcpy(buf, x + i, bytes);
    scale_step<D>(buf, vs);
    std::memcpy(x + i, buf, bytes);
  }
}

void scale(void* data, int64_t n, int64_t dtype, float s) {
  switch (dtype) {
    case DTYPE_F32: return scale_span<DTYPE_F32>(data, n, s);
    case DTYPE_F16: return scale_span<DTYPE_F16>(data, n, s);
    default: return scale_span<DTYPE_BF16>(data, n, s);  // the caller validated dtype
  }
}

}  // namespace
