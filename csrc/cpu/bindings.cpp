// gradfuse._C_cpu: the fused CPU kernels over one clip descriptor (gradfuse._abi.ClipDesc, passed
// by its host address), so the module never links libtorch. Called by gradfuse._backends.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "clip.h"
#include "kernels.h"

namespace py = pybind11;

namespace {

const gradfuse::abi::ClipDesc& desc_at(uintptr_t address) {
  if (address == 0) throw std::invalid_argument("gradfuse._C_cpu: the descriptor address is 0");
  return *reinterpret_cast<const gradfuse::abi::ClipDesc*>(address);
}

}  // namespace

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "gradfuse's fused CPU kernels (the contract is gradfuse/_abi.py).";
  // The GIL is released around the kernels; an error thrown inside re-takes it before pybind11 raises.
  m.def("reduce", [](uintptr_t desc, int num_threads) {
          const auto& d = desc_at(desc);
          py::gil_scoped_release no_gil;
          gradfuse::cpu::reduce(d, num_threads);
        },
        "Phase 1: chunk partials and statistics, per-tensor norms/partials/max_abs/counts (and "
        "factors under FLAG_WRITE_TENSOR_SCALES), result[4] = total, found_inf, coef, scale.",
        py::arg("desc"), py::arg("num_threads"));
  m.def("scale", [](uintptr_t desc, int num_threads) {
          const auto& d = desc_at(desc);
          py::gil_scoped_release no_gil;
          gradfuse::cpu::scale(d, num_threads);
        },
        "Phase 2: x = x * s in fp32 with one rounding to the dtype (0 when zero_if_scale_is_zero "
        "and s == 0), s = *scale_ptr or the tensor's factor; chunks whose factor is 1 are not touched.",
        py::arg("desc"), py::arg("num_threads"));
  m.def("descriptor_size", [] { return sizeof(gradfuse::abi::ClipDesc); },
        "sizeof(ClipDesc) this module was built with (gradfuse checks it against gradfuse._abi).");
  m.def("isa", [] { return gradfuse::cpu::kernels().isa; },
        "The instruction set the kernels run with here: avx512, avx2 or generic (GRADFUSE_CPU_ISA caps it).");
}
