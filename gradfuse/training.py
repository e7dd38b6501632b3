"""Training integration: clip for one read of the gradients, AMP in one pass, no host syncs.

Three entry points, all on the one read that :func:`gradfuse.clip_grads` makes (norm, NaN/Inf
check, coefficient and optional unscale, results left on the device):

* :func:`clip_grad_norm_for_optimizer_` clips the gradients of an optimizer's parameters. For torch's
  fused optimizers (``Adam``/``AdamW``/``SGD``/``Adagrad`` with ``fused=True``, whose ``step()`` reads
  ``self.grad_scale`` and ``self.found_inf`` and divides every gradient by ``grad_scale`` inside its
  fused kernel) it does not scale the gradients at all: it hands the divisor ``1 / scale`` to the
  optimizer, so the clip reads the gradients once and there is no scale pass (torch's fused kernel
  stores the divided gradients back as it steps, so ``p.grad`` ends up clipped, as with torch).
  Every other optimizer gets the scale pass.
* :func:`unscale_and_clip_` replaces ``scaler.unscale_(opt)`` + ``clip_grad_norm_`` under a
  ``torch.amp.GradScaler``: unscale, NaN/Inf check, norm of the unscaled gradients and clip in one
  read (plus one scale pass, or none with a fused optimizer), leaving the scaler in the state
  ``unscale_`` leaves it in, so ``scaler.step(opt)`` skips on overflow and ``scaler.update()``
  backs the scale off exactly as torch does.
* :class:`gradfuse.Clipper` (``gradfuse.clipper``) is the stateful one: thresholds, spike and
  non-finite skipping, counters, statistics and rollback around the same steps.

Each runs the same steps (``gradfuse._steps``): measure (one read), apply the non-finite policy,
hand the factor over to a fused optimizer (``gradfuse._handoff``) or scale; GradScaler's state is
read and written by ``gradfuse._amp``.

Host syncs: none on the default paths (``nonfinite="propagate"``, ``"skip"`` or ``"zero"``).
``nonfinite="error"`` reads the total norm once, before any gradient is touched (under
``torch.compile`` it becomes a device-side assert instead).
"""

from __future__ import annotations

import torch

from . import _amp
from ._engine import ClipResult
from ._handoff import handoff_unsupported_reason
from ._steps import clip_for_optimizer
from .monitor import NonFiniteCounter

__all__ = [
    "NonFiniteCounter",
    "clip_grad_norm_for_optimizer_",
    "handoff_unsupported_reason",
    "unscale_and_clip_",
]


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def clip_grad_norm_for_optimizer_(
    optimizer: torch.optim.Optimizer,
    max_norm: float | torch.Tensor,
    norm_type: float = 2.0,
    *,
    nonfinite: str = "propagate",
    scaler: torch.amp.GradScaler | None = None,
    handoff: bool | None = None,
    foreach: bool | None = None,
    backend: str | None = None,
    group=None,
    exclude_from_norm=None,
) -> ClipResult | None:
    r"""Clip the gradients of ``optimizer``'s parameters for its next ``step()``, in one read.

    The optimizer's next step sees the gradients scaled by
    ``min(1, max_norm / (total_norm + 1e-6))``, as after ``torch.nn.utils.clip_grad_norm_``.

    ``handoff``: None (default) hands the scale to the optimizer when it can apply it (torch's fused
    Adam/AdamW/SGD/Adagrad, see :func:`handoff_unsupported_reason`): the clip reads the gradients
    once and writes nothing; ``optimizer.grad_scale = 1 / scale`` is divided out inside the fused
    kernel of the next step, and only that step (set and removed by step hooks). torch's fused
    kernels store the divided gradients back, so after the step ``p.grad`` holds the clipped
    gradients, as after torch's clip. Other optimizers get the scale pass (gradients scaled in
    place, only when the coefficient is below 1). True: require the hand-off (ValueError if
    impossible); False: always the scale pass.

    ``nonfinite`` (a NaN/Inf in the gradients):
      * "propagate": torch's behaviour (the NaN/Inf reaches the step);
      * "skip": the step is skipped on the device and the gradients are left untouched (a fused
        optimizer gets ``found_inf``, rolls back its step count, and leaves params and state alone).
        Needs an optimizer that can skip on the device: ValueError otherwise (use
        :class:`gradfuse.Clipper`, whose step then reads found_inf once, or a GradScaler);
      * "zero": the gradients are zeroed and the step taken (an early-exit launch on finite steps);
      * "error": RuntimeError after one host sync, before any gradient or the optimizer is touched.

    ``scaler``: with an enabled ``torch.amp.GradScaler`` this is :func:`unscale_and_clip_`.
    ``max_norm`` may be a device tensor. No host sync except for "error". Returns the
    :class:`~gradfuse.ClipResult` (``scale``: the factor the step applies), or None without grads.
    ``group``, ``exclude_from_norm``: sharded or pipelined gradients, as in
    :func:`gradfuse.clip_grad_norm_` (found_inf, and so every policy, agrees across the group).
    """
    fn = "clip_grad_norm_for_optimizer_"
    if _amp.enabled(scaler):
        _amp.check_scaler(scaler, fn)
    else:
        scaler = None
    return clip_for_optimizer(
        optimizer, max_norm, norm_type, nonfinite, scaler, handoff, foreach, backend, fn, group=group,
        exclude_from_norm=exclude_from_norm,
    )  # fmt: skip


@torch.no_grad()
def unscale_and_clip_(
    scaler: torch.amp.GradScaler,
    optimizer: torch.optim.Optimizer,
    max_norm: float | torch.Tensor,
    norm_type: float = 2.0,
    *,
    nonfinite: str = "propagate",
    handoff: bool | None = None,
    foreach: bool | None = None,
    backend: str | None = None,
    group=None,
    exclude_from_norm=None,
) -> ClipResult | None:
    r"""``scaler.unscale_(optimizer)`` + ``clip_grad_norm_(params, max_norm)`` in one read.

    With ``inv_scale = 1 / scaler`` (fp64 reciprocal, as torch), one pass computes the NaN/Inf check
    and the norm of the *unscaled* gradients; the combined factor ``min(1, max_norm / (total +
    1e-6)) * inv_scale`` is then applied once (scale pass), or handed to a fused optimizer as
    ``optimizer.grad_scale = 1 / factor`` (``handoff``, as in :func:`clip_grad_norm_for_optimizer_`).
    The scaler is left exactly as after ``unscale_``: ``found_inf_per_device`` holds the check and
    the stage is UNSCALED, so ``scaler.step(optimizer)`` skips the step on overflow (fused
    optimizers on the device; others after GradScaler's own ``.item()``) and ``scaler.update()``
    backs the scale off. Raises as ``unscale_`` does when called twice, after ``step``, or on fp16
    gradients. A disabled scaler makes this :func:`clip_grad_norm_for_optimizer_`.

    ``nonfinite`` only changes what happens to the gradients on an overflow step, which GradScaler
    skips in every case: "propagate" (torch's: a pass writing 0/NaN), "skip" (left untouched, still
    scaled: saves that pass), "zero" (zeroed), "error" (one host sync, raise). The returned
    :class:`~gradfuse.ClipResult` holds the norms of the unscaled gradients. No host sync except
    for "error".

    Sharded gradients (DTensors, or ``group=``, ``exclude_from_norm=`` as in
    :func:`gradfuse.clip_grad_norm_`): found_inf is agreed across the group in the clip's one
    collective, so every rank skips or steps together. torch's ``ShardedGradScaler`` is taken (its
    fp16 gradients too); the clip's group must contain its ``process_group``.
    """
    fn = "unscale_and_clip_"
    _amp.check_scaler(scaler, fn)
    scaler = scaler if _amp.enabled(scaler) else None
    return clip_for_optimizer(
        optimizer, max_norm, norm_type, nonfinite, scaler, handoff, foreach, backend, fn, group=group,
        exclude_from_norm=exclude_from_norm,
    )  # fmt: skip
