"""Layer-wise clipping, fused: every gradient (or every group of gradients) clipped to its own bound.

::

    factor_t = min(1, max_norm / (norm_t + 1e-6))              each gradient t on its own
    norm_G   = root(combine_{t in G} S_t),  factor_t = min(1, max_norm / (norm_G + 1e-6))  t in group G

``S_t`` is gradient t's partial before the root (``sum |x|^p``; max/min ``|x|`` for +-inf; the
count of non-zeros for 0), which the one read of the gradients already returns
(``ClipResult.tensor_partials``, fp64). Without groups the kernels' finalize writes the factors
(``per_tensor=True``); with groups they come from the partials on the device (a few ops, none per
tensor). The scale pass then reads one factor per gradient and leaves every gradient whose factor
is exactly 1 untouched, bitwise. No host sync (except ``nonfinite="error"``: one read, before any
gradient is touched).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from . import _abi, _layout, _reference, _validation as v, ops
from ._engine import ClipResult
from ._plan import device_constant
from ._tracking import named_parameters


def module_of(name: str) -> str:
    """``group_by="module"``: the name of the module that owns a parameter ("h.0.attn.c_attn.weight" -> "h.0.attn.c_attn")."""
    return name.rpartition(".")[0]


def group_keys(names: list[str], group_by, fn: str) -> list:
    """The group key of each name: ``group_by`` is "module" or a callable name -> hashable key."""
    if group_by == "module":
        group_by = module_of
    if not callable(group_by):
        raise TypeError(f"{fn}: group_by must be None, 'module' or a callable name -> key, not {group_by!r}")
    return [group_by(name) for name in names]


def segment_index(keys: list, device: torch.device) -> tuple[torch.Tensor, int]:
    """(the group number of each entry as a device index, the number of groups), groups numbered in
    order of first appearance; copied to the device once per grouping."""
    number: dict = {}
    ids = tuple(number.setdefault(k, len(number)) for k in keys)
    device = torch.device(device)
    return device_constant(("groups", ids, device), lambda: torch.tensor(ids, dtype=torch.int64, device=device)), len(number)


def combine(partials: torch.Tensor, index: torch.Tensor, size: int, p: float) -> torch.Tensor:
    """Per-group partials from per-entry ``partials`` (fp64): sum, or max/min for +-inf (NaN kept)."""
    if p == math.inf or p == -math.inf:
        out = partials.new_full((size,), -math.inf if p > 0 else math.inf)
        return out.scatter_reduce_(0, index, partials, "amax" if p > 0 else "amin", include_self=False)
    return partials.new_zeros(size).index_add_(0, index, partials)


def _with_factors(r: ClipResult, coef: torch.Tensor, scales: torch.Tensor) -> ClipResult:
    """``r`` with the factors applied per entry and, as ``clip_coef``, the smallest coefficient."""
    result = r.result.clone()
    result[_abi.RESULT_COEF] = coef.min().to(result.dtype)
    return dataclasses.replace(r, result=result, tensor_scales=scales)


def clip_by_group(r: ClipResult, max_norm, index: torch.Tensor | None, size: int, policy: int, inv_scale=None) -> tuple[ClipResult, torch.Tensor]:
    """``r`` (measured, nothing applied) with ``tensor_scales`` = the factor of each entry clipped
    by group (``index``: the group of each entry; None: each entry its own group), ``clip_coef`` =
    the smallest group coefficient; and the group norms (fp64). The kernels' formula, on the device:
    ``min(1, max_norm / (fp32(norm_G) + 1e-6)) * inv_scale`` after the non-finite policy
    (``max_norm``: a number, a device scalar, or one per group)."""
    p = r.norm_type
    partials = r.tensor_partials if index is None else combine(r.tensor_partials, index, size, p)
    norms = _reference.root(partials, p)
    if inv_scale is not None and p != 0.0:
        norms = norms * inv_scale.reshape(()).to(norms.device, norms.dtype)
    coef64 = _reference.wide_clip_coefficient(norms.to(torch.float32), max_norm, norms)
    scales = _reference.scale_factor(coef64, r.found_inf, policy, inv_scale).to(torch.float32)
    return _with_factors(r, coef64.to(torch.float32), scales if index is None else scales.index_select(0, index)), norms


def with_smallest_coef(r: ClipResult, max_norm, inv_scale=None) -> ClipResult:
    """A per-tensor clip's result (factors written by the kernels) with ``clip_coef`` = the
    smallest per-tensor coefficient."""
    norms = _reference.root(r.tensor_partials, r.norm_type)
    if inv_scale is not None and r.norm_type != 0.0:
        norms = norms * inv_scale.reshape(()).to(norms.device, norms.dtype)
    return _with_factors(r, _reference.clip_coefficient(r.tensor_norms.to(torch.float32), max_norm, norms), r.tensor_scales)


@torch.no_grad()
def clip_grad_norm_per_tensor_(
    parameters,
    max_norm: float | torch.Tensor,
    norm_type: float = 2.0,
    *,
    group_by=None,
    nonfinite: str = "propagate",
    foreach: bool | None = None,
    backend: str | None = None,
) -> ClipResult | None:
    r"""Clip every gradient to its own norm bound (layer-wise clipping, Keras' ``clipnorm``), in place.

    ``g_t *= min(1, max_norm / (||g_t||_p + 1e-6))`` for each gradient; with ``group_by`` ("module":
    the parameters of one module together, or a callable parameter name -> key) the norm is that of
    the group's gradients viewed as one vector. One read of the gradients plus one scale pass that
    touches only the gradients whose factor is below 1 (the others stay bitwise as they were).

    ``parameters``: a module, ``named_parameters()``, a tensor or an iterable of tensors
    (``group_by`` sees the names; plain parameters are named ``param<i>``). ``nonfinite``: as in
    :func:`gradfuse.clip_grads` (the check is global: one NaN skips or zeroes every gradient).
    Returns the :class:`~gradfuse.ClipResult`: ``tensor_norms`` (each gradient's norm before
    clipping), ``tensor_scales`` (the factor applied to each), ``clip_coef`` (the smallest
    coefficient: below 1 when any gradient was clipped), the global total norm and ``found_inf``;
    None when no parameter has a gradient.
    """
    fn = "clip_grad_norm_per_tensor_"
    named = named_parameters(parameters, fn)
    max_norm = v.check_max_norm(max_norm, fn)
    p = v.check_norm_type(norm_type, fn)
    nonfinite = v.check_nonfinite(nonfinite, fn)
    with_grad = [(name, param) for name, param in named if param.grad is not None]
    _layout.refuse_dtensors([param for _, param in with_grad], fn)
    keys = group_keys([name for name, _ in with_grad], group_by, fn) if group_by is not None else None
    grads = v.grads_of([param for _, param in with_grad], fn)
    if not grads:
        return None
    dtypes = v.check_grads(grads, p, foreach, fn)
    policy, error = v.policy_of(nonfinite), nonfinite == "error"
    if keys is None:  # the kernels' finalize writes the factors; measured and scaled in one call
        r = ops.clip(grads, max_norm, p, apply=True, backend=backend, error_if_nonfinite=error, foreach=foreach,
                     policy=policy, per_tensor=True, dtypes=dtypes)  # fmt: skip
        return with_smallest_coef(r, max_norm)
    r = ops.clip(grads, max_norm, p, apply=False, backend=backend, error_if_nonfinite=error, foreach=foreach, policy=policy, dtypes=dtypes)
    index, size = segment_index(keys, grads[0].device)
    r, _ = clip_by_group(r, max_norm, index, size, policy)
    ops.scale_(grads, r.tensor_scales, backend=backend, foreach=foreach, per_tensor=True, zero_if_scale_is_zero=policy == _abi.POLICY_ZERO)
    return r
