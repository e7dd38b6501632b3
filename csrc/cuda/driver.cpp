// The host side of the CUDA kernels (driver.h): descriptor checks, device guard, SM count cache,
// launch. Compiled by the host compiler; the kernels' entry addresses come from kernels.h.
#include "driver.h"

#include <cuda.h>  // CUcontext / CUresult, to restore the caller's exact context (no libcuda link)
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels.h"
#include "tuning.h"

namespace gradfuse::cuda {
namespace {

using abi::ClipDesc;

constexpr int kMaxCachedDevices = 64;

// ---- errors -------------------------------------------------------------------------------------

[[noreturn]] void bad_field(const char* call, const std::string& what) {
  throw std::invalid_argument(std::string("gradfuse._C_cuda.") + call + ": " + what);
}

[[noreturn]] void cuda_failed(const char* call, const std::string& what, cudaError_t e) {
  (void)cudaGetLastError();  // clear the (non-sticky) error state for the next call
  throw std::runtime_error(std::string("gradfuse._C_cuda.") + call + ": " + what + " failed: " + cudaGetErrorString(e));
}

void cuda_check(const char* call, cudaError_t e, const char* what) {
  if (e != cudaSuccess) cuda_failed(call, what, e);
}

// ---- descriptor checks (host fields only: the tables live on the device) ------------------------
// The kernels guard what only the tables can tell (dtype tags, chunk bounds): see chunk_walk.cuh.

void require(const char* call, uint64_t address, const char* field) {
  if (address == 0) bad_field(call, std::string(field) + " is 0");
}

void check_common(const char* call, const ClipDesc& d) {
  if (d.chunk_size < 1 || d.chunk_size > kMaxChunkSize)
    bad_field(call, "chunk_size must be in [1, 2^30], got " + std::to_string(d.chunk_size));
  if (d.num_chunks < 0) bad_field(call, "num_chunks must be >= 0, got " + std::to_string(d.num_chunks));
  if (d.num_tensors < 0) bad_field(call, "num_tensors must be >= 0, got " + std::to_string(d.num_tensors));
  if (d.num_chunks > 0 && d.num_tensors == 0)
    bad_field(call, "num_chunks is " + std::to_string(d.num_chunks) + " but num_tensors is 0");
  if (d.flags & ~(abi::FLAG_WRITE_TENSOR_SCALES | abi::FLAG_READ_TENSOR_SCALES))
    bad_field(call, "flags " + std::to_string(d.flags) + " has bits outside FLAG_WRITE_TENSOR_SCALES | FLAG_READ_TENSOR_SCALES");
  if (d.num_chunks > 0) {
    require(call, d.addrs, "addrs");
    require(call, d.numels, "numels");
    require(call, d.dtypes, "dtypes");
    require(call, d.chunk_tensor, "chunk_tensor");
    require(call, d.chunk_start, "chunk_start");
  }
}

void check_reduce(const ClipDesc& d) {
  constexpr const char* call = "reduce";
  check_common(call, d);
  if (d.norm_kind < abi::NORM_L2 || d.norm_kind > abi::NORM_L0)
    bad_field(call, "norm_kind " + std::to_string(d.norm_kind) + " is not one of NORM_L2 (0) .. NORM_L0 (5)");
  if (d.norm_kind == abi::NORM_P && !(std::isfinite(d.p) && d.p != 0.0))
    bad_field(call, "NORM_P needs a finite non-zero p, got " + std::to_string(d.p) + " (use NORM_INF/NEG_INF/L0)");
  if (d.policy < abi::POLICY_PROPAGATE || d.policy > abi::POLICY_ZERO)
    bad_field(call, "policy " + std::to_string(d.policy) + " is not one of POLICY_PROPAGATE (0), SKIP (1), ZERO (2)");
  require(call, d.result, "result");
  require(call, d.tensor_chunk_begin, "tensor_chunk_begin");
  require(call, d.ticket, "ticket");
  if (d.num_tensors > 0) {
    require(call, d.addrs, "addrs");
    require(call, d.numels, "numels");
    require(call, d.dtypes, "dtypes");
    require(call, d.tensor_norms, "tensor_norms");
    require(call, d.tensor_partials, "tensor_partials");
    require(call, d.tensor_max_abs, "tensor_max_abs");
    require(call, d.tensor_counts, "tensor_counts");
    if (d.flags & abi::FLAG_WRITE_TENSOR_SCALES) require(call, d.tensor_scales, "tensor_scales");
  }
  if (d.num_chunks > 0) {
    require(call, d.chunk_partials, "chunk_partials");
    require(call, d.chunk_max_abs, "chunk_max_abs");
    require(call, d.chunk_counts, "chunk_counts");
  }
}

void check_scale(const ClipDesc& d) {
  constexpr const char* call = "scale";
  check_common(call, d);
  if (d.flags & abi::FLAG_READ_TENSOR_SCALES) require(call, d.tensor_scales, "tensor_scales");
  else require(call, d.scale_ptr, "scale_ptr");
}

// ---- devices --------------------------------------------------------------------------------------

std::string check_device(int device_index) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return std::string("no CUDA device (cudaGetDeviceCount failed: ") + cudaGetErrorString(e) + ")";
  }
  if (n <= 0) return "no CUDA device";
  if (device_index < 0 || device_index >= n)
    return "device_index " + std::to_string(device_index) + " is out of range (" + std::to_string(n) + " CUDA devices)";
  return "";
}

// SM count per device, queried once (cudaDeviceGetAttribute is cheap but not free).
std::atomic<int> g_sm_count[kMaxCachedDevices];

int sm_count(const char* call, int device_index) {
  if (device_index < kMaxCachedDevices) {
    const int cached = g_sm_count[device_index].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int sms = 0;
  cuda_check(call, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device_index),
             "cudaDeviceGetAttribute(cudaDevAttrMultiProcessorCount)");
  if (sms <= 0) sms = 1;
  if (device_index < kMaxCachedDevices) g_sm_count[device_index].store(sms, std::memory_order_relaxed);
  return sms;
}

// Driver entry points to save / restore the calling thread's exact current context (possibly
// none), so that leaving the device guard never creates a context on the previous device the way
// cudaSetDevice(prev) would. Null when unavailable; then cudaSetDevice(prev) is the fallback.
struct CtxApi {
  PFN_cuCtxGetCurrent_v4000 get = nullptr;
  PFN_cuCtxSetCurrent_v4000 set = nullptr;
};

const CtxApi& ctx_api() {
  static const CtxApi api = [] {
    CtxApi a;
    void* g = nullptr;
    void* s = nullptr;
#if CUDART_VERSION >= 12050  // the versioned query (CUDA 13 has no other); older toolkits use the fallback
    cudaDriverEntryPointQueryResult qg = cudaDriverEntryPointSymbolNotFound;
    cudaDriverEntryPointQueryResult qs = cudaDriverEntryPointSymbolNotFound;
    const cudaError_t eg = cudaGetDriverEntryPointByVersion("cuCtxGetCurrent", &g, 4000, cudaEnableDefault, &qg);
    const cudaError_t es = cudaGetDriverEntryPointByVersion("cuCtxSetCurrent", &s, 4000, cudaEnableDefault, &qs);
    if (eg == cudaSuccess && es == cudaSuccess && qg == cudaDriverEntryPointSuccess && qs == cudaDriverEntryPointSuccess && g && s) {
      a.get = reinterpret_cast<PFN_cuCtxGetCurrent_v4000>(g);
      a.set = reinterpret_cast<PFN_cuCtxSetCurrent_v4000>(s);
    }
    (void)cudaGetLastError();
#endif
    return a;
  }();
  return api;
}

// Makes device_index current for the launch; restore() gives the caller its context back (and
// reports a failure); the destructor does it silently when an error left the scope first, so that
// error is the one reported.
class DeviceGuard {
 public:
  DeviceGuard(const char* call, int device_index) : call_(call) {
    int prev = -1;
    cuda_check(call, cudaGetDevice(&prev), "cudaGetDevice");
    if (prev == device_index) return;
    const CtxApi& api = ctx_api();
    if (api.get && api.get(&saved_ctx_) == CUDA_SUCCESS) have_ctx_ = true;
    prev_ = prev;
    cuda_check(call, cudaSetDevice(device_index), "cudaSetDevice");
    switched_ = true;
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

  void restore() {
    if (!switched_) return;
    switched_ = false;
    if (have_ctx_ && ctx_api().set && ctx_api().set(saved_ctx_) == CUDA_SUCCESS) return;
    cuda_check(call_, cudaSetDevice(prev_), "cudaSetDevice (restoring the previous device)");
  }

  ~DeviceGuard() {
    if (!switched_) return;
    if (!(have_ctx_ && ctx_api().set && ctx_api().set(saved_ctx_) == CUDA_SUCCESS)) (void)cudaSetDevice(prev_);
    (void)cudaGetLastError();
  }

 private:
  const char* call_;
  bool switched_ = false;
  bool have_ctx_ = false;
  CUcontext saved_ctx_ = nullptr;
  int prev_ = 0;
};

// One launch of `kernel` over a persistent grid of min(C, SMs * blocks_per_sm) blocks (at least
// one), the descriptor passed by value, on device_index's `stream`.
void launch(const char* call, const void* kernel, const ClipDesc& d, int device_index, std::uint64_t stream,
            int threads, int blocks_per_sm) {
  const std::string why = check_device(device_index);
  if (!why.empty()) throw std::runtime_error(std::string("gradfuse._C_cuda.") + call + ": " + why);
  DeviceGuard guard(call, device_index);
  long long grid = static_cast<long long>(sm_count(call, device_index)) * blocks_per_sm;
  if (grid > d.num_chunks) grid = d.num_chunks;
  if (grid < 1) grid = 1;
  ClipDesc arg = d;
  void* args[] = {&arg};
  cuda_check(call, cudaLaunchKernel(kernel, dim3(static_cast<unsigned>(grid)), dim3(static_cast<unsigned>(threads)), args, 0,
                                    reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(stream))),
             "cudaLaunchKernel");
  cuda_check(call, cudaGetLastError(), "cudaGetLastError after the launch");
  guard.restore();
}

}  // namespace

void reduce(const ClipDesc& d, int device_index, std::uint64_t stream) {
  check_reduce(d);
  // One block at least: with no chunks it still writes the outputs (norms of empty tensors, ...).
  launch("reduce", reduce_kernel_for(d.norm_kind), d, device_index, stream, kReduceThreads, kReduceBlocksPerSM);
}

void scale(const ClipDesc& d, int device_index, std::uint64_t stream) {
  check_scale(d);
  if (d.num_chunks == 0) {  // nothing to scale: launch nothing, but say so when the device cannot run
    const std::string why = check_device(device_index);
    if (!why.empty()) throw std::runtime_error("gradfuse._C_cuda.scale: " + why);
    return;
  }
  launch("scale", scale_kernel_entry(), d, device_index, stream, kScaleThreads, kScaleBlocksPerSM);
}

std::string device_error(int device_index) { return check_device(device_index); }

int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n > 0 ? n : 0;
}

}  // namespace gradfuse::cuda
