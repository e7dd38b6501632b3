// The kernels for AVX2 + FMA + F16C: 8 fp32 lanes per register.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "abi.h"
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
  static F load_bf16(const uint16_t* p) {
    const I wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }

  static void store_f32(float* p, F v) { _mm256_storeu_ps(p, v); }
  static void store_f16(uint16_t* p, F v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // As f32_to_bf16 (float_bits.h), 8 lanes at once.
  static void store_bf16(uint16_t* p, F v) {
    const I u = _mm256_castps_si256(v);
    const I lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const I rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const I quiet_nan = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    const I is_nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    const I out = _mm256_blendv_epi8(rounded, quiet_nan, is_nan);
    // Every lane is in [0, 0xffff], so the saturating pack only narrows.
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(out), _mm256_extracti128_si256(out, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
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
  // a is a non-negative bit pattern, so a != 0 is a > 0; the compare gives -1 there.
  static I count_nonzero(I cnt, I a) { return _mm256_sub_epi32(cnt, _mm256_cmpgt_epi32(a, _mm256_setzero_si256())); }
};

}  // namespace

#include "kernels_impl.h"

const KernelSet kKernels = {"avx2", &reduce, &scale};

}  // namespace gradfuse::cpu::avx2

#pragma GCC pop_options
#endif  // __x86_64__
