// Scalar fp16/bf16 <-> fp32 conversions by bit manipulation: the generic kernels and the span tails
// use them. They give the same results as F16C / torch (c10::Half, c10::BFloat16) for every
// non-NaN value; a NaN stays a NaN (its payload may differ).
//
// Include this before any `#pragma GCC target` so these inline functions keep the baseline target
// in every translation unit (one definition for the linker to keep).
#pragma once

#include <cstdint>
#include <cstring>

namespace gradfuse::cpu {

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// bf16 is the upper half of an fp32.
inline float bf16_to_f32(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

// Round to nearest even: add 0x7fff plus the lowest kept bit, then truncate. A NaN keeps its sign
// and top payload bits with the quiet bit set (rounding could otherwise carry it into an Inf).
inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = bits_of(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Exact: normals are re-biased by a multiply by 2^-112 (exponent field 0xE0 + e16 so Inf/NaN land
// on exponent 0xFF), subnormals are rebuilt with the 0.5 magic bias (no fp32 subnormal on the way).
inline float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = float_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = two_w < (1u << 27) ? bits_of(denormalized) : bits_of(normalized);
  return float_of(sign | magnitude);
}

// Correctly rounded (nearest even), overflow to Inf: scaling by 2^112 then 2^-110 lets the fp32
// adder do the rounding at the fp16 precision of the value's own exponent (the FP16 library's method,
// as c10::Half).
inline uint16_t f32_to_f16(float f) {
  const uint32_t w = bits_of(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  float base = (float_of(w & 0x7fffffffu) * 0x1.0p+112f) * 0x1.0p-110f;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = float_of((bias >> 1) + 0x07800000u) + base;
  const uint32_t b = bits_of(base);
  const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

}  // namespace gradfuse::cpu
