"""Taming exploding gradients: adaptive clip thresholds and per-layer norm telemetry, on the device.

Everything here updates device tensors with torch ops and never reads them back, so a training step
stays free of host syncs; ``GradClipper.stats()`` and ``NonFiniteCounter.as_dict()`` are the places
that read (call them when you log).

``NonFiniteCounter`` counts steps, non-finite steps and clipped steps from each ClipResult.

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
import numbers

import torch

from . import _layout, _validation as v
from ._backends import requested_backend
from ._engine import ClipResult
from ._tracking import named_parameters
from .clip import clip_grads
from .distributed import DistributedClipResult


class NonFiniteCounter:
    """Counts clip steps, non-finite steps and clipped steps on the device, with no host sync.

    ``update(result)`` after each clip adds to int64 device tensors (created on the device of the
    first result, or of ``device``): ``steps``, ``nonfinite_steps`` (found_inf set), ``clipped_steps``
    (finite and coefficient below 1), ``consecutive_nonfinite`` (reset by a finite step). Read them
    with :meth:`as_dict` (one host sync) or keep them on the device (e.g. to halt after N
    consecutive overflows with ``torch._assert_async``). ``state_dict``/``load_state_dict`` for
    checkpoints.
    """

    #: the counts, in the order of ``counts``.
    FIELDS = ("steps", "nonfinite_steps", "clipped_steps", "consecutive_nonfinite")

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


def _real(owner: str, name: str, value, *, low: float, high: float = math.inf, low_open: bool = True, high_open: bool = False) -> float:
    """``value`` as a float inside the interval, else an error naming the setting and the value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, not {type(value).__name__}")
    value = float(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if math.isnan(value) or below or above:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{owner}: {name} must be in {interval}, got {value}")
    return value


def _count(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner}: {name} must be an integer >= 1, got {value!r}")
    return int(value)


class ZScoreThreshold:
    """ZClip: threshold = mu + z_thresh * sigma from an EMA (alpha) of the total norm."""

    def __init__(self, max_norm: float = 1.0, alpha: float = 0.97, z_thresh: float = 2.5, warmup_steps: int = 25):
        owner = "ZScoreThreshold"
        self.max_norm = _real(owner, "max_norm", max_norm, low=0.0)
        self.alpha = _real(owner, "alpha", alpha, low=0.0, high=1.0, high_open=True)
        self.z_thresh = _real(owner, "z_thresh", z_thresh, low=0.0, high_open=True)
        self.warmup_steps = _count(owner, "warmup_steps", warmup_steps)
        self.steps = 0
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self._warmup_sum: torch.Tensor | None = None
        self._warmup_sq: torch.Tensor | None = None

    def threshold(self, device: torch.device) -> torch.Tensor:
        """max_norm for this step, as a float32 device scalar."""
        cap = torch.full((), self.max_norm, dtype=torch.float32, device=device)
        if self.steps < self.warmup_steps or self.mean is None:
            return cap
        return torch.minimum(self.mean + self.z_thresh * self.var.clamp_min(0).sqrt(), cap)

    def update(self, total_norm: torch.Tensor) -> None:
        """Fold this step's (finite) norm into the statistics; non-finite norms are ignored."""
        n = total_norm.detach().float().reshape(())
        finite = torch.isfinite(n)
        n = torch.where(finite, n, torch.zeros_like(n))
        if self.steps < self.warmup_steps:
            w = finite.float()
            self._warmup_sum = n * w if self._warmup_sum is None else self._warmup_sum + n * w
            self._warmup_sq = n * n * w if self._warmup_sq is None else self._warmup_sq + n * n * w
            self.steps += 1
            if self.steps == self.warmup_steps:
                self.mean = self._warmup_sum / self.warmup_steps
                self.var = self._warmup_sq / self.warmup_steps - self.mean * self.mean
            return
        # Clipped norms enter the EMA at the threshold, so one spike does not drag the mean up.
        n = torch.minimum(n, self.threshold(n.device))
        new_mean = self.alpha * self.mean + (1 - self.alpha) * n
        new_var = self.alpha * self.var + (1 - self.alpha) * (n - self.mean) ** 2
        self.mean = torch.where(finite, new_mean, self.mean)
        self.var = torch.where(finite, new_var, self.var)
        self.steps += 1

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("max_norm", "alpha", "z_thresh", "warmup_steps", "steps", "mean", "var", "_warmup_sum", "_warmup_sq")}

    def load_state_dict(self, state: dict) -> None:
        for k, val in state.items():
            setattr(self, k, val)


class QuantileThreshold:
    """AutoClip: threshold = the ``quantile`` of the last ``history`` total norms (capped by max_norm)."""

    def __init__(self, max_norm: float = math.inf, quantile: float = 0.9, history: int = 1000, warmup_steps: int = 10):
        owner = "QuantileThreshold"
        self.max_norm = _real(owner, "max_norm", max_norm, low=0.0)
        self.quantile = _real(owner, "quantile", quantile, low=0.0, high=1.0)
        self.history = _count(owner, "history", history)
        self.warmup_steps = _count(owner, "warmup_steps", warmup_steps)
        self.steps = 0
        self.norms: torch.Tensor | None = None

    def threshold(self, device: torch.device) -> torch.Tensor:
        cap = torch.full((), self.max_norm, dtype=torch.float32, device=device)
        filled = min(self.steps, self.history)
        if self.steps < self.warmup_steps or self.norms is None:
            return cap
        return torch.minimum(torch.quantile(self.norms[:filled], self.quantile), cap)

    def update(self, total_norm: torch.Tensor) -> None:
        n = total_norm.detach().float().reshape(())
        if self.norms is None:
            self.norms = torch.zeros(self.history, dtype=torch.float32, device=n.device)
        slot = self.steps % self.history
        previous = self.norms[slot]
        # A non-finite norm keeps the slot's old value out of the history (no sync to branch on it).
        self.norms[slot] = torch.where(torch.isfinite(n), n, previous if self.steps >= self.history else torch.zeros_like(n))
        self.steps += 1

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("max_norm", "quantile", "history", "warmup_steps", "steps", "norms")}

    def load_state_dict(self, state: dict) -> None:
        for k, val in state.items():
            setattr(self, k, val)


class GradClipper:
    """Clip a model's gradients each step and keep per-layer statistics on the device.

    ``parameters``: ``model.named_parameters()`` (layers are reported by name), or plain
    parameters (reported as ``param0``, ``param1``, ...).
    ``max_norm``: a number or a threshold object (``ZScoreThreshold``, ``QuantileThreshold``).
    ``step()`` clips (``gradfuse.clip_grads``) and updates running statistics without a host sync:
    the step counts of a :class:`NonFiniteCounter` (``counter``), the last and the largest total
    norm, and each layer's last and largest norm (NaN once the layer held a NaN). ``stats()`` reads
    them back (one sync). ``history`` (:class:`gradfuse.NormHistory`) and ``telemetry``
    (:class:`gradfuse.Telemetry`), when given, are fed every step with the threshold used and, for
    ``nonfinite="skip"``, whether the step was skipped.

    Sharded gradients (DTensors, or ``group=`` as in :func:`gradfuse.clip_grad_norm_`): the totals
    and thresholds are global and the same on every rank. ``layer_norms``: record the per-layer
    norms, which for sharded gradients are the global ones, gathered by one more collective per
    step and mesh (None, the default: only when that costs nothing, i.e. for local gradients).
    """

    def __init__(
        self, parameters, max_norm=1.0, norm_type: float = 2.0, *, nonfinite: str = "propagate", backend: str | None = None,
        history=None, telemetry=None, group=None, layer_norms: bool | None = None,
    ):  # fmt: skip
        fn = "GradClipper"
        self.named = named_parameters(parameters, fn)
        self.names = [name for name, _ in self.named]
        self.threshold = max_norm if hasattr(max_norm, "threshold") else None
        self.max_norm = None if self.threshold is not None else v.check_max_norm(max_norm, fn)
        self.norm_type = v.check_norm_type(norm_type, fn)
        self.nonfinite = v.check_nonfinite(nonfinite, fn)
        self.backend = requested_backend(backend) if backend is not None else None
        self.group = _layout.check_group(group, fn)
        self.layer_norms = layer_norms
        self.counter = NonFiniteCounter()
        self.history, self.telemetry = history, telemetry
        self._totals: torch.Tensor | None = None  # [last total norm, largest total norm]
        self._layer_last: torch.Tensor | None = None
        self._layer_max: torch.Tensor | None = None
        self._index: tuple[tuple[int, ...], torch.Tensor] | None = None  # layers with a grad, on device

    def step(self) -> ClipResult | None:
        params = [p for _, p in self.named]
        with_grad = [i for i, p in enumerate(params) if p.grad is not None]
        if not with_grad and self.group is None:
            return None
        device = params[with_grad[0]].grad.device if with_grad else _layout.collective_device(self.group)
        max_norm = self.threshold.threshold(device) if self.threshold is not None else self.max_norm
        result = clip_grads(params, max_norm, self.norm_type, nonfinite=self.nonfinite, backend=self.backend, group=self.group)
        if self.threshold is not None:
            self.threshold.update(result.total_norm)
        self._record(result, with_grad, device)
        skipped = result.found_inf if self.nonfinite == "skip" else None
        for sink in (self.history, self.telemetry):
            if sink is not None:
                sink.update(result, max_norm=max_norm, skipped=skipped)
        return result

    @torch.no_grad()
    def _record(self, r: ClipResult, with_grad: list[int], device: torch.device) -> None:
        self.counter.update(r)
        if self._totals is None:
            self._totals = torch.zeros(2, dtype=torch.float64, device=device)
            self._layer_last = torch.zeros(len(self.named), dtype=torch.float32, device=device)
            self._layer_max = torch.zeros(len(self.named), dtype=torch.float32, device=device)
        total = r.total_norm.to(device, torch.float64)
        self._totals[0] = total
        self._totals[1] = torch.fmax(self._totals[1], total)
        if self._index is None or self._index[0] != tuple(with_grad):  # copied once, not every step
            self._index = (tuple(with_grad), torch.tensor(with_grad, device=device))
        idx = self._index[1]
        sharded = isinstance(r, DistributedClipResult)
        if not (self.layer_norms if self.layer_norms is not None else not sharded):
            return
        norms = (r.global_tensor_norms() if sharded else r.tensor_norms).to(device, torch.float32)
        self._layer_last.index_copy_(0, idx, norms)
        # torch.maximum, not fmax: a layer that held a NaN must show it, not hide behind its old max.
        self._layer_max.index_copy_(0, idx, torch.maximum(self._layer_max.index_select(0, idx), norms))

    def stats(self, top_k: int = 5) -> dict:
        """Host copy of the statistics (one sync): counts, clip rate, norms, the top-k layers."""
        if self._totals is None:
            return {"steps": 0}
        n = len(self.names)
        values = torch.cat(
            [self.counter.counts.double(), self._totals, self._layer_last.double(), self._layer_max.double()]
        ).tolist()  # one read for everything
        k = len(NonFiniteCounter.FIELDS)
        counts = dict(zip(NonFiniteCounter.FIELDS, map(int, values[:k])))
        last, largest = values[k : k + 2]
        last_layers, max_layers = values[k + 2 : k + 2 + n], values[k + 2 + n :]
        order = sorted(range(n), key=lambda i: -last_layers[i] if math.isfinite(last_layers[i]) else -math.inf)
        steps = counts["steps"]
        return {
            "steps": steps,
            "clipped_steps": counts["clipped_steps"],
            "clip_rate": counts["clipped_steps"] / steps if steps else 0.0,
            "nonfinite_steps": counts["nonfinite_steps"],
            "consecutive_nonfinite": counts["consecutive_nonfinite"],
            "last_total_norm": last,
            "max_total_norm": largest,
            "top_layers": [(self.names[i], last_layers[i]) for i in order[:top_k]],
            "layer_max_norms": dict(zip(self.names, max_layers)),
        }
