// gradfuse CUDA kernels: the host-side interface (plain C++, no CUDA types).
//
// The kernels implement the contract of gradfuse/_abi.py over raw device addresses. Everything
// here is an integer or a double so that bindings.cpp compiles with the host compiler alone and
// the module never links libtorch: the caller passes tensor.data_ptr() values and the
// cuda_stream handle of torch.cuda.current_stream() as integers.
//
// Both launchers are asynchronous and capturable in a CUDA graph: they enqueue exactly one kernel
// on the given stream, never synchronise the host, never allocate, never copy to the host.
#pragma once

#include <cstdint>
#include <string>

namespace gradfuse_cuda {

// Mirrors of gradfuse/_abi.py (keep in sync).
constexpr int DTYPE_F32 = 0;
constexpr int DTYPE_F16 = 1;
constexpr int DTYPE_BF16 = 2;

constexpr int NORM_L2 = 0;       // chunk partial: sum x^2
constexpr int NORM_L1 = 1;       // chunk partial: sum |x|
constexpr int NORM_P = 2;        // chunk partial: sum |x|^p
constexpr int NORM_INF = 3;      // chunk partial: max |x| (NaN if the chunk holds a NaN)
constexpr int NORM_NEG_INF = 4;  // chunk partial: min |x| (NaN if the chunk holds a NaN)
constexpr int NORM_L0 = 5;       // chunk partial: count of x != 0

constexpr int POLICY_PROPAGATE = 0;
constexpr int POLICY_SKIP = 1;
constexpr int POLICY_ZERO = 2;

constexpr int RESULT_TOTAL = 0;
constexpr int RESULT_FOUND_INF = 1;
constexpr int RESULT_COEF = 2;
constexpr int RESULT_SCALE = 3;
constexpr int RESULT_SIZE = 4;

// Phase 1 (one kernel launch). Every address is a device address on device `device_index`.
struct ReduceArgs {
  std::uint64_t addrs = 0;               // int64[T]: address of element 0 of tensor t
  std::uint64_t numels = 0;              // int64[T]: elements of tensor t
  std::uint64_t dtypes = 0;              // int64[T]: DTYPE_* tag of tensor t
  std::uint64_t tensor_chunk_begin = 0;  // int64[T+1]: chunks of t are [begin[t], begin[t+1])
  std::uint64_t chunk_tensor = 0;        // int64[C]: tensor of chunk c
  std::uint64_t chunk_start = 0;         // int64[C]: first element of chunk c inside its tensor
  std::int64_t num_tensors = 0;          // T
  std::int64_t num_chunks = 0;           // C (may be 0: then only the outputs are written)
  std::int64_t chunk_size = 0;           // elements per chunk (the last chunk of a tensor may be shorter)
  std::int64_t max_tensor_chunks = 0;    // chunks of the largest tensor (informational, validated)
  int norm_kind = NORM_L2;               // NORM_*
  double p = 2.0;                        // the norm order (used by NORM_P)
  double max_norm = 0.0;                 // clipping threshold when max_norm_ptr == 0
  std::uint64_t max_norm_ptr = 0;        // float32[1] threshold on the device, or 0
  std::uint64_t inv_scale_ptr = 0;       // float32[1] AMP inverse loss scale on the device, or 0 (= 1)
  int policy = POLICY_PROPAGATE;         // POLICY_*
  std::uint64_t chunk_partials = 0;      // float32[C] workspace (written)
  std::uint64_t chunk_nonfinite = 0;     // int32[C] workspace (written)
  std::uint64_t ticket = 0;              // int32[1] workspace: 0 on entry, reset to 0 by the last block
  std::uint64_t tensor_norms = 0;        // float32[T] output
  std::uint64_t result = 0;              // float32[RESULT_SIZE] output
  int device_index = 0;                  // CUDA device of every address above
  std::uint64_t stream = 0;              // cudaStream_t handle (0 = the legacy default stream)
};

// Phase 2 (one kernel launch).
struct ScaleArgs {
  std::uint64_t addrs = 0;         // int64[T], as in ReduceArgs (gradients are modified in place)
  std::uint64_t numels = 0;        // int64[T]
  std::uint64_t dtypes = 0;        // int64[T]
  std::uint64_t chunk_tensor = 0;  // int64[C]
  std::uint64_t chunk_start = 0;   // int64[C]
  std::int64_t num_chunks = 0;     // C (0: nothing is launched)
  std::int64_t chunk_size = 0;
  std::uint64_t scale_ptr = 0;     // float32[1] on the device: the factor (result[RESULT_SCALE])
  bool zero_if_scale_is_zero = false;  // write 0 (not x * 0) when the factor is exactly 0
  int device_index = 0;
  std::uint64_t stream = 0;
};

// Each returns "" on success, else the failing call and its reason, e.g.
// "cudaLaunchKernel failed: invalid device function" or "no CUDA device (...)".
// Errors from arguments are reported before any CUDA call. Thread-safe.
std::string reduce(const ReduceArgs& args);
std::string scale(const ScaleArgs& args);

// Number of visible CUDA devices; 0 when there is no device or no usable driver. Never throws.
int device_count() noexcept;

// "" when device_index can run the kernels, else why not: "no CUDA device (cudaGetDeviceCount
// failed: CUDA driver version is insufficient for CUDA runtime version)", an index out of range...
std::string device_error(int device_index);

}  // namespace gradfuse_cuda
