// gradfuse._C_cpu: the fused CPU kernels over raw addresses (tensor.data_ptr() as Python ints), so
// the module never links libtorch. Called by gradfuse._backends.CpuBackend.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "clip.h"
#include "kernels.h"

namespace py = pybind11;
using gradfuse::cpu::Plan;
using gradfuse::cpu::ReduceOutputs;
using gradfuse::cpu::ReduceParams;

namespace {

template <class T>
T* at(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void reduce(uintptr_t addrs, uintptr_t numels, uintptr_t dtypes, uintptr_t tensor_chunk_begin,
            uintptr_t chunk_tensor, uintptr_t chunk_start, int64_t num_tensors, int64_t num_chunks,
            int64_t chunk_size, int64_t /*max_tensor_chunks: sizes GPU loops only*/, int norm_kind, double p,
            double max_norm, uintptr_t max_norm_ptr, uintptr_t inv_scale_ptr, int policy,
            uintptr_t chunk_partials, uintptr_t chunk_nonfinite, uintptr_t /*ticket: GPU only*/,
            uintptr_t tensor_norms, uintptr_t result, int num_threads) {
  const Plan plan{at<const int64_t>(addrs),        at<const int64_t>(numels),      at<const int64_t>(dtypes),
                  at<const int64_t>(tensor_chunk_begin), at<const int64_t>(chunk_tensor), at<const int64_t>(chunk_start),
                  num_tensors,                     num_chunks,                     chunk_size};
  const ReduceParams params{norm_kind, p, max_norm, at<const float>(max_norm_ptr), at<const float>(inv_scale_ptr), policy};
  const ReduceOutputs out{at<float>(chunk_partials), at<int32_t>(chunk_nonfinite), at<float>(tensor_norms), at<float>(result)};
  py::gil_scoped_release no_gil;  // an error thrown below re-takes the GIL before pybind11 raises it
  gradfuse::cpu::reduce(plan, params, out, num_threads);
}

void scale(uintptr_t addrs, uintptr_t numels, uintptr_t dtypes, uintptr_t chunk_tensor, uintptr_t chunk_start,
           int64_t num_chunks, int64_t chunk_size, uintptr_t scale_ptr, bool zero_if_scale_is_zero, int num_threads) {
  const Plan plan{at<const int64_t>(addrs), at<const int64_t>(numels), at<const int64_t>(dtypes), nullptr,
                  at<const int64_t>(chunk_tensor), at<const int64_t>(chunk_start), -1, num_chunks, chunk_size};
  py::gil_scoped_release no_gil;
  gradfuse::cpu::scale(plan, at<const float>(scale_ptr), zero_if_scale_is_zero, num_threads);
}

}  // namespace

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "gradfuse's fused CPU kernels (the contract is gradfuse/_abi.py).";
  m.def("reduce", &reduce,
        "Phase 1: per-chunk partials and non-finite flags, per-tensor norms and result[4] "
        "(total, found_inf, coef, scale).",
        py::arg("addrs"), py::arg("numels"), py::arg("dtypes"), py::arg("tensor_chunk_begin"),
        py::arg("chunk_tensor"), py::arg("chunk_start"), py::arg("num_tensors"), py::arg("num_chunks"),
        py::arg("chunk_size"), py::arg("max_tensor_chunks"), py::arg("norm_kind"), py::arg("p"),
        py::arg("max_norm"), py::arg("max_norm_ptr"), py::arg("inv_scale_ptr"), py::arg("policy"),
        py::arg("chunk_partials"), py::arg("chunk_nonfinite"), py::arg("ticket"), py::arg("tensor_norms"),
        py::arg("result"), py::arg("num_threads"));
  m.def("scale", &scale,
        "Phase 2: x = x * scale in fp32 with one rounding to the dtype (0 when zero_if_scale_is_zero "
        "and scale == 0); nothing is touched when scale == 1.",
        py::arg("addrs"), py::arg("numels"), py::arg("dtypes"), py::arg("chunk_tensor"), py::arg("chunk_start"),
        py::arg("num_chunks"), py::arg("chunk_size"), py::arg("scale_ptr"), py::arg("zero_if_scale_is_zero"),
        py::arg("num_threads"));
  m.def("isa", [] { return gradfuse::cpu::kernels().isa; },
        "The instruction set the kernels run with here: avx512, avx2 or generic (GRADFUSE_CPU_ISA caps it).");
}
