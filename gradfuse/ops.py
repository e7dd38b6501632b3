"""gradfuse's ops, each one object that runs eagerly or under ``torch.compile``.

``clip`` and ``scale_`` take ``gradfuse._engine.clip`` / ``scale_``'s arguments. An eager call goes
straight to the engine (a custom op's dispatch costs tens of microseconds per call, a lot next to a
fused clip of small models); under ``torch.compile`` the same call goes through the
``torch.library`` custom op ``gradfuse::clip_`` / ``gradfuse::scale_``, whose fake implementation
gives compile the output shapes. A custom op returns tensors, not a ClipResult: ``RESULT_FIELDS``
declares how each tensor field travels, and packing, fake outputs and unpacking all follow it.
"""

from __future__ import annotations

import torch

from . import _abi, _engine, _layout, _reference
from ._backends import requested_backend

_LIB = "gradfuse"

#: dtype of a result field that follows the gradients: fp64 when any gradient accumulates in fp64, else fp32.
ACC = None
#: in a result field's shape: the number of gradients.
T = "T"

#: The tensor fields of ClipResult as the clip op returns them, each an output of its own:
#: (name, dtype, shape). A new tensor field of ClipResult is one row here.
RESULT_FIELDS = (
    ("result", ACC, (_abi.RESULT_SIZE,)),
    ("tensor_norms", ACC, (T,)),
    ("tensor_partials", torch.float64, (T,)),
    ("tensor_max_abs", torch.float32, (T,)),
    ("tensor_counts", torch.int64, (T, 2)),
)
# The op's return type: a fixed tuple (functionalization refuses a Tensor[] output of a mutating op).
_OUTPUTS = tuple[(torch.Tensor,) * len(RESULT_FIELDS)]


def packed_dtype(grads: list[torch.Tensor]) -> torch.dtype:
    """ACC for these gradients: fp64 when any gradient accumulates in fp64, else fp32."""
    acc = {_reference.accumulation_dtype(g.dtype) for g in grads}
    return torch.float64 if torch.float64 in acc else torch.float32


def _pack(r: _engine.ClipResult, grads: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    acc = packed_dtype(grads)
    # copies: a custom op's outputs may not alias its inputs or each other
    return tuple(getattr(r, name).to(dtype or acc, copy=True) for name, dtype, _ in RESULT_FIELDS)


def _fake_outputs(grads: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    acc, g = packed_dtype(grads), grads[0]
    sizes = {T: len(grads)}
    return tuple(g.new_empty([sizes.get(n, n) for n in shape], dtype=dtype or acc) for _, dtype, shape in RESULT_FIELDS)


def unpack(outputs: tuple[torch.Tensor, ...], grads: list[torch.Tensor], backend: str, p: float) -> _engine.ClipResult:
    """The ClipResult the clip op's ``outputs`` hold."""
    fields = {name: t for (name, _, _), t in zip(RESULT_FIELDS, outputs)}
    return _engine.ClipResult(**fields, norm_dtype=_engine.torch_norm_dtype(g.dtype for g in grads), backend=backend, norm_type=float(p))


@torch.library.custom_op(f"{_LIB}::clip_", mutates_args=("grads",))
def _clip_op(
    grads: list[torch.Tensor],
    max_norm: float,
    max_norm_tensor: torch.Tensor | None,
    norm_type: float,
    apply: bool,
    policy: int,
    inv_scale: torch.Tensor | None,
    backend: str,
) -> _OUTPUTS:
    """``_engine.clip``; returns the ClipResult packed as ``RESULT_FIELDS`` declares."""
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
    return _pack(r, grads)


@_clip_op.register_fake
def _(grads, max_norm, max_norm_tensor, norm_type, apply, policy, inv_scale, backend):
    return _fake_outputs(grads)


@torch.library.custom_op(f"{_LIB}::scale_", mutates_args=("grads",))
def _scale_op(grads: list[torch.Tensor], scale: torch.Tensor, zero_if_scale_is_zero: bool, backend: str) -> None:
    """grads *= scale, skipped on the device when scale == 1."""
    _engine.scale_(grads, scale, backend=backend, zero_if_scale_is_zero=zero_if_scale_is_zero)


@_scale_op.register_fake
def _(grads, scale, zero_if_scale_is_zero, backend):
    return None


class EagerOrCompiled:
    """An op: ``eager(*args, **kwargs)`` when called eagerly, ``compiled(*args, **kwargs)`` (the same
    arguments, through the custom op) while torch.compile traces the call."""

    def __init__(self, eager, compiled):
        self.eager = eager
        self.compiled = compiled

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self.compiled(*args, **kwargs)
        return self.eager(*args, **kwargs)


def _clip_compiled(
    grads, max_norm, p, *, apply, backend=None, error_if_nonfinite=False, foreach=None, policy=_abi.POLICY_PROPAGATE,
    inv_scale=None, dtypes=None,
) -> _engine.ClipResult:  # fmt: skip
    """``_engine.clip`` through ``gradfuse::clip_``: error_if_nonfinite becomes a device assert;
    ``foreach`` and ``dtypes`` only serve the eager path."""
    name = requested_backend(backend)
    is_tensor = isinstance(max_norm, torch.Tensor)
    # With error_if_nonfinite the check must come before any gradient is scaled: reduce, assert, scale.
    outputs = torch.ops.gradfuse.clip_(
        grads, 0.0 if is_tensor else float(max_norm), max_norm if is_tensor else None, p,
        apply and not error_if_nonfinite, policy, inv_scale, name,
    )  # fmt: skip
    r = unpack(outputs, grads, name, p)
    if error_if_nonfinite:
        torch._assert_async(torch.isfinite(r.total_norm), f"The total norm of order {p} for gradients from `parameters` is non-finite")
        if apply:
            torch.ops.gradfuse.scale_(grads, r.scale, policy == _abi.POLICY_ZERO, name)
    return r


def _scale_compiled(grads, scale, *, backend=None, foreach=None, zero_if_scale_is_zero=False) -> None:
    """``_engine.scale_`` through ``gradfuse::scale_`` (``foreach`` only serves the eager path)."""
    torch.ops.gradfuse.scale_(grads, scale, zero_if_scale_is_zero, requested_backend(backend))


#: Norms, NaN/Inf check, coefficient and (``apply``) the scale pass: ``_engine.clip``'s arguments.
clip = EagerOrCompiled(_engine.clip, _clip_compiled)
def _scale_eager(grads, scale, **kwargs) -> None:
    """``_engine.scale_``; DTensor gradients by their local shards (one factor scales every shard)."""
    _engine.scale_(_layout.local_tensors(grads) if _layout.has_dtensors(grads) else grads, scale, **kwargs)


#: grads *= scale, skipped on the device when scale == 1: ``_engine.scale_``'s arguments.
scale_ = EagerOrCompiled(_scale_eager, _scale_compiled)
