"""The pure-torch reference path (``backend="torch"``), and the route for what no fused backend runs.

It computes what the fused kernels compute (``gradfuse._abi``), with torch ops: per-tensor norms
in fp64, the total as the norm of the stacked per-tensor norms (torch's formula), both returned in
the accumulation dtype (fp32, or fp64 for fp64 grads; complex gives a real norm), max |x| per
tensor (which also gives ``found_inf``: it is finite exactly when the tensor is), the coefficient
``min(1, max_norm / (total + 1e-6))`` and one multiply per (device, dtype) group: a fixed number of
ops per group with foreach (an op per tensor without it, for the NaN/Inf counts, asked for only by
statistics, for the per-tensor or per-row factors and for the skip/zero policies). It takes
every gradient torch takes (fp64, complex, sparse raises as in torch, tensor subclasses, any
device, several devices in one call) with torch's semantics, except for the documented numerical
fixes (no fp16 overflow, no double rounding, no fp32 drift).
"""

from __future__ import annotations

import math

import torch
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)

from . import _abi
from ._plan import device_constant


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype norms are returned in: fp32 for fp16/bf16/fp32, the real dtype of fp64/complex."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return torch.empty((), dtype=dtype).real.dtype if dtype.is_complex else dtype


def _compute_dtype(dtype: torch.dtype) -> torch.dtype | None:
    """fp64 for real floating dtypes (the reference must beat fp32 drift); complex keeps its own."""
    return None if dtype.is_complex else torch.float64


def _foreach_norm_takes_dtype() -> bool:
    try:  # torch._foreach_norm(..., dtype=) is missing from some torch versions in our range
        torch._foreach_norm([torch.ones(1, dtype=torch.float16)], 2.0, dtype=torch.float64)
        return True
    except (TypeError, RuntimeError):
        return False


_FOREACH_NORM_TAKES_DTYPE = _foreach_norm_takes_dtype()


def _use_foreach(tensors: list[torch.Tensor], device: torch.device, foreach: bool | None) -> bool:
    if foreach is None:
        return _has_foreach_support(tensors, device)
    if foreach and not _device_has_foreach_support(device):
        raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
    return bool(foreach)


def _in_input_order(blocks: list[torch.Tensor], order: list[int]) -> torch.Tensor:
    """Per-group rows concatenated, put back in the order of the gradients given."""
    in_group_order = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    if order == list(range(len(order))):
        return in_group_order
    position = [0] * len(order)
    for k, i in enumerate(order):
        position[i] = k
    device = in_group_order.device  # the index is copied to the device once, not every call (a sync)
    index = device_constant(("order", tuple(position), device), lambda: torch.tensor(position, device=device))
    return in_group_order[index]


def _per_tensor(grads: list[torch.Tensor], fn) -> torch.Tensor:
    """``fn(group, device, dtype)`` -> a tensor of one row per tensor of the group, rows put back in
    input order on the first gradient's device."""
    first = grads[0].device
    blocks, order = [], []
    for (device, dtype), ([group], indices) in _group_tensors_by_device_and_dtype([grads], with_indices=True).items():
        blocks.append(fn(group, device, dtype).to(first))
        order.extend(indices)
    return _in_input_order(blocks, order)


def _norms64(group, device, p: float, foreach, dtype) -> torch.Tensor:
    """The p-norm of each tensor of a group, in fp64 (complex: their real dtype)."""
    cast = _compute_dtype(dtype)
    if _use_foreach(group, device, foreach) and (cast is None or _FOREACH_NORM_TAKES_DTYPE):
        return torch.stack(torch._foreach_norm(group, p, dtype=cast) if cast else torch._foreach_norm(group, p))
    return torch.stack([torch.linalg.vector_norm(g, p, dtype=cast) for g in group])


def _max_abs(group, device, dtype) -> torch.Tensor:
    """max |x| per tensor of a group (NaN propagates; 0 for an empty tensor), float64."""
    if all(g.numel() == 0 for g in group):
        return torch.zeros(len(group), dtype=torch.float64, device=device)
    # An empty tensor (whose inf-norm raises) stands in as one zero: a fill, no index from the host.
    zero = next(g for g in group if g.numel()).new_zeros(1)
    tensors = [g if g.numel() else zero for g in group]
    maxima = torch._foreach_norm(tensors, math.inf) if _has_foreach_support(tensors, device) else [torch.linalg.vector_norm(g, math.inf) for g in tensors]
    return torch.stack(list(maxima)).to(torch.float64)


def _counts(group, device, dtype) -> torch.Tensor:
    """[n, 2] int64: NaN and Inf elements per tensor of a group (an op per tensor)."""
    return torch.stack([torch.stack((g.isnan().sum(), g.isinf().sum())) for g in group])


def _partials(norms64: torch.Tensor, p: float) -> torch.Tensor:
    """S_t from the fp64 norms: norm^p (sum |x|^p), the norm itself for +-inf and 0."""
    if p in (math.inf, -math.inf, 0.0):
        return norms64
    return norms64.pow(p)


def combine_all(partials: torch.Tensor, p: float) -> torch.Tensor:
    """The partial of all entries together (0-dim): sum, max for inf, min for -inf (NaN kept);
    the identity when there is none."""
    if partials.numel() == 0:
        return partials.new_full((), math.inf if p == -math.inf else 0.0)
    if p == math.inf or p == -math.inf:
        return partials.amax() if p > 0 else partials.amin()
    return partials.sum()


def root(partials: torch.Tensor, p: float) -> torch.Tensor:
    """The norm from its partial: ``S^(1/p)``; S itself for 1, +-inf and 0 (the kernels' root)."""
    if p in (1.0, math.inf, -math.inf, 0.0):
        return partials
    return partials.sqrt() if p == 2.0 else partials.pow(1.0 / p)


def result_dtype(dtypes) -> torch.dtype:
    """ACC, the dtype of a call's results: fp64 when any gradient accumulates in fp64, else fp32."""
    return torch.float64 if any(accumulation_dtype(d) == torch.float64 for d in set(dtypes)) else torch.float32


def wide_clip_coefficient(total: torch.Tensor, max_norm: float | torch.Tensor, wide_total: torch.Tensor | None = None) -> torch.Tensor:
    """min(1, max_norm / (total + 1e-6)) in fp64 on the given (rounded) total, not rounded;
    torch.clamp keeps a NaN. Where the rounded total overflowed to inf, the unrounded
    ``wide_total`` (a norm beyond fp32 still clips by a finite factor)."""
    wide = torch.float64 if total.device.type != "mps" else torch.float32
    t = total.to(wide)
    if wide_total is not None:
        t = torch.where(torch.isinf(t), wide_total.to(wide), t)
    return torch.clamp(max_norm / (t + _abi.CLIP_EPS), max=1.0)


def clip_coefficient(total: torch.Tensor, max_norm: float | torch.Tensor, wide_total: torch.Tensor | None = None) -> torch.Tensor:
    """``wide_clip_coefficient`` rounded once to the total's dtype."""
    return wide_clip_coefficient(total, max_norm, wide_total).to(total.dtype)


def scale_factor(coef: torch.Tensor, found_inf: torch.Tensor, policy: int, inv_scale: torch.Tensor | None) -> torch.Tensor:
    """coef * inv_scale, or 1 (skip) / 0 (zero) when found_inf, per the kernel contract; in coef's
    dtype (pass the wide coefficient, then round once, as the kernels do)."""
    scale = coef if inv_scale is None else coef * inv_scale.reshape(()).to(coef.device, coef.dtype)
    if policy == _abi.POLICY_SKIP:
        scale = torch.where(found_inf.to(scale.device) != 0, torch.ones_like(scale), scale)
    elif policy == _abi.POLICY_ZERO:
        scale = torch.where(found_inf.to(scale.device) != 0, torch.zeros_like(scale), scale)
    return scale


def _row_stats(grads, rows, p: float, stats: bool):
    """Per-row norms (fp64), max |x| (fp64) and NaN/Inf counts of every gradient split in
    ``rows[i]`` dim-0 slices: a few ops per gradient, on the first gradient's device."""
    first = grads[0].device
    views = [g.reshape(r, -1) if r else g.reshape(0, 1) for g, r in zip(grads, rows)]
    norms = torch.cat([torch.linalg.vector_norm(v, p, dim=1, dtype=_compute_dtype(v.dtype)).to(first, torch.float64) for v in views])
    max_abs = torch.cat([(v.abs().amax(dim=1) if v.shape[1] else v.new_zeros(v.shape[0])).to(first, torch.float64) for v in views])
    counts = torch.cat([torch.stack((v.isnan().sum(1), v.isinf().sum(1)), 1).to(first) for v in views]) if stats else None
    return norms, max_abs, counts


def measure(grads, max_norm, p, foreach, policy, inv_scale, per_tensor, stats, dtypes, rows=None):
    """The kernel contract's reduce with torch ops (``rows``: the entries are dim-0 slices);
    returns a ``gradfuse.ClipResult``."""
    from ._engine import ClipResult, torch_norm_dtype

    acc = result_dtype(dtypes)
    # The total is torch's: the p-norm of the per-tensor norms, in fp64, rounded once.
    if rows is None:
        norms64 = _per_tensor(grads, lambda group, device, dtype: _norms64(group, device, p, foreach, dtype))
        max_abs = _per_tensor(grads, _max_abs)
        counts = _per_tensor(grads, _counts) if stats else None
    else:
        norms64, max_abs, counts = _row_stats(grads, rows, p, stats)
    wide_total = torch.linalg.vector_norm(norms64, p)
    partials = _partials(norms64.to(torch.float64), p)
    if inv_scale is not None and p != 0.0:  # norms of the unscaled gradients (L0 counts stay counts)
        inv = inv_scale.reshape(()).to(norms64.device, norms64.dtype)
        wide_total, norms64 = wide_total * inv, norms64 * inv
    total, tensor_norms = wide_total.to(acc), norms64.to(acc)
    found_inf = (~torch.isfinite(max_abs)).any().to(torch.float32)
    coef64 = wide_clip_coefficient(total, max_norm, wide_total)
    scales = None
    if per_tensor:
        scales = scale_factor(wide_clip_coefficient(tensor_norms, max_norm, norms64), found_inf, policy, inv_scale).to(torch.float32)
    scale = scale_factor(coef64, found_inf, policy, inv_scale)
    return ClipResult(
        result=torch.stack([total, found_inf.to(total.dtype), coef64.to(total.dtype), scale.to(total.dtype)]),
        tensor_norms=tensor_norms,
        tensor_partials=partials,
        tensor_max_abs=max_abs.to(torch.float32),
        tensor_counts=counts,
        norm_dtype=torch_norm_dtype(dtypes),
        backend="torch",
        norm_type=float(p),
        tensor_scales=scales,
    )


def scale_grads_(grads: list[torch.Tensor], scale: torch.Tensor, foreach: bool | None, policy: int = _abi.POLICY_PROPAGATE,
                 per_tensor: bool = False, rows: tuple[int, ...] | None = None) -> None:  # fmt: skip
    """grads *= scale (a 0-dim tensor, or one factor per gradient) in place like torch (a duplicate
    gradient is scaled twice). POLICY_PROPAGATE: torch's foreach multiply per (device, dtype)
    group. Otherwise, or per tensor, as the kernels do: every bit stays as it was where the factor
    is 1 (NaN payloads survive a skipped step), and POLICY_ZERO writes zeros where it is 0 (NaN * 0
    would stay NaN)."""
    if not per_tensor and policy == _abi.POLICY_PROPAGATE:
        scale = scale.reshape(())
        for (device, _), ([group], _) in _group_tensors_by_device_and_dtype([grads]).items():
            if _use_foreach(group, device, foreach):
                torch._foreach_mul_(group, scale.to(device))
            else:
                for g in group:
                    g.mul_(scale.to(device))
        return
    if rows is not None:  # one factor per dim-0 slice (rows[i] == shape[0]), or per gradient (1)
        factors = scale.reshape(-1) if per_tensor else scale.reshape(()).expand(sum(rows))
        factors = [f.reshape(-1, *[1] * (g.dim() - 1)) if r != 1 else f.reshape(()) for g, f, r in zip(grads, factors.split(list(rows)), rows)]
    else:
        factors = (scale.reshape(-1) if per_tensor else scale.reshape(()).expand(len(grads))).unbind(0)
    for g, s in zip(grads, factors):
        s = s.to(g.device)
        new = g * s
        if policy == _abi.POLICY_ZERO:
            new.masked_fill_(s == 0, 0)
        g.copy_(torch.where(s == 1, g, new))
