"""A ``torch.amp.GradScaler``'s state, read and written as ``scaler.unscale_(optimizer)`` would.

GradScaler's own methods are on torch.compile's skip list, so gradfuse reads and writes its fields
(``_enabled``, ``_scale``, ``_growth_tracker``, ``_per_optimizer_states``) directly; subclasses
that override the methods gradfuse emulates are refused, except torch's ``ShardedGradScaler``: it
all-reduces found_inf over its process group, which the distributed clip's own collective does
(found_inf is agreed across the clip's group, which must contain those ranks).
"""

from __future__ import annotations

import torch
from torch.amp.grad_scaler import OptState

from . import _layout, _validation as v
from ._handoff import found_inf_flag


def _sharded_scaler_type():
    try:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
    except ImportError:  # builds without torch.distributed
        return None
    return ShardedGradScaler


def _base(scaler) -> type:
    sharded = _sharded_scaler_type()
    return sharded if sharded is not None and isinstance(scaler, sharded) else torch.amp.GradScaler


def check_scaler(scaler, fn: str) -> None:
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"{fn}: scaler must be a torch.amp.GradScaler, not {type(scaler).__name__}")
    base = _base(scaler)
    for name in ("unscale_", "_unscale_grads_", "step", "update"):
        if getattr(type(scaler), name) is not getattr(base, name):
            raise TypeError(
                f"{fn}: {type(scaler).__name__} overrides {base.__name__}.{name}, which unscale_and_clip_ cannot "
                "emulate; call scaler.unscale_(optimizer) and then gradfuse.clip_grad_norm_ instead"
            )


def enabled(scaler: torch.amp.GradScaler | None) -> bool:
    return scaler is not None and scaler._enabled


def begin_unscale(scaler: torch.amp.GradScaler, optimizer, params: list, fn: str, group=None) -> torch.Tensor:
    """The checks ``unscale_`` makes, with its messages (no scale yet, called twice since the last
    update, after step, fp16 gradients, which ShardedGradScaler takes); then ``inv_scale = 1 /
    scale`` (fp64 reciprocal, as torch). ``group``: the clip's ``group=``."""
    scale = scaler._scale
    if scale is None or scaler._growth_tracker is None:
        raise AssertionError(
            "Attempted unscale_ but _scale is None.  This may indicate your script did not use "
            "scaler.scale(loss or outputs) earlier in the iteration."
        )
    # .get, not [], and a fresh dict in mark_unscaled: torch.compile drops writes into the entry the
    # defaultdict would create (torch 2.13), and replays a plain assignment.
    stage = scaler._per_optimizer_states.get(id(optimizer), {}).get("stage", OptState.READY)
    if stage is OptState.UNSCALED:
        raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
    if stage is OptState.STEPPED:
        raise RuntimeError("unscale_() is being called after step().")
    grads = v.grads_of(params, fn)
    if _base(scaler) is not torch.amp.GradScaler:
        _layout.check_scaler_group(scaler.process_group, grads, group, fn)
    elif any(g.dtype == torch.float16 for g in grads):
        raise ValueError("Attempting to unscale FP16 gradients.")
    return scale.double().reciprocal().float() if scale.device.type != "mps" else scale.reciprocal()


def mark_unscaled(scaler: torch.amp.GradScaler, optimizer, found_inf: torch.Tensor | None) -> None:
    """Leave the scaler as ``unscale_`` does: stage UNSCALED, ``found_inf_per_device`` holding the
    check (empty when no parameter had a gradient), so ``scaler.step`` skips on overflow and
    ``scaler.update`` backs the scale off."""
    per_device = {} if found_inf is None else {found_inf.device: found_inf_flag(found_inf)}
    scaler._per_optimizer_states[id(optimizer)] = {"stage": OptState.UNSCALED, "found_inf_per_device": per_device}
