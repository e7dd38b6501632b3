"""``Telemetry``: what happened to the gradients between two log steps, read once per interval.

Logging ``clip_grad_norm_``'s return value every N steps is a snapshot: a spike between two log
steps is never seen, and each read syncs the host. ``Telemetry.update(result)`` after every clip
accumulates on the device, with a fixed number of ops and no host read: one row per step (total
norm, found_inf, coefficient, scale, threshold, skipped, loss), each layer's largest norm and its
NaN/Inf element counts, and (on the steps that ask, ``histograms=True``) each layer's log2-magnitude
histogram (:mod:`gradfuse.histogram`). ``collect()`` at a log step reduces the interval on the
device (max/mean/p95 of the total norm, clipped, non-finite and skipped steps), starts one copy to
the host (non-blocking into pinned memory on CUDA) and starts the next interval; the returned
:class:`TelemetryRecord` waits for that copy only when first read.
"""

from __future__ import annotations

import math

import torch

from . import _tracking as tr
from .histogram import NUM_BUCKETS, log2_histograms

# The interval's scalars, in the order collect() packs them.
_SCALARS = (
    "total_norm_max", "total_norm_mean", "total_norm_p95", "total_norm_min", "total_norm_last",
    "finite_steps", "clipped_steps", "nonfinite_steps", "skipped_steps",
    "max_norm_last", "max_norm_min", "loss_mean", "loss_max", "loss_last",
)  # fmt: skip


class TelemetryRecord:
    """One interval's figures. Reading any of them waits for the host copy (once).

    ``record()``: the nested dict (what :class:`gradfuse.sinks.JSONLSink` writes);
    ``as_dict(prefix)``: a flat dict of numbers for any logger (HF ``log``, Lightning ``log_dict``,
    ``wandb.log``)."""

    def __init__(self, names: list[str], step: int, steps: int, seen: set[int], top_k: int, host=None, event=None, hist_step=None):
        self.names, self.step, self.steps, self.top_k = names, step, steps, top_k
        self._seen, self._host, self._event, self._hist_step = seen, host, event, hist_step
        self._record: dict | None = None

    def record(self) -> dict:
        if self._record is None:
            self._record = self._resolve()
        return self._record

    def _resolve(self) -> dict:
        out = {"step": self.step, "steps": self.steps}
        if self.steps == 0:
            return out
        if self._event is not None:
            self._event.synchronize()  # the copy started by collect(); nothing else is waited for
        values = self._host.cpu().tolist()
        s = dict(zip(_SCALARS, values))
        n = len(self.names)
        layer_max = values[len(_SCALARS) : len(_SCALARS) + n]
        nans = values[len(_SCALARS) + n : len(_SCALARS) + 2 * n]
        infs = values[len(_SCALARS) + 2 * n : len(_SCALARS) + 3 * n]
        finite = int(s["finite_steps"])
        out["total_norm"] = {k: s[f"total_norm_{k}"] if finite else math.nan for k in ("max", "mean", "p95", "min")}
        out["total_norm"]["last"] = s["total_norm_last"]
        counts = {k: int(s[k]) for k in ("finite_steps", "clipped_steps", "nonfinite_steps", "skipped_steps")}
        out.update(counts, clip_rate=counts["clipped_steps"] / self.steps)
        out["max_norm"] = {"last": s["max_norm_last"], "min": s["max_norm_min"]}
        out["loss"] = {"mean": s["loss_mean"], "max": s["loss_max"], "last": s["loss_last"]}
        out["layer_norms"] = {name: (layer_max[i] if i in self._seen else None) for i, name in enumerate(self.names)}
        ranked = sorted((i for i in self._seen if math.isfinite(layer_max[i])), key=lambda i: -layer_max[i])
        out["top_layers"] = [[self.names[i], layer_max[i]] for i in ranked[: self.top_k]]
        out["nonfinite_layers"] = [
            {"name": self.names[i], "nan": int(nans[i]), "inf": int(infs[i])} for i in range(n) if nans[i] or infs[i]
        ]
        out["no_gradient"] = [name for i, name in enumerate(self.names) if i not in self._seen]
        if self._hist_step is not None:
            table = values[len(_SCALARS) + 3 * n :]
            rows = [table[i * NUM_BUCKETS : (i + 1) * NUM_BUCKETS] for i in range(n)]
            used = [b for b in range(NUM_BUCKETS) if any(r[b] for r in rows)]
            lo, hi = (used[0], used[-1]) if used else (0, -1)
            out["histograms"] = {
                "step": self._hist_step,
                "first_bucket": lo,
                "layers": {name: [int(c) for c in rows[i][lo : hi + 1]] for i, name in enumerate(self.names) if sum(rows[i])},
            }
        return out

    def as_dict(self, prefix: str = "grad/") -> dict[str, float]:
        """Flat ``{prefix + key: number}``: the total-norm figures, step counts, threshold and
        loss, ``top/<layer>`` for the largest layers, ``nonfinite/<layer>`` (NaN + Inf elements)."""
        r = self.record()
        if r["steps"] == 0:
            return {}
        flat = {f"{prefix}total_norm_{k}": v for k, v in r["total_norm"].items()}
        flat.update({prefix + k: float(r[k]) for k in ("clipped_steps", "nonfinite_steps", "skipped_steps", "clip_rate")})
        flat[prefix + "max_norm"] = r["max_norm"]["last"]
        if not math.isnan(r["loss"]["last"]):
            flat.update({f"{prefix}loss_{k}": v for k, v in r["loss"].items()})
        flat.update({f"{prefix}top/{name}": norm for name, norm in r["top_layers"]})
        flat.update({f"{prefix}nonfinite/{d['name']}": float(d["nan"] + d["inf"]) for d in r["nonfinite_layers"]})
        return flat

    def __repr__(self) -> str:
        return f"TelemetryRecord(step={self.step}, steps={self.steps}{', pending' if self._record is None else ''})"


class Telemetry:
    """Interval aggregates of every clip, kept on the device; one host read per :meth:`collect`.

    ``parameters``: a module or ``model.named_parameters()`` (layers are reported by name; a layer
    without a gradient all interval is listed under ``no_gradient``). ``top_k``: how many of the
    largest layers a record names.
    """

    def __init__(self, parameters, *, top_k: int = 5):
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"Telemetry: top_k must be an integer >= 0, got {top_k!r}")
        self.layers = tr.Layers(parameters, "Telemetry")
        self.top_k = top_k
        self.step = 0  # updates since construction
        self._n = 0  # updates in this interval
        self._rows = self._layer_max = self._layer_counts = self._hist = None
        self._seen: set[tuple[int, ...]] = set()
        self._hist_step = 0

    def _allocate(self, device: torch.device) -> None:
        n = len(self.layers)
        self._rows = torch.empty((64, len(tr.STEP_COLUMNS)), dtype=torch.float32, device=device)
        self._layer_max = torch.zeros(n, dtype=torch.float32, device=device)
        self._layer_counts = torch.zeros((n, 2), dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, result, *, max_norm=None, skipped=None, loss=None, histograms: bool = False) -> None:
        """Fold one clip into the interval (None, a clip with no gradients, counts nothing).

        ``max_norm``, ``skipped``, ``loss``: as for :meth:`gradfuse.NormHistory.update`.
        ``histograms=True``: also bin this step's gradients (an extra read of them)."""
        if result is None:
            return
        present, index = self.layers.rows(result)
        if self._rows is None:
            self._allocate(result.result.device)
        if self._n == len(self._rows):  # a longer interval than ever: double the row buffer
            self._rows = torch.cat([self._rows, torch.empty_like(self._rows)])
        tr.write_step(self._rows[self._n], result, max_norm, skipped, loss)
        norms = self.layers.spread(result.tensor_norms.detach().to(torch.float32), index, 0.0)
        torch.maximum(self._layer_max, norms, out=self._layer_max)  # NaN propagates: a NaN layer shows
        self._layer_counts.add_(self.layers.spread(tr.nonfinite_counts(result), index, 0))
        self._seen.add(present)
        self.step += 1
        self._n += 1
        if histograms:
            grads = [self.layers.params[i].grad for i in present]
            self._hist = self.layers.spread(log2_histograms(grads), index, 0)
            self._hist_step = self.step

    @torch.no_grad()
    def collect(self, step: int | None = None) -> TelemetryRecord:
        """End the interval: reduce it on the device, start the host copy, reset. ``step``: the
        step to report (default: the number of updates so far)."""
        step = self.step if step is None else step
        seen = set().union(*self._seen)
        if self._n == 0:
            return TelemetryRecord(self.layers.names, step, 0, seen, self.top_k)
        rows = self._rows[: self._n]
        total = rows[:, tr.TOTAL]
        finite = torch.isfinite(total)
        found = rows[:, tr.FOUND_INF] != 0
        max_norm, loss = rows[:, tr.MAX_NORM], rows[:, tr.LOSS]
        loss_known = ~torch.isnan(loss)
        scalars = torch.stack([
            torch.where(finite, total, -math.inf).amax(),
            torch.where(finite, total, 0.0).sum() / finite.sum().clamp(min=1),
            torch.nanquantile(torch.where(finite, total, math.nan), 0.95),
            torch.where(finite, total, math.inf).amin(),
            total[-1],
            finite.sum().to(torch.float32),
            tr.clipped(rows[:, tr.COEF], found, rows[:, tr.SKIPPED] != 0).sum().to(torch.float32),
            found.sum().to(torch.float32),
            (rows[:, tr.SKIPPED] != 0).sum().to(torch.float32),
            max_norm[-1],
            torch.nan_to_num(max_norm, nan=math.inf).amin(),
            torch.nanmean(loss),
            torch.where(loss_known, loss, -math.inf).amax(),
            loss[-1],
        ])  # fmt: skip
        parts = [scalars.to(torch.float64), self._layer_max.to(torch.float64), self._layer_counts.t().reshape(-1).to(torch.float64)]
        if self._hist is not None:
            parts.append(self._hist.reshape(-1).to(torch.float64))
        packed = torch.cat(parts)
        host, event = packed, None
        if packed.device.type == "cuda":
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        record = TelemetryRecord(self.layers.names, step, self._n, seen, self.top_k, host, event, self._hist_step if self._hist is not None else None)
        self._n = 0
        self._layer_max.zero_()
        self._layer_counts.zero_()
        self._hist = None
        self._seen = set()
        return record
