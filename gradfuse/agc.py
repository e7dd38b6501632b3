"""Adaptive gradient clipping (AGC, Brock et al. 2021, arXiv:2102.06171), unit-wise and fused.

timm's ``adaptive_clip_grad``, per *unit* (each dim-0 slice, an output row, of a parameter with
more than one dimension; the whole tensor otherwise)::

    max_u = clip_factor * max(||W_u||, eps)
    g_u   = g_u                                 where ||g_u|| < max_u
            g_u * max_u / max(||g_u||, 1e-6)    otherwise

timm runs several kernels per parameter. Here one read of every weight and every gradient (one
plan whose entries are their rows, ``gradfuse._engine.target(rows=...)``) gives all unit norms, the
factors are a few device ops over all units at once, and one scale pass rewrites only the rows whose
factor is not 1: rows that need no clipping stay bitwise as they were. No host sync.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch

from . import _abi, _reference, _validation as v, ops
from ._engine import ClipResult, torch_norm_dtype
from ._layout import refuse_dtensors
from ._tracking import named_parameters
from ._plan import device_constant
from ._reference import combine_all, root
from .layerwise import combine


def _check_real(value, name: str, fn: str, *, positive: bool) -> float:
    return v.real_setting(fn, name, value, low=0.0, low_open=positive)


def check_exclude(exclude, fn: str) -> tuple[str, ...]:
    patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    if not all(isinstance(x, str) for x in patterns):
        raise TypeError(f"{fn}: exclude must be a name pattern or a sequence of them (fnmatch, e.g. 'head.*'), got {exclude!r}")
    return patterns


@dataclass(frozen=True)
class AGC:
    """Adaptive gradient clipping settings for :class:`gradfuse.Clipper` (``agc=AGC(...)``), as in
    :func:`adaptive_clip_grad_`: ``clip_factor``, ``eps`` and ``exclude`` (name patterns)."""

    clip_factor: float = 0.01
    eps: float = 1e-3
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        owner = "AGC"
        object.__setattr__(self, "clip_factor", _check_real(self.clip_factor, "clip_factor", owner, positive=True))
        object.__setattr__(self, "eps", _check_real(self.eps, "eps", owner, positive=False))
        object.__setattr__(self, "exclude", check_exclude(self.exclude, owner))


def units(t: torch.Tensor) -> int:
    """The number of AGC units of a parameter: its rows when it has more than one dimension."""
    return t.shape[0] if t.dim() > 1 else 1


@dataclass(frozen=True)
class Units:
    """The parameters with a gradient, which of them AGC clips (not excluded) and their entries:
    a clipped parameter's weight and gradient are split in units, an excluded one's gradient is one
    entry (measured for the total norm and the NaN/Inf check, factor 1)."""

    params: list[torch.Tensor]
    clipped: tuple[bool, ...]
    grad_rows: tuple[int, ...]  # entries of each gradient

    @property
    def weight_rows(self) -> tuple[int, ...]:
        return tuple(r for r, c in zip(self.grad_rows, self.clipped) if c)


@torch.compiler.assume_constant_result  # evaluated when traced, not traced (fnmatch is not traceable)
def _kept(names: tuple[str, ...], exclude: tuple[str, ...]) -> tuple[bool, ...]:
    return tuple(not any(fnmatch.fnmatchcase(name, pat) for pat in exclude) for name in names)


def select(named: list[tuple[str, torch.Tensor]], exclude: tuple[str, ...]) -> Units:
    with_grad = [(name, p) for name, p in named if p.grad is not None]
    clipped = _kept(tuple(name for name, _ in with_grad), exclude) if exclude else (True,) * len(with_grad)
    rows = tuple(units(p) if c else 1 for (_, p), c in zip(with_grad, clipped))
    return Units([p for _, p in with_grad], clipped, rows)


def _layout(grad_rows: tuple[int, ...], clipped: tuple[bool, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the gradient of each entry, the entries of the clipped units), as device indices built once."""

    def make():
        owner = [i for i, r in enumerate(grad_rows) for _ in range(r)]  # on the host: no data-dependent shapes to trace
        units_at = [k for k, i in enumerate(owner) if clipped[i]]
        return torch.tensor(owner, dtype=torch.int64, device=device), torch.tensor(units_at, dtype=torch.int64, device=device)

    return device_constant(("agc", grad_rows, clipped, torch.device(device)), make)


def per_gradient(r: ClipResult, grad_rows: tuple[int, ...], inv_scale: torch.Tensor | None = None) -> ClipResult:
    """A unit-wise result folded to one entry per gradient (what per-layer statistics expect):
    partials and NaN/Inf counts summed (max/min for +-inf), max |x| maximal, factors minimal;
    norms of the unscaled gradients (``inv_scale``: AMP's, the partials stay before it)."""
    owner = _layout(grad_rows, (True,) * len(grad_rows), r.tensor_partials.device)[0]
    n, p = len(grad_rows), r.norm_type
    partials = combine(r.tensor_partials, owner, n, p)
    norms = root(partials, p)
    if inv_scale is not None and p != 0.0:
        norms = norms * inv_scale.reshape(()).to(norms.device, norms.dtype)
    norms = norms.to(r.tensor_norms.dtype)
    max_abs = r.tensor_max_abs.new_zeros(n).scatter_reduce_(0, owner, r.tensor_max_abs, "amax", include_self=False)
    counts = None if r.tensor_counts is None else r.tensor_counts.new_zeros(n, 2).index_add_(0, owner, r.tensor_counts)
    scales = None if r.tensor_scales is None else r.tensor_scales.new_ones(n).scatter_reduce_(0, owner, r.tensor_scales, "amin", include_self=False)
    return ClipResult(r.result, norms, partials, max_abs, counts, r.norm_dtype, r.backend, p, scales)


def clip_units(
    u: Units, clip_factor: float, eps: float, p: float, policy: int, *, error: bool = False, inv_scale=None, foreach=None, backend=None
) -> ClipResult:
    """AGC of ``u`` in place; the result's entries are the gradients' entries (see
    :func:`adaptive_clip_grad_`). ``inv_scale`` (AMP): the gradients are unscaled in the same pass
    (unit norms and bounds are those of the unscaled gradients)."""
    weights = [w.detach() for w, c in zip(u.params, u.clipped) if c]  # the fused path refuses tensors that require grad
    grads = [w.grad for w in u.params]
    k = sum(u.weight_rows)
    # One read of weights and gradients: entries [0, k) are the clipped weights' units, then the gradients'.
    both = ops.clip(weights + grads, 0.0, p, apply=False, backend=backend, foreach=foreach, rows=u.weight_rows + u.grad_rows)
    w_norm, g_part, g_max_abs = root(both.tensor_partials[:k], p), both.tensor_partials[k:], both.tensor_max_abs[k:]
    g_norm = root(g_part, p)
    total = root(combine_all(g_part, p), p)
    if inv_scale is not None and p != 0.0:
        inv = inv_scale.reshape(()).to(g_norm.device, g_norm.dtype)
        g_norm, total = g_norm * inv, total * inv
    found_inf = (~torch.isfinite(g_max_abs)).any().to(torch.float32)
    if error:
        _raise_if(found_inf)
    _, units_at = _layout(u.grad_rows, u.clipped, g_norm.device)
    g_units = g_norm.index_select(0, units_at)
    bound = clip_factor * torch.clamp(w_norm, min=eps)
    coef = torch.ones_like(g_norm).index_copy_(0, units_at, torch.where(g_units < bound, 1.0, bound / torch.clamp(g_units, min=_abi.CLIP_EPS)))
    scales = _reference.scale_factor(coef, found_inf, policy, inv_scale).to(torch.float32)  # rounded once
    ops.scale_(grads, scales, backend=backend, foreach=foreach, per_tensor=True, zero_if_scale_is_zero=policy == _abi.POLICY_ZERO, rows=u.grad_rows)
    acc = both.result.dtype
    step_scale = _reference.scale_factor(torch.ones((), dtype=acc, device=total.device), found_inf, policy, inv_scale).to(acc)
    result = torch.stack([total.to(acc), found_inf.to(acc), coef.min().to(torch.float32).to(acc), step_scale])
    counts = None if both.tensor_counts is None else both.tensor_counts[k:]
    return ClipResult(result, g_norm.to(acc), g_part, g_max_abs, counts, torch_norm_dtype(g.dtype for g in grads), both.backend, p, scales)


def _raise_if(found_inf: torch.Tensor) -> None:
    message = "adaptive_clip_grad_: a gradient holds a NaN or Inf (nonfinite='error'); no gradient was changed"
    if torch.compiler.is_compiling():
        torch._assert_async(found_inf == 0, message)
    elif bool(found_inf):  # the one documented host sync, before any gradient is touched
        raise RuntimeError(message)


@torch.no_grad()
def adaptive_clip_grad_(
    parameters,
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    norm_type: float = 2.0,
    *,
    exclude=(),
    nonfinite: str = "propagate",
    foreach: bool | None = None,
    backend: str | None = None,
) -> ClipResult | None:
    r"""Adaptive gradient clipping, unit-wise, in place (timm's ``adaptive_clip_grad`` semantics).

    For each unit u (a dim-0 slice of a parameter with more than one dimension, else the whole
    parameter): ``max_u = clip_factor * max(||W_u||_p, eps)``; where ``||g_u||_p >= max_u`` the
    gradient unit is scaled by ``max_u / max(||g_u||_p, 1e-6)``, elsewhere left bitwise untouched.

    ``parameters``: a module, ``named_parameters()``, a tensor or an iterable of tensors;
    ``exclude``: name patterns (fnmatch) of parameters left alone, usually the classifier head
    (``exclude="head.*"``; plain parameters are named ``param<i>``). ``nonfinite``: as in
    :func:`gradfuse.clip_grads`, on the gradients (the check is global). One read of every weight
    and gradient, one scale pass over the rows that need it, no host sync (except "error").

    Returns a :class:`~gradfuse.ClipResult` whose entries are the gradients' units, in parameter
    order (an excluded gradient is one entry, factor 1): ``tensor_norms`` (before clipping) and
    ``tensor_scales`` (the factors applied); ``total_norm`` and ``found_inf`` are those of all the
    gradients, ``clip_coef`` the smallest coefficient. None when no parameter is clipped.
    """
    fn = "adaptive_clip_grad_"
    named = named_parameters(parameters, fn)
    clip_factor = _check_real(clip_factor, "clip_factor", fn, positive=True)
    eps = _check_real(eps, "eps", fn, positive=False)
    p = v.check_norm_type(norm_type, fn)
    nonfinite = v.check_nonfinite(nonfinite, fn)
    u = select(named, check_exclude(exclude, fn))
    refuse_dtensors(u.params, fn)
    if not any(u.clipped):
        return None
    v.check_grads(v.grads_of(u.params, fn), p, foreach, fn)
    return clip_units(u, clip_factor, eps, p, v.policy_of(nonfinite), error=nonfinite == "error", foreach=foreach, backend=backend)
