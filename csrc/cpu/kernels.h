// Per-span kernels of the CPU backend, one set per instruction set, picked once at run time.
//
// The same templated source (kernels_impl.h) is compiled three times under different
// `#pragma GCC target`s (kernels_avx512.cpp, kernels_avx2.cpp, kernels_generic.cpp), so the build
// needs no -march flag and the binary runs on any x86-64 (or, generic only, any other CPU).
#pragma once

#include <cstdint>

namespace gradfuse::cpu {

// The partial of one span of elements: the NormKind's accumulation in fp64 (see abi.h) and whether
// the span holds a NaN or an Inf.
struct SpanPartial {
  double value;
  bool nonfinite;
};

struct KernelSet {
  const char* isa;  // "avx512", "avx2" or "generic"
  // Partial of the n elements at `data` (any alignment) of dtype tag `dtype` for `kind` (p is used
  // by kNormP only). Every element is read once.
  SpanPartial (*reduce)(const void* data, int64_t n, int64_t dtype, int kind, double p);
  // x = x * s in fp32 with one rounding back to the dtype (round to nearest even).
  void (*scale)(void* data, int64_t n, int64_t dtype, float s);
};

namespace avx512 {
extern const KernelSet kKernels;  // needs AVX512F, AVX2, FMA and F16C
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
