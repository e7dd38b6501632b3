"""The correctness guard: one call of every benchmarked implementation is checked against fp64.

Before the call: the exact (fp64) norm of the gradient set and a strided sample of every gradient.
After it: the returned norm against the fp64 norm, and the sampled gradients (or, for the fused
optimizer, the first Adam moment, which holds ``(1 - beta1) * clipped grad`` after one step from a
fresh state) against ``original * coef``, ``coef = min(1, max_norm / (norm + 1e-6))`` in fp64.

Tolerances: the norm within ``max(1e-5, eps(dtype of the returned norm))`` relative (1e-5 for fp32,
one ulp for a bf16/fp16 result); each value within ``k * eps(dtype) + 1e-5`` relative, ``k`` the
roundings it went through, plus the dtype's smallest subnormal absolute.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .workloads import fp64_norm

SAMPLE_PER_TENSOR = 1 << 13  # values of each gradient kept for the check (strided: every chunk is hit)
CLIP_EPS = 1e-6  # torch's: coef = max_norm / (total + 1e-6)
COEF_RTOL = 1e-5  # relative error allowed in the coefficient (an fp32-accumulated norm)


@dataclass
class Snapshot:
    """The fp64 norm of a gradient set, and its sampled values (fp64, concatenated per dtype)."""

    total: float
    strides: list[int]
    originals: dict[torch.dtype, torch.Tensor]


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1)


def _samples(tensors: list[torch.Tensor], strides: list[int]) -> dict[torch.dtype, torch.Tensor]:
    """Every ``stride``-th value of each tensor, concatenated per dtype, in fp64."""
    parts: dict[torch.dtype, list[torch.Tensor]] = {}
    for t, stride in zip(tensors, strides):
        parts.setdefault(t.dtype, []).append(_flat(t)[::stride])
    return {dtype: torch.cat(p).double() for dtype, p in parts.items()}


def take_snapshot(grads: list[torch.Tensor]) -> Snapshot:
    strides = [max(1, math.ceil(g.numel() / SAMPLE_PER_TENSOR)) for g in grads]
    return Snapshot(fp64_norm(grads), strides, _samples(grads, strides))


def expected_coef(max_norm: float | None, total: float) -> float:
    """The clip coefficient in fp64 (1 when nothing clips)."""
    if max_norm is None:
        return 1.0
    return min(1.0, max_norm / (total + CLIP_EPS))


def norm_tolerance(dtype: torch.dtype) -> float:
    return max(1e-5, torch.finfo(dtype).eps)


def _value_tolerance(dtype: torch.dtype, roundings: int) -> tuple[float, float]:
    info = torch.finfo(dtype)
    return roundings * info.eps + COEF_RTOL, info.tiny * info.eps


@dataclass
class Check:
    """What the guard found; ``problems`` is empty when the call was right."""

    norm_rel_err: float | None = None
    norm_tol: float | None = None
    values_max_rel_err: float | None = None
    values_checked: str | None = None  # "grads" or "adam exp_avg"
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {**asdict(self), "problems": list(self.problems), "ok": self.ok}


def _compare(actual: dict[torch.dtype, torch.Tensor], snap: Snapshot, factor: float, roundings: int) -> tuple[float, int]:
    """Max relative error of ``actual`` vs ``snapshot * factor``, and how many values broke tolerance."""
    worst, bad = 0.0, 0
    for dtype, orig in snap.originals.items():
        rtol, atol = _value_tolerance(dtype, roundings)
        want = orig * factor
        err = (actual[dtype] - want).abs()
        bad += int((~(err <= rtol * want.abs() + atol)).sum())  # NaN counts as bad
        if err.numel():
            worst = max(worst, float((err / (want.abs() + atol)).max()))
    return worst, bad


def check_call(
    snap: Snapshot,
    norm: torch.Tensor | None,
    max_norm: float | None,
    grads: list[torch.Tensor],
    adam_exp_avgs: list[torch.Tensor] | None = None,
    adam_beta1: float = 0.9,
) -> Check:
    """Check one call's returned norm and the values it left behind (see the module docstring).

    ``adam_exp_avgs``: for the fused optimizer, the first moments after one step from zero state
    (the gradients themselves may or may not have been scaled in place, both are allowed).
    """
    check = Check()
    problems = []
    coef = expected_coef(max_norm, snap.total)
    if norm is not None:
        value = float(norm.detach().double())
        check.norm_tol = norm_tolerance(norm.dtype)
        check.norm_rel_err = abs(value - snap.total) / snap.total if snap.total else abs(value)
        if not check.norm_rel_err <= check.norm_tol:
            problems.append(
                f"total norm {value:.9g} vs fp64 {snap.total:.9g}: rel err {check.norm_rel_err:.2e} > {check.norm_tol:.1e}"
            )
    if adam_exp_avgs is not None:
        check.values_checked = "adam exp_avg"
        worst, bad = _compare(_samples(adam_exp_avgs, snap.strides), snap, (1.0 - adam_beta1) * coef, roundings=2)
    else:
        check.values_checked = "grads"
        worst, bad = _compare(_samples(grads, snap.strides), snap, coef, roundings=1)
    check.values_max_rel_err = worst
    if bad:
        what = "first Adam moments (the gradients the optimizer used)" if adam_exp_avgs is not None else "gradients"
        problems.append(f"{bad} sampled {what} differ from original * coef (coef {coef:.9g}); max rel err {worst:.2e}")
    check.problems = tuple(problems)
    return check


def grads_changed(snap: Snapshot, grads: list[torch.Tensor]) -> bool:
    """Whether the call scaled the gradients in place (compared on the sample)."""
    current = _samples(grads, snap.strides)
    return any(not torch.equal(current[dtype], orig) for dtype, orig in snap.originals.items())
