"""The distributed clip: one fused read of this rank's local shards, one collective, no host sync.

A call is distributed when a gradient is a DTensor (FSDP2, HSDP, tensor/expert parallel) or
``group=`` is given (plain tensors that are this rank's part of a model spread over a group:
pipeline stages, Megatron-style layouts). With the layout of ``gradfuse._layout`` (which shards
count here, and the group)::

    S_t     = the fused read's per-tensor partial of each local tensor (sum |x|^p; max/min |x|
              for +-inf; identity for an empty shard), where this rank does not count t: identity
    S_local = combine_t S_t                              (sum; max for inf; min for -inf)
    pack    = [S_local with NaN -> identity, isnan(S_local), found_inf, has_entries]   (float64)
    all_reduce(pack, SUM | MAX | MIN, layout.group)      (MIN: the flags negated), the one collective
    S       = NaN where any rank's S_local was NaN, else the reduced value
    total   = root(S) * inv_scale                        (0 when no rank holds an entry)

then ``coef = min(1, max_norm / (total + 1e-6))``, ``found_inf`` (a NaN/Inf in any local gradient
of any rank) and the policy's factor, as device ops (``gradfuse._reference``'s formulas), and the
fused scale pass over the local shards. Every rank gets the same bits (the reduced pack is the
same everywhere), so every policy agrees across ranks and ``nonfinite="error"`` raises on every
rank. p = 0 (torch: the number of tensors with a non-zero element) needs each DTensor's count
summed over its mesh: packed into the same collective when every DTensor's mesh spans the group,
else one more collective per mesh rank set before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _abi, _engine, _reference
from ._engine import ClipResult
from ._layout import Layout, dtensor_api, layout_of, local_tensors

__all__ = ["DistributedClipResult"]

_IDENTITY = {_abi.NORM_INF: 0.0, _abi.NORM_NEG_INF: math.inf}  # every other kind sums: 0


def _identity(kind: int) -> float:
    return _IDENTITY.get(kind, 0.0)


def _reduce_op(kind: int):
    import torch.distributed as dist

    return {_abi.NORM_INF: dist.ReduceOp.MAX, _abi.NORM_NEG_INF: dist.ReduceOp.MIN}.get(kind, dist.ReduceOp.SUM)


def _all_reduce(values: torch.Tensor, flags: torch.Tensor | None, kind: int, group) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``values`` (float64, may hold NaN) combined over ``group`` as ``kind`` needs, and ``flags``
    (0/1) OR-ed, in one collective. NaN travels as a flag: MAX/MIN of NaN differ between gloo and
    NCCL (and between their algorithms)."""
    import torch.distributed as dist

    n = values.numel()
    nan = values.isnan()
    sign = -1.0 if kind == _abi.NORM_NEG_INF else 1.0  # MIN ORs flags as their negatives
    parts = [values.masked_fill(nan, _identity(kind)), nan.to(torch.float64) * sign]
    if flags is not None:
        parts.append(flags * sign)
    pack = torch.cat(parts)
    dist.all_reduce(pack, op=_reduce_op(kind), group=group)
    out = pack[:n].masked_fill(pack[n : 2 * n] != 0, math.nan)
    return out, (pack[2 * n :] != 0 if flags is not None else None)


def _masked(partials: torch.Tensor, lay: Layout, kind: int) -> torch.Tensor:
    """The partials with the identity where this rank does not count the tensor."""
    if lay.mask is None:
        return partials
    return torch.where(lay.mask, partials, _identity(kind))


@dataclass(frozen=True)
class DistributedClipResult(ClipResult):
    """A :class:`ClipResult` of a distributed call. ``result`` (total, found_inf, coef, scale) is
    global and the same on every rank; the per-tensor fields describe this rank's local tensors
    (its shards); :meth:`global_tensor_norms` gathers the global per-tensor norms."""

    layout: Layout | None = None
    inv_scale: torch.Tensor | None = None

    def global_tensor_norms(self) -> torch.Tensor:
        """The norm of each whole gradient (a DTensor's over its mesh, a plain tensor's own), in the
        order given: one collective per mesh rank set, which every rank of the group must call."""
        lay, p = self.layout, self.norm_type
        kind = _abi.norm_kind(p)
        partials = self.tensor_partials.clone()
        masked = _masked(self.tensor_partials, lay, kind)
        for s in lay.mesh_sets:
            reduced, _ = _all_reduce(masked.index_select(0, s.indices), None, kind, s.group)
            partials.index_copy_(0, s.indices, reduced)
        norms = _reference.root(partials, p)
        if self.inv_scale is not None and kind != _abi.NORM_L0:
            norms = norms * self.inv_scale.reshape(()).to(norms.device, torch.float64)
        return norms.to(self.result.dtype)

    def torch_total(self) -> torch.Tensor:
        """The total as torch returns it: its dtype; a DTensor (replicated) for DTensor gradients."""
        total = self.torch_norm
        mesh = self.layout.total_mesh
        if mesh is None:
            return total
        dtensor, replicate, _ = dtensor_api()
        return dtensor.from_local(total, mesh, [replicate()] * mesh.ndim, run_check=False)


DistributedClipResult.__module__ = "gradfuse"


def _l0_count(masked: torch.Tensor, lay: Layout, flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p = 0: the number of tensors with a non-zero element over the group, and the OR-ed flags."""
    plain = (masked.index_select(0, lay.plain) != 0).sum().to(torch.float64).reshape(1)
    sets = lay.mesh_sets
    if len(sets) == 1 and sets[0].ranks == lay.ranks:  # one collective: the counts ride along
        values, flags = _all_reduce(torch.cat([masked.index_select(0, sets[0].indices), plain]), flags, _abi.NORM_L0, lay.group)
        return (values[:-1] != 0).sum().to(torch.float64) + values[-1], flags
    led = plain
    for s in sets:  # each DTensor's count over its mesh, then counted once, by the set's leader
        counts, _ = _all_reduce(masked.index_select(0, s.indices), None, _abi.NORM_L0, s.group)
        if s.leader:
            led = led + (counts != 0).sum()
    values, flags = _all_reduce(led, flags, _abi.NORM_L0, lay.group)
    return values[0], flags


@torch.compiler.disable  # collectives and host-side layout work: eager even inside a compiled step
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
    group=None,
    excluded: tuple[int, ...] = (),
    fn: str = "clip",
) -> DistributedClipResult:
    """``gradfuse._engine.clip``'s arguments, for ``grads`` (validated; DTensors and/or plain
    tensors, none on this rank possibly when ``group`` is given): measure over the layout, scale
    the local shards in place when ``apply``."""
    dtypes = tuple(g.dtype for g in grads) if dtypes is None else dtypes
    lay = layout_of(grads, group, excluded, fn)
    kind = _abi.norm_kind(p)
    local = local_tensors(grads)
    at = r = None
    if local:
        at = _engine.target(local, dtypes, backend, foreach)
        r = _engine.measure(at, 0.0, p, inv_scale=inv_scale, dtypes=dtypes)  # partials stay before inv_scale
        partials, found = r.tensor_partials, r.found_inf.to(torch.float64)
    else:
        partials = torch.zeros(0, dtype=torch.float64, device=lay.device)
        found = torch.zeros((), dtype=torch.float64, device=lay.device)
    has = any(t.numel() for t, counted in zip(local, lay.counted) if counted)
    flags = torch.stack([found.reshape(()), torch.full((), float(has), dtype=torch.float64, device=lay.device)])
    masked = _masked(partials, lay, kind)
    if kind == _abi.NORM_L0:
        total64, flags = _l0_count(masked, lay, flags)
    else:
        s, flags = _all_reduce(_reference.combine_all(masked, p).reshape(1), flags, kind, lay.group)
        total64 = _reference.root(s[0], p)
        if inv_scale is not None:
            total64 = total64 * inv_scale.reshape(()).to(lay.device, torch.float64)
    total64 = torch.where(flags[1], total64, 0.0)  # no entry on any rank: torch's 0 (not -inf's identity)
    acc = _reference.result_dtype(dtypes)
    total, found_inf = total64.to(acc), flags[0].to(acc)
    if isinstance(max_norm, torch.Tensor):
        max_norm = max_norm.detach().reshape(()).to(lay.device)
    coef64 = _reference.wide_clip_coefficient(total, max_norm, total64)
    scale = _reference.scale_factor(coef64, found_inf, policy, inv_scale).to(acc)
    result = torch.stack([total, found_inf, coef64.to(acc), scale])
    if error_if_nonfinite:
        _engine.raise_if_nonfinite(total, p)  # the same total on every rank: every rank raises
    if apply and at is not None:
        _engine.apply_scale(at, scale, policy=policy)
    empty = torch.zeros(0, dtype=acc, device=lay.device)
    return DistributedClipResult(
        result=result,
        tensor_norms=r.tensor_norms if r is not None else empty,
        tensor_partials=partials,
        tensor_max_abs=r.tensor_max_abs if r is not None else empty.float(),
        tensor_counts=r.tensor_counts if r is not None else torch.zeros((0, 2), dtype=torch.int64, device=lay.device),
        norm_dtype=_engine.torch_norm_dtype(dtypes) if dtypes else torch.float32,
        backend=r.backend if r is not None else "none",
        norm_type=float(p),
        layout=lay,
        inv_scale=inv_scale,
    )
