// The kernels for AVX-512F (+ BW for 16-bit integer lanes): 16 fp32 lanes per register.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "float_bits.h"
#include "kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx2,fma,f16c")
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 warns about the `__Y = __Y` inside its own _mm512_undefined_* (GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace gradfuse::cpu::avx512 {
namespace {

struct Vec {
  static constexpr int kWidth = 16;
  using F = __m512;
  using I = __m512i;

  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static I set1_i(int32_t v) { return _mm512_set1_epi32(v); }

  static F load_f32(const float* p) { return _mm512_loadu_ps(p); }
  static F load_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  // Lane order of load_row: even elements of 0..31, odd of 0..31, even of 32..63, odd of 32..63.
  // The |x| bit patterns of the row's words are folded into mx on the way (two per 32-bit lane).
  static void load_row_bf16(const uint16_t* p, F* v, I& mx) {
    const I high_half = _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u));
    for (int h = 0; h < 2; ++h) {
      const I w = _mm512_loadu_si512(p + 32 * h);
      mx = _mm512_max_epu16(mx, _mm512_and_si512(w, _mm512_set1_epi16(0x7fff)));
      v[2 * h] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
      v[2 * h + 1] = _mm512_castsi512_ps(_mm512_and_si512(w, high_half));
    }
  }

  static void store_f32(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store_f16(uint16_t* p, F v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // 32 bf16 times s in place. Even and odd elements are split by a shift and a mask and joined
  // back the same way, so no lane shuffle is needed either way.
  static void scale_bf16(uint16_t* p, F s) {
    const I high_half = _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u));
    const I w = _mm512_loadu_si512(p);
    const I even = round_bf16(_mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), s));
    const I odd = round_bf16(_mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(w, high_half)), s));
    // (odd & high_half) | (even >> 16)
    _mm512_storeu_si512(p, _mm512_ternarylogic_epi32(odd, high_half, _mm512_srli_epi32(even, 16), 0xEA));
  }
  // As f32_to_bf16 (float_bits.h), the bf16 left in the high half of each lane: add 0x7fff plus the
  // lowest kept bit. NaN lanes are left alone: a product's NaN is quiet, so its high half is a NaN.
  static I round_bf16(F v) {
    const I u = _mm512_castps_si512(v);
    const I bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7fff));
    return _mm512_mask_add_epi32(u, _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), u, bias);
  }
  static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
  static void store_i(int32_t* p, I v) { _mm512_storeu_si512(p, v); }

  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static I abs_bits(F v, I mask) { return _mm512_and_si512(_mm512_castps_si512(v), mask); }
  static F as_float(I a) { return _mm512_castsi512_ps(a); }
  static I max_i(I a, I b) { return _mm512_max_epi32(a, b); }
  static I min_i(I a, I b) { return _mm512_min_epi32(a, b); }
  // Per 32-bit lane, the larger of its two 16-bit halves (unsigned).
  static I max_of_halves(I v) { return _mm512_max_epi32(_mm512_srli_epi32(v, 16), _mm512_and_si512(v, _mm512_set1_epi32(0xffff))); }
  // mx with the |x| bit patterns of the 32 16-bit elements at p folded in, lane-halves wise.
  static I max_abs_u16(I mx, const uint16_t* p) {
    const I w = _mm512_loadu_si512(p);
    return _mm512_max_epu16(mx, _mm512_and_si512(w, _mm512_set1_epi16(0x7fff)));
  }
  static I count_nonzero(I cnt, I a) { return _mm512_mask_add_epi32(cnt, _mm512_test_epi32_mask(a, a), cnt, _mm512_set1_epi32(1)); }
};

}  // namespace

#include "kernels_impl.h"

const KernelSet kKernels = {"avx512", &reduce, &scale};

}  // namespace gradfuse::cpu::avx512

#pragma GCC pop_options
#endif  // __x86_64__
