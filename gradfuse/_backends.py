"""The backends, one record each, and the choice among them, in one place.

A fused backend runs the two phases of ``gradfuse._abi`` over a plan's descriptor. Each is one
object whose class attributes are its record: ``name``, ``devices`` (the device types it can run
on), ``auto_for`` (the device types ``auto`` may pick it for), ``chunk_size`` (what its plans are
built with), ``how_to_get``; ``unavailable_reason(device)`` probes it. ``FUSED_BACKENDS`` lists
them fastest first, which is ``auto``'s order. ``choose`` honours an explicit request (argument,
else ``GRADFUSE_BACKEND``) or fails with the reason the backend could not load; ``auto`` takes the
first that runs and falls back silently. ``"torch"`` (the pure-torch reference) is not a fused
backend: the engine routes to it when asked, and for every case no fused backend handles.
"""

from __future__ import annotations

import ctypes
import importlib
import os

import torch

from . import _abi
from ._plan import DevicePlan

ENV_VAR = "GRADFUSE_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why and what to do."""


BackendUnavailableError.__module__ = "gradfuse"  # raised to users: show the public name


class _Backend:
    """A fused backend: its record (class attributes) and its two phases."""

    name: str
    devices: tuple[str, ...]
    auto_for: tuple[str, ...]
    chunk_size: int
    module_name: str
    how_to_get: str

    def __init__(self):
        self._module = None
        self._error: str | None = None
        self._loaded = False

    def module(self):
        """The compiled module or kernel package, imported once (None if it cannot be)."""
        if not self._loaded:
            self._loaded = True
            try:
                module = importlib.import_module(self.module_name)
            except ImportError as e:  # keep the reason for the error message
                self._error = f"{self.module_name} could not be imported ({e!r}). {self.how_to_get}"
            else:
                self._error = self._stale_reason(module)
                self._module = None if self._error else module
        return self._module

    def _stale_reason(self, module) -> str | None:
        return None

    def unavailable_reason(self, device: torch.device) -> str | None:
        if device.type not in self.devices:
            kinds = " or ".join(d.upper() for d in self.devices)
            return f"the {self.name} backend runs on {kinds} tensors, not {device.type}"
        if self.module() is None:
            return self._error
        return self._device_reason(device)

    def _device_reason(self, device: torch.device) -> str | None:
        return None

    def reduce(self, plan: DevicePlan) -> None:
        raise NotImplementedError

    def scale(self, plan: DevicePlan) -> None:
        raise NotImplementedError


class _CompiledBackend(_Backend):
    """A pybind11 module over the descriptor's address (csrc/cpu or csrc/cuda)."""

    def _stale_reason(self, module) -> str | None:
        size = module.descriptor_size() if hasattr(module, "descriptor_size") else None
        if size != ctypes.sizeof(_abi.ClipDesc):
            return (
                f"{self.module_name} was built for another kernel contract ({f'a {size}-byte descriptor' if size else 'no descriptor'}, "
                f"gradfuse._abi declares {ctypes.sizeof(_abi.ClipDesc)}). {self.how_to_get}"
            )
        return None


class CpuBackend(_CompiledBackend):
    name = "cpu"
    devices = ("cpu",)
    auto_for = ("cpu",)
    chunk_size = 1 << 20  # measured: 2^16 -> 2^20 took GPT-2 bf16 from 7.7x to 8.4x torch (2 cores)
    module_name = "gradfuse._C_cpu"
    how_to_get = "Reinstall gradfuse with a C++ compiler present: pip install --no-build-isolation -e ."

    def reduce(self, plan):
        self._module.reduce(plan.desc.address(), torch.get_num_threads())

    def scale(self, plan):
        self._module.scale(plan.desc.address(), torch.get_num_threads())


def _current_stream(device: torch.device) -> int:
    """The current CUDA stream's handle. torch's raw getter costs ~0.3 us; current_stream() ~4 us."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(device.index)
    return torch.cuda.current_stream(device).cuda_stream


class CudaBackend(_CompiledBackend):
    name = "cuda"
    devices = ("cuda",)
    auto_for = ("cuda",)
    chunk_size = 1 << 16
    module_name = "gradfuse._C_cuda"
    how_to_get = (
        "Build it with nvcc on the PATH: GRADFUSE_CUDA=1 pip install --no-build-isolation -e . "
        "(or python setup.py build_ext --inplace in a source checkout)"
    )

    def _device_reason(self, device):
        error = self._module.device_error(device.index if device.index is not None else 0)
        return f"gradfuse._C_cuda: {error}" if error else None

    def reduce(self, plan):
        self._module.reduce(plan.desc.address(), plan.device.index, _current_stream(plan.device))

    def scale(self, plan):
        self._module.scale(plan.desc.address(), plan.device.index, _current_stream(plan.device))


class TritonBackend(_Backend):
    """The Triton kernels of ``gradfuse.triton_kernels`` (CUDA tensors, or CPU ones interpreted)."""

    name = "triton"
    devices = ("cuda", "cpu")
    auto_for = ("cuda",)  # on CPU tensors only through the interpreter, which is for tests
    # Measured with the kernels' tunables (benchmarks/NOTES.md); kept here, not read from
    # gradfuse.triton_kernels: importing that would import triton with gradfuse.
    chunk_size = 1 << 16
    module_name = "gradfuse.triton_kernels"
    how_to_get = "Install triton on Linux x86-64: pip install triton, or gradfuse's gpu extra (pip install \".[gpu]\")."

    def _device_reason(self, device):
        interpreted = self._module.INTERPRETED
        if device.type == "cuda" and interpreted:
            return "the Triton kernels were built by its interpreter (TRITON_INTERPRET=1), which runs on CPU tensors only"
        if device.type == "cpu" and not interpreted:
            return (
                "Triton runs on CPU tensors only through its interpreter: set TRITON_INTERPRET=1 before "
                "gradfuse.triton_kernels is first imported"
            )
        return None

    def reduce(self, plan):
        self._module.reduce(plan.desc, plan.device)

    def scale(self, plan):
        self._module.scale(plan.desc, plan.device)


#: Every fused backend, fastest first (auto's order; see benchmarks/results for the figures).
FUSED_BACKENDS = {b.name: b for b in (CudaBackend(), TritonBackend(), CpuBackend())}
BACKEND_NAMES = ("auto", *FUSED_BACKENDS, "torch")


def requested_backend(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    name = name.strip().lower()
    if name not in BACKEND_NAMES:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source}={name!r} is not a gradfuse backend; choose one of {', '.join(BACKEND_NAMES)}")
    return name


def choose(name: str, device: torch.device) -> _Backend | None:
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
    for backend in FUSED_BACKENDS.values():
        if device.type in backend.auto_for and backend.unavailable_reason(device) is None:
            return backend
    return None


def available_backends(device: torch.device | str) -> list[str]:
    """Names of the backends that can run on ``device`` here ("torch" always can)."""
    device = torch.device(device)
    names = [n for n, b in FUSED_BACKENDS.items() if b.unavailable_reason(device) is None]
    return names + ["torch"]
