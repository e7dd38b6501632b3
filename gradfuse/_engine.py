"""The one way through: validated gradients -> route (fused backend or reference) -> plan -> kernels.

``clip`` is the single implementation behind every public norm/clip function. It never synchronises
with the host, except to raise for ``error_if_nonfinite=True`` (one read of the total, before any
gradient is touched).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _abi, _reference
from ._backends import choose, requested_backend
from ._plan import PLANS, build_plan, fingerprint


@dataclass(frozen=True)
class ClipResult:
    """Everything one clip computed, all still on the device (nothing was synchronised).

    ``total_norm``: the global norm in the accumulation dtype (fp32 unless fp64 grads);
    ``tensor_norms``: the per-gradient norms, in the order of the gradients given;
    ``found_inf``: float32, 1.0 when a gradient holds a NaN or Inf (GradScaler's convention);
    ``clip_coef``: ``min(1, max_norm / (total_norm + 1e-6))``;
    ``scale``: the factor applied to the gradients (or handed to an optimizer);
    ``norm_dtype``: the dtype torch would return the total norm in.
    """

    total_norm: torch.Tensor
    tensor_norms: torch.Tensor
    found_inf: torch.Tensor
    clip_coef: torch.Tensor
    scale: torch.Tensor
    norm_dtype: torch.dtype
    backend: str

    @property
    def torch_norm(self) -> torch.Tensor:
        """The total norm as ``torch.nn.utils.clip_grad_norm_`` returns it (torch's dtype)."""
        return self.total_norm.to(self.norm_dtype)


ClipResult.__module__ = "gradfuse"  # public as gradfuse.ClipResult (also for pickle)


def _real(dtype: torch.dtype) -> torch.dtype:
    return _reference.accumulation_dtype(dtype) if dtype.is_complex else dtype


def torch_norm_dtype(dtypes) -> torch.dtype:
    """torch stacks per-(device, dtype) norms, so its total has the promoted real dtype."""
    out = None
    for dtype in set(dtypes):
        out = _real(dtype) if out is None else torch.promote_types(out, _real(dtype))
    return out


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill [data_ptr, data_ptr + numel) in some order."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.size()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def fused_ineligible_reason(grads: list[torch.Tensor]) -> str | None:
    """Why no fused backend can take these gradients, or None if one can."""
    device = grads[0].device
    for i, g in enumerate(grads):
        if type(g) is not torch.Tensor:
            return f"gradient {i} is a {type(g).__name__}, a tensor subclass"
        if g.layout is not torch.strided:
            return f"gradient {i} has layout {g.layout}"
        if g.dtype not in _abi.DTYPE_TAGS:
            return f"gradient {i} has dtype {g.dtype}"
        if g.device != device:
            return "the gradients are on several devices"
        if g.requires_grad:
            return f"gradient {i} requires grad (create_graph)"
        if not _is_dense(g):
            return f"gradient {i} is a strided view with gaps or overlaps"
    if len({g.data_ptr() for g in grads if g.numel()}) != sum(1 for g in grads if g.numel()):
        return "a gradient appears twice"
    return None


def _fused_plan(backend, grads: list[torch.Tensor], dtypes: tuple[torch.dtype, ...]):
    """The cached plan for ``grads`` on ``backend``, or None when they need the reference path."""
    try:
        key = fingerprint(grads, dtypes)
    except RuntimeError:  # sparse and other storage-less tensors have no data_ptr
        return None
    chunk = backend.chunk_size
    plan = PLANS.lookup(backend.name, chunk, key)
    if plan is not None:
        # The fingerprint holds addresses, sizes and dtypes; a new tensor at the same address
        # with another layout is caught by the full check whenever a gradient is not contiguous.
        if all(map(torch.Tensor.is_contiguous, grads)) or fused_ineligible_reason(grads) is None:
            return plan
        return None
    if fused_ineligible_reason(grads) is not None:
        return None
    return PLANS.insert(backend.name, chunk, key, build_plan(grads, chunk))


def _device_scalar(x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A float32 one-element tensor on ``device`` (kernels read it by address)."""
    if x is None:
        return None
    return x.detach().to(device=device, dtype=torch.float32).reshape(1).contiguous()


def _raise_if_nonfinite(total: torch.Tensor, p: float) -> None:
    if not bool(torch.isfinite(total)):  # the one documented host sync
        raise RuntimeError(
            f"The total norm of order {p} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )


def clip(
    grads: list[torch.Tensor],
    max_norm: float | torch.Tensor,
    p: float,
    *,
    apply: bool,
    backend: str | None = None,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    policy: int = _abi.POLICY_PROPAGATE,
    inv_scale: torch.Tensor | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
) -> ClipResult:
    """Norms, non-finite check and clip coefficient of ``grads`` (non-empty, validated); scales
    them in place by the result's ``scale`` when ``apply`` (skipped on the device when it is 1).
    ``dtypes``: the gradients' dtypes when the caller has them already."""
    name = requested_backend(backend)
    device = grads[0].device
    dtypes = tuple(g.dtype for g in grads) if dtypes is None else dtypes
    fused = choose(name, device) if name != "torch" else None
    plan = _fused_plan(fused, grads, dtypes) if fused is not None else None
    if plan is None:
        return _reference_clip(grads, max_norm, p, apply, error_if_nonfinite, foreach, policy, inv_scale, dtypes)

    kind = _abi.norm_kind(p)
    max_norm_tensor = _device_scalar(max_norm, device) if isinstance(max_norm, torch.Tensor) else None
    max_norm_value = 0.0 if max_norm_tensor is not None else float(max_norm)
    inv_scale = _device_scalar(inv_scale, device)
    tensor_norms = torch.empty(plan.num_tensors, dtype=torch.float32, device=device)
    result = torch.empty(_abi.RESULT_SIZE, dtype=torch.float32, device=device)
    fused.reduce(plan, kind, p, max_norm_value, max_norm_tensor, inv_scale, policy, tensor_norms, result)
    if error_if_nonfinite:
        _raise_if_nonfinite(result[_abi.RESULT_TOTAL], p)
    scale = result[_abi.RESULT_SCALE]
    if apply:
        fused.scale(plan, result[_abi.RESULT_SCALE : _abi.RESULT_SCALE + 1], policy == _abi.POLICY_ZERO)
    return ClipResult(
        total_norm=result[_abi.RESULT_TOTAL],
        tensor_norms=tensor_norms,
        found_inf=result[_abi.RESULT_FOUND_INF],
        clip_coef=result[_abi.RESULT_COEF],
        scale=scale,
        norm_dtype=torch_norm_dtype(dtypes),
        backend=fused.name,
    )


def _reference_clip(grads, max_norm, p, apply, error_if_nonfinite, foreach, policy, inv_scale, dtypes) -> ClipResult:
    total, tensor_norms, wide_total = _reference.norms(grads, p, foreach)
    if inv_scale is not None and p != 0.0:
        inv = inv_scale.reshape(()).to(total.device, total.dtype)
        total, tensor_norms = total * inv, tensor_norms * inv
    if error_if_nonfinite:
        _raise_if_nonfinite(total, p)
    found_inf = _reference.found_nonfinite(grads, p, wide_total, dtypes)
    coef = _reference.clip_coefficient(total, max_norm)
    scale = _reference.scale_factor(coef, found_inf, policy, inv_scale)
    if apply:
        _reference.scale_grads_(grads, scale, foreach, policy)
    return ClipResult(
        total_norm=total,
        tensor_norms=tensor_norms,
        found_inf=found_inf,
        clip_coef=coef,
        scale=scale,
        norm_dtype=torch_norm_dtype(dtypes),
        backend="torch",
    )


def scale_(
    grads: list[torch.Tensor],
    scale: torch.Tensor,
    *,
    backend: str | None = None,
    foreach: bool | None = None,
    zero_if_scale_is_zero: bool = False,
) -> None:
    """grads *= scale (a device scalar), skipped on the device when scale == 1."""
    name = requested_backend(backend)
    fused = choose(name, grads[0].device) if name != "torch" else None
    plan = _fused_plan(fused, grads, tuple(g.dtype for g in grads)) if fused is not None else None
    if plan is None:
        _reference.scale_grads_(grads, scale, foreach, _abi.POLICY_ZERO if zero_if_scale_is_zero else _abi.POLICY_PROPAGATE)
        return
    fused.scale(plan, _device_scalar(scale, plan.device), zero_if_scale_is_zero)
