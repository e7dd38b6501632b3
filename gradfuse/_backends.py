"""Backend choice, in one place.

A fused backend runs the two phases of ``gradfuse._abi`` over a plan. ``choose`` picks one for a
device: an explicit request (argument, else ``GRADFUSE_BACKEND``) is honoured or fails with the
reason the backend could not load; ``auto`` takes the fastest one that loaded and falls back
silently. ``"torch"`` (the pure-torch reference) is not a fused backend: the engine routes to it
when asked, and for every case no fused backend handles.
"""

from __future__ import annotations

import importlib
import os

import torch

from ._plan import DevicePlan

BACKEND_NAMES = ("auto", "cuda", "triton", "cpu", "torch")
ENV_VAR = "GRADFUSE_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and what to do."""


BackendUnavailableError.__module__ = "gradfuse"  # raised to users: show the public name


def _addr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class _CompiledBackend:
    """A pybind11 module over raw addresses (csrc/cpu or csrc/cuda)."""

    name: str
    module_name: str
    how_to_get: str
    chunk_size: int

    def __init__(self):
        self._module = None
        self._error: BaseException | None = None
        self._loaded = False

    def module(self):
        if not self._loaded:
            self._loaded = True
            try:
                self._module = importlib.import_module(self.module_name)
            except ImportError as e:  # keep the reason for the error message
                self._error = e
        return self._module

    def unavailable_reason(self, device: torch.device) -> str | None:
        if self.module() is None:
            return f"{self.module_name} could not be imported ({self._error!r}). {self.how_to_get}"
        return self._device_reason(device)

    def _device_reason(self, device: torch.device) -> str | None:
        raise NotImplementedError

    def _reduce_args(self, plan, norm_kind, p, max_norm, max_norm_tensor, inv_scale, policy, tensor_norms, result):
        return (
            plan.addrs.data_ptr(), plan.numels.data_ptr(), plan.dtypes.data_ptr(),
            plan.tensor_chunk_begin.data_ptr(), plan.chunk_tensor.data_ptr(), plan.chunk_start.data_ptr(),
            plan.num_tensors, plan.num_chunks, plan.chunk_size, plan.max_tensor_chunks,
            norm_kind, float(p), float(max_norm), _addr(max_norm_tensor), _addr(inv_scale), policy,
            plan.chunk_partials.data_ptr(), plan.chunk_nonfinite.data_ptr(), plan.ticket.data_ptr(),
            tensor_norms.data_ptr(), result.data_ptr(),
        )  # fmt: skip

    def _scale_args(self, plan, scale, zero_if_scale_is_zero):
        return (
            plan.addrs.data_ptr(), plan.numels.data_ptr(), plan.dtypes.data_ptr(),
            plan.chunk_tensor.data_ptr(), plan.chunk_start.data_ptr(),
            plan.num_chunks, plan.chunk_size, scale.data_ptr(), bool(zero_if_scale_is_zero),
        )  # fmt: skip


class CpuBackend(_CompiledBackend):
    name = "cpu"
    module_name = "gradfuse._C_cpu"
    how_to_get = "Reinstall gradfuse with a C++ compiler present: pip install --no-build-isolation -e ."
    chunk_size = 1 << 20  # measured: 2^16 -> 2^20 took GPT-2 bf16 from 7.7x to 8.4x torch (2 cores)

    def _device_reason(self, device):
        return None if device.type == "cpu" else f"the cpu backend runs on CPU tensors, not {device.type}"

    def reduce(self, plan: DevicePlan, norm_kind, p, max_norm, max_norm_tensor, inv_scale, policy, tensor_norms, result):
        args = self._reduce_args(plan, norm_kind, p, max_norm, max_norm_tensor, inv_scale, policy, tensor_norms, result)
        self.module().reduce(*args, torch.get_num_threads())

    def scale(self, plan: DevicePlan, scale: torch.Tensor, zero_if_scale_is_zero: bool):
        self.module().scale(*self._scale_args(plan, scale, zero_if_scale_is_zero), torch.get_num_threads())


def _current_stream(device: torch.device) -> int:
    """The current CUDA stream's handle. torch's raw getter costs ~0.3 us; current_stream() ~4 us."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(device.index)
    return torch.cuda.current_stream(device).cuda_stream


class CudaBackend(_CompiledBackend):
    name = "cuda"
    module_name = "gradfuse._C_cuda"
    how_to_get = (
        "Build it with nvcc on the PATH: GRADFUSE_CUDA=1 pip install --no-build-isolation -e . "
        "(or python setup.py build_ext --inplace in a source checkout)"
    )
    chunk_size = 1 << 16

    def _device_reason(self, device):
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, not {device.type}"
        error = self.module().device_error(device.index if device.index is not None else 0)
        return f"gradfuse._C_cuda: {error}" if error else None

    def reduce(self, plan, norm_kind, p, max_norm, max_norm_tensor, inv_scale, policy, tensor_norms, result):
        args = self._reduce_args(plan, norm_kind, p, max_norm, max_norm_tensor, inv_scale, policy, tensor_norms, result)
        self.module().reduce(*args, plan.device.index, _current_stream(plan.device))

    def scale(self, plan, scale, zero_if_scale_is_zero):
        args = self._scale_args(plan, scale, zero_if_scale_is_zero)
        self.module().scale(*args, plan.device.index, _current_stream(plan.device))


class TritonBackend:
    """The Triton kernels of ``gradfuse.triton_kernels`` (CUDA tensors, or CPU ones interpreted)."""

    name = "triton"
    how_to_get = "Install triton (pip install triton) on Linux x86-64."

    def __init__(self):
        self._kernels = None
        self._error: BaseException | None = None
        self._loaded = False

    def kernels(self):
        if not self._loaded:
            self._loaded = True
            try:
                self._kernels = importlib.import_module("gradfuse.triton_kernels")
            except ImportError as e:
                self._error = e
        return self._kernels

    @property
    def chunk_size(self) -> int:
        return self.kernels().CHUNK_SIZE

    def unavailable_reason(self, device: torch.device) -> str | None:
        kernels = self.kernels()
        if kernels is None:
            return f"gradfuse.triton_kernels could not be imported ({self._error!r}). {self.how_to_get}"
        if device.type == "cuda":
            if kernels.INTERPRETED:
                return "the Triton kernels were built by its interpreter (TRITON_INTERPRET=1), which runs on CPU tensors only"
            return None
        if device.type == "cpu":
            if kernels.INTERPRETED:
                return None
            return (
                "Triton runs on CPU tensors only through its interpreter: set TRITON_INTERPRET=1 before "
                "gradfuse.triton_kernels is first imported"
            )
        return f"the triton backend runs on CUDA tensors, not {device.type}"

    def reduce(self, plan, norm_kind, p, max_norm, max_norm_tensor, inv_scale, policy, tensor_norms, result):
        self.kernels().reduce(plan, norm_kind, p, max_norm, max_norm_tensor, inv_scale, policy, tensor_norms, result)

    def scale(self, plan, scale, zero_if_scale_is_zero):
        self.kernels().scale(plan, scale, zero_if_scale_is_zero)


FUSED_BACKENDS = {b.name: b for b in (CudaBackend(), TritonBackend(), CpuBackend())}

# auto's preference per device type, fastest first (see benchmarks/results for the figures).
_AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


def requested_backend(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    name = name.strip().lower()
    if name not in BACKEND_NAMES:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source}={name!r} is not a gradfuse backend; choose one of {', '.join(BACKEND_NAMES)}")
    return name


def choose(name: str, device: torch.device):
    """The fused backend to run on ``device``, or None for the torch reference path.

    ``name`` comes from ``requested_backend``. An explicit fused backend that cannot run on this
    device raises BackendUnavailableError; auto falls back silently.
    """
    if name == "torch":
        return None
    if name != "auto":
        backend = FUSED_BACKENDS[name]
        reason = backend.unavailable_reason(device)
        if reason is not None:
            raise BackendUnavailableError(f"gradfuse backend {name!r} is unavailable: {reason}")
        return backend
    for candidate in _AUTO_ORDER.get(device.type, ()):
        backend = FUSED_BACKENDS[candidate]
        if backend.unavailable_reason(device) is None:
            return backend
    return None


def available_backends(device: torch.device | str) -> list[str]:
    """Names of the backends that can run on ``device`` here ("torch" always can)."""
    device = torch.device(device)
    names = [n for n, b in FUSED_BACKENDS.items() if b.unavailable_reason(device) is None]
    return names + ["torch"]


