// Run-time choice of the kernel set (GCC function multiversioning by hand: the ISA variants are
// compiled under `#pragma GCC target` and picked here with __builtin_cpu_supports).
#include <cstdlib>
#include <cstring>

#include "kernels.h"

namespace gradfuse::cpu {
namespace {

const KernelSet& detect() {
  const char* cap = std::getenv("GRADFUSE_CPU_ISA");
  const bool allow_avx512 = cap == nullptr || std::strcmp(cap, "avx512") == 0;
  const bool allow_avx2 = allow_avx512 || std::strcmp(cap, "avx2") == 0;
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool has_avx512 = has_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  if (allow_avx512 && has_avx512) return avx512::kKernels;
  if (allow_avx2 && has_avx2) return avx2::kKernels;
#else
  (void)allow_avx2;
#endif
  return generic::kKernels;
}

}  // namespace

const KernelSet& kernels() {
  static const KernelSet& chosen = detect();
  return chosen;
}

}  // namespace gradfuse::cpu
