"""Public API: drop-in replacements for ``torch.nn.utils``'s clipping functions, plus ``clip_grads``.

Same names, signatures, defaults and return values as torch 2.13; gradfuse's own options are
keyword-only and come after torch's. Each function validates, then calls ``gradfuse.ops`` (the
engine, or under ``torch.compile`` the same engine through its custom op).
"""

from __future__ import annotations

import functools

import torch
from typing_extensions import deprecated

from . import _layout, _reference, _validation as v, distributed, ops
from ._engine import ClipResult

# torch's own clamp pass, taken at import: gradfuse.patch_torch() replaces torch.nn.utils.clip_grad_value_
# with gradfuse's, which calling it by name would then recurse into.
_torch_clip_grad_value_ = torch.nn.utils.clip_grad.clip_grad_value_



def _no_grad(fn):
    def wrapper(*args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)

    return functools.update_wrapper(wrapper, fn)


def _distribution(items: list, group, exclude_from_norm, fn: str):
    """``group=`` checked, and the indices among ``items`` (those whose gradients are clipped, in
    order) that ``exclude_from_norm`` names."""
    group = _layout.check_group(group, fn)
    excluded = _layout.excluded_indices(items, exclude_from_norm, fn)
    return group, excluded


def _with_grad(params: list, exclude_from_norm) -> list:
    return params if exclude_from_norm is None else [p for p in params if p.grad is not None]


def _clip(grads, max_norm, p, *, group, excluded, fn, **kwargs) -> ClipResult:
    """The distributed layer for DTensor gradients or ``group=``, else the engine (``gradfuse.ops``)."""
    if group is not None or _layout.has_dtensors(grads):
        return distributed.clip(grads, max_norm, p, group=group, excluded=excluded, fn=fn, **kwargs)
    if excluded:
        raise ValueError(f"{fn}: exclude_from_norm marks copies held by other ranks: it needs group= or DTensor gradients")
    return ops.clip(grads, max_norm, p, **kwargs)


def _returned_total(r: ClipResult) -> torch.Tensor:
    return r.torch_total() if isinstance(r, distributed.DistributedClipResult) else r.torch_norm


@_no_grad
def get_total_norm(
    tensors, norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach: bool | None = None, *,
    backend: str | None = None, group=None, exclude_from_norm=None,
) -> torch.Tensor:  # fmt: skip
    r"""Norm of all ``tensors`` viewed as one vector: :math:`(\sum_t \|t\|_p^p)^{1/p}`.

    Like ``torch.nn.utils.get_total_norm``, accumulated in fp32 for fp16/bf16 tensors and returned
    in torch's dtype. ``backend``: "auto" (default, or ``GRADFUSE_BACKEND``), "cuda", "triton",
    "cpu" or "torch". ``group``, ``exclude_from_norm``: as in :func:`clip_grad_norm_`.
    """
    fn = "get_total_norm"
    tensors = v.check_tensors([tensors] if isinstance(tensors, torch.Tensor) else list(tensors), fn)
    p = v.check_norm_type(norm_type, fn)
    group, excluded = _distribution(tensors, group, exclude_from_norm, fn)
    if not tensors and group is None:
        return torch.tensor(0.0)
    dtypes = v.check_grads(tensors, p, foreach, fn)
    r = _clip(tensors, 0.0, p, apply=False, backend=backend, error_if_nonfinite=error_if_nonfinite, foreach=foreach, dtypes=dtypes,
              group=group, excluded=excluded, fn=fn)  # fmt: skip
    return _returned_total(r)


@_no_grad
def clip_grads_with_norm_(parameters, max_norm: float, total_norm: torch.Tensor, foreach: bool | None = None, *, backend: str | None = None) -> None:
    r"""Scale the gradients by :math:`\min(1, \text{max\_norm} / (\text{total\_norm} + 10^{-6}))`.

    Like ``torch.nn.utils.clip_grads_with_norm_``; the coefficient is evaluated in fp64 and rounded
    once to fp32 (kept in fp64 for an fp64 ``total_norm``), and the scale pass is skipped on the
    device when it is 1.
    """
    fn = "clip_grads_with_norm_"
    grads = v.grads_of(v.as_list(parameters, fn), fn)
    max_norm = v.check_max_norm(max_norm, fn)
    total_norm = v.check_total_norm(total_norm, fn)
    if not grads:
        return
    v.check_grads(grads, 2.0, foreach, fn)
    if _layout.is_dtensor(total_norm):  # torch's get_total_norm gives a DTensor (Partial until reduced)
        total_norm = total_norm.full_tensor()
    acc = torch.float64 if total_norm.dtype == torch.float64 else torch.float32
    coef = _reference.clip_coefficient(total_norm.to(acc), max_norm)
    ops.scale_(grads, coef, backend=backend, foreach=foreach)


@_no_grad
def clip_grad_norm_(
    parameters,
    max_norm: float | torch.Tensor,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    backend: str | None = None,
    group=None,
    exclude_from_norm=None,
) -> torch.Tensor:
    r"""Clip the gradients' global norm in place; return the norm before clipping.

    Drop-in for ``torch.nn.utils.clip_grad_norm_``: ``total = (\sum_g \|g\|_p^p)^{1/p}``,
    ``g *= min(1, max_norm / (total + 1e-6))``. One read of every gradient computes the norm, the
    NaN/Inf check and the coefficient on the device; a second pass scales only when the coefficient
    is below 1. fp16/bf16 gradients accumulate in fp32 (no overflow above 65504); the returned norm
    has torch's dtype.

    Args:
        parameters: a tensor or an iterable of tensors (a generator too) whose ``.grad`` is clipped;
            parameters without a gradient are skipped.
        max_norm: the largest norm allowed, a number >= 0 (``inf`` allowed); on a GPU also a
            one-element device tensor, read by the kernels with no host sync.
        norm_type: p of the norm: any real number, ``inf`` (max |x|), ``-inf`` (min |x|) or 0 (the
            count of non-zeros).
        error_if_nonfinite: raise if the total norm is NaN or Inf, before any gradient is touched
            (the one host sync).
        foreach: used by the ``torch`` backend only (torch's meaning); the fused backends always
            process every gradient in one launch.
        backend: ``"auto"`` (default, or the ``GRADFUSE_BACKEND`` variable), ``"cuda"``,
            ``"triton"``, ``"cpu"`` or ``"torch"``; an explicit one that cannot run raises
            :class:`BackendUnavailableError`.
        group: a ``ProcessGroup`` or 1-D ``DeviceMesh``: these gradients are this rank's part of a
            model spread over ``group`` (pipeline stages, Megatron-style layouts); the norm is the
            global one, the same on every rank, and every rank of the group must call (with or
            without gradients). DTensor gradients need no ``group``: their meshes give it.
        exclude_from_norm: parameters (or gradients) whose gradient is a copy that another rank of
            the group counts (e.g. a tensor-parallel LayerNorm on all but one tensor-parallel
            rank): scaled, not counted here. DTensor ``Replicate`` placements count once by
            themselves.

    Returns:
        The total norm before clipping, a 0-dim tensor of torch's dtype on the gradients' device
        (a replicated DTensor for DTensor gradients, as torch returns).
    """
    fn = "clip_grad_norm_"
    params = v.as_list(parameters, fn, warn_empty_generator=True)
    grads = v.grads_of(params, fn)
    max_norm = v.check_max_norm(max_norm, fn)
    p = v.check_norm_type(norm_type, fn)
    group, excluded = _distribution(_with_grad(params, exclude_from_norm), group, exclude_from_norm, fn)
    if not grads and group is None:
        return torch.tensor(0.0)
    dtypes = v.check_grads(grads, p, foreach, fn)
    r = _clip(grads, max_norm, p, apply=True, backend=backend, error_if_nonfinite=error_if_nonfinite, foreach=foreach, dtypes=dtypes,
              group=group, excluded=excluded, fn=fn)  # fmt: skip
    return _returned_total(r)


@deprecated(
    "`gradfuse.clip_grad_norm` is deprecated in favor of `gradfuse.clip_grad_norm_`, as "
    "`torch.nn.utils.clip_grad_norm` is in favor of `torch.nn.utils.clip_grad_norm_`.",
    category=FutureWarning,
)
def clip_grad_norm(parameters, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach: bool | None = None, *, backend: str | None = None) -> torch.Tensor:
    """Deprecated alias of :func:`clip_grad_norm_` (a FutureWarning, as torch's alias gives)."""
    return clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach, backend=backend)


@_no_grad
def clip_grad_value_(parameters, clip_value: float, foreach: bool | None = None) -> None:
    r"""Clamp every gradient element to :math:`[-\text{clip\_value}, \text{clip\_value}]` in place.

    Drop-in for ``torch.nn.utils.clip_grad_value_`` (torch's foreach clamp; a negative or NaN
    ``clip_value`` is an error instead of flipping or poisoning the gradients).
    """
    fn = "clip_grad_value_"
    params = v.as_list(parameters, fn)
    clip_value = v.check_clip_value(clip_value, fn)
    grads = v.grads_of(params, fn)
    if not grads:
        raise RuntimeError("Expected !nested_tensorlist[0].empty() to be true, but got false.")
    v.check_grads(grads, 2.0, foreach, fn)
    _torch_clip_grad_value_(params, clip_value, foreach=foreach)


@_no_grad
def clip_grads(
    parameters,
    max_norm: float | torch.Tensor,
    norm_type: float = 2.0,
    *,
    nonfinite: str = "propagate",
    inv_scale: torch.Tensor | None = None,
    apply: bool = True,
    foreach: bool | None = None,
    backend: str | None = None,
    group=None,
    exclude_from_norm=None,
) -> ClipResult | None:
    r"""The full clip: norms, NaN/Inf check, coefficient, optional unscale, all on the device.

    ``scale = min(1, max_norm / (total + 1e-6)) * inv_scale`` where ``total`` is the norm of the
    gradients times ``inv_scale`` (AMP's 1/loss_scale, a device tensor; None = 1). ``nonfinite``:
    "propagate" (torch's behaviour), "skip" (gradients untouched when a NaN/Inf is found), "zero"
    (gradients zeroed), "error" (raise, one host sync, before any gradient is touched).
    ``max_norm`` may be a device tensor (adaptive thresholds: no host sync). ``apply=False``
    computes without scaling. ``group``, ``exclude_from_norm``: as in :func:`clip_grad_norm_`; a
    distributed call returns a :class:`DistributedClipResult` (global total, found_inf, coef and
    scale, the same on every rank; per-tensor fields of the local shards). Returns a
    :class:`ClipResult`, or None when no parameter has a grad (and no ``group`` is given).
    """
    fn = "clip_grads"
    params = v.as_list(parameters, fn)
    grads = v.grads_of(params, fn)
    max_norm = v.check_max_norm(max_norm, fn)
    p = v.check_norm_type(norm_type, fn)
    nonfinite = v.check_nonfinite(nonfinite, fn)
    group, excluded = _distribution(_with_grad(params, exclude_from_norm), group, exclude_from_norm, fn)
    if not grads and group is None:
        return None
    dtypes = v.check_grads(grads, p, foreach, fn)
    return _clip(
        grads, max_norm, p, apply=apply, backend=backend, error_if_nonfinite=nonfinite == "error", foreach=foreach,
        policy=v.policy_of(nonfinite), inv_scale=inv_scale, dtypes=dtypes, group=group, excluded=excluded, fn=fn,
    )  # fmt: skip
