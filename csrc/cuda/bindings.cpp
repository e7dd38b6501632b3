// gradfuse._C_cuda: pybind11 bindings of the CUDA kernels (clip_kernels.h).
//
// Every address is a Python int (tensor.data_ptr(), 0 for an absent optional scalar) and
// `stream` is torch.cuda.current_stream(device).cuda_stream, so the module never links libtorch.
// The GIL is released around each launch; an error becomes a RuntimeError naming the call, e.g.
// "gradfuse._C_cuda.reduce: cudaLaunchKernel failed: invalid device function". Without a GPU (or
// a driver) the module still imports, device_count() returns 0 and reduce/scale raise
// "gradfuse._C_cuda.<call>: no CUDA device (...)".

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "clip_kernels.h"

namespace py = pybind11;

namespace {

void raise_if_error(const char* call, const std::string& err) {
  if (!err.empty()) throw std::runtime_error(std::string("gradfuse._C_cuda.") + call + ": " + err);
}

void reduce(std::uint64_t addrs, std::uint64_t numels, std::uint64_t dtypes, std::uint64_t tensor_chunk_begin,
            std::uint64_t chunk_tensor, std::uint64_t chunk_start, std::int64_t num_tensors,
            std::int64_t num_chunks, std::int64_t chunk_size, std::int64_t max_tensor_chunks, int norm_kind,
            double p, double max_norm, std::uint64_t max_norm_ptr, std::uint64_t inv_scale_ptr, int policy,
            std::uint64_t chunk_partials, std::uint64_t chunk_nonfinite, std::uint64_t ticket,
            std::uint64_t tensor_norms, std::uint64_t result, int device_index, std::uint64_t stream) {
  gradfuse_cuda::ReduceArgs a;
  a.addrs = addrs;
  a.numels = numels;
  a.dtypes = dtypes;
  a.tensor_chunk_begin = tensor_chunk_begin;
  a.chunk_tensor = chunk_tensor;
  a.chunk_start = chunk_start;
  a.num_tensors = num_tensors;
  a.num_chunks = num_chunks;
  a.chunk_size = chunk_size;
  a.max_tensor_chunks = max_tensor_chunks;
  a.norm_kind = norm_kind;
  a.p = p;
  a.max_norm = max_norm;
  a.max_norm_ptr = max_norm_ptr;
  a.inv_scale_ptr = inv_scale_ptr;
  a.policy = policy;
  a.chunk_partials = chunk_partials;
  a.chunk_nonfinite = chunk_nonfinite;
  a.ticket = ticket;
  a.tensor_norms = tensor_norms;
  a.result = result;
  a.device_index = device_index;
  a.stream = stream;
  std::string err;
  {
    py::gil_scoped_release no_gil;
    err = gradfuse_cuda::reduce(a);
  }
  raise_if_error("reduce", err);
}

void scale(std::uint64_t addrs, std::uint64_t numels, std::uint64_t dtypes, std::uint64_t chunk_tensor,
           std::uint64_t chunk_start, std::int64_t num_chunks, std::int64_t chunk_size, std::uint64_t scale_ptr,
           bool zero_if_scale_is_zero, int device_index, std::uint64_t stream) {
  gradfuse_cuda::ScaleArgs a;
  a.addrs = addrs;
  a.numels = numels;
  a.dtypes = dtypes;
  a.chunk_tensor = chunk_tensor;
  a.chunk_start = chunk_start;
  a.num_chunks = num_chunks;
  a.chunk_size = chunk_size;
  a.scale_ptr = scale_ptr;
  a.zero_if_scale_is_zero = zero_if_scale_is_zero;
  a.device_index = device_index;
  a.stream = stream;
  std::string err;
  {
    py::gil_scoped_release no_gil;
    err = gradfuse_cuda::scale(a);
  }
  raise_if_error("scale", err);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() =
      "gradfuse CUDA kernels over raw device addresses (contract: gradfuse/_abi.py). "
      "Launches are asynchronous on the given stream and capturable in CUDA graphs.";

  m.def("reduce", &reduce,
        "Phase 1, one kernel launch: chunk partials and non-finite flags of every gradient, then "
        "(last block, fp64, fixed order) tensor_norms[T] and result[4] = total, found_inf, coef, scale.",
        py::arg("addrs"), py::arg("numels"), py::arg("dtypes"), py::arg("tensor_chunk_begin"),
        py::arg("chunk_tensor"), py::arg("chunk_start"), py::arg("num_tensors"), py::arg("num_chunks"),
        py::arg("chunk_size"), py::arg("max_tensor_chunks"), py::arg("norm_kind"), py::arg("p"),
        py::arg("max_norm"), py::arg("max_norm_ptr"), py::arg("inv_scale_ptr"), py::arg("policy"),
        py::arg("chunk_partials"), py::arg("chunk_nonfinite"), py::arg("ticket"), py::arg("tensor_norms"),
        py::arg("result"), py::arg("device_index"), py::arg("stream"));

  m.def("scale", &scale,
        "Phase 2, one kernel launch: x *= *scale_ptr in place (fp32 math, one rounding), nothing "
        "when *scale_ptr == 1, zeros when zero_if_scale_is_zero and *scale_ptr == 0.",
        py::arg("addrs"), py::arg("numels"), py::arg("dtypes"), py::arg("chunk_tensor"), py::arg("chunk_start"),
        py::arg("num_chunks"), py::arg("chunk_size"), py::arg("scale_ptr"), py::arg("zero_if_scale_is_zero"),
        py::arg("device_index"), py::arg("stream"));

  m.def("device_count", &gradfuse_cuda::device_count,
        "Visible CUDA devices; 0 when there is no GPU or no usable driver (never raises).");

  m.def("device_error", &gradfuse_cuda::device_error,
        "Why the kernels cannot run on device_index (no GPU, a driver too old for this build, an index "
        "out of range), or an empty string when they can.",
        py::arg("device_index"));

  m.attr("DTYPE_F32") = gradfuse_cuda::DTYPE_F32;
  m.attr("DTYPE_F16") = gradfuse_cuda::DTYPE_F16;
  m.attr("DTYPE_BF16") = gradfuse_cuda::DTYPE_BF16;
}
