// The two phases of the kernel contract (gradfuse/_abi.py) on the CPU, over one clip descriptor
// (csrc/gradfuse_abi.h): reduce (chunk partials, per-tensor statistics, total, found_inf, coef,
// scale) and scale (x *= the chunk's factor unless it is 1), threaded over chunks.
#pragma once

#include "gradfuse_abi.h"

namespace gradfuse::cpu {

// Both throw std::invalid_argument for a malformed descriptor (a bad dtype tag, norm kind, policy
// or flag, a chunk outside its tensor, a null address that is needed), naming the field, before
// touching any gradient. num_threads < 1 means 1.
void reduce(const abi::ClipDesc& desc, int num_threads);
void scale(const abi::ClipDesc& desc, int num_threads);

}  // namespace gradfuse::cpu
