// Per-span kernels of the CPU backend, one set per instruction set, picked once at run time.
//
// The same templated source (kernels_impl.h) is compiled three times under different
// `#pragma GCC target`s (kernels_avx512.cpp, kernels_avx2.cpp, kernels_generic.cpp), so the build
// needs no -march flag and the binary runs on any x86-64 (or, generic only, any other CPU).
#pragma once

#include <cstdint>

#include "gradfuse_abi.h"

namespace gradfuse::cpu {

using namespace gradfuse::abi;  // DTYPE_*, NORM_*, POLICY_*, FLAG_*, RESULT_*, the constants

// What one read of a span gives: the NormKind's partial in fp64 (see gradfuse/_abi.py), the max
// |x| as a bit pattern (above 0x7f800000: the span holds a NaN), and exact NaN / Inf counts.
struct SpanPartial {
  double value;
  uint32_t max_bits;
  int64_t nan_count;
  int64_t inf_count;
};

struct KernelSet {
  const char* isa;  // "avx512", "avx2" or "generic"
  // Partial of the n elements at `data` (any alignment) of dtype tag `dtype` for `kind` (p is used
  // by NORM_P only). Every element is read once, except blocks that hold a NaN/Inf (counted) or
  // whose sums cannot be trusted: fp32 sums of finite values that overflowed or are tiny (re-added
  // in fp64), NORM_P's fp64 terms all tiny (re-read scaled by a power of two).
  SpanPartial (*reduce)(const void* data, int64_t n, int64_t dtype, int kind, double p);
  // x = x * s in fp32 with one rounding back to the dtype (round to nearest even).
  void (*scale)(void* data, int64_t n, int64_t dtype, float s);
};

namespace avx512 {
extern const KernelSet kKernels;  // needs AVX512F, AVX512BW, AVX2, FMA and F16C
}
namespace avx2 {
extern const KernelSet kKernels;  // needs AVX2 + FMA + F16C
}
namespace generic {
extern const KernelSet kKernels;  // baseline instructions only
}

// The best set this CPU runs. GRADFUSE_CPU_ISA=avx2|generic caps the choice (to test the
// lower paths on a newer machine); asking for more than the CPU has falls back to what it has.
const KernelSet& kernels();

}  // namespace gradfuse::cpu
