// The kernels for AVX2 + FMA + F16C: 8 fp32 lanes per register.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "float_bits.h"
#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace gradfuse::cpu::avx2 {
namespace {

struct Vec {
  static constexpr int kWidth = 8;
  using F = __m256;
  using I = __m256i;

  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static I set1_i(int32_t v) { return _mm256_set1_epi32(v); }

  static F load_f32(const float* p) { return _mm256_loadu_ps(p); }
  static F load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  // Lane order of load_row: register 4h + k holds the even elements of 32h + 16k .. + 15, register
  // 4h + 2 + k their odd elements.
  static void load_row_bf16(const uint16_t* p, F* v, I& mx) {
    const I high_half = _mm256_set1_epi32(static_cast<int32_t>(0xffff0000u));
    for (int h = 0; h < 2; ++h) {
      for (int k = 0; k < 2; ++k) {
        const I w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * h + 16 * k));
        mx = _mm256_max_epu16(mx, _mm256_and_si256(w, _mm256_set1_epi16(0x7fff)));
        v[4 * h + k] = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
        v[4 * h + 2 + k] = _mm256_castsi256_ps(_mm256_and_si256(w, high_half));
      }
    }
  }

  static void store_f32(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void store_f16(uint16_t* p, F v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // 16 bf16 times s in place. Even and odd elements are split by a shift and a mask and joined
  // back the same way, so no lane shuffle is needed either way.
  static void scale_bf16(uint16_t* p, F s) {
    const I high_half = _mm256_set1_epi32(static_cast<int32_t>(0xffff0000u));
    const I w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const I even = round_bf16(_mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)), s));
    const I odd = round_bf16(_mm256_mul_ps(_mm256_castsi256_ps(_mm256_and_si256(w, high_half)), s));
    const I out = _mm256_or_si256(_mm256_and_si256(odd, high_half), _mm256_srli_epi32(even, 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), out);
  }
  // As f32_to_bf16 (float_bits.h), the bf16 left in the high half of each lane: add 0x7fff plus the
  // lowest kept bit. NaN lanes are left alone: a product's NaN is quiet, so its high half is a NaN.
  static I round_bf16(F v) {
    const I u = _mm256_castps_si256(v);
    const I bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)), _mm256_set1_epi32(0x7fff));
    const I is_number = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q));
    return _mm256_add_epi32(u, _mm256_and_si256(bias, is_number));
  }
  static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void store_i(int32_t* p, I v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }

  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static I abs_bits(F v, I mask) { return _mm256_and_si256(_mm256_castps_si256(v), mask); }
  static F as_float(I a) { return _mm256_castsi256_ps(a); }
  static I max_i(I a, I b) { return _mm256_max_epi32(a, b); }
  static I min_i(I a, I b) { return _mm256_min_epi32(a, b); }
  // Per 32-bit lane, the larger of its two 16-bit halves (unsigned).
  static I max_of_halves(I v) { return _mm256_max_epi32(_mm256_srli_epi32(v, 16), _mm256_and_si256(v, _mm256_set1_epi32(0xffff))); }
  // mx with the |x| bit patterns of the 16 16-bit elements at p folded in, lane-halves wise.
  static I max_abs_u16(I mx, const uint16_t* p) {
    const I w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm256_max_epu16(mx, _mm256_and_si256(w, _mm256_set1_epi16(0x7fff)));
  }
  // a is a non-negative bit pattern, so a != 0 is a > 0; the compare gives -1 there.
  static I count_nonzero(I cnt, I a) { return _mm256_sub_epi32(cnt, _mm256_cmpgt_epi32(a, _mm256_setzero_si256())); }
};

}  // namespace

#include "kernels_impl.h"

const KernelSet kKernels = {"avx2", &reduce, &scale};

}  // namespace gradfuse::cpu::avx2

#pragma GCC pop_options
#endif  // __x86_64__
