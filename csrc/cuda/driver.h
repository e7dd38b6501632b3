// The host side of the CUDA kernels (plain C++, no CUDA types): argument checks against the clip
// descriptor, the device guard, the launch. Called by bindings.cpp; contract: gradfuse/_abi.py.
//
// reduce enqueues exactly one kernel on `stream` (a cudaStream_t handle as an integer, 0 = the
// legacy default stream) on device `device_index`, scale one too, or none when the plan has no
// chunks (num_chunks == 0): asynchronous, no host sync, no allocation,
// no copy to the host, so both are capturable in a CUDA graph. The descriptor is passed to the
// kernel by value. Every address in it is a device address on that device.
//
// Errors: a bad descriptor field throws std::invalid_argument naming the field, before any CUDA
// call (so it shows without a GPU too); a CUDA failure throws std::runtime_error naming the call,
// e.g. "gradfuse._C_cuda.reduce: no CUDA device (cudaGetDeviceCount failed: ...)". Thread-safe.
#pragma once

#include <cstdint>
#include <string>

#include "gradfuse_abi.h"

namespace gradfuse::cuda {

void reduce(const abi::ClipDesc& d, int device_index, std::uint64_t stream);
void scale(const abi::ClipDesc& d, int device_index, std::uint64_t stream);

// Visible CUDA devices; 0 when there is no device or no usable driver. Never throws.
int device_count() noexcept;

// "" when device_index can run the kernels, else why not: "no CUDA device (cudaGetDeviceCount
// failed: CUDA driver version is insufficient for CUDA runtime version)", an index out of range...
std::string device_error(int device_index);

}  // namespace gradfuse::cuda
