"""The pure-torch reference path (``backend="torch"``), and the route for what no fused backend runs.

It computes what the fused kernels compute (``gradfuse._abi``), with torch ops: per-tensor norms in
fp64, the total as the norm of the stacked per-tensor norms (torch's formula), both returned in the
accumulation dtype (fp32, or fp64 for fp64 grads; complex gives a real norm), the coefficient
``min(1, max_norm / (total + 1e-6))`` on that rounded total, and one multiply per (device, dtype)
group. It takes every gradient torch takes (fp64, complex, sparse raises as in torch, tensor
subclasses such as DTensor, any device, several devices in one call) with torch's semantics, except
for the documented numerical fixes (no fp16 overflow, no double rounding, no fp32 drift).
"""

from __future__ import annotations

import torch
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)

from . import _abi


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


def norms(grads: list[torch.Tensor], p: float, foreach: bool | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, per-tensor norms in input order, wide total) on the first gradient's device. The first
    two in the accumulation dtype; the wide total unrounded (fp64 for real gradients). The total is
    torch's: the p-norm of the per-(device, dtype)-group norms stacked in group order, computed in
    fp64 and rounded once. A few ops per group, none per tensor."""
    first = grads[0].device
    acc = torch.float32
    for dtype in {g.dtype for g in grads}:
        acc = torch.promote_types(acc, accumulation_dtype(dtype))
    blocks: list[torch.Tensor] = []
    order: list[int] = []  # input index of each norm, in group order
    grouped = _group_tensors_by_device_and_dtype([grads], with_indices=True)
    for (device, dtype), ([group], indices) in grouped.items():
        cast = _compute_dtype(dtype)
        if _use_foreach(group, device, foreach) and (cast is None or _FOREACH_NORM_TAKES_DTYPE):
            group_norms = torch._foreach_norm(group, p, dtype=cast) if cast else torch._foreach_norm(group, p)
        else:
            group_norms = [torch.linalg.vector_norm(g, p, dtype=cast) for g in group]
        blocks.append(torch.stack(list(group_norms)).to(first))
        order.extend(indices)
    in_group_order = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    wide_total = torch.linalg.vector_norm(in_group_order, p)
    if order == list(range(len(grads))):
        in_input_order = in_group_order
    else:
        position = [0] * len(grads)
        for k, i in enumerate(order):
            position[i] = k
        rows = in_group_order.unbind(0)
        in_input_order = torch.stack([rows[k] for k in position])
    return wide_total.to(acc), in_input_order.to(acc), wide_total


# Where the fp64 sum of |x|^p over finite fp16/bf16/fp32 values cannot overflow ((3.4e38)^4 times
# 2^63 elements is 1e173), a NaN or Inf element is exactly what makes the total non-finite.
_TOTAL_SHOWS_NONFINITE_MAX_P = 4.0
_NARROW_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def found_nonfinite(grads: list[torch.Tensor], p: float, wide_total: torch.Tensor, dtypes) -> torch.Tensor:
    """float32 1.0 if any element is NaN or Inf (not an overflow of the norm). Read off the fp64
    total where that is exact (0 < p <= 4, fp16/bf16/fp32 gradients); otherwise from max |x| per
    tensor, which is finite exactly when the tensor is."""
    first = grads[0].device
    if 0 < p <= _TOTAL_SHOWS_NONFINITE_MAX_P and all(d in _NARROW_DTYPES for d in set(dtypes)):  # total is fp64
        return (~torch.isfinite(wide_total)).to(torch.float32)
    nonempty = [g for g in grads if g.numel()]
    if not nonempty:
        return torch.zeros((), dtype=torch.float32, device=first)
    blocks = []
    grouped = _group_tensors_by_device_and_dtype([nonempty])
    for (device, _), ([group], _) in grouped.items():
        if _has_foreach_support(group, device):
            maxima = torch._foreach_norm(group, float("inf"))
        else:
            maxima = [torch.linalg.vector_norm(g, float("inf")) for g in group]
        blocks.append(torch.stack(list(maxima)).to(first, torch.float64))
    return (~torch.isfinite(torch.cat(blocks))).any().to(torch.float32)


def clip_coefficient(total: torch.Tensor, max_norm: float | torch.Tensor) -> torch.Tensor:
    """min(1, max_norm / (total + 1e-6)) in fp64 on the given (rounded) total, rounded once to the
    total's dtype; torch.clamp keeps a NaN."""
    wide = torch.float64 if total.device.type != "mps" else torch.float32
    coef = torch.clamp(max_norm / (total.to(wide) + _abi.CLIP_EPS), max=1.0)
    return coef.to(total.dtype)


def scale_factor(coef: torch.Tensor, found_inf: torch.Tensor, policy: int, inv_scale: torch.Tensor | None) -> torch.Tensor:
    """coef * inv_scale, or 1 (skip) / 0 (zero) when found_inf, per the kernel contract."""
    scale = coef if inv_scale is None else coef * inv_scale.reshape(()).to(coef.device, coef.dtype)
    if policy == _abi.POLICY_SKIP:
        scale = torch.where(found_inf.to(scale.device) != 0, torch.ones_like(scale), scale)
    elif policy == _abi.POLICY_ZERO:
        scale = torch.where(found_inf.to(scale.device) != 0, torch.zeros_like(scale), scale)
    return scale


def scale_grads_(grads: list[torch.Tensor], scale: torch.Tensor, foreach: bool | None, policy: int = _abi.POLICY_PROPAGATE) -> None:
    """grads *= scale (a 0-dim tensor) per (device, dtype) group, in place like torch (a duplicate
    gradient is scaled twice). Under POLICY_SKIP every bit stays as it was when scale == 1 (NaN
    payloads survive a skipped step); under POLICY_ZERO a zero scale writes zeros (NaN * 0 would
    stay NaN)."""
    scale = scale.reshape(())
    grouped = _group_tensors_by_device_and_dtype([grads])
    for (device, _), ([group], _) in grouped.items():
        s = scale.to(device)
        if policy == _abi.POLICY_PROPAGATE:
            if _use_foreach(group, device, foreach):
                torch._foreach_mul_(group, s)
            else:
                for g in group:
                    g.mul_(s)
            continue
        keep, zero = s == 1, s == 0
        for g in group:
            new = g * s
            if policy == _abi.POLICY_ZERO:
                new.masked_fill_(zero, 0)
            g.copy_(torch.where(keep, g, new))
