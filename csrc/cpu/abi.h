// The constants of the kernel contract, mirrored from gradfuse/_abi.py (the single source of truth:
// keep both in step).
#pragma once

#include <cstdint>

namespace gradfuse::cpu {

// Element type tags of the plan's dtypes[] table.
enum Dtype : int64_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Norm kinds and the per-chunk partial each one accumulates.
enum NormKind : int {
  kNormL2 = 0,      // sum x^2
  kNormL1 = 1,      // sum |x|
  kNormP = 2,       // sum |x|^p
  kNormInf = 3,     // max |x| (NaN if the chunk holds a NaN)
  kNormNegInf = 4,  // min |x| (NaN if the chunk holds a NaN)
  kNormL0 = 5,      // count of x != 0
};

// What the scale factor becomes when a gradient holds a NaN or Inf.
enum Policy : int { kPolicyPropagate = 0, kPolicySkip = 1, kPolicyZero = 2 };

// Slots of the float32 result[4] output.
enum ResultSlot : int { kResultTotal = 0, kResultFoundInf = 1, kResultCoef = 2, kResultScale = 3 };

// torch's clip_grad_norm_: coef = max_norm / (total + 1e-6).
constexpr double kClipEps = 1e-6;

inline bool valid_dtype(int64_t tag) { return tag == kF32 || tag == kF16 || tag == kBF16; }

inline int64_t element_size(int64_t tag) { return tag == kF32 ? 4 : 2; }

}  // namespace gradfuse::cpu
