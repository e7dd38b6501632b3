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
#: in a result field's shape: the number of entries (gradients, or their dim-0 slices with ``rows``).
T = "T"

#: The tensor fields of ClipResult as the clip op returns them, each an output of its own:
#: (name, dtype, shape). A new tensor field of ClipResult is one row here.
RESULT_FIELDS = (
    ("result", ACC, (_abi.RESULT_SIZE,)),
    ("tensor_norms", ACC, (T,)),
    ("tensor_partials", torch.float64, (T,)),
    ("tensor_max_abs", torch.float32, (T,)),
    ("tensor_counts", torch.int64, (T, 2)),
    ("tensor_scales", torch.float32, (T,)),  # per_tensor only (else zeros in the op's output, None in ClipResult)
)
# The op's return type: a fixed tuple (functionalization refuses a Tensor[] output of a mutating op).
_OUTPUTS = tuple[(torch.Tensor,) * len(RESULT_FIELDS)]


def _shape(shape, grads: list[torch.Tensor], rows) -> list[int]:
    entries = len(grads) if rows is None else sum(rows)
    return [entries if n == T else n for n in shape]


def _pack(r: _engine.ClipResult, grads: list[torch.Tensor], rows) -> tuple[torch.Tensor, ...]:
    acc = _reference.result_dtype(g.dtype for g in grads)
    # copies: a custom op's outputs may not alias its inputs or each other
    return tuple(
        getattr(r, name).to(dtype or acc, copy=True) if getattr(r, name) is not None
        else grads[0].new_zeros(_shape(shape, grads, rows), dtype=dtype or acc)
        for name, dtype, shape in RESULT_FIELDS
    )  # fmt: skip


def _fake_outputs(grads: list[torch.Tensor], rows) -> tuple[torch.Tensor, ...]:
    acc, g = _reference.result_dtype(g.dtype for g in grads), grads[0]
    return tuple(g.new_empty(_shape(shape, grads, rows), dtype=dtype or acc) for _, dtype, shape in RESULT_FIELDS)


def unpack(outputs: tuple[torch.Tensor, ...], grads: list[torch.Tensor], backend: str, p: float, per_tensor: bool = False) -> _engine.ClipResult:
    """The ClipResult the clip op's ``outputs`` hold."""
    fields = {name: t for (name, _, _), t in zip(RESULT_FIELDS, outputs)}
    if not per_tensor:
        fields["tensor_scales"] = None
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
    per_tensor: bool = False,
    rows: list[int] | None = None,
) -> _OUTPUTS:
    """``_engine.clip``; returns the ClipResult packed as ``RESULT_FIELDS`` declares."""
    rows = None if rows is None else tuple(rows)
    r = _engine.clip(
        grads,
        max_norm if max_norm_tensor is None else max_norm_tensor,
        norm_type,
        apply=apply,
        backend=backend,
        policy=policy,
        inv_scale=inv_scale,
        per_tensor=per_tensor,
        stats=True,
        rows=rows,
    )
    return _pack(r, grads, rows)


@_clip_op.register_fake
def _(grads, max_norm, max_norm_tensor, norm_type, apply, policy, inv_scale, backend, per_tensor=False, rows=None):
    return _fake_outputs(grads, rows)


@torch.library.custom_op(f"{_LIB}::scale_", mutates_args=("grads",))
def _scale_op(grads: list[torch.Tensor], scale: torch.Tensor, zero_if_scale_is_zero: bool, backend: str, per_tensor: bool = False, rows: list[int] | None = None) -> None:
    """grads *= scale (one factor, or one per entry), skipped on the device where the factor is 1."""
    rows = None if rows is None else tuple(rows)
    _engine.scale_(grads, scale, backend=backend, zero_if_scale_is_zero=zero_if_scale_is_zero, per_tensor=per_tensor, rows=rows)


@_scale_op.register_fake
def _(grads, scale, zero_if_scale_is_zero, backend, per_tensor=False, rows=None):
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
    inv_scale=None, per_tensor=False, stats=False, dtypes=None, rows=None,
) -> _engine.ClipResult:  # fmt: skip
    """``_engine.clip`` through ``gradfuse::clip_``: error_if_nonfinite becomes a device assert;
    ``foreach``, ``stats`` (the op always counts) and ``dtypes`` only serve the eager path."""
    name = requested_backend(backend)
    is_tensor = isinstance(max_norm, torch.Tensor)
    rows = None if rows is None else list(rows)
    # With error_if_nonfinite the check must come before any gradient is scaled: reduce, assert, scale.
    outputs = torch.ops.gradfuse.clip_(
        grads, 0.0 if is_tensor else float(max_norm), max_norm if is_tensor else None, p,
        apply and not error_if_nonfinite, policy, inv_scale, name, per_tensor, rows,
    )  # fmt: skip
    r = unpack(outputs, grads, name, p, per_tensor)
    if error_if_nonfinite:
        torch._assert_async(torch.isfinite(r.total_norm), f"The total norm of order {p} for gradients from `parameters` is non-finite")
        if apply:
            factor = r.tensor_scales if per_tensor else r.scale
            torch.ops.gradfuse.scale_(grads, factor, policy == _abi.POLICY_ZERO, name, per_tensor, rows)
    return r


def _scale_compiled(grads, scale, *, backend=None, foreach=None, per_tensor=False, zero_if_scale_is_zero=False, rows=None) -> None:
    """``_engine.scale_`` through ``gradfuse::scale_`` (``foreach`` only serves the eager path)."""
    rows = None if rows is None else list(rows)
    torch.ops.gradfuse.scale_(grads, scale, zero_if_scale_is_zero, requested_backend(backend), per_tensor, rows)


#: Norms, NaN/Inf check, coefficient and (``apply``) the scale pass: ``_engine.clip``'s arguments.
clip = EagerOrCompiled(_engine.clip, _clip_compiled)
def _scale_eager(grads, scale, **kwargs) -> None:
    """``_engine.scale_``; DTensor gradients by their local shards (one factor scales every shard)."""
    _engine.scale_(_layout.local_tensors(grads) if _layout.has_dtensors(grads) else grads, scale, **kwargs)


#: grads *= scale (one factor, or one per entry), skipped on the device where 1: ``_engine.scale_``'s arguments.
scale_ = EagerOrCompiled(_scale_eager, _scale_compiled)
