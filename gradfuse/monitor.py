"""Step counters and adaptive clip thresholds, on the device (what :class:`gradfuse.Clipper` uses).

Everything here updates device tensors with torch ops and never reads them back, so a training step
stays free of host syncs; ``NonFiniteCounter.as_dict()`` is the place that reads (call it when you log).

``NonFiniteCounter`` counts steps, non-finite, clipped and skipped steps from each ClipResult.

Thresholds (each gives ``max_norm`` as a device tensor, which the kernels read on the device):

* ``ZScoreThreshold`` (ZClip, arXiv:2504.02507): EMA mean ``mu`` and variance ``var`` of the total
  norm; a norm whose z-score ``(n - mu) / sigma`` exceeds ``z_thresh`` is clipped to
  ``mu + z_thresh * sigma``; during warm-up the fixed ``max_norm`` applies.
* ``QuantileThreshold`` (AutoClip, arXiv:2007.14469): clip to the ``quantile`` of the last
  ``history`` total norms.

Both are capped by ``max_norm`` (``min(adaptive, max_norm)``) and are ``state_dict``-checkpointable.
"""

from __future__ import annotations

import math

import torch

from . import _tracking as tr, _validation as v
from ._engine import ClipResult


class NonFiniteCounter:
    """Counts clip steps, non-finite steps, clipped steps and skipped steps on the device, with no host sync.

    ``update(result, spike=None, skipped=None)`` after each clip adds to int64 device tensors
    (created on the device of the first result, or of ``device``): ``steps``, ``nonfinite_steps``
    (found_inf set), ``clipped_steps`` (finite, not skipped, and a coefficient below 1),
    ``consecutive_nonfinite`` (reset by a finite step), ``spike_steps`` (``spike`` set: skipped by
    a spike rule), ``skipped_steps`` (``skipped`` set: the optimizer step did not happen) and
    ``consecutive_bad`` (skipped or non-finite steps in a row, reset by a finite step taken). Read
    them with :meth:`as_dict` (one host sync) or keep them on the device (e.g. to halt after N
    consecutive overflows with ``torch._assert_async``). ``state_dict``/``load_state_dict`` for
    checkpoints.
    """

    #: the counts, in the order of ``counts``.
    FIELDS = ("steps", "nonfinite_steps", "clipped_steps", "consecutive_nonfinite", "spike_steps", "skipped_steps", "consecutive_bad")

    def __init__(self, device: torch.device | str | None = None):
        self.counts: torch.Tensor | None = None
        if device is not None:
            self.counts = torch.zeros(len(self.FIELDS), dtype=torch.int64, device=device)

    def _on(self, device: torch.device) -> torch.Tensor:
        if self.counts is None:
            self.counts = torch.zeros(len(self.FIELDS), dtype=torch.int64, device=device)
        elif self.counts.device != device:
            self.counts = self.counts.to(device)
        return self.counts

    @torch.no_grad()
    def update(self, result: ClipResult | None, *, spike: torch.Tensor | None = None, skipped: torch.Tensor | None = None) -> None:
        """Count one clip (None, a clip with no gradients, counts nothing). ``spike``, ``skipped``:
        device flags (nonzero: set) of this step, None when not set."""
        if result is None:
            return
        found = result.found_inf.detach().reshape(()).ne(0).to(torch.int64)
        spike = torch.zeros_like(found) if spike is None else spike.detach().reshape(()).ne(0).to(torch.int64)
        skipped = torch.zeros_like(found) if skipped is None else skipped.detach().reshape(()).ne(0).to(torch.int64)
        clipped = tr.clipped(result.clip_coef.detach().reshape(()), found.bool(), skipped.bool()).to(torch.int64)
        bad = torch.maximum(found, skipped)
        counts = self._on(found.device)
        counts.add_(torch.stack((torch.ones_like(found), found, clipped, found, spike, skipped, bad)))
        counts.mul_(torch.stack((torch.ones_like(found),) * 3 + (found,) + (torch.ones_like(found),) * 2 + (bad,)))  # consecutive: (n + 1) * flag

    def __getattr__(self, name):
        if name in NonFiniteCounter.FIELDS:
            counts = self.__dict__.get("counts")
            if counts is None:
                return torch.zeros((), dtype=torch.int64)
            return counts[NonFiniteCounter.FIELDS.index(name)]
        raise AttributeError(name)

    def as_dict(self) -> dict[str, int]:
        """The counts as Python ints (one host sync)."""
        values = [0] * len(self.FIELDS) if self.counts is None else self.counts.tolist()
        return dict(zip(self.FIELDS, values))

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


class ZScoreThreshold:
    """ZClip: threshold = mu + z_thresh * sigma from an EMA (alpha) of the norm. ``update`` takes a
    scalar (the total norm) or a vector (per-tensor or per-group norms, each with its own EMA, for
    layer-wise clipping); ``threshold`` then has the same shape. The state, the step count included,
    lives on the device (no host read, and nothing a compiled step must guard on)."""

    def __init__(self, max_norm: float = 1.0, alpha: float = 0.97, z_thresh: float = 2.5, warmup_steps: int = 25):
        owner = "ZScoreThreshold"
        self.max_norm = v.real_setting(owner, "max_norm", max_norm, low=0.0)
        self.alpha = v.real_setting(owner, "alpha", alpha, low=0.0, high=1.0, high_open=True)
        self.z_thresh = v.real_setting(owner, "z_thresh", z_thresh, low=0.0, high_open=True)
        self.warmup_steps = v.count_setting(owner, "warmup_steps", warmup_steps)
        self.steps: torch.Tensor | None = None  # int64 device scalar: updates so far
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self._warmup: torch.Tensor | None = None  # [sum, sum of squares, count] of the finite warm-up norms

    def threshold(self, device: torch.device) -> torch.Tensor:
        """max_norm for this step, as a float32 device tensor (a scalar until the first update)."""
        cap = torch.full((), self.max_norm, dtype=torch.float32, device=device)
        if self.steps is None:
            return cap
        adaptive = torch.minimum(self.mean + self.z_thresh * self.var.clamp_min(0).sqrt(), cap)
        return torch.where(self.steps >= self.warmup_steps, adaptive, cap)

    @torch.no_grad()
    def update(self, total_norm: torch.Tensor) -> None:
        """Fold this step's (finite) norms into the statistics; non-finite norms are ignored."""
        n = total_norm.detach().float()
        if self.steps is None:
            self.steps = torch.zeros((), dtype=torch.int64, device=n.device)
            self.mean, self.var = torch.zeros_like(n), torch.zeros_like(n)
            self._warmup = torch.zeros((3, *n.shape), dtype=torch.float32, device=n.device)
        finite = torch.isfinite(n)
        n = torch.where(finite, n, 0.0)
        # After warm-up: the EMA, with a clipped norm entering at the threshold (one spike does not drag the mean up).
        clipped = torch.minimum(n, self.threshold(n.device))
        after = finite & (self.steps >= self.warmup_steps)
        mean = torch.where(after, self.alpha * self.mean + (1 - self.alpha) * clipped, self.mean)
        var = torch.where(after, self.alpha * self.var + (1 - self.alpha) * (clipped - self.mean) ** 2, self.var)
        # During warm-up: sums of the finite norms; their mean and variance start the EMA.
        during = (finite & (self.steps < self.warmup_steps)).float()
        self._warmup.add_(torch.stack((n * during, n * n * during, during)))
        self.steps.add_(1)
        count = self._warmup[2].clamp(min=1)
        start = self.steps == self.warmup_steps
        warm_mean = self._warmup[0] / count
        self.mean = torch.where(start, warm_mean, mean)
        self.var = torch.where(start, self._warmup[1] / count - warm_mean * warm_mean, var)

    def state_dict(self) -> dict:
        return _saved(self, ("max_norm", "alpha", "z_thresh", "warmup_steps", "steps", "mean", "var", "_warmup"))

    def load_state_dict(self, state: dict) -> None:
        _load(self, state)


class QuantileThreshold:
    """AutoClip: threshold = the ``quantile`` of the last ``history`` norms (capped by max_norm); a
    scalar (total norm) or one per entry of the vectors ``update`` is given (layer-wise clipping).
    The ring and the step count live on the device (no host read, nothing for compile to guard on)."""

    def __init__(self, max_norm: float = math.inf, quantile: float = 0.9, history: int = 1000, warmup_steps: int = 10):
        owner = "QuantileThreshold"
        self.max_norm = v.real_setting(owner, "max_norm", max_norm, low=0.0)
        self.quantile = v.real_setting(owner, "quantile", quantile, low=0.0, high=1.0)
        self.history = v.count_setting(owner, "history", history)
        self.warmup_steps = v.count_setting(owner, "warmup_steps", warmup_steps)
        self.steps: torch.Tensor | None = None  # int64 device scalar: updates so far
        self.norms: torch.Tensor | None = None  # [history, ...]: NaN where no finite norm was written yet

    def threshold(self, device: torch.device) -> torch.Tensor:
        cap = torch.full((), self.max_norm, dtype=torch.float32, device=device)
        if self.steps is None:
            return cap
        q = torch.nanquantile(self.norms, self.quantile, dim=0)
        return torch.where((self.steps >= self.warmup_steps) & ~torch.isnan(q), torch.minimum(q, cap), cap)

    @torch.no_grad()
    def update(self, total_norm: torch.Tensor) -> None:
        n = total_norm.detach().float()
        if self.steps is None:
            self.steps = torch.zeros((), dtype=torch.int64, device=n.device)
            self.norms = torch.full((self.history, *n.shape), math.nan, dtype=torch.float32, device=n.device)
        slot = torch.remainder(self.steps, self.history).reshape(1)
        # A non-finite norm keeps the slot's old value (no sync to branch on it).
        old = self.norms.index_select(0, slot)
        self.norms.index_copy_(0, slot, torch.where(torch.isfinite(n), n, old))
        self.steps.add_(1)

    def state_dict(self) -> dict:
        return _saved(self, ("max_norm", "quantile", "history", "warmup_steps", "steps", "norms"))

    def load_state_dict(self, state: dict) -> None:
        _load(self, state)


def _saved(obj, names) -> dict:
    """Copies of the device state (the live tensors keep moving with training)."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in ((k, getattr(obj, k)) for k in names)}


def _load(obj, state: dict) -> None:
    """Into the tensors already held where shapes agree (what a compiled step reads), else copies."""
    for k, val in state.items():
        old = getattr(obj, k, None)
        if isinstance(val, torch.Tensor) and isinstance(old, torch.Tensor) and old.shape == val.shape and old.dtype == val.dtype:
            old.copy_(val)
        else:
            setattr(obj, k, val.clone() if isinstance(val, torch.Tensor) else val)
