"""Rollback: an in-memory ring of known-good snapshots of the model and the optimizer state.

PaLM's remedy for a persistent loss explosion: go back to a state from before it began and skip
the batches that led there. :class:`Snapshots` copies every parameter, buffer and optimizer state
tensor to host memory every few steps without stalling the step: on CUDA into pinned buffers,
with non-blocking copies on a side stream (the next forward and backward run meanwhile; the
optimizer step that follows waits on the device, not the host, for the copy to finish); on the CPU
with a plain copy. :meth:`Snapshots.restore` copies the newest snapshot taken before a given step
back in place, bitwise (a host wait, paid only on a rollback).

:class:`LaggedRead` is how the host learns, without a sync, that it must act: a small device tensor
(the step counters) copied every step into pinned memory and read ``lag`` steps later, when the
copy has long landed (its CUDA event is waited for only if the device runs that far behind the
host). The lag is fixed, so every rank of a distributed run decides at the same step.
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from . import _validation as v
from ._layout import local_tensors


@dataclass(frozen=True)
class Rollback:
    """What the clipper does on a persistent explosion: restore the newest snapshot taken before it
    began, then tell the loop to skip ``skip_batches`` batches.

    ``every``: a snapshot every K optimizer steps (and one when the clipper is made); ``keep``: how
    many snapshots the ring holds (host memory: ``keep`` copies of the parameters, buffers and
    optimizer state); ``max_rollbacks``: after that many, the next persistent explosion raises.
    """

    every: int = 100
    keep: int = 2
    skip_batches: int = 0
    max_rollbacks: int = 3

    def __post_init__(self):
        owner = "Rollback"
        v.count_setting(owner, "every", self.every, 1)
        v.count_setting(owner, "keep", self.keep, 1)
        v.count_setting(owner, "skip_batches", self.skip_batches, 0)
        v.count_setting(owner, "max_rollbacks", self.max_rollbacks, 0)


@dataclass
class _Slot:
    step: int = -1  # the optimizer steps taken when the snapshot was captured; -1: empty
    layout: tuple = ()
    host: list[torch.Tensor] = field(default_factory=list)
    extras: dict = field(default_factory=dict)  # non-tensor optimizer state, per parameter index
    event: object = None  # CUDA: the copy's completion


class Snapshots:
    """A ring of ``keep`` host snapshots of ``module`` (parameters and buffers; or a list of
    parameters) and ``optimizer``'s per-parameter state. ``param_groups`` (learning rates, ...) are
    not part of it: the schedule goes on after a restore."""

    def __init__(self, module, optimizer: torch.optim.Optimizer, keep: int = 2):
        if isinstance(module, torch.nn.Module):
            self._model = list(module.parameters()) + list(module.buffers())
        else:
            self._model = list(module)
        self.optimizer = optimizer
        self._slots = [_Slot() for _ in range(keep)]
        self._next = 0
        self._stream = None
        self._pending = None  # the event of a copy the next update must wait for

    def _opt_params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _live(self) -> tuple[list[torch.Tensor], tuple, dict]:
        """The device tensors to copy, their layout, and the non-tensor optimizer state."""
        tensors, layout, extras = [t.detach() for t in local_tensors(self._model)], [], {}
        for i, p in enumerate(self._opt_params()):
            state = self.optimizer.state.get(p, {})
            for key in sorted(state, key=str):
                value = state[key]
                if isinstance(value, torch.Tensor):
                    tensors.append(local_tensors([value.detach()])[0])
                    layout.append((i, key))
                else:
                    extras[(i, key)] = copy.deepcopy(value)
        shapes = tuple((t.shape, t.dtype, t.device) for t in tensors)
        return tensors, (tuple(layout), shapes), extras

    @torch.no_grad()
    def capture(self, step: int) -> None:
        """Start copying the current state into the oldest slot (non-blocking on CUDA)."""
        tensors, layout, extras = self._live()
        slot = self._slots[self._next]
        self._next = (self._next + 1) % len(self._slots)
        if slot.event is not None:
            slot.event.synchronize()  # that slot's previous copy (captures are far apart: done long ago)
        cuda = any(t.is_cuda for t in tensors)
        if slot.layout != layout:  # first use, or the optimizer state has grown since
            slot.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda) for t in tensors]
            slot.layout = layout
        slot.step, slot.extras, slot.event = step, extras, None
        if not cuda:
            for h, t in zip(slot.host, tensors):
                h.copy_(t)
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=next(t.device for t in tensors if t.is_cuda))
        self._stream.wait_stream(torch.cuda.current_stream(self._stream.device))
        with torch.cuda.stream(self._stream):
            for h, t in zip(slot.host, tensors):
                h.copy_(t, non_blocking=True)
            slot.event = torch.cuda.Event()
            slot.event.record(self._stream)
        self._pending = slot.event

    def before_update(self) -> None:
        """Make the device wait (not the host) for a snapshot copy before the state is written."""
        if self._pending is not None:
            torch.cuda.current_stream(self._stream.device).wait_event(self._pending)
            self._pending = None

    def steps(self) -> list[int]:
        """The steps of the snapshots held, newest first."""
        return sorted((s.step for s in self._slots if s.step >= 0), reverse=True)

    @torch.no_grad()
    def restore(self, before: int) -> int | None:
        """Copy back, bitwise, the newest snapshot captured at a step <= ``before``; returns its step
        (None: there is none, nothing changed)."""
        eligible = [s for s in self._slots if 0 <= s.step <= before]
        if not eligible:
            return None
        slot = max(eligible, key=lambda s: s.step)
        if slot.event is not None:
            slot.event.synchronize()
        host = iter(slot.host)
        for t in local_tensors(self._model):
            t.detach().copy_(next(host))
        params = self._opt_params()
        state_keys, shapes = slot.layout
        restored: dict[int, dict] = {}
        for (i, key), h, (_, _, device) in zip(state_keys, host, shapes[len(self._model) :]):
            restored.setdefault(i, {})[key] = h.to(device, copy=True)
        for (i, key), value in slot.extras.items():
            restored.setdefault(i, {})[key] = copy.deepcopy(value)
        for i, p in enumerate(params):
            current = self.optimizer.state.get(p)
            if i not in restored:
                self.optimizer.state.pop(p, None)  # no state then: a fresh start for that parameter
                continue
            new = restored[i]
            if current is not None:  # keep the tensors in place where they fit (CUDA graphs hold them)
                for key, value in new.items():
                    old = current.get(key)
                    here = local_tensors([old])[0] if isinstance(old, torch.Tensor) else None
                    if here is not None and isinstance(value, torch.Tensor) and here.shape == value.shape and here.dtype == value.dtype:
                        here.copy_(value)
                        new[key] = old
            self.optimizer.state[p] = new
        return slot.step


class LaggedRead:
    """The host's view of a small device tensor, ``lag`` steps late, with no sync: :meth:`start`
    copies it (CUDA: into pinned memory, non-blocking, with an event); :meth:`latest` returns the
    copy started ``lag`` starts ago (as numpy), or None before there is one. On the CPU the copy is
    the value at once (no lag: there is no device to wait for)."""

    def __init__(self, lag: int = 2):
        self.lag = lag
        self._pending: deque = deque()
        self._free: list[torch.Tensor] = []
        self._landed: torch.Tensor | None = None

    def start(self, t: torch.Tensor) -> None:
        if not t.is_cuda:
            self._landed = t.detach().clone()  # on the CPU the copy is the value itself
            return
        buf = self._free.pop() if self._free and self._free[-1].shape == t.shape else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        buf.copy_(t.detach(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((buf, event))

    def latest(self) -> np.ndarray | None:
        while len(self._pending) > self.lag:
            buf, event = self._pending.popleft()
            event.synchronize()  # started `lag` steps ago: done, unless the device is that far behind
            if self._landed is not None and self._landed.is_pinned():
                self._free.append(self._landed)
            self._landed = buf
        return None if self._landed is None else self._landed.numpy()

    def reset(self) -> None:
        self._pending.clear()
        self._landed = None

