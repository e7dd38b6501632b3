"""Handing the clip scale to a fused optimizer, for exactly its next step.

torch's fused optimizers (``Adam``/``AdamW``/``SGD``/``Adagrad`` with ``fused=True``) divide every
gradient by ``self.grad_scale`` inside their step kernel and skip the step on ``self.found_inf``.
A clip that hands its scale over records a :class:`Pending` for the optimizer's next step; global
optimizer step hooks (registered when this module is imported) set ``optimizer.grad_scale`` /
``found_inf`` from it right before that step and delete them right after, so a step not preceded by
a clip never reuses a stale scale, and nothing is written to the optimizer inside a compiled
region. Under a GradScaler, ``scaler.step`` deletes them itself. A step that would combine the clip
scale with a ``grad_scale`` set by someone else (``GradScaler.step`` without ``unscale_``) raises.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass

import torch
import torch.optim.optimizer as _optimizer_module

# torch's optimizers whose fused step divides by ``self.grad_scale`` and skips on ``self.found_inf``.
_HANDOFF_BASES = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD, torch.optim.Adagrad)


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


def use_handoff(optimizer, handoff: bool | None, fn: str) -> bool:
    """The ``handoff`` argument resolved: None = whenever the optimizer can take the scale."""
    if handoff is False:
        return False
    if handoff is not None and handoff is not True:
        raise TypeError(f"{fn}: handoff must be None, True or False, not {handoff!r}")
    reason = handoff_unsupported_reason(optimizer)
    if reason is not None and handoff:
        raise ValueError(f"{fn}: handoff=True, but the optimizer cannot apply the clip scale itself: {reason}")
    return reason is None


def check_no_foreign_scale(optimizer, fn: str) -> None:
    for name in ("grad_scale", "found_inf"):
        if getattr(optimizer, name, None) is not None:
            raise RuntimeError(
                f"{fn}: optimizer.{name} is already set by someone else; gradfuse hands the clip scale "
                "to the optimizer through this attribute and will not combine it with another"
            )


def found_inf_flag(found_inf: torch.Tensor) -> torch.Tensor:
    """A private float32 0-dim copy of found_inf, as fused optimizers and GradScaler read it
    (GradScaler.update adds into the first one in place)."""
    return found_inf.detach().reshape(()).to(torch.float32, copy=True)


@dataclass(frozen=True)
class Pending:
    """What a clip handed to an optimizer for its next step."""

    optimizer: weakref.ref  # a dead optimizer's entry may sit under a reused id
    grad_scale: torch.Tensor  # float32 0-dim: the fused step divides the gradients by it
    found_inf: torch.Tensor | None  # float32 0-dim: the fused step skips on it; None: left as it is
    under_scaler: bool  # the step runs inside GradScaler.step, which sets and deletes found_inf


# The pending hand-overs, keyed by id(optimizer). A module-level table and not attributes of the
# optimizer: torch.compile drops attribute writes on Optimizer objects silently (torch 2.13), while
# writes to a global dict are replayed. The step pre-hook moves the entry onto the optimizer right
# before its step, the post-hook removes it right after.
PENDING: dict[int, Pending] = {}


def hand_over(optimizer, scale: torch.Tensor, found_inf: torch.Tensor | None, *, under_scaler: bool) -> None:
    """Make the optimizer's next step scale the gradients by ``scale`` (it divides by
    ``grad_scale = 1 / scale``, a float32 reciprocal taken in the scale's own dtype) and, when
    ``found_inf`` is given, skip on it."""
    grad_scale = scale.detach().reshape(()).reciprocal().to(torch.float32)
    flag = None if found_inf is None else found_inf_flag(found_inf)
    PENDING[id(optimizer)] = Pending(weakref.ref(optimizer), grad_scale, flag, under_scaler)


def drop(optimizer) -> None:
    """Forget what an earlier clip handed over and no step consumed."""
    PENDING.pop(id(optimizer), None)


def _pending_of(optimizer) -> Pending | None:
    entry = PENDING.get(id(optimizer))
    if entry is None or entry.optimizer() is not optimizer:  # a dead optimizer's entry under a reused id
        return None
    return entry


def _pre_step_hook(optimizer, args, kwargs):
    if id(optimizer) in PENDING:  # traceable: a compiled step without a pending entry does not break
        # args are step()'s own, self first: step(self, closure=None)
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        _apply_pending(optimizer, closure)


def _post_step_hook(optimizer, args, kwargs):
    if id(optimizer) in PENDING:
        _consume_pending(optimizer)


@torch.compiler.disable  # eager even inside a compiled step: compile drops setattr on optimizers
def _apply_pending(optimizer, closure) -> None:
    entry = _pending_of(optimizer)
    if entry is None:
        return
    if closure is not None:  # it recomputes the gradients after the clip measured them
        del PENDING[id(optimizer)]
        raise RuntimeError(
            "gradfuse: step(closure) after clip_grad_norm_for_optimizer_/unscale_and_clip_: the closure "
            "recomputes the gradients, so the clip scale computed from the old ones would be applied to "
            "the new ones. Clip inside the closure with gradfuse.clip_grad_norm_ instead."
        )
    # GradScaler.step sets grad_scale = None (UNSCALED stage, ours to fill) or the loss scale times
    # any user value (READY stage: unscale_ was not called, so the clip saw scaled gradients).
    foreign = getattr(optimizer, "grad_scale", None)
    if foreign is not None or (not entry.under_scaler and getattr(optimizer, "found_inf", None) is not None):
        del PENDING[id(optimizer)]
        raise RuntimeError(
            "gradfuse: the optimizer is stepping with a grad_scale/found_inf set by someone else (GradScaler.step "
            "does that when unscale_ was not called), so the clip scale handed to it by "
            "clip_grad_norm_for_optimizer_ cannot be applied. Under a GradScaler, call "
            "gradfuse.unscale_and_clip_(scaler, optimizer, ...) or pass scaler=scaler."
        )
    optimizer.grad_scale = entry.grad_scale
    if entry.found_inf is not None:
        optimizer.found_inf = entry.found_inf


@torch.compiler.disable
def _consume_pending(optimizer) -> None:
    entry = _pending_of(optimizer)
    if entry is None:
        return
    del PENDING[id(optimizer)]
    for key in [k for k, e in PENDING.items() if e.optimizer() is None]:  # entries of dead optimizers
        del PENDING[key]
    if entry.under_scaler and getattr(optimizer, "found_inf", None) is not None:
        return  # inside GradScaler.step, which deletes grad_scale and found_inf right after this hook
    _delete_if(optimizer, "grad_scale", entry.grad_scale)
    _delete_if(optimizer, "found_inf", entry.found_inf)


def _delete_if(optimizer, name: str, obj) -> None:
    if obj is not None and getattr(optimizer, name, None) is obj:
        delattr(optimizer, name)


# Global hooks (registered once, for every optimizer): a dict lookup per step, and no registration
# inside a torch.compile'd region.
_optimizer_module.register_optimizer_step_pre_hook(_pre_step_hook)
_optimizer_module.register_optimizer_step_post_hook(_post_step_hook)
