// The kernels' entry points as the host driver sees them (plain C++: driver.cpp is compiled by
// the host compiler). Each kernel takes one gradfuse::abi::ClipDesc by value (8 bytes per field,
// its size static_asserted in gradfuse_abi.h) and is launched with the shapes of tuning.h.
// Contract: gradfuse/_abi.py.
#pragma once

#include <cstdint>

namespace gradfuse::cuda {

// Phase 1 for a valid norm_kind (NORM_L2 .. NORM_L0); defined in reduce.cu.
const void* reduce_kernel_for(int64_t norm_kind);

// Phase 2; defined in scale.cu.
const void* scale_kernel_entry();

}  // namespace gradfuse::cuda
