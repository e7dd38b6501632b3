// gradfuse._C_cuda: the CUDA kernels over one clip descriptor (gradfuse._abi.ClipDesc, passed by its
// host address), so the module never links libtorch. Called by gradfuse._backends.
//
// `stream` is torch's current stream handle as an integer. The struct is copied from the host
// address before the GIL is released, then passed to the kernel by value. A bad field is a
// ValueError naming it, a CUDA failure a RuntimeError naming the call; without a GPU (or a driver)
// the module still imports, device_count() is 0 and reduce/scale raise
// "gradfuse._C_cuda.<call>: no CUDA device (...)".
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "driver.h"

namespace py = pybind11;

namespace {

using gradfuse::abi::ClipDesc;

ClipDesc desc_at(const char* call, uintptr_t address) {
  if (address == 0) throw std::invalid_argument(std::string("gradfuse._C_cuda.") + call + ": the descriptor address is 0");
  return *reinterpret_cast<const ClipDesc*>(address);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() =
      "gradfuse's CUDA kernels (the contract is gradfuse/_abi.py). Each call enqueues one kernel on "
      "the given stream: asynchronous, no allocation, no host sync, capturable in CUDA graphs.";
  // The GIL is released around the launch; an error thrown inside re-takes it before pybind11 raises.
  m.def("reduce", [](uintptr_t desc, int device_index, uint64_t stream) {
          const ClipDesc d = desc_at("reduce", desc);
          py::gil_scoped_release no_gil;
          gradfuse::cuda::reduce(d, device_index, stream);
        },
        "Phase 1: chunk partials and statistics, per-tensor norms/partials/max_abs/counts (and "
        "factors under FLAG_WRITE_TENSOR_SCALES), result[4] = total, found_inf, coef, scale.",
        py::arg("desc"), py::arg("device_index"), py::arg("stream"));
  m.def("scale", [](uintptr_t desc, int device_index, uint64_t stream) {
          const ClipDesc d = desc_at("scale", desc);
          py::gil_scoped_release no_gil;
          gradfuse::cuda::scale(d, device_index, stream);
        },
        "Phase 2: x = x * s in fp32 with one rounding to the dtype (0 when zero_if_scale_is_zero "
        "and s == 0), s = *scale_ptr or the tensor's factor; chunks whose factor is 1 are not touched.",
        py::arg("desc"), py::arg("device_index"), py::arg("stream"));
  m.def("descriptor_size", [] { return sizeof(ClipDesc); },
        "sizeof(ClipDesc) this module was built with (gradfuse checks it against gradfuse._abi).");
  m.def("device_count", &gradfuse::cuda::device_count,
        "Visible CUDA devices; 0 when there is no GPU or no usable driver (never raises).");
  m.def("device_error", &gradfuse::cuda::device_error,
        "Why the kernels cannot run on device_index (no GPU, a driver too old for this build, an index "
        "out of range), or an empty string when they can.",
        py::arg("device_index"));
}
