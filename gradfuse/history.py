"""``NormHistory``: the last N clips' norms in a ring buffer on the device, for thresholds and plots.

``update(result)`` after each clip writes one row (total norm, found_inf, coefficient, scale, the
threshold, skipped, loss) and, for the layers chosen with ``layers=``, their norms, with a fixed
number of device ops and no host read. Non-finite totals stay in the ring (plots mark them), but
never enter the statistics: ``summary()`` and the quantiles use the finite norms only, and second
rings hold the finite totals and losses of the steps taken (not skipped) alone, so that
:meth:`NormHistory.window` (the mean, std and count of the last W of them, on the device: what a
z-score spike detector needs, ``gradfuse.SpikeRule``) is never poisoned by one NaN step or by the
spike it skipped.

The rule most training recipes use, ``max_norm`` = the 95th percentile of the norms seen:
``history.suggest_max_norm(0.95)`` (a host read), or ``history.quantile(0.95)`` (a device tensor).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from . import _tracking as tr, _validation as v
from ._engine import ClipResult

#: the per-layer value of a step at which the layer had no gradient (a norm is never negative).
NO_GRAD = -1.0
#: the step columns :meth:`NormHistory.window` keeps a window of.
WINDOWED = ("total_norm", "loss")
_WINDOWED_AT = [tr.STEP_COLUMNS.index(c) for c in WINDOWED]


class Window(NamedTuple):
    """Statistics of the last ``size`` finite total norms, as device scalars (float32, int64)."""

    mean: torch.Tensor
    std: torch.Tensor
    count: torch.Tensor


def _check_quantile(q, owner: str) -> float:
    return v.real_setting(owner, "quantile", q, low=0.0, high=1.0, low_open=False)


class NormHistory:
    """Ring buffer of the last ``capacity`` clips on the device.

    ``parameters``: a module or ``named_parameters()``, needed only to keep per-layer norms of the
    ``layers`` named (a list of parameter names, or ``"all"``); a layer without a gradient at a step
    is recorded as :data:`NO_GRAD`. ``device``: where the buffers live (default: the first result's).
    """

    def __init__(self, capacity: int = 1000, *, parameters=None, layers=None, device: torch.device | str | None = None):
        owner = "NormHistory"
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"{owner}: capacity must be an integer >= 1, got {capacity!r}")
        self.capacity = capacity
        self.steps = 0  # updates so far (host-side: each update writes exactly one row)
        self._layers = tr.Layers(parameters, owner) if parameters is not None else None
        if layers is not None and self._layers is None:
            raise ValueError(f"{owner}: layers= needs parameters= (the model's named_parameters())")
        names = [] if layers is None else (self._layers.names if layers == "all" else list(layers))
        self.layer_names = names
        self._tracked = self._layers.check_names(names) if names else []
        self._gather: dict[tuple[int, ...], torch.Tensor | None] = {}
        self._rows = self._layer_rows = self._finite = self._finite_count = None
        if device is not None:
            self._allocate(torch.device(device))

    def _allocate(self, device: torch.device) -> None:
        self._rows = torch.full((self.capacity, len(tr.STEP_COLUMNS)), math.nan, dtype=torch.float32, device=device)
        self._layer_rows = torch.full((self.capacity, len(self._tracked)), NO_GRAD, dtype=torch.float32, device=device)
        # One slot more than the capacity: the slot written next is never among the last `capacity`
        # values, so a value that must not enter can be written there unconditionally (no branch, no sync).
        self._finite = torch.zeros((len(WINDOWED), self.capacity + 1), dtype=torch.float32, device=device)
        self._finite_count = torch.zeros(len(WINDOWED), dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device | None:
        return None if self._rows is None else self._rows.device

    @torch.no_grad()
    def update(self, result: ClipResult | None, *, max_norm=None, skipped=None, loss=None) -> None:
        """Record one clip (None, a clip with no gradients, records nothing); no host read.

        ``max_norm``: the threshold the clip used (number or device scalar), ``skipped``: whether
        the optimizer step was skipped (bool or device tensor), ``loss``: this step's loss."""
        if result is None:
            return
        if self._rows is None:
            self._allocate(result.result.device)
        slot = self.steps % self.capacity
        tr.write_step(self._rows[slot], result, max_norm, skipped, loss)
        if self._tracked:
            self._layer_rows[slot].copy_(self._layer_norms(result))
        row = self._rows[slot]
        values = row[_WINDOWED_AT]
        at = torch.remainder(self._finite_count, self.capacity + 1)
        self._finite.scatter_(1, at.unsqueeze(1), values.unsqueeze(1))
        self._finite_count.add_(torch.isfinite(values) & (row[tr.SKIPPED] == 0))
        self.steps += 1

    def _layer_norms(self, result: ClipResult) -> torch.Tensor:
        present, _ = self._layers.rows(result)
        if present not in self._gather:  # one gather index per set of layers with a gradient
            row = {i: k for k, i in enumerate(present)}
            missing = len(present)  # the NO_GRAD element appended below
            index = [row.get(i, missing) for i in self._tracked]
            trivial = index == list(range(len(present))) and len(index) == len(present)
            self._gather[present] = None if trivial else torch.tensor(index, dtype=torch.int64, device=self.device)
        norms = result.tensor_norms.detach().to(torch.float32)
        index = self._gather[present]
        if index is None:
            return norms
        return torch.cat([norms, norms.new_full((1,), NO_GRAD)]).index_select(0, index)

    # -- on the device, no host read ---------------------------------------------------------

    def _ordered(self, rows: torch.Tensor) -> torch.Tensor:
        """The filled rows of a ring, oldest first."""
        if self.steps <= self.capacity:
            return rows[: self.steps]
        slot = self.steps % self.capacity
        return torch.cat([rows[slot:], rows[:slot]])

    def norms(self) -> torch.Tensor:
        """The recorded total norms (NaN/Inf included), oldest first, on the device."""
        self._require("norms")
        return self._ordered(self._rows)[:, tr.TOTAL]

    def quantile(self, q: float = 0.95) -> torch.Tensor:
        """The ``q`` quantile of the finite recorded norms (linear interpolation, numpy's default),
        a float32 device scalar; NaN when none is finite."""
        q = _check_quantile(q, "NormHistory.quantile")
        n = self.norms()
        return torch.nanquantile(torch.where(torch.isfinite(n), n, torch.nan), q)

    def window(self, size: int | None = None, correction: int = 1, of: str = "total_norm") -> Window:
        """Mean, std (``correction`` as in ``torch.std``) and count of the last ``size`` (default:
        ``capacity``) finite total norms (``of="loss"``: losses) of the steps taken, on the device.
        With fewer than ``size`` so far, of those there are (count < size; mean 0, std 0 when there
        is none)."""
        self._require("window")
        if of not in WINDOWED:
            raise ValueError(f"NormHistory.window: of must be one of {WINDOWED}, got {of!r}")
        ring, filled = self._finite[WINDOWED.index(of)], self._finite_count[WINDOWED.index(of)]
        size = self.capacity if size is None else size
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= self.capacity:
            raise ValueError(f"NormHistory.window: size must be an integer in [1, {self.capacity}], got {size!r}")
        back = torch.arange(size, device=self.device)
        count = torch.clamp(filled, max=size)
        valid = back < count
        values = ring.index_select(0, torch.remainder(filled - 1 - back, self.capacity + 1))
        values = torch.where(valid, values, 0.0)
        mean = values.sum() / count.clamp(min=1)
        var = torch.where(valid, values - mean, 0.0).square().sum() / (count - correction).clamp(min=1)
        return Window(mean=mean, std=var.sqrt(), count=count)

    # -- host reads ----------------------------------------------------------------------------

    def records(self) -> dict[str, np.ndarray]:
        """Everything recorded, oldest first, as numpy arrays (one host read): ``step`` (1-based
        update number), one array per :data:`gradfuse._tracking.STEP_COLUMNS` entry, and
        ``layer_norms`` [steps, layers] (:data:`NO_GRAD` where a layer had no gradient)."""
        self._require("records")
        both = torch.cat([self._ordered(self._rows), self._ordered(self._layer_rows)], dim=1).cpu().numpy()
        k = len(tr.STEP_COLUMNS)
        out = {"step": np.arange(self.steps - len(both) + 1, self.steps + 1)}
        out.update({name: both[:, i] for i, name in enumerate(tr.STEP_COLUMNS)})
        out["layer_norms"] = both[:, k:]
        return out

    def summary(self, layer: str | None = None) -> dict:
        """mean, median, p95, p99 and max of the finite recorded norms (of ``layer``'s when named),
        with ``count`` (finite) and ``nonfinite`` (one host read)."""
        if layer is None:
            values = self.norms().cpu().numpy()
        else:
            if layer not in self.layer_names:
                raise ValueError(f"NormHistory.summary: layer {layer!r} is not tracked (layers={self.layer_names[:5]}...)")
            self._require("summary")
            values = self._ordered(self._layer_rows)[:, self.layer_names.index(layer)].cpu().numpy()
            values = values[values != NO_GRAD]
        finite = values[np.isfinite(values)]
        out = {"count": int(finite.size), "nonfinite": int(values.size - finite.size)}
        if finite.size == 0:
            return out | {k: math.nan for k in ("mean", "median", "p95", "p99", "max")}
        p50, p95, p99 = np.percentile(finite.astype(np.float64), [50, 95, 99])
        return out | {"mean": float(finite.mean(dtype=np.float64)), "median": float(p50), "p95": float(p95), "p99": float(p99), "max": float(finite.max())}

    def suggest_max_norm(self, quantile: float = 0.95) -> float:
        """A fixed ``max_norm``: the ``quantile`` of the finite norms recorded (one host read)."""
        q = _check_quantile(quantile, "NormHistory.suggest_max_norm")
        finite = self.norms().cpu().numpy()
        finite = finite[np.isfinite(finite)]
        if finite.size == 0:
            raise RuntimeError("NormHistory.suggest_max_norm: no finite norm recorded yet; update() after some clips first")
        return float(np.quantile(finite.astype(np.float64), q))

    def _require(self, what: str) -> None:
        if self._rows is None:
            raise RuntimeError(f"NormHistory.{what}: nothing recorded yet (and no device= given); call update(result) first")

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        tensors = {k: None if getattr(self, k) is None else getattr(self, k).clone() for k in ("_rows", "_layer_rows", "_finite", "_finite_count")}
        return {"capacity": self.capacity, "steps": self.steps, "layer_names": list(self.layer_names), **{k.lstrip("_"): t for k, t in tensors.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity or list(state["layer_names"]) != self.layer_names:
            raise ValueError(
                f"NormHistory.load_state_dict: the state has capacity {state['capacity']} and {len(state['layer_names'])} "
                f"layers; this history has capacity {self.capacity} and {len(self.layer_names)} layers"
            )
        self.steps = int(state["steps"])
        for k in ("rows", "layer_rows", "finite", "finite_count"):
            t = state[k]
            setattr(self, "_" + k, None if t is None else t.clone() if self.device is None else t.to(self.device, copy=True))
