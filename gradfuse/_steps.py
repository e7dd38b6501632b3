"""The steps every clip for an optimizer is composed of, as torch's ``clip_grad_norm_`` is of
``_get_total_norm`` and ``_clip_grads_with_norm_``:

1. :func:`measure`: one read of the gradients (norms, NaN/Inf check, coefficient, factor), and the
   scale pass in the same call unless the factor is handed to the optimizer;
2. :func:`clip_for_next_step`: the non-finite policy, and the hand-off of the factor to a fused
   optimizer's next step (``gradfuse._handoff``);
3. :func:`gated_step`: the step, skipped after one host read where only the host can skip it.

:func:`clip_for_optimizer` runs 1 and 2 for an optimizer (and an enabled GradScaler, whose state
``gradfuse._amp`` reads and writes); the public functions of ``gradfuse.training`` call it.
:class:`gradfuse.Clipper` composes all three with its own decisions (thresholds, spike rule).
"""

from __future__ import annotations

import dataclasses

import torch

from . import _abi, _amp, _handoff, _validation as v, ops
from ._engine import ClipResult
from ._handoff import handoff_unsupported_reason
from .clip import clip_grads


def params_of(optimizer, fn: str) -> list[torch.Tensor]:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{fn}: optimizer must be a torch.optim.Optimizer, not {type(optimizer).__name__}")
    return [p for group in optimizer.param_groups for p in group["params"]]


def measured_policy(nonfinite: str, handoff: bool) -> str:
    """The policy the read applies: with ``handoff`` "zero" is measured as "skip" (a fused optimizer
    cannot zero by division, NaN / x stays NaN), and :func:`clip_for_next_step` zeroes."""
    return "skip" if handoff and nonfinite == "zero" else nonfinite


def measure(params, max_norm, norm_type: float, nonfinite: str, *, handoff: bool, inv_scale=None, foreach=None, backend=None,
            group=None, exclude_from_norm=None) -> ClipResult | None:  # fmt: skip
    """One read of the gradients: norms, NaN/Inf check, coefficient and the factor
    ``scale = min(1, max_norm / (total + 1e-6)) * inv_scale``. Without ``handoff`` the gradients are
    scaled in the same call, with the policy applied by the kernels. With ``handoff`` nothing is
    written, and the factor stays 1 on a bad step (:func:`measured_policy`). ``group``,
    ``exclude_from_norm``: sharded or pipelined gradients (``gradfuse.clip_grad_norm_``)."""
    policy = measured_policy(nonfinite, handoff)
    return clip_grads(
        params, max_norm, norm_type, nonfinite=policy, inv_scale=inv_scale, apply=not handoff, foreach=foreach,
        backend=backend, group=group, exclude_from_norm=exclude_from_norm,
    )  # fmt: skip


def clip_for_next_step(
    optimizer, params, r: ClipResult, nonfinite: str, *, under_scaler: bool, skip=None, foreach=None, backend=None, fn: str
) -> ClipResult:
    """Give ``r`` (from :func:`measure` with ``handoff``) to the optimizer's next step, under the
    ``nonfinite`` policy: the step divides by ``1 / r.scale``; "skip" also hands it ``found_inf``
    (under a GradScaler, ``scaler.step`` does); "zero" zeroes the gradients where ``found_inf`` is
    set. ``skip``: a device flag the step skips on instead of that ``found_inf`` (the caller's
    decision: found_inf or a spike; ignored under a GradScaler, whose found_inf the caller sets).
    Returns the result as the step sees it ("zero": a scale of 0 on a bad step)."""
    seen = r
    if nonfinite == "zero":
        _zero_if_found_(v.grads_of(params, fn), r.found_inf, foreach, backend)
        keep = torch.ones_like(r.result)
        keep[_abi.RESULT_SCALE] = 1 - r.found_inf
        seen = dataclasses.replace(r, result=r.result * keep)
    # The factor is 1 on a bad step under "skip"/"zero"; under "propagate" it may be inf or NaN, which
    # the step takes as torch's would, or, under a GradScaler, never reads: GradScaler.step hands
    # found_inf to the optimizer, whose fused kernel then returns at once.
    found_inf = r.found_inf if nonfinite == "skip" and not under_scaler else None
    if skip is not None and not under_scaler:
        found_inf = skip
    _handoff.hand_over(optimizer, r.scale, found_inf, under_scaler=under_scaler)
    return seen


def _zero_if_found_(grads: list[torch.Tensor], found_inf: torch.Tensor, foreach, backend) -> None:
    """grads = 0 when found_inf, untouched otherwise (the fused scale pass returns at once on a
    scale of 1, so a finite step costs one launch and no memory traffic)."""
    keep = (1.0 - found_inf.detach().to(torch.float32)).reshape(())
    ops.scale_(grads, keep, backend=backend, foreach=foreach, zero_if_scale_is_zero=True)


def gated_step(optimizer, found_inf: torch.Tensor | None, *args, **kwargs):
    """``optimizer.step(*args, **kwargs)``, skipped when ``found_inf`` is set: one host read, as
    ``GradScaler.step`` does for an optimizer that cannot skip on the device (None: just step)."""
    if found_inf is not None and bool(found_inf):  # the documented host sync
        return None
    return optimizer.step(*args, **kwargs)


def clip_for_optimizer(
    optimizer, max_norm, norm_type, nonfinite, scaler, handoff, foreach, backend, fn, *, group=None, exclude_from_norm=None
) -> ClipResult | None:
    """The steps in order, for ``optimizer`` and an enabled ``scaler`` or None; returns the result.
    "skip" needs an optimizer that skips on the device (or a scaler): ValueError otherwise."""
    params = params_of(optimizer, fn)
    nonfinite = v.check_nonfinite(nonfinite, fn)
    inv_scale = _amp.begin_unscale(scaler, optimizer, params, fn, group) if scaler is not None else None
    handoff = _handoff.use_handoff(optimizer, handoff, fn)
    if not handoff and nonfinite == "skip" and scaler is None:
        raise ValueError(
            f"{fn}: nonfinite='skip' needs an optimizer that can skip its step on the device "
            f"({handoff_unsupported_reason(optimizer) or 'handoff=False was passed'}); use a fused "
            "optimizer, a GradScaler, gradfuse.Clipper (whose step() then reads found_inf once), or "
            "gradfuse.clip_grads(nonfinite='skip') for the gradient-level policy"
        )
    if handoff:
        _handoff.check_no_foreign_scale(optimizer, fn)
    r = measure(params, max_norm, norm_type, nonfinite, handoff=handoff, inv_scale=inv_scale, foreach=foreach, backend=backend,
                group=group, exclude_from_norm=exclude_from_norm)  # fmt: skip
    _handoff.drop(optimizer)  # after every check: a call that raises leaves an earlier hand-off as it was
    if r is not None and handoff:
        r = clip_for_next_step(optimizer, params, r, nonfinite, under_scaler=scaler is not None, foreach=foreach, backend=backend, fn=fn)
    if scaler is not None:
        _amp.mark_unscaled(scaler, optimizer, None if r is None else r.found_inf)
    return r
