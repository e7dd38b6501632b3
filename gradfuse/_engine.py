"""The one way through: validated gradients -> route (fused backend or reference) -> plan -> kernels.

``clip`` is the single implementation behind every public norm/clip function, composed of two
steps that the distributed layer also uses on their own: ``measure`` (one read: norms, per-tensor
statistics, NaN/Inf check, coefficient) and ``apply_scale`` (the scale pass, skipped on the device
where the factor is 1). It never synchronises with the host, except to raise for
``error_if_nonfinite=True`` (one read of the total, before any gradient is touched); a new plan
(or, on the reference path, a new index of its dtype groups) is copied to the device once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _abi, _reference
from ._backends import choose, requested_backend
from ._plan import DTYPE_TAGS, PLANS, REQUIRES_GRAD, DevicePlan, build_plan, fingerprint, overlap_reason


@dataclass(frozen=True)
class ClipResult:
    """Everything one clip computed, all still on the device (nothing was synchronised).

    ``result``: ``[total, found_inf, coef, scale]`` (``gradfuse._abi``'s RESULT_* slots) in the
    accumulation dtype (fp32 unless fp64 grads), read through the properties below;
    ``tensor_norms``: the per-gradient norms, in the order of the gradients given;
    ``tensor_partials``: float64 per-gradient ``S_t`` before the root (sum of ``|x|^p``; max/min
    ``|x|`` for +-inf; the count of non-zeros for 0), without ``inv_scale``;
    ``tensor_max_abs``: float32 per-gradient max ``|x|`` (NaN where a gradient holds a NaN);
    ``tensor_counts``: int64 ``[T, 2]``, NaN and Inf elements per gradient (None from the torch
    reference unless ``stats=True`` was asked for: it costs an op per gradient there);
    ``tensor_scales``: float32 per-gradient factors of a layer-wise clip, else None;
    ``norm_dtype``: the dtype torch would return the total norm in; ``norm_type``: p.
    """

    result: torch.Tensor
    tensor_norms: torch.Tensor
    tensor_partials: torch.Tensor
    tensor_max_abs: torch.Tensor
    tensor_counts: torch.Tensor | None
    norm_dtype: torch.dtype
    backend: str
    norm_type: float = 2.0
    tensor_scales: torch.Tensor | None = None

    @property
    def total_norm(self) -> torch.Tensor:
        """The global norm (of the unscaled gradients when an ``inv_scale`` was given)."""
        return self.result[_abi.RESULT_TOTAL]

    @property
    def found_inf(self) -> torch.Tensor:
        """1.0 when a gradient holds a NaN or Inf (GradScaler's convention), else 0.0."""
        return self.result[_abi.RESULT_FOUND_INF]

    @property
    def clip_coef(self) -> torch.Tensor:
        """``min(1, max_norm / (total_norm + 1e-6))``."""
        return self.result[_abi.RESULT_COEF]

    @property
    def scale(self) -> torch.Tensor:
        """The factor applied to the gradients (or handed to an optimizer), after the policy."""
        return self.result[_abi.RESULT_SCALE]

    @property
    def torch_norm(self) -> torch.Tensor:
        """The total norm as ``torch.nn.utils.clip_grad_norm_`` returns it (torch's dtype)."""
        return self.total_norm.to(self.norm_dtype)


ClipResult.__module__ = "gradfuse"  # public as gradfuse.ClipResult (also for pickle)


def torch_norm_dtype(dtypes) -> torch.dtype:
    """torch stacks per-(device, dtype) norms, so its total has the promoted real dtype."""
    out = None
    for dtype in set(dtypes):
        real = _reference.accumulation_dtype(dtype) if dtype.is_complex else dtype
        out = real if out is None else torch.promote_types(out, real)
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
        if g.dtype not in DTYPE_TAGS:
            return f"gradient {i} has dtype {g.dtype}"
        if g.device != device:
            return "the gradients are on several devices"
        if g.requires_grad:
            return f"gradient {i} requires grad (create_graph)"
        if not _is_dense(g):
            return f"gradient {i} is a strided view with gaps or overlaps"
    return overlap_reason(grads)


def _fused_plan(backend, grads: list[torch.Tensor], dtypes: tuple[torch.dtype, ...], rows: tuple[int, ...] | None = None) -> DevicePlan | None:
    """The cached plan for ``grads`` (split in ``rows`` when given) on ``backend``, or None when
    they need the reference path."""
    try:
        key = fingerprint(grads, dtypes) if rows is None else (fingerprint(grads, dtypes), rows)
    except RuntimeError:  # sparse and other storage-less tensors have no data_ptr
        return None
    if rows is not None and not all(map(torch.Tensor.is_contiguous, grads)):
        return None  # dim-0 slices are consecutive spans only in contiguous tensors
    chunk = backend.chunk_size
    plan = PLANS.lookup(backend.name, chunk, key)
    if plan is not None:
        # The key holds the device, addresses, sizes and dtypes, which fix the spans (so no overlap
        # appears on a hit); what it cannot see is checked again: a subclass or a gradient that
        # requires grad at a cached address, and a new layout (whenever a gradient is not contiguous).
        if set(map(type, grads)) == {torch.Tensor} and not any(map(REQUIRES_GRAD, grads)):
            if all(map(torch.Tensor.is_contiguous, grads)) or fused_ineligible_reason(grads) is None:
                return plan
        return None
    if fused_ineligible_reason(grads) is not None:
        return None
    return PLANS.insert(backend.name, chunk, key, build_plan(grads, chunk, None if rows is None else list(rows)))


def _device_scalar(x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A float32 one-element tensor on ``device`` (kernels read it by address)."""
    if x is None:
        return None
    return x.detach().to(device=device, dtype=torch.float32).reshape(1).contiguous()


def _addr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def raise_if_nonfinite(total: torch.Tensor, p: float) -> None:
    if not bool(torch.isfinite(total)):  # the one documented host sync
        raise RuntimeError(
            f"The total norm of order {p} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )


@dataclass(frozen=True)
class Target:
    """Where a set of gradients is measured and scaled: a fused backend's plan, or the reference
    path. Its entries are the gradients, or with ``rows`` their dim-0 slices (unit-wise norms)."""

    grads: list[torch.Tensor]
    backend: object | None = None  # the fused backend, None for the reference
    plan: DevicePlan | None = None
    foreach: bool | None = None
    rows: tuple[int, ...] | None = None


def target(grads, dtypes, backend: str | None, foreach: bool | None = None, rows: tuple[int, ...] | None = None) -> Target:
    """The fused plan for ``grads`` if a fused backend can take them, else the reference path.
    ``rows[i]``: gradient i is one entry (1) or its ``shape[0]`` dim-0 slices, so that every result
    holds one value per entry (unit-wise norms, as adaptive gradient clipping needs)."""
    name = requested_backend(backend)
    fused = choose(name, grads[0].device) if name != "torch" else None
    plan = _fused_plan(fused, grads, dtypes, rows) if fused is not None else None
    return Target(grads, fused, plan, foreach, rows) if plan is not None else Target(grads, foreach=foreach, rows=rows)


def measure(
    at: Target,
    max_norm: float | torch.Tensor,
    p: float,
    *,
    policy: int = _abi.POLICY_PROPAGATE,
    inv_scale: torch.Tensor | None = None,
    per_tensor: bool = False,
    stats: bool = False,
    dtypes: tuple[torch.dtype, ...],
) -> ClipResult:
    """One read of the gradients: norms, statistics, NaN/Inf check, coefficient and scale (the
    kernel contract, ``gradfuse._abi``). ``per_tensor``: also each gradient's own clip factor
    (``tensor_scales``, layer-wise clipping). ``stats``: the reference path also counts NaN/Inf."""
    if at.plan is None:
        return _reference.measure(at.grads, max_norm, p, at.foreach, policy, inv_scale, per_tensor, stats, dtypes, at.rows)
    plan, device, t = at.plan, at.plan.device, at.plan.num_tensors
    max_norm_tensor = _device_scalar(max_norm, device) if isinstance(max_norm, torch.Tensor) else None
    inv_scale = _device_scalar(inv_scale, device)
    result = torch.empty(_abi.RESULT_SIZE, dtype=torch.float32, device=device)
    norms = torch.empty(t, dtype=torch.float32, device=device)
    max_abs = torch.empty(t, dtype=torch.float32, device=device)
    partials = torch.empty(t, dtype=torch.float64, device=device)
    counts = torch.empty((t, 2), dtype=torch.int64, device=device)
    scales = torch.empty(t, dtype=torch.float32, device=device) if per_tensor else None
    d = plan.desc
    d.norm_kind, d.p, d.policy = _abi.norm_kind(p), float(p), policy
    d.max_norm = 0.0 if max_norm_tensor is not None else float(max_norm)
    d.max_norm_ptr, d.inv_scale_ptr = _addr(max_norm_tensor), _addr(inv_scale)
    d.flags = _abi.FLAG_WRITE_TENSOR_SCALES if per_tensor else 0
    d.tensor_norms, d.tensor_partials, d.tensor_max_abs = norms.data_ptr(), partials.data_ptr(), max_abs.data_ptr()
    d.tensor_counts, d.tensor_scales, d.result = counts.data_ptr(), _addr(scales), result.data_ptr()
    at.backend.reduce(plan)
    # The outputs are this call's: no stale address stays in the cached descriptor.
    d.tensor_norms = d.tensor_partials = d.tensor_max_abs = d.tensor_counts = d.tensor_scales = d.result = 0
    return ClipResult(
        result=result,
        tensor_norms=norms,
        tensor_partials=partials,
        tensor_max_abs=max_abs,
        tensor_counts=counts,
        norm_dtype=torch_norm_dtype(dtypes),
        backend=at.backend.name,
        norm_type=float(p),
        tensor_scales=scales,
    )


def apply_scale(at: Target, scale: torch.Tensor, *, per_tensor: bool = False, policy: int = _abi.POLICY_PROPAGATE) -> None:
    """grads *= scale in place: one device scalar, or (``per_tensor``) one factor per gradient;
    gradients whose factor is exactly 1 are not touched (decided on the device); POLICY_ZERO
    writes zeros where the factor is 0."""
    if at.plan is None:
        _reference.scale_grads_(at.grads, scale, at.foreach, policy, per_tensor, at.rows)
        return
    plan = at.plan
    factor = scale.detach().to(plan.device, torch.float32).contiguous()
    d = plan.desc
    d.flags = _abi.FLAG_READ_TENSOR_SCALES if per_tensor else 0
    d.tensor_scales, d.scale_ptr = (factor.data_ptr(), 0) if per_tensor else (0, factor.data_ptr())
    d.zero_if_scale_is_zero = int(policy == _abi.POLICY_ZERO)
    at.backend.scale(plan)
    d.tensor_scales = d.scale_ptr = 0
    torch._C._increment_version(at.grads)  # an in-place write, seen by autograd as torch's own


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
    per_tensor: bool = False,
    stats: bool = False,
    dtypes: tuple[torch.dtype, ...] | None = None,
    rows: tuple[int, ...] | None = None,
) -> ClipResult:
    """Measure ``grads`` (non-empty, validated); scale them in place by the result's ``scale``
    (``tensor_scales`` when ``per_tensor``) when ``apply``. ``dtypes``: the gradients' dtypes when
    the caller has them already; ``rows``: as in :func:`target`."""
    dtypes = tuple(g.dtype for g in grads) if dtypes is None else dtypes
    at = target(grads, dtypes, backend, foreach, rows)
    r = measure(at, max_norm, p, policy=policy, inv_scale=inv_scale, per_tensor=per_tensor, stats=stats, dtypes=dtypes)
    if error_if_nonfinite:
        raise_if_nonfinite(r.total_norm, p)
    if apply:
        apply_scale(at, r.tensor_scales if per_tensor else r.scale, per_tensor=per_tensor, policy=policy)
    return r


def scale_(
    grads: list[torch.Tensor],
    scale: torch.Tensor,
    *,
    backend: str | None = None,
    foreach: bool | None = None,
    per_tensor: bool = False,
    zero_if_scale_is_zero: bool = False,
    rows: tuple[int, ...] | None = None,
) -> None:
    """grads *= scale (a device scalar, or one factor per entry), skipped on the device where 1."""
    at = target(grads, tuple(g.dtype for g in grads), backend, foreach, rows)
    apply_scale(at, scale, per_tensor=per_tensor, policy=_abi.POLICY_ZERO if zero_if_scale_is_zero else _abi.POLICY_PROPAGATE)
