"""Helpers for gradfuse's tests: the backends to parametrize over, tensor sizes for the Triton
interpreter, gradient builders, fp64 references and comparisons. Tests import them with
``from helpers import ...`` (pytest puts tests/ on sys.path); ``conftest.py`` holds the setup.

* ``CPU_BACKENDS`` parametrises tests over every backend that can run on CPU tensors here ("torch"
  always, "cpu" when ``gradfuse._C_cpu`` is built, "triton" when ``gradfuse.triton_kernels`` imports
  under the interpreter); the ones that cannot run are kept as skipped params, with the reason, so a
  missing backend shows up in the skip count (and, named in ``GRADFUSE_TEST_REQUIRE``, as an error).
* The Triton interpreter costs ~0.1 s per launch and ~0.5 s per 10^6 elements (measured), so tests
  size their tensors with ``small(n, backend)`` / ``max_numel(backend)`` / ``needs_numel`` (at most
  ~10^6 elements per tensor for interpreted Triton) and keep the number of calls modest.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from gradfuse import _backends

HAS_CUDA = torch.cuda.is_available()
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# --------------------------------------------------------------------------------------------------
# Backends

def _unavailable_reason(name: str, device: str) -> str | None:
    if name == "torch":
        return None
    try:
        return _backends.FUSED_BACKENDS[name].unavailable_reason(torch.device(device))
    except Exception as e:  # a half-written kernel module must not take the whole suite down
        return f"probing the {name} backend raised {e!r}"


def _reasons(device: str) -> dict[str, str | None]:
    """Why each backend for ``device`` tensors cannot run here (None: it can); "torch" first on CPU."""
    names = (["torch"] if device == "cpu" else []) + [n for n, b in _backends.FUSED_BACKENDS.items() if device in b.devices]
    if device == "cuda" and not HAS_CUDA:
        return dict.fromkeys(names, "no CUDA device")
    return {name: _unavailable_reason(name, device) for name in names}


CPU_BACKEND_REASONS = _reasons("cpu")
GPU_BACKEND_REASONS = _reasons("cuda")
BACKENDS_CPU = [name for name, reason in CPU_BACKEND_REASONS.items() if reason is None]
BACKENDS_GPU = [name for name, reason in GPU_BACKEND_REASONS.items() if reason is None]


def required_backend_errors(names) -> list[str]:
    """For each backend in ``names`` the tests cannot run on any device they run it on (CUDA
    tensors when there is a GPU, CPU tensors), why not."""
    errors = []
    for name in names:
        reasons = {d: r[name] for d, r in (("cpu", CPU_BACKEND_REASONS), ("cuda", GPU_BACKEND_REASONS)) if name in r}
        if not reasons:
            errors.append(f"{name!r} is not a backend (choose from {', '.join(n for n in _backends.BACKEND_NAMES if n != 'auto')})")
        elif None not in reasons.values():
            errors.append(f"{name!r} cannot run here: " + "; ".join(f"on {d} tensors, {r}" for d, r in reasons.items()))
    return errors


def _params(reasons: dict[str, str | None], fused_only: bool = False) -> list:
    out = []
    for name, reason in reasons.items():
        if fused_only and name == "torch":
            continue
        marks = [pytest.mark.skip(reason=f"backend {name!r} unavailable: {reason}")] if reason is not None else []
        out.append(pytest.param(name, id=name, marks=marks))
    return out


#: every backend for CPU tensors (unavailable ones are skipped params).
CPU_BACKENDS = _params(CPU_BACKEND_REASONS)
#: the fused backends for CPU tensors only (cpu, triton).
FUSED_CPU_BACKENDS = _params(CPU_BACKEND_REASONS, fused_only=True)
#: the GPU backends (cuda, triton), for CUDA tensors.
GPU_BACKENDS = _params(GPU_BACKEND_REASONS)


def chunk_size(backend: str) -> int | None:
    if backend == "torch":
        return None
    return _backends.FUSED_BACKENDS[backend].chunk_size


# --------------------------------------------------------------------------------------------------
# Sizes: the Triton interpreter executes every program in Python/numpy.

INTERPRETER_MAX_NUMEL = 1_100_000  # measured: ~0.1 s per launch, ~0.5 s for 10^6 elements


def interpreted(backend: str) -> bool:
    return backend == "triton" and TRITON_INTERPRETED


def max_numel(backend: str) -> int:
    """Largest tensor a test should hand ``backend`` on this machine."""
    return INTERPRETER_MAX_NUMEL if interpreted(backend) else 1 << 22


def small(n: int, backend: str) -> int:
    """``n``, capped for the Triton interpreter."""
    return min(n, max_numel(backend))


def needs_numel(n: int, backend: str) -> None:
    """Skip the test when ``backend`` would run ``n`` elements through the interpreter."""
    if n > max_numel(backend):
        pytest.skip(f"{n} elements is too many for {backend} under the Triton interpreter")


# --------------------------------------------------------------------------------------------------
# Gradient builders and comparisons


def param_with_grad(grad: torch.Tensor) -> torch.nn.Parameter:
    """A parameter whose ``.grad`` is ``grad`` itself (same storage, same strides)."""
    p = torch.nn.Parameter(torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device))
    p.grad = grad
    return p


def params_from(grads) -> list[torch.nn.Parameter]:
    return [param_with_grad(g) for g in grads]


def clone_layout(t: torch.Tensor) -> torch.Tensor:
    """A deep copy with the same sizes, strides and storage offset, in a copy of the whole storage
    (so views with gaps keep their gaps, and misaligned views their misalignment)."""
    if t.layout is not torch.strided or t.device.type == "meta" or type(t) is not torch.Tensor:
        return t.clone()
    t = t.detach()
    nelem = t.untyped_storage().nbytes() // t.element_size()
    whole = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), 0, (nelem,), (1,))
    return whole.clone().as_strided(t.size(), t.stride(), t.storage_offset())


def clone_grads(grads) -> list[torch.Tensor]:
    """Deep copies that keep each gradient's layout (strides, gaps, storage offset)."""
    return [clone_layout(g) for g in grads]


def twin_params(grads) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Two independent parameter lists with identical gradients: one for torch, one for gradfuse."""
    return params_from(clone_grads(grads)), params_from(clone_grads(grads))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of ``t`` (so NaN == NaN and -0.0 != 0.0 in comparisons)."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    itype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(itype).cpu()


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, f"{msg}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    assert torch.equal(bits(a), bits(b)), f"{msg}: not bitwise equal\n{a}\n{b}"


def snapshot(grads) -> list[torch.Tensor]:
    return [bits(g).clone() for g in grads]


def assert_unchanged(grads, snap, msg="gradients changed") -> None:
    for i, (g, s) in enumerate(zip(grads, snap)):
        assert torch.equal(bits(g), s), f"{_msg(msg)} (gradient {i})"


def ref_norms(grads, p: float) -> tuple[float, list[float]]:
    """fp64 reference: (total, per-tensor norms) with torch's formula, on the CPU."""
    p = float(p)
    per = [float(torch.linalg.vector_norm(g.detach().cpu().to(torch.complex128 if g.is_complex() else torch.float64), p)) for g in grads]
    total = float(torch.linalg.vector_norm(torch.tensor(per, dtype=torch.float64), p)) if per else 0.0
    return total, per


def ref_coef(total: float, max_norm: float) -> float:
    """min(1, max_norm / (total + 1e-6)) with NaN propagating (torch.clamp)."""
    t = torch.tensor(float(max_norm), dtype=torch.float64) / (torch.tensor(float(total), dtype=torch.float64) + 1e-6)
    return float(torch.clamp(t, max=1.0))  # inf / inf -> NaN, kept by clamp (Python's min would drop it)


#: half an ulp of each dtype, relative (the error of one rounding to that dtype).
HALF_ULP = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
#: parity tolerances vs torch.nn.utils per dtype (torch double-rounds fp16/bf16).
PARITY_RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.empty((), dtype=dtype).real.dtype if dtype.is_complex else dtype


def parity_rtol(grads) -> float:
    """Tolerance of a total norm vs torch's: set by the least precise gradient dtype."""
    return max(PARITY_RTOL[real_dtype(g.dtype)] for g in grads)


def _msg(msg) -> str:
    """Messages may be callables, formatted only on failure (a repr can be expensive)."""
    return msg() if callable(msg) else msg


def subnormal_step(dtype: torch.dtype) -> float:
    """The spacing of the dtype's subnormals (its absolute resolution near zero)."""
    fi = torch.finfo(real_dtype(dtype))
    return fi.tiny * fi.eps


def assert_close_rel(got: float, want: float, rtol: float, msg="", atol: float = 0.0) -> None:
    if abs(got - want) <= rtol * abs(want) + atol:  # fast path
        return
    msg = _msg(msg)
    if math.isnan(want):
        assert math.isnan(got), f"{msg}: got {got}, want NaN"
        return
    if math.isinf(want):
        assert got == want, f"{msg}: got {got}, want {want}"
        return
    assert abs(got - want) <= rtol * abs(want) + atol + 1e-300, f"{msg}: got {got!r}, want {want!r} (rel err {abs(got - want) / max(abs(want), 1e-300):.3g} > {rtol:g})"


def assert_scaled(after: torch.Tensor, before: torch.Tensor, coef: float, ulps: float = 1.0, msg="", rtol: float = 0.0) -> None:
    """``after`` equals ``(before.double() * coef).to(dtype)`` within ``ulps`` ulps of the dtype,
    plus ``rtol`` relative (for a ``coef`` that is itself only known to that precision)."""
    dtype = before.dtype
    if dtype.is_complex:
        assert_scaled(torch.view_as_real(after), torch.view_as_real(before), coef, ulps, msg, rtol)
        return
    want = before.detach().cpu().double() * coef
    got = after.detach().cpu().double()
    finite = torch.isfinite(want)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"{_msg(msg)}: NaN positions differ"
    inf = ~finite & ~nan
    assert torch.equal(got[inf], want[inf]), f"{_msg(msg)}: Inf elements differ"
    w = want[finite]
    g = got[finite]
    # one ulp of the dtype at |w| (subnormals: the dtype's smallest subnormal spacing)
    tiny = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    ulp = torch.clamp(w.abs() * (2 * HALF_ULP[dtype]), min=tiny)
    err = (g - w).abs()
    bad = err > ulps * ulp + rtol * w.abs() + 1e-300
    assert not bool(bad.any()), f"{_msg(msg)}: {int(bad.sum())} elements off by more than {ulps} ulp; worst {float((err / ulp).max()):.3g} ulp; e.g. got {g[bad][:4].tolist()} want {w[bad][:4].tolist()}"


def ref_norms_pow2_scaled(grads, p: float) -> tuple[float, list[float]]:
    """``ref_norms`` computed on the gradients scaled by the power of two 2^-k nearest their max |x|
    (exact), then times 2^k: ||c x||_p = |c| ||x||_p for every p != 0, so fp64's range does not
    limit the reference where |x|^p leaves it (|x|^8 of 1e-40, |x|^-2 of 1e-30)."""
    biggest = max((float(g.detach().abs().max()) for g in grads if g.numel()), default=0.0)
    k = math.frexp(biggest)[1] if 0.0 < biggest < math.inf else 0
    total, per = ref_norms([g.detach().cpu().double() * 2.0**-k for g in grads], p)
    return math.ldexp(total, k), [math.ldexp(n, k) for n in per]


#: NORM_P inputs whose terms leave fp32's (or fp64's) range: name -> (gradients on the CPU, p, rtol).
#: Each was off on some backend: the root's p not the terms' (3.3 on 1e30: 1e-6 on Triton), p < 0
#: overflowing or underflowing fp32 (CUDA, Triton: norm 0 or inf), fp64 terms under 2^-1022 (CPU:
#: 0), 2^(p e) formed below fp64's subnormals (Triton: 0). The last two keep the digits a subnormal
#: fp64 S_t holds (~19 and ~11 bits), then fp32's subnormal norm.
NORM_P_EDGES = {
    "p=3.3 on 1e30": (lambda: [torch.linspace(1.0, 3.0, 1000) * 1e30, torch.randn(300)], 3.3, 4e-7),
    "p=-2, one tiny value": (lambda: [torch.tensor([1e-30, 1.0])], -2.0, 2e-6),
    "p=-2, only large values": (lambda: [torch.full((300,), 1e30), torch.full((5,), 3e38)], -2.0, 2e-6),
    "p=-1.5, a subnormal and a zero": (lambda: [torch.tensor([3e-39, 1.0, 2.0]), torch.tensor([0.0, 5.0])], -1.5, 2e-6),
    "p=8 under fp64's normal range": (lambda: [torch.tensor([1e-40, 2e-40])], 8.0, 1e-5),
    "p=8, 2^(p e) under fp64's subnormals": (lambda: [torch.full((1000,), 1.9 * 2.0**-135)], 8.0, 1e-4),
}
