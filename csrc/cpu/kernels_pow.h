// |x|^p in fp64 on 8 lanes (add_pow_abs) and its helpers, for NORM_P in kernels_impl.h.
//
// Textually included by kernels_impl.h inside its namespace, after kLanes and under the caller's
// `#pragma GCC target(...)`, like kernels_impl.h itself: no includes, no include guard on purpose.

// add_pow_abs runs on 8 fp64 lanes through the compiler's vector extension (one zmm, two ymm or four
// xmm registers): explicit SIMD without control flow. Written as scalar code, GCC keeps the
// selects as branches around FP operations (which could trap) and does not vectorise the loop.
typedef double F64x8 __attribute__((vector_size(64)));
typedef uint64_t U64x8 __attribute__((vector_size(64)));
typedef float F32x8 __attribute__((vector_size(32)));
constexpr int kPowLanes = 8;
static_assert(kLanes % kPowLanes == 0, "a row must be whole add_pow_abs vectors");
#if defined(__GNUC__) && !defined(__clang__)
// These vectors never cross an ABI boundary (internal linkage), so GCC's note that returning them
// by value depends on AVX-512 does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

inline F64x8 splat(double v) { return F64x8{v, v, v, v, v, v, v, v}; }

inline U64x8 splat_u(uint64_t v) { return U64x8{v, v, v, v, v, v, v, v}; }

// mask ? a : b, lane by lane (mask lanes all ones or all zeros, as comparisons give).
inline F64x8 select(const U64x8& mask, const F64x8& a, const F64x8& b) { return (F64x8)(((U64x8)a & mask) | ((U64x8)b & ~mask)); }

// sum += |x|^p, lane by lane, with |x|^p = exp(p ln|x|) in fp64:
//   ln|x| = e ln2 + ln m with |x| = m 2^e, m in [sqrt(1/2), sqrt(2)), and
//   ln m = 2 atanh(s) = 2 (s + s^3/3 + ... + s^17/17), s = (m - 1)/(m + 1), |s| <= 0.172;
//   exp(y) = 2^k exp(r), k = round(y / ln2), |r| <= ln2/2, exp(r) by its degree-12 Taylor polynomial.
// Relative error ~1e-15 for the fp32 inputs it gets. Special cases as IEEE pow: 0^p = 0 (p > 0) or
// Inf (p < 0), Inf^p = Inf or 0, NaN^p = NaN; results below 2^-1022 flush to 0 (a block of such
// terms is read again by rescan_tiny_pow).
inline void add_pow_abs(const F64x8& xs, double p, F64x8& sum) {
  constexpr double kInf = __builtin_inf();
  constexpr double kLn2 = 0x1.62e42fefa39efp-1;
  constexpr double kLn2Hi = 0x1.62e42fefa3800p-1;  // few mantissa bits: k * kLn2Hi is exact
  constexpr double kLn2Lo = 0x1.ef35793c76730p-45;
  constexpr double kLog2e = 0x1.71547652b82fep0;
  constexpr double kRound = 0x1.8p52;  // adding it rounds to an integer kept in the low mantissa bits
  const U64x8 b = (U64x8)xs & 0x7fffffffffffffffull;
  const F64x8 x = (F64x8)b;
  // m in [sqrt(1/2), sqrt(2)) and e from the bits; the mantissa of sqrt(2) is 0x6a09e667f3bcd.
  const U64x8 frac = b & 0x000fffffffffffffull;
  const U64x8 high = (U64x8)(frac > splat_u(0x6a09e667f3bcdull)) & 1;
  const F64x8 m = (F64x8)(frac | (0x3ff0000000000000ull - (high << 52)));
  const F64x8 e = (F64x8)(((b >> 52) + high) | 0x4330000000000000ull) - (0x1p52 + 1023.0);
  const F64x8 s = (m - 1.0) / (m + 1.0);
  const F64x8 s2 = s * s;
  F64x8 t = splat(1.0 / 17);
  t = t * s2 + 1.0 / 15;
  t = t * s2 + 1.0 / 13;
  t = t * s2 + 1.0 / 11;
  t = t * s2 + 1.0 / 9;
  t = t * s2 + 1.0 / 7;
  t = t * s2 + 1.0 / 5;
  t = t * s2 + 1.0 / 3;
  t = t * s2 + 1.0;
  const F64x8 y = p * (e * kLn2 + 2.0 * s * t);
  // Where exp(y) leaves fp64's range (|k| > ~1023) the steps below give garbage that the selects at
  // the end replace, so y needs no clamp.
  const F64x8 k = (y * kLog2e + kRound) - kRound;
  const F64x8 r = (y - k * kLn2Hi) - k * kLn2Lo;
  F64x8 q = splat(1.0 / 479001600);  // 1/12!
  q = q * r + 1.0 / 39916800;
  q = q * r + 1.0 / 3628800;
  q = q * r + 1.0 / 362880;
  q = q * r + 1.0 / 40320;
  q = q * r + 1.0 / 5040;
  q = q * r + 1.0 / 720;
  q = q * r + 1.0 / 120;
  q = q * r + 1.0 / 24;
  q = q * r + 1.0 / 6;
  q = q * r + 0.5;
  q = q * r + 1.0;
  q = q * r + 1.0;
  // 2^k from its exponent field (k + 1023 lands in the low mantissa bits of k + kRound + 1023).
  const F64x8 two_k = (F64x8)((U64x8)(k + (kRound + 1023.0)) << 52);
  F64x8 result = q * two_k;
  result = select((U64x8)(k > splat(1023.0)), splat(kInf), result);
  result = select((U64x8)(k < splat(-1022.0)), splat(0.0), result);
  result = select((U64x8)(x == splat(0.0)), splat(p > 0 ? 0.0 : kInf), result);
  result = select((U64x8)(x == splat(kInf)), splat(p > 0 ? kInf : 0.0), result);
  sum += select((U64x8)(x != x), x, result);
}

// sum * 2^(p e) without forming 2^(p e), which may leave fp64's range where the product does not:
// one rounding, with gradual underflow (the CUDA kernels' times_pow2).
inline double times_pow2(double sum, double p, int e) {
  const double t = p * e;
  const double k = std::floor(t);
  return std::ldexp(sum * std::exp2(t - k), static_cast<int>(k));
}

// A NORM_P block whose fp64 terms sum below this is read again scaled (rescan_tiny_pow): its terms
// are under 2^(64 - 1022), so those add_pow_abs flushed (under 2^-1022) could matter.
constexpr double kTinyPowSum = 0x1p-958;
