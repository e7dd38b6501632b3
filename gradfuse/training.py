"""Training integration: clip for one read of the gradients, AMP in one pass, no host syncs.

Three entry points, all built on :func:`gradfuse.clip_grads` (norm, NaN/Inf check, coefficient and
optional unscale in one read, results left on the device):

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
* :class:`OptimizerClipper` wraps either for one optimizer and counts steps, non-finite steps and clipped
  steps in a :class:`NonFiniteCounter`, on the device.

Host syncs: none on the default paths (``nonfinite="propagate"``, ``"skip"`` or ``"zero"``).
``nonfinite="error"`` reads the total norm once, before any gradient is touched (under
``torch.compile`` it becomes a device-side assert instead). ``OptimizerClipper.step`` with
``nonfinite="skip"`` on an optimizer that cannot skip on the device (not fused, no GradScaler) reads
``found_inf`` once to decide whether to step, as ``GradScaler.step`` does for such optimizers.

How the hand-off to a fused optimizer is kept to exactly one step: the clip call records the divisor
(and, for "skip" without a GradScaler, ``found_inf``) for the optimizer's next step; global optimizer
step hooks (registered when this module is imported) set ``optimizer.grad_scale``/``found_inf``
right before that step and delete them right after, so a step not preceded by a clip never reuses
a stale scale, and nothing is written to the optimizer inside a compiled region. Under a
GradScaler, ``scaler.step`` deletes them itself. A step that would combine the clip scale with a
``grad_scale`` set by someone else (``GradScaler.step`` without ``unscale_``) raises instead.
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref

import torch
import torch.optim.optimizer as _optimizer_module
from torch.amp.grad_scaler import OptState

from . import _abi, _engine, _layout, _validation as v, ops
from ._backends import requested_backend
from ._engine import ClipResult
from .clip import clip_grads

__all__ = [
    "OptimizerClipper",
    "NonFiniteCounter",
    "clip_grad_norm_for_optimizer_",
    "handoff_unsupported_reason",
    "unscale_and_clip_",
]

# torch's optimizers whose fused step divides by ``self.grad_scale`` and skips on ``self.found_inf``.
_HANDOFF_BASES = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD, torch.optim.Adagrad)

# What the last clip handed to an optimizer for its next step, keyed by id(optimizer):
# (weakref to the optimizer, grad_scale, found_inf or None, under_scaler). A module-level table and
# not attributes of the optimizer: torch.compile drops attribute writes on Optimizer objects
# silently (torch 2.13), while writes to a global dict are replayed. The step pre-hook moves the
# entry onto the optimizer right before its step, the post-hook removes it right after.
_PENDING: dict[int, tuple] = {}


# --------------------------------------------------------------------------------------------------
# Which optimizers can take the scale
# --------------------------------------------------------------------------------------------------


def handoff_unsupported_reason(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer`` cannot apply the clip scale itself, or None when it can.

    It can when it is one of torch's ``Adam``, ``AdamW``, ``SGD`` or ``Adagrad``, created with
    ``fused=True`` (``_step_supports_amp_scaling``), every param group is fused, and its class does
    not override ``step`` (an override might not read ``grad_scale``; gradfuse never guesses).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        return f"{type(optimizer).__name__} is not a torch.optim.Optimizer"
    base = next((b for b in _HANDOFF_BASES if isinstance(optimizer, b)), None)
    if base is None:
        return (
            f"{type(optimizer).__name__} does not read grad_scale/found_inf in step() (only torch's "
            "Adam, AdamW, SGD and Adagrad with fused=True do)"
        )
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return f"{type(optimizer).__name__} was not created with fused=True"
    if inspect.unwrap(type(optimizer).step) is not inspect.unwrap(base.step):
        return f"{type(optimizer).__name__} overrides {base.__name__}.step"
    for i, group in enumerate(optimizer.param_groups):
        if not group.get("fused", False):
            return f"param group {i} has fused={group.get('fused')!r}"
    return None


def _use_handoff(optimizer, handoff: bool | None, fn: str) -> bool:
    if handoff is False:
        return False
    if handoff is not None and handoff is not True:
        raise TypeError(f"{fn}: handoff must be None, True or False, not {handoff!r}")
    reason = handoff_unsupported_reason(optimizer)
    if reason is not None and handoff:
        raise ValueError(f"{fn}: handoff=True, but the optimizer cannot apply the clip scale itself: {reason}")
    return reason is None


# --------------------------------------------------------------------------------------------------
# The one-step life of optimizer.grad_scale / optimizer.found_inf
# --------------------------------------------------------------------------------------------------


def _pending_of(optimizer):
    entry = _PENDING.get(id(optimizer))
    if entry is None or entry[0]() is not optimizer:  # a dead optimizer's entry under a reused id
        return None
    return entry


def _pre_step_hook(optimizer, args, kwargs):
    if id(optimizer) in _PENDING:  # traceable: a compiled step without a pending entry does not break
        # args are step()'s own, self first: step(self, closure=None)
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        _apply_pending(optimizer, closure)


def _post_step_hook(optimizer, args, kwargs):
    if id(optimizer) in _PENDING:
        _consume_pending(optimizer)


@torch.compiler.disable  # eager even inside a compiled step: compile drops setattr on optimizers
def _apply_pending(optimizer, closure) -> None:
    entry = _pending_of(optimizer)
    if entry is None:
        return
    _, grad_scale, found_inf, under_scaler = entry
    if closure is not None:  # it recomputes the gradients after the clip measured them
        del _PENDING[id(optimizer)]
        raise RuntimeError(
            "gradfuse: step(closure) after clip_grad_norm_for_optimizer_/unscale_and_clip_: the closure "
            "recomputes the gradients, so the clip scale computed from the old ones would be applied to "
            "the new ones. Clip inside the closure with gradfuse.clip_grad_norm_ instead."
        )
    # GradScaler.step sets grad_scale = None (UNSCALED stage, ours to fill) or the loss scale times
    # any user value (READY stage: unscale_ was not called, so the clip saw scaled gradients).
    foreign = getattr(optimizer, "grad_scale", None)
    if foreign is not None or (not under_scaler and getattr(optimizer, "found_inf", None) is not None):
        del _PENDING[id(optimizer)]
        raise RuntimeError(
            "gradfuse: the optimizer is stepping with a grad_scale/found_inf set by someone else (GradScaler.step "
            "does that when unscale_ was not called), so the clip scale handed to it by "
            "clip_grad_norm_for_optimizer_ cannot be applied. Under a GradScaler, call "
            "gradfuse.unscale_and_clip_(scaler, optimizer, ...) or pass scaler=scaler."
        )
    optimizer.grad_scale = grad_scale
    if found_inf is not None:
        optimizer.found_inf = found_inf


@torch.compiler.disable
def _consume_pending(optimizer) -> None:
    entry = _pending_of(optimizer)
    if entry is None:
        return
    del _PENDING[id(optimizer)]
    for key in [k for k, e in _PENDING.items() if e[0]() is None]:  # entries of dead optimizers
        del _PENDING[key]
    _, grad_scale, found_inf, under_scaler = entry
    if under_scaler and getattr(optimizer, "found_inf", None) is not None:
        return  # inside GradScaler.step, which deletes grad_scale and found_inf right after this hook
    _delete_if(optimizer, "grad_scale", grad_scale)
    _delete_if(optimizer, "found_inf", found_inf)


# Global hooks (registered once, for every optimizer): a dict lookup per step, and no registration
# inside a torch.compile'd region.
_optimizer_module.register_optimizer_step_pre_hook(_pre_step_hook)
_optimizer_module.register_optimizer_step_post_hook(_post_step_hook)


def _delete_if(optimizer, name: str, obj) -> None:
    if obj is not None and getattr(optimizer, name, None) is obj:
        delattr(optimizer, name)


def _drop_pending(optimizer) -> None:
    """Forget what an earlier clip handed over and no step consumed."""
    _PENDING.pop(id(optimizer), None)


def _check_no_foreign_scale(optimizer, fn: str) -> None:
    for name in ("grad_scale", "found_inf"):
        if getattr(optimizer, name, None) is not None:
            raise RuntimeError(
                f"{fn}: optimizer.{name} is already set by someone else; gradfuse hands the clip scale "
                "to the optimizer through this attribute and will not combine it with another"
            )


def _hand_over(optimizer, grad_scale: torch.Tensor, found_inf: torch.Tensor | None, under_scaler: bool) -> None:
    """Make the optimizer's next step divide by grad_scale (and skip on found_inf)."""
    _PENDING[id(optimizer)] = (weakref.ref(optimizer), grad_scale, found_inf, under_scaler)


def _divisor(scale: torch.Tensor) -> torch.Tensor:
    """What the fused optimizers divide the gradients by: 1 / scale, a float32 0-dim device tensor
    (the reciprocal is taken in the scale's own dtype, fp64 for fp64 gradients)."""
    return scale.detach().reshape(()).reciprocal().to(torch.float32)


def _flag(found_inf: torch.Tensor) -> torch.Tensor:
    """A private float32 0-dim copy of found_inf (GradScaler.update adds into the first one in place)."""
    return found_inf.detach().reshape(()).to(torch.float32, copy=True)


def _zero_if_found_(grads: list[torch.Tensor], found_inf: torch.Tensor, foreach, backend) -> None:
    """grads = 0 when found_inf, untouched otherwise (the fused scale pass returns at once on a
    scale of 1, so a finite step costs one launch and no memory traffic)."""
    keep = (1.0 - found_inf.detach().to(torch.float32)).reshape(())  # 0-dim: the reference path's foreach mul needs it
    name = requested_backend(backend)
    if _layout.has_dtensors(grads):  # the local shards, zeroed by the same flag (global, agreed by every rank)
        grads = _layout.local_tensors(grads)
    if ops.is_compiling():
        torch.ops.gradfuse.scale_(grads, keep, True, name)
    else:
        _engine.scale_(grads, keep, backend=name, foreach=foreach, zero_if_scale_is_zero=True)


def _with_zero_scale(r: ClipResult) -> ClipResult:
    """The result as the step sees it under "zero": a scale of 0 on a non-finite step."""
    keep = torch.ones_like(r.result)
    keep[_abi.RESULT_SCALE] = 1 - r.found_inf
    return dataclasses.replace(r, result=r.result * keep)


def _params_of(optimizer, fn: str) -> list[torch.Tensor]:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{fn}: optimizer must be a torch.optim.Optimizer, not {type(optimizer).__name__}")
    return [p for group in optimizer.param_groups for p in group["params"]]


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
        :class:`OptimizerClipper`, whose ``step()`` then syncs once, or a GradScaler);
      * "zero": the gradients are zeroed and the step taken (an early-exit launch on finite steps);
      * "error": RuntimeError after one host sync, before any gradient or the optimizer is touched.

    ``scaler``: an enabled ``torch.amp.GradScaler`` routes to :func:`unscale_and_clip_`.
    ``max_norm`` may be a device tensor. No host sync except for "error". Returns the
    :class:`~gradfuse.ClipResult` (``scale``: the factor the step applies), or None without grads.
    ``group``, ``exclude_from_norm``: sharded or pipelined gradients, as in
    :func:`gradfuse.clip_grad_norm_` (found_inf, and so every policy, agrees across the group).
    """
    fn = "clip_grad_norm_for_optimizer_"
    if scaler is not None and scaler._enabled:
        return unscale_and_clip_(
            scaler, optimizer, max_norm, norm_type, nonfinite=nonfinite, handoff=handoff, foreach=foreach, backend=backend,
            group=group, exclude_from_norm=exclude_from_norm,
        )  # fmt: skip
    dist_kw = dict(group=group, exclude_from_norm=exclude_from_norm)
    params = _params_of(optimizer, fn)
    nonfinite = v.check_nonfinite(nonfinite, fn)
    handoff = _use_handoff(optimizer, handoff, fn)
    _drop_pending(optimizer)
    if not handoff:
        if nonfinite == "skip":
            raise ValueError(
                f"{fn}: nonfinite='skip' needs an optimizer that can skip its step on the device "
                f"({handoff_unsupported_reason(optimizer) or 'handoff=False was passed'}); use a fused "
                "optimizer, a GradScaler, gradfuse.OptimizerClipper (whose step() then syncs once), or "
                "gradfuse.clip_grads(nonfinite='skip') for the gradient-level policy"
            )
        return clip_grads(params, max_norm, norm_type, nonfinite=nonfinite, apply=True, foreach=foreach, backend=backend, **dist_kw)

    _check_no_foreign_scale(optimizer, fn)
    # "zero" is "skip" (a finite divisor of 1 on a bad step) plus a zeroing pass that does nothing
    # on finite steps: a fused optimizer cannot zero by division (NaN / x stays NaN).
    r = clip_grads(
        params, max_norm, norm_type, nonfinite="skip" if nonfinite == "zero" else nonfinite,
        apply=False, foreach=foreach, backend=backend, **dist_kw,
    )  # fmt: skip
    if r is None:
        return None
    divisor = _divisor(r.scale)  # finite on a bad step under "skip"/"zero": the scale is 1 there
    found_inf = _flag(r.found_inf) if nonfinite == "skip" else None
    if nonfinite == "zero":
        _zero_if_found_(v.grads_of(params, fn), r.found_inf, foreach, backend)
        r = _with_zero_scale(r)
    _hand_over(optimizer, divisor, found_inf, under_scaler=False)
    return r


def _sharded_scaler_type():
    try:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    except ImportError:  # builds without torch.distributed
        return None
    return ShardedGradScaler


def _check_scaler(scaler, fn: str) -> type:
    """The scaler's emulated base: GradScaler, or torch's ShardedGradScaler (whose found_inf the
    distributed clip agrees across ranks in its own collective)."""
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"{fn}: scaler must be a torch.amp.GradScaler, not {type(scaler).__name__}")
    sharded = _sharded_scaler_type()
    base = sharded if sharded is not None and isinstance(scaler, sharded) else torch.amp.GradScaler
    for name in ("unscale_", "_unscale_grads_", "step", "update"):
        if getattr(type(scaler), name) is not getattr(base, name):
            raise TypeError(
                f"{fn}: {type(scaler).__name__} overrides {base.__name__}.{name}, which unscale_and_clip_ "
                "cannot emulate; call scaler.unscale_(optimizer) and then gradfuse.clip_grad_norm_ instead"
            )
    return base


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

    Sharded gradients (DTensors, or ``group=``): found_inf is agreed across the group in the clip's
    one collective, so every rank skips or steps together. torch's ``ShardedGradScaler`` is taken
    (its fp16 gradients too); the clip's group must contain its ``process_group``.
    """
    fn = "unscale_and_clip_"
    base = _check_scaler(scaler, fn)
    if not scaler._enabled:
        return clip_grad_norm_for_optimizer_(
            optimizer, max_norm, norm_type, nonfinite=nonfinite, handoff=handoff, foreach=foreach, backend=backend,
            group=group, exclude_from_norm=exclude_from_norm,
        )  # fmt: skip
    params = _params_of(optimizer, fn)
    nonfinite = v.check_nonfinite(nonfinite, fn)
    scale = scaler._scale  # GradScaler's own methods are on torch.compile's skip list: read its fields
    if scale is None or scaler._growth_tracker is None:
        raise AssertionError(
            "Attempted unscale_ but _scale is None.  This may indicate your script did not use "
            "scaler.scale(loss or outputs) earlier in the iteration."
        )
    # .get, not [], and a fresh dict below: torch.compile drops writes into the entry the defaultdict
    # would create (torch 2.13), and replays a plain assignment.
    stage = scaler._per_optimizer_states.get(id(optimizer), {}).get("stage", OptState.READY)
    if stage is OptState.UNSCALED:
        raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
    if stage is OptState.STEPPED:
        raise RuntimeError("unscale_() is being called after step().")
    grads = v.grads_of(params, fn)
    sharded = base is not torch.amp.GradScaler
    if sharded:
        _layout.check_scaler_group(scaler.process_group, grads, group, fn)
    elif any(g.dtype == torch.float16 for g in grads):
        raise ValueError("Attempting to unscale FP16 gradients.")
    handoff = _use_handoff(optimizer, handoff, fn)
    _drop_pending(optimizer)
    if handoff:
        _check_no_foreign_scale(optimizer, fn)
    inv_scale = scale.double().reciprocal().float() if scale.device.type != "mps" else scale.reciprocal()

    policy = "skip" if (handoff and nonfinite == "zero") else nonfinite
    r = clip_grads(
        params, max_norm, norm_type, nonfinite=policy, inv_scale=inv_scale, apply=not handoff,
        foreach=foreach, backend=backend, group=group, exclude_from_norm=exclude_from_norm,
    )  # fmt: skip
    if r is None:
        scaler._per_optimizer_states[id(optimizer)] = {"stage": OptState.UNSCALED, "found_inf_per_device": {}}
        return None
    if handoff:
        # On an overflow step the divisor may be inf or NaN ("propagate"): GradScaler.step hands
        # found_inf to the optimizer, whose fused kernel then returns before reading it.
        divisor = _divisor(r.scale)
        if nonfinite == "zero":
            _zero_if_found_(grads, r.found_inf, foreach, backend)
            r = _with_zero_scale(r)
        _hand_over(optimizer, divisor, None, under_scaler=True)
    scaler._per_optimizer_states[id(optimizer)] = {
        "stage": OptState.UNSCALED,
        "found_inf_per_device": {r.found_inf.device: _flag(r.found_inf)},
    }
    return r


# --------------------------------------------------------------------------------------------------
# Counters and the stateful wrapper
# --------------------------------------------------------------------------------------------------


class NonFiniteCounter:
    """Counts clip steps, non-finite steps and clipped steps on the device, with no host sync.

    ``update(result)`` after each clip adds to int64 device tensors (created on the device of the
    first result, or of ``device``): ``steps``, ``nonfinite_steps`` (found_inf set), ``clipped_steps``
    (finite and coefficient below 1), ``consecutive_nonfinite`` (reset by a finite step). Read them
    with :meth:`as_dict` (one host sync) or keep them on the device (e.g. to halt after N
    consecutive overflows with ``torch._assert_async``). ``state_dict``/``load_state_dict`` for
    checkpoints.
    """

    _FIELDS = ("steps", "nonfinite_steps", "clipped_steps", "consecutive_nonfinite")

    def __init__(self, device: torch.device | str | None = None):
        self.counts: torch.Tensor | None = None
        if device is not None:
            self.counts = torch.zeros(len(self._FIELDS), dtype=torch.int64, device=device)

    def _on(self, device: torch.device) -> torch.Tensor:
        if self.counts is None:
            self.counts = torch.zeros(len(self._FIELDS), dtype=torch.int64, device=device)
        elif self.counts.device != device:
            self.counts = self.counts.to(device)
        return self.counts

    @torch.no_grad()
    def update(self, result: ClipResult | None) -> None:
        """Count one clip (None, a clip with no gradients, counts nothing)."""
        if result is None:
            return
        found = result.found_inf.detach().reshape(()).ne(0).to(torch.int64)
        clipped = result.clip_coef.detach().reshape(()).lt(1).to(torch.int64) * (1 - found)
        counts = self._on(found.device)
        counts.add_(torch.stack((torch.ones_like(found), found, clipped, found)))
        counts[3].mul_(found)  # consecutive: (n + 1) * found

    def __getattr__(self, name):
        if name in NonFiniteCounter._FIELDS:
            counts = self.__dict__.get("counts")
            if counts is None:
                return torch.zeros((), dtype=torch.int64)
            return counts[NonFiniteCounter._FIELDS.index(name)]
        raise AttributeError(name)

    def as_dict(self) -> dict[str, int]:
        """The counts as Python ints (one host sync)."""
        values = [0] * len(self._FIELDS) if self.counts is None else self.counts.tolist()
        return dict(zip(self._FIELDS, values))

    def reset(self) -> None:
        if self.counts is not None:
            self.counts.zero_()

    def state_dict(self) -> dict:
        return {"counts": None if self.counts is None else self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        counts = state["counts"]
        if counts is None:
            self.counts = None
        elif self.counts is None:
            self.counts = counts.clone()
        else:
            self.counts.copy_(counts)

    def __repr__(self) -> str:
        return f"NonFiniteCounter(counts={self.counts})"


class OptimizerClipper:
    """Clip-then-step for one optimizer (and optionally its GradScaler), with device-side counters.

    ::

        clipper = gradfuse.OptimizerClipper(opt, max_norm=1.0, scaler=scaler, nonfinite="skip")
        for x, y in data:
            scaler.scale(loss_fn(model(x), y)).backward()
            clipper.clip()    # unscale + check + norm + clip in one read; counts
            clipper.step()    # scaler.step(opt) (or opt.step())
            scaler.update()
            opt.zero_grad()

    ``clip()`` runs :func:`unscale_and_clip_` with an enabled scaler, else
    :func:`clip_grad_norm_for_optimizer_`, and updates :attr:`counter`. The one case those refuse,
    ``nonfinite="skip"`` with an optimizer that cannot skip on the device and no GradScaler, is
    handled here: the gradients are left untouched on a bad step and ``step()`` reads ``found_inf``
    once (a host sync, as ``GradScaler.step`` does for such optimizers) to skip the step.
    ``group``, ``exclude_from_norm``: sharded or pipelined gradients, as in
    :func:`gradfuse.clip_grad_norm_`.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_norm: float | torch.Tensor,
        norm_type: float = 2.0,
        *,
        nonfinite: str = "propagate",
        scaler: torch.amp.GradScaler | None = None,
        handoff: bool | None = None,
        foreach: bool | None = None,
        backend: str | None = None,
        counter: NonFiniteCounter | None = None,
        group=None,
        exclude_from_norm=None,
    ):
        fn = "OptimizerClipper"
        _params_of(optimizer, fn)
        self.optimizer = optimizer
        self.max_norm = v.check_max_norm(max_norm, fn)
        self.norm_type = v.check_norm_type(norm_type, fn)
        self.nonfinite = v.check_nonfinite(nonfinite, fn)
        if scaler is not None:
            _check_scaler(scaler, fn)
        self.scaler = scaler
        self.handoff = handoff
        self.foreach = foreach
        self.backend = backend
        self.dist_kw = dict(group=group, exclude_from_norm=exclude_from_norm)
        self.counter = counter if counter is not None else NonFiniteCounter()
        self.last: ClipResult | None = None
        self._skip_on_host: torch.Tensor | None = None

    def _scaler_on(self) -> bool:
        return self.scaler is not None and self.scaler._enabled

    def clip(self) -> ClipResult | None:
        """Clip the optimizer's gradients for the next :meth:`step`; returns the ClipResult."""
        kw = dict(nonfinite=self.nonfinite, handoff=self.handoff, foreach=self.foreach, backend=self.backend, **self.dist_kw)
        self._skip_on_host = None
        if self._scaler_on():
            r = unscale_and_clip_(self.scaler, self.optimizer, self.max_norm, self.norm_type, **kw)
        elif self.nonfinite == "skip" and not _use_handoff(self.optimizer, self.handoff, "OptimizerClipper.clip"):
            _drop_pending(self.optimizer)
            params = _params_of(self.optimizer, "OptimizerClipper.clip")
            r = clip_grads(params, self.max_norm, self.norm_type, nonfinite="skip", foreach=self.foreach, backend=self.backend, **self.dist_kw)
            self._skip_on_host = None if r is None else r.found_inf
        else:
            r = clip_grad_norm_for_optimizer_(self.optimizer, self.max_norm, self.norm_type, **kw)
        self.counter.update(r)
        self.last = r
        return r

    def step(self, *args, **kwargs):
        """``scaler.step(optimizer)`` with an enabled scaler, else ``optimizer.step()``; skipped after
        a host read of found_inf in the one case described in the class docstring."""
        if self._scaler_on():
            return self.scaler.step(self.optimizer, *args, **kwargs)
        found, self._skip_on_host = self._skip_on_host, None
        if found is not None and bool(found):  # the documented host sync
            return None
        return self.optimizer.step(*args, **kwargs)

    def state_dict(self) -> dict:
        return {"counter": self.counter.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.counter.load_state_dict(state["counter"])
