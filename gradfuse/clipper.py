"""``Clipper``: the one object a training loop calls once per step to tame its gradients.

::

    clipper = gradfuse.Clipper(model, opt, max_norm=1.0, spike=gradfuse.SpikeRule(),
                               max_bad_steps=8, rollback=gradfuse.Rollback(every=100, skip_batches=200))
    for batch in loader:
        if clipper.skip_batch():        # after a rollback: the batches that led to the explosion
            continue
        loss = loss_fn(model, batch)
        loss.backward()                 # or scaler.scale(loss).backward() with scaler=
        clipper.step(loss)              # clip, judge, step the optimizer (or skip it), count, snapshot
        opt.zero_grad()

A step is :meth:`Clipper.clip` (traceable by ``torch.compile(fullgraph=True)``: unscale, one read
of the gradients, the threshold, the non-finite policy, the spike rule, statistics, the hand-off of
the decision to the optimizer) then :meth:`Clipper.optimizer_step` (the step, snapshots, rollback).

Skipping really skips: a fused optimizer (``fused=True``) gets ``found_inf`` and skips on the
device; under a GradScaler, ``scaler.step`` skips (on the device for fused optimizers, after its own
host read otherwise); any other optimizer is stepped after one host read of the skip flag (the one
documented sync, paid only when a step can be skipped: ``nonfinite="skip"`` or a spike rule).
Host syncs otherwise: none. The persistent-explosion check reads the counters through
:class:`gradfuse.rollback.LaggedRead` (a non-blocking copy, read two steps later on CUDA, at the
same step on every rank; at once on the CPU).
"""

from __future__ import annotations

import torch

import dataclasses

from . import _abi, _amp, _handoff, _layout, _steps, _validation as v, ops
from ._engine import ClipResult
from .agc import AGC, clip_units, per_gradient, select
from .clip import _clip as clip_maybe_distributed
from .distributed import DistributedClipResult
from ._tracking import named_parameters
from .layerwise import clip_by_group, group_keys, segment_index, with_smallest_coef
from .monitor import NonFiniteCounter
from .rollback import LaggedRead, Rollback, Snapshots
from .spike import SpikeRule

_BAD = NonFiniteCounter.FIELDS.index("consecutive_bad")
_RESET_ON_ROLLBACK = [NonFiniteCounter.FIELDS.index(k) for k in ("consecutive_nonfinite", "consecutive_bad")]


def _history(history, spike: SpikeRule | None, device):
    if spike is None:
        return history
    if history is None:
        from .history import NormHistory

        return NormHistory(spike.window, device=device)
    if history.capacity < spike.window:
        raise ValueError(f"Clipper: the history holds {history.capacity} steps, fewer than the spike rule's window ({spike.window})")
    return history


def _device_loss(loss, device: torch.device) -> torch.Tensor:
    """The loss as a float32 scalar on ``device``: a Python number by a fill (no host-to-device copy)."""
    if isinstance(loss, torch.Tensor):
        return loss.detach().reshape(()).to(device, torch.float32)
    return torch.full((), float(loss), dtype=torch.float32, device=device)


class Clipper:
    """Clip, check, skip, step and count, for one optimizer; everything on the device.

    ``parameters``: the model (its parameters and buffers are what a rollback restores), its
    ``named_parameters()`` or a list of parameters; the optimizer's parameters are clipped, named
    after them. ``max_norm``: a number, a threshold object (:class:`gradfuse.ZScoreThreshold`,
    :class:`gradfuse.QuantileThreshold`: adaptive, on the device) or None (no clipping).
    ``layerwise``: False (one global norm), True (each gradient to its own bound) or a ``group_by``
    of :func:`gradfuse.clip_grad_norm_per_tensor_` ("module", or a callable name -> key); with a
    threshold object, each gradient (group) gets its own adaptive threshold. ``agc``: an
    :class:`gradfuse.AGC` instead of ``max_norm`` (unit-wise adaptive clipping).
    ``nonfinite``: "skip" (default: a step with a NaN/Inf gradient is skipped, its gradients left
    untouched), "zero", "propagate" or "error" (:func:`gradfuse.clip_grads`). ``spike``: a
    :class:`gradfuse.SpikeRule` (skip a step whose norm or loss is a sigma outlier).
    ``max_bad_steps``: after that many skipped or non-finite steps in a row, restore a snapshot
    (``rollback``: a :class:`gradfuse.Rollback`) or raise RuntimeError (no rollback).
    ``scaler``: a ``torch.amp.GradScaler`` (unscale in the same read; ``scaler.update()`` stays the
    loop's). ``history``/``telemetry``: a :class:`gradfuse.NormHistory` / ``Telemetry`` fed every
    step (the spike rule makes a history when none is given). ``handoff``, ``foreach``, ``backend``:
    as in :func:`gradfuse.clip_grad_norm_for_optimizer_`.

    Sharded gradients (DTensors, or ``group=``, ``exclude_from_norm=`` as in
    :func:`gradfuse.clip_grad_norm_`; global clipping only): the total, found_inf and so every
    decision (threshold, spike, skip, rollback) are the same on every rank. ``layer_norms``: feed
    the history/telemetry the global per-layer norms (one more collective per step; None: when they
    are fed; False: NaN, not gathered).
    """

    def __init__(self, parameters, optimizer: torch.optim.Optimizer, max_norm=1.0, norm_type: float = 2.0, *, layerwise=False,
                 agc: AGC | None = None, nonfinite: str = "skip", spike: SpikeRule | None = None, max_bad_steps: int | None = None,
                 rollback: Rollback | None = None, scaler: torch.amp.GradScaler | None = None, history=None, telemetry=None,
                 handoff: bool | None = None, foreach: bool | None = None, backend: str | None = None, group=None,
                 exclude_from_norm=None, layer_norms: bool | None = None):  # fmt: skip
        fn = "Clipper"
        opt_params = _steps.params_of(optimizer, fn)
        named = named_parameters(parameters, fn)
        names = {id(p): name for name, p in reversed(named)}
        missing = [i for i, p in enumerate(opt_params) if id(p) not in names]
        if missing:
            raise ValueError(f"Clipper: optimizer parameter {missing[0]} is not among `parameters`; pass the model whose parameters the optimizer steps")
        self.named = [(names[id(p)], p) for p in opt_params]
        self.params = opt_params
        self.optimizer = optimizer
        self.threshold = max_norm if hasattr(max_norm, "threshold") else None
        if agc is not None and max_norm is not None:
            raise ValueError("Clipper: agc= clips by the weights' norms; pass max_norm=None with it")
        if agc is not None and not isinstance(agc, AGC):
            raise TypeError(f"Clipper: agc must be a gradfuse.AGC, not {type(agc).__name__}")
        self.max_norm = None if self.threshold is not None or max_norm is None else v.check_max_norm(max_norm, fn)
        self.norm_type = v.check_norm_type(norm_type, fn)
        self.agc = agc
        if layerwise not in (False, True) and agc is None:
            if layerwise is None:
                raise TypeError(f"{fn}: layerwise must be False, True, 'module' or a callable name -> key, not None")
            group_keys([], layerwise, fn)  # validates group_by
        self.layerwise = layerwise if agc is None else False
        self.nonfinite = v.check_nonfinite(nonfinite, fn)
        if spike is not None and not isinstance(spike, SpikeRule):
            raise TypeError(f"Clipper: spike must be a gradfuse.SpikeRule, not {type(spike).__name__}")
        self.spike = spike
        if max_bad_steps is not None and (isinstance(max_bad_steps, bool) or not isinstance(max_bad_steps, int) or max_bad_steps < 1):
            raise ValueError(f"Clipper: max_bad_steps must be an integer >= 1 or None, got {max_bad_steps!r}")
        if rollback is not None and (not isinstance(rollback, Rollback) or max_bad_steps is None):
            raise ValueError("Clipper: rollback= needs a gradfuse.Rollback and max_bad_steps= (when to roll back)")
        self.max_bad_steps, self.rollback = max_bad_steps, rollback
        if scaler is not None:
            _amp.check_scaler(scaler, fn)
        self.scaler, self.handoff, self.foreach, self.backend = scaler, handoff, foreach, backend
        self.group, self.exclude_from_norm = _layout.check_group(group, fn), exclude_from_norm
        _layout.excluded_indices(opt_params, exclude_from_norm, fn)  # validated here, resolved each step
        self.sharded = self.group is not None or exclude_from_norm is not None or _layout.has_dtensors(opt_params)
        if self.sharded and (agc is not None or layerwise is not False):
            raise ValueError("Clipper: layer-wise and AGC clipping of sharded gradients (DTensors, group=) are not supported; clip globally")
        self.layer_norms = layer_norms
        device = _layout.collective_device(self.group) if self.group is not None else opt_params[0].device if opt_params else torch.device("cpu")
        self.counter = NonFiniteCounter(device)
        self.history, self.telemetry = _history(history, spike, device), telemetry
        self.rollbacks = 0  # host count of the rollbacks done
        self.steps = 0  # optimizer steps taken or skipped (host count)
        self._skip_batches = 0
        self._gate: torch.Tensor | None = None  # the skip flag step() reads when only the host can skip
        self._overflow: torch.Tensor | None = None  # under a GradScaler with a spike rule: found_inf alone
        self._to_record = None  # what clip() measured, for the threshold and the statistics
        self._watch = LaggedRead() if max_bad_steps is not None else None
        self._snapshots = Snapshots(parameters if isinstance(parameters, torch.nn.Module) else opt_params, optimizer, rollback.keep) if rollback else None
        self._last_bad = 0  # the consecutive bad steps the host last saw
        self.last_rollback: dict | None = None  # {"detected_at": step, "restored": step} of the last rollback
        if self._snapshots is not None:
            self._snapshots.capture(0)

    # -- the step, part 1: traceable --------------------------------------------------------------

    def _bound(self, device):
        return self.threshold.threshold(device) if self.threshold is not None else (float("inf") if self.max_norm is None else self.max_norm)

    def _measure(self, grads, dtypes, bound, inv_scale, handoff: bool):
        """One read and the scale pass of the chosen clipping: the step's result (per gradient, what
        statistics see), the factor still to hand to the optimizer, and the threshold's statistic."""
        p, nonfinite = self.norm_type, self.nonfinite
        error = nonfinite == "error"
        if self.agc is not None:
            u = select(self.named, self.agc.exclude)
            r = clip_units(u, self.agc.clip_factor, self.agc.eps, p, v.policy_of(nonfinite), error=error, inv_scale=inv_scale,
                           foreach=self.foreach, backend=self.backend)  # fmt: skip
            return per_gradient(r, u.grad_rows, inv_scale), None, None
        if self.layerwise is False:
            policy = v.policy_of(_steps.measured_policy(nonfinite, handoff))
            with_grad = [q for q in self.params if q.grad is not None]
            excluded = _layout.excluded_indices(with_grad, self.exclude_from_norm, "Clipper.clip")
            r = clip_maybe_distributed(grads, bound, p, group=self.group, excluded=excluded, fn="Clipper.clip", apply=not handoff,
                                       backend=self.backend, error_if_nonfinite=error, foreach=self.foreach, policy=policy,
                                       inv_scale=inv_scale, dtypes=dtypes)  # fmt: skip
            return r, (r.scale if handoff else None), r.total_norm
        policy = v.policy_of(nonfinite)
        vector = isinstance(bound, torch.Tensor) and bound.dim() > 0
        if self.layerwise is True and not vector:  # the kernels' finalize writes the factors
            r = ops.clip(grads, bound, p, apply=True, backend=self.backend, error_if_nonfinite=error, foreach=self.foreach,
                         policy=policy, inv_scale=inv_scale, per_tensor=True, dtypes=dtypes)  # fmt: skip
            r = with_smallest_coef(r, bound, inv_scale)
            return r, None, r.tensor_norms
        # per-group bounds are applied below: the read gets a scalar one (its global coefficient is not used)
        r = ops.clip(grads, float("inf") if vector else bound, p, apply=False, backend=self.backend, error_if_nonfinite=error,
                     foreach=self.foreach, policy=policy, inv_scale=inv_scale, dtypes=dtypes)  # fmt: skip
        index, size = (None, len(grads)) if self.layerwise is True else self._groups(grads)
        r, norms = clip_by_group(r, bound, index, size, policy, inv_scale)
        ops.scale_(grads, r.tensor_scales, backend=self.backend, foreach=self.foreach, per_tensor=True,
                   zero_if_scale_is_zero=policy == _abi.POLICY_ZERO)  # fmt: skip
        return r, None, norms.to(torch.float32)

    def _groups(self, grads):
        keys = group_keys([name for name, p in self.named if p.grad is not None], self.layerwise, "Clipper")
        return segment_index(keys, grads[0].device)

    def clip(self, loss: torch.Tensor | float | None = None) -> ClipResult | None:
        """Clip the gradients and decide whether the optimizer's next step is taken, on the device.
        ``loss``: this step's loss, for the spike rule and the statistics. Returns the step's
        :class:`~gradfuse.ClipResult` (per gradient), or None when no parameter has a gradient."""
        fn = "Clipper.clip"
        opt, params = self.optimizer, self.params
        self._gate = self._overflow = self._to_record = None
        scaler = self.scaler if _amp.enabled(self.scaler) else None
        grads = v.grads_of(params, fn)
        inv_scale = _amp.begin_unscale(scaler, opt, params, fn, self.group) if scaler is not None else None
        handoff = _handoff.use_handoff(opt, self.handoff, fn)
        if not grads and self.group is None:
            _handoff.drop(opt)
            if scaler is not None:
                _amp.mark_unscaled(scaler, opt, None)
            return None
        if handoff:
            _handoff.check_no_foreign_scale(opt, fn)
        dtypes = v.check_grads(grads, self.norm_type, self.foreach, fn)
        bound = self._bound(grads[0].device if grads else self.counter.counts.device)
        r, factor, statistic = self._measure(grads, dtypes, bound, inv_scale, handoff)
        _handoff.drop(opt)  # after every check: a call that raises leaves an earlier hand-off as it was
        found = r.found_inf.reshape(()).to(torch.float32)
        loss = None if loss is None else _device_loss(loss, found.device)
        spike = self.spike.check(self.history, r.total_norm, loss) if self.spike is not None else None
        gate = found if self.nonfinite == "skip" or scaler is not None else None
        if spike is not None:
            gate = spike.to(torch.float32) if gate is None else torch.maximum(gate, spike.to(torch.float32))
        if factor is not None:  # global clip handed to a fused optimizer: it also skips on the gate
            r = _steps.clip_for_next_step(opt, params, r, self.nonfinite, under_scaler=scaler is not None, skip=gate,
                                          foreach=self.foreach, backend=self.backend, fn=fn)  # fmt: skip
        elif handoff and gate is not None and scaler is None:  # already scaled: hand over the gate alone
            _handoff.hand_over(opt, torch.ones_like(found), gate, under_scaler=False)
        if scaler is not None:
            _amp.mark_unscaled(scaler, opt, gate)
            self._overflow = found if spike is not None else None
        elif not handoff:
            self._gate = gate
        self.counter.update(r, spike=spike, skipped=gate)
        self._to_record = (r, bound, gate, loss, statistic)
        return r

    def _record(self) -> None:
        """Feed the step's norms to the threshold and the statistics (after the step, eagerly:
        their host-side step counts must not be traced into a compiled clip)."""
        if self._to_record is None:
            return
        r, bound, gate, loss, statistic = self._to_record
        self._to_record = None
        if self.threshold is not None:
            self.threshold.update(statistic)
        if isinstance(r, DistributedClipResult) and (self.history is not None or self.telemetry is not None):
            gather = self.layer_norms is not False  # every rank feeds alike: the collective is everyone's
            r = dataclasses.replace(r, tensor_norms=r.global_tensor_norms() if gather else torch.full_like(r.tensor_norms, float("nan")))
        scalar_bound = bound if not isinstance(bound, torch.Tensor) or bound.dim() == 0 else None
        for sink in (self.history, self.telemetry):
            if sink is not None:
                sink.update(r, max_norm=None if self.agc is not None else scalar_bound, skipped=gate, loss=loss)

    # -- the step, part 2: the optimizer, snapshots, rollback (eager) ---------------------------------

    def optimizer_step(self, *args, **kwargs):
        """The optimizer's step as :meth:`clip` decided it (``scaler.step`` with a scaler); then the
        snapshot every ``rollback.every`` steps and the persistent-explosion check."""
        if self._snapshots is not None:
            self._snapshots.before_update()
        if _amp.enabled(self.scaler):
            out = self.scaler.step(self.optimizer, *args, **kwargs)
            if self._overflow is not None:
                _amp.record_overflow(self.scaler, self.optimizer, self._overflow)
        else:
            out = _steps.gated_step(self.optimizer, self._gate, *args, **kwargs)
        self._gate = self._overflow = None
        self._record()
        self.steps += 1
        self._watch_for_explosion()
        if self._snapshots is not None and self.steps % self.rollback.every == 0 and self._last_bad == 0:
            self._snapshots.capture(self.steps)
        return out

    def step(self, loss: torch.Tensor | float | None = None, *args, **kwargs) -> ClipResult | None:
        """:meth:`clip` then :meth:`optimizer_step` (``args``/``kwargs`` go to the optimizer's step)."""
        r = self.clip(loss)
        self.optimizer_step(*args, **kwargs)
        return r

    def _watch_for_explosion(self) -> None:
        if self._watch is None:
            return
        self._watch.start(self.counter.counts)
        seen = self._watch.latest()
        if seen is None:
            return
        steps_seen, self._last_bad = int(seen[0]), int(seen[_BAD])
        if self._last_bad < self.max_bad_steps:
            return
        what = f"{self._last_bad} skipped or non-finite steps in a row (max_bad_steps={self.max_bad_steps}) up to step {steps_seen}"
        if self.rollback is None:
            raise RuntimeError(f"Clipper: {what}: a persistent explosion. Pass rollback=gradfuse.Rollback(...) to restore a snapshot instead")
        if self.rollbacks >= self.rollback.max_rollbacks:
            raise RuntimeError(f"Clipper: {what}, after {self.rollbacks} rollbacks (Rollback.max_rollbacks)")
        restored = self._snapshots.restore(before=steps_seen - self._last_bad)
        if restored is None:
            raise RuntimeError(f"Clipper: {what}, and no snapshot from before step {steps_seen - self._last_bad + 1} is held")
        self.rollbacks += 1
        self.last_rollback = {"detected_at": steps_seen, "restored": restored}
        self._skip_batches = self.rollback.skip_batches
        self.counter.counts[_RESET_ON_ROLLBACK] = 0
        self._watch.reset()
        self._last_bad = 0

    def skip_batch(self) -> bool:
        """True for each of the ``rollback.skip_batches`` batches after a rollback (skip them)."""
        if self._skip_batches > 0:
            self._skip_batches -= 1
            return True
        return False

    # -- reading and checkpoints --------------------------------------------------------------------

    def stats(self) -> dict:
        """The counters (one host read), the rollbacks and the snapshots held."""
        out = self.counter.as_dict()
        out["rollbacks"] = self.rollbacks
        if self._snapshots is not None:
            out["snapshot_steps"] = self._snapshots.steps()
        return out

    def state_dict(self) -> dict:
        out = {"counter": self.counter.state_dict(), "rollbacks": self.rollbacks, "steps": self.steps}
        if self.threshold is not None:
            out["threshold"] = self.threshold.state_dict()
        if self.history is not None:
            out["history"] = self.history.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        self.counter.load_state_dict(state["counter"])
        self.rollbacks, self.steps = int(state["rollbacks"]), int(state["steps"])
        if self.threshold is not None:
            self.threshold.load_state_dict(state["threshold"])
        if self.history is not None and "history" in state:
            self.history.load_state_dict(state["history"])
