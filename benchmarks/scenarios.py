"""What is benchmarked: the scenarios, the implementations, and one prepared call per pair.

Scenarios (N = bytes of one set of gradients; ``bytes_factor * N`` is the least any implementation
must move):

* ``clip``: ``clip_grad_norm_`` with max_norm = half the norm, so every call scales: 3N
  (read for the norm, read + write to scale).
* ``noclip``: max_norm = 100x the norm; gradfuse skips the scale pass: N.
* ``norm``: ``get_total_norm`` only: N.
* ``nonfinite-check``: ``clip`` with ``error_if_nonfinite=True`` on finite gradients: 3N.
* ``fused-optimizer``: clip + a fused AdamW step; gradfuse hands the coefficient to the optimizer
  instead of scaling. Bytes: N for the clip's overhead over the step alone (``adamw:step-only``).

A clip halves the gradients; the runner multiplies them back by 2 (exact) after each call, outside
the timed region, so every call sees the same norm and really clips.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch

from .workloads import GradGroup, GradSet

ADAMW_LR = 1e-6


@dataclass(frozen=True)
class Scenario:
    name: str
    bytes_factor: int
    clips: bool | None  # True: max_norm below the norm; False: far above; None: no max_norm
    error_if_nonfinite: bool = False
    steps_optimizer: bool = False


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("clip", 3, clips=True),
        Scenario("noclip", 1, clips=False),
        Scenario("norm", 1, clips=None),
        Scenario("nonfinite-check", 3, clips=True, error_if_nonfinite=True),
        Scenario("fused-optimizer", 1, clips=True, steps_optimizer=True),
    )
}


def max_norm_for(scenario: Scenario, group: GradGroup) -> float | None:
    """Half the smallest set norm (every call clips by about 0.5), 100x the largest, or None."""
    if scenario.clips is None:
        return None
    return 0.5 * min(group.norms) if scenario.clips else 100.0 * max(group.norms)


class Unsupported(Exception):
    """This implementation cannot run this scenario here: a note in the results, not a failure."""


@dataclass(frozen=True)
class Impl:
    """One contender: ``family`` "gradfuse" (with ``backend``), "torch" or "adamw" (the step alone)."""

    name: str
    family: str
    backend: str | None = None
    foreach: bool = True
    compiled: bool = False

    @property
    def is_gradfuse(self) -> bool:
        return self.family == "gradfuse"


TORCH_FOREACH = Impl("torch:foreach", "torch", foreach=True)
TORCH_LOOP = Impl("torch:loop", "torch", foreach=False)
TORCH_COMPILE = Impl("torch:compile", "torch", foreach=True, compiled=True)
ADAMW_STEP_ONLY = Impl("adamw:step-only", "adamw")
BASELINE = TORCH_FOREACH  # speedups are reported against this one


def gradfuse_impl(backend: str) -> Impl:
    return Impl(f"gradfuse:{backend}", "gradfuse", backend=backend)


@dataclass
class PreparedCall:
    """``call(i)`` runs one call on gradient set ``i`` (rotating); ``close()`` frees what it holds."""

    group: GradGroup
    run: Callable[[GradSet, torch.optim.Optimizer | None], object]
    optimizers: list[torch.optim.Optimizer] | None = None
    on_close: list[Callable[[], None]] = field(default_factory=list)

    def __call__(self, i: int):
        return self.run(self.group.set(i), self.optimizer(i))

    def optimizer(self, i: int) -> torch.optim.Optimizer | None:
        return self.optimizers[i % len(self.optimizers)] if self.optimizers else None

    def close(self) -> None:
        self.optimizers = None
        for fn in self.on_close:
            fn()


def returned_norm(result) -> torch.Tensor | None:
    """The total norm a call returned (a tensor, or a ClipResult's ``total_norm``)."""
    if isinstance(result, torch.Tensor):
        return result
    return getattr(result, "total_norm", None)


# --------------------------------------------------------------------------------------------------
# torch baselines


def _torch_clip(params, max_norm: float, error_if_nonfinite: bool, foreach: bool):
    return torch.nn.utils.clip_grad_norm_(params, max_norm, error_if_nonfinite=error_if_nonfinite, foreach=foreach)


def _torch_norm(grads, foreach: bool):
    return torch.nn.utils.get_total_norm(grads, foreach=foreach)


def _compile(fn):
    torch._dynamo.reset()  # a fresh cache per cell: no recompile limit, no stale graphs
    return torch.compile(fn)


# --------------------------------------------------------------------------------------------------
# gradfuse


def handoff_function(gradfuse) -> Callable | None:
    """gradfuse's clip-for-a-fused-optimizer entry point as ``f(optimizer, params, max_norm, backend)``.

    ``clip_grads(..., optimizer=)`` when it takes one, else ``clip_grad_norm_for_optimizer_``
    (top level or ``gradfuse.training``); None when neither exists yet.
    """
    clip_grads = getattr(gradfuse, "clip_grads", None)
    if clip_grads is not None and "optimizer" in inspect.signature(clip_grads).parameters:
        return lambda opt, params, max_norm, backend: clip_grads(params, max_norm, backend=backend, optimizer=opt)
    owners = [gradfuse]
    try:
        owners.append(importlib.import_module("gradfuse.training"))
    except ImportError:
        pass
    for owner in owners:
        fn = getattr(owner, "clip_grad_norm_for_optimizer_", None)
        if fn is not None:
            return lambda opt, params, max_norm, backend: fn(opt, max_norm, backend=backend)
    return None


# --------------------------------------------------------------------------------------------------
# Preparing one call


def _fused_adamw(group: GradGroup, device: torch.device) -> list[torch.optim.Optimizer]:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # torch's cache is free to torch
        need = 2 * group.nbytes * len(group.sets)
        if need > 0.9 * free:
            raise Unsupported(f"AdamW state needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
    try:
        return [torch.optim.AdamW(s.params, lr=ADAMW_LR, fused=True) for s in group.sets]
    except (RuntimeError, ValueError) as e:
        raise Unsupported(f"fused AdamW unavailable here: {e}") from e


def prepare(impl: Impl, scenario: Scenario, group: GradGroup, max_norm: float | None, device: torch.device, gradfuse=None) -> PreparedCall:
    """The call ``impl`` makes in ``scenario`` on ``group``; raises Unsupported when it cannot."""
    if impl.family == "adamw":
        if not scenario.steps_optimizer:
            raise Unsupported("the step alone belongs to fused-optimizer only")
        return PreparedCall(group, lambda s, opt: opt.step(), _fused_adamw(group, device))

    if impl.is_gradfuse:
        run = _gradfuse_run(impl, scenario, max_norm, gradfuse)
        on_close = []
    else:
        run, on_close = _torch_run(impl, scenario, max_norm)

    if not scenario.steps_optimizer:
        return PreparedCall(group, run, None, on_close)

    def clip_and_step(s, opt):
        result = run(s, opt)
        opt.step()
        return result

    return PreparedCall(group, clip_and_step, _fused_adamw(group, device), on_close)


def _gradfuse_run(impl: Impl, scenario: Scenario, max_norm, gradfuse):
    backend = impl.backend
    if scenario.steps_optimizer:
        handoff = handoff_function(gradfuse)
        if handoff is None:
            raise Unsupported("gradfuse has no clip hand-off to a fused optimizer yet")
        return lambda s, opt: handoff(opt, s.params, max_norm, backend)
    if scenario.clips is None:
        return lambda s, opt: gradfuse.get_total_norm(s.grads, backend=backend)
    check = scenario.error_if_nonfinite
    return lambda s, opt: gradfuse.clip_grad_norm_(s.params, max_norm, error_if_nonfinite=check, backend=backend)


def _torch_run(impl: Impl, scenario: Scenario, max_norm):
    foreach = impl.foreach
    on_close = [torch._dynamo.reset] if impl.compiled else []
    if scenario.clips is None:
        norm = _compile(_torch_norm) if impl.compiled else _torch_norm
        return (lambda s, opt: norm(s.grads, foreach)), on_close
    clip = _compile(_torch_clip) if impl.compiled else _torch_clip
    check = scenario.error_if_nonfinite
    return (lambda s, opt: clip(s.params, max_norm, check, foreach)), on_close
