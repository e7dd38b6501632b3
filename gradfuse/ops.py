"""The clip as a ``torch.library`` custom op, so ``torch.compile(fullgraph=True)`` traces through it.

Eager calls go straight to ``gradfuse._engine`` (the op's dispatch costs tens of microseconds per
call, a lot next to a fused clip of small models); under ``torch.compile`` the public functions call
``torch.ops.gradfuse.clip_`` instead, whose fake implementation gives compile the output shapes.
"""

from __future__ import annotations

import torch

from . import _abi, _engine

_LIB = "gradfuse"


def packed_dtype(grads: list[torch.Tensor]) -> torch.dtype:
    """fp64 when any gradient accumulates in fp64, else fp32."""
    acc = {_engine._reference.accumulation_dtype(g.dtype) for g in grads}
    return torch.float64 if torch.float64 in acc else torch.float32


@torch.library.custom_op(f"{_LIB}::clip_", mutates_args=("grads",))
def clip_(
    grads: list[torch.Tensor],
    max_norm: float,
    max_norm_tensor: torch.Tensor | None,
    norm_type: float,
    apply: bool,
    policy: int,
    inv_scale: torch.Tensor | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (packed, tensor_norms, tensor_partials, tensor_max_abs, tensor_counts):
    packed = [total, found_inf, coef, scale]."""
    r = _engine.clip(
        grads,
        max_norm if max_norm_tensor is None else max_norm_tensor,
        norm_type,
        apply=apply,
        backend=backend,
        policy=policy,
        inv_scale=inv_scale,
        stats=True,
    )
    dtype = packed_dtype(grads)
    packed = r.result.to(dtype, copy=True)
    return (packed, r.tensor_norms.to(dtype).clone(), r.tensor_partials.clone(), r.tensor_max_abs.clone(),
            r.tensor_counts.clone())  # fmt: skip


@clip_.register_fake
def _(grads, max_norm, max_norm_tensor, norm_type, apply, policy, inv_scale, backend):
    dtype, t = packed_dtype(grads), len(grads)
    return (grads[0].new_empty(4, dtype=dtype), grads[0].new_empty(t, dtype=dtype), grads[0].new_empty(t, dtype=torch.float64),
            grads[0].new_empty(t, dtype=torch.float32), grads[0].new_empty((t, 2), dtype=torch.int64))  # fmt: skip


@torch.library.custom_op(f"{_LIB}::scale_", mutates_args=("grads",))
def scale_(grads: list[torch.Tensor], scale: torch.Tensor, zero_if_scale_is_zero: bool, backend: str) -> None:
    """grads *= scale, skipped on the device when scale == 1."""
    _engine.scale_(grads, scale, backend=backend, zero_if_scale_is_zero=zero_if_scale_is_zero)


@scale_.register_fake
def _(grads, scale, zero_if_scale_is_zero, backend):
    return None


def is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()


def clip_compiled(grads, max_norm, p, *, apply, backend, error_if_nonfinite, policy, inv_scale) -> _engine.ClipResult:
    """The engine's clip, as seen by torch.compile (error_if_nonfinite becomes a device assert)."""
    is_tensor = isinstance(max_norm, torch.Tensor)
    # With error_if_nonfinite the check must come before any gradient is scaled: reduce, assert, scale.
    packed, tensor_norms, tensor_partials, tensor_max_abs, tensor_counts = torch.ops.gradfuse.clip_(
        grads, 0.0 if is_tensor else float(max_norm), max_norm if is_tensor else None, p,
        apply and not error_if_nonfinite, policy, inv_scale, backend,
    )  # fmt: skip
    if error_if_nonfinite:
        torch._assert_async(torch.isfinite(packed[0]), f"The total norm of order {p} for gradients from `parameters` is non-finite")
        if apply:
            torch.ops.gradfuse.scale_(grads, packed[3:4].float(), policy == _abi.POLICY_ZERO, backend)
    return _engine.ClipResult(
        result=packed,
        tensor_norms=tensor_norms,
        tensor_partials=tensor_partials,
        tensor_max_abs=tensor_max_abs,
        tensor_counts=tensor_counts,
        norm_dtype=_engine.torch_norm_dtype(g.dtype for g in grads),
        backend=backend,
        norm_type=float(p),
    )
