// The portable kernels: 4-lane GCC/Clang vector extensions, lowered to the baseline SIMD of the
// target (SSE2 on x86-64, NEON on AArch64) or to scalar code. The only path off x86-64.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "float_bits.h"
#include "kernels.h"

namespace gradfuse::cpu::generic {
namespace {

struct Vec {
  static constexpr int kWidth = 4;
  typedef float F __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));
  typedef uint32_t U __attribute__((vector_size(16)));

  static F zero() { return F{0.0f, 0.0f, 0.0f, 0.0f}; }
  static F set1(float v) { return F{v, v, v, v}; }
  static I set1_i(int32_t v) { return I{v, v, v, v}; }

  static F load_f32(const float* p) {
    F v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static F load_f16(const uint16_t* p) {
    uint16_t h[kWidth];
    std::memcpy(h, p, sizeof h);
    return F{f16_to_f32(h[0]), f16_to_f32(h[1]), f16_to_f32(h[2]), f16_to_f32(h[3])};
  }
  // Lane order of load_row: register 8h + k holds the even elements of 32h + 8k .. + 7, register
  // 8h + 4 + k their odd elements (the low half of a little-endian 32-bit word is the even one).
  static void load_row_bf16(const uint16_t* p, F* v, I& mx) {
    for (int h = 0; h < 2; ++h) {
      for (int k = 0; k < 4; ++k) {
        U w;
        std::memcpy(&w, p + 32 * h + 8 * k, sizeof w);
        mx = max_abs_u16(mx, p + 32 * h + 8 * k);
        const U even = w << 16, odd = w & 0xffff0000u;
        std::memcpy(&v[8 * h + k], &even, sizeof even);
        std::memcpy(&v[8 * h + 4 + k], &odd, sizeof odd);
      }
    }
  }

  static void store_f32(float* p, F v) { std::memcpy(p, &v, sizeof v); }
  static void store_f16(uint16_t* p, F v) {
    const uint16_t h[kWidth] = {f32_to_f16(v[0]), f32_to_f16(v[1]), f32_to_f16(v[2]), f32_to_f16(v[3])};
    std::memcpy(p, h, sizeof h);
  }
  static void scale_bf16(uint16_t* p, F s) {
    uint16_t h[2 * kWidth];
    std::memcpy(h, p, sizeof h);
    for (uint16_t& e : h) e = f32_to_bf16(bf16_to_f32(e) * s[0]);
    std::memcpy(p, h, sizeof h);
  }
  static void store(float* p, F v) { std::memcpy(p, &v, sizeof v); }
  static void store_i(int32_t* p, I v) { std::memcpy(p, &v, sizeof v); }

  static F add(F a, F b) { return a + b; }
  static F mul(F a, F b) { return a * b; }
  static F fmadd(F a, F b, F c) { return a * b + c; }
  static I abs_bits(F v, I mask) {
    I a;
    std::memcpy(&a, &v, sizeof a);
    return a & mask;
  }
  static F as_float(I a) {
    F v;
    std::memcpy(&v, &a, sizeof v);
    return v;
  }
  // Comparisons give -1 (all ones) where true, so they select bitwise.
  static I max_i(I a, I b) {
    const I a_wins = a > b;
    return (a & a_wins) | (b & ~a_wins);
  }
  static I min_i(I a, I b) {
    const I a_wins = a < b;
    return (a & a_wins) | (b & ~a_wins);
  }
  // Per 32-bit lane, the larger of its two 16-bit halves (unsigned).
  static I max_of_halves(I v) {
    const I hi = (I)((U)v >> 16), lo = v & 0xffff;
    return hi > lo ? hi : lo;
  }
  // mx with the |x| bit patterns of the 8 16-bit elements at p folded in, lane-halves wise.
  static I max_abs_u16(I mx, const uint16_t* p) {
    typedef uint16_t H __attribute__((vector_size(16)));
    H w, m;
    std::memcpy(&w, p, sizeof w);
    std::memcpy(&m, &mx, sizeof m);
    w &= 0x7fff;
    m = m > w ? m : w;
    std::memcpy(&mx, &m, sizeof mx);
    return mx;
  }
  static I count_nonzero(I cnt, I a) { return cnt - (a != 0); }
};

}  // namespace

#include "kernels_impl.h"

const KernelSet kKernels = {"generic", &reduce, &scale};

}  // namespace gradfuse::cpu::generic
