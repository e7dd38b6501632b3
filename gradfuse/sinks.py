"""Where :class:`~gradfuse.telemetry.TelemetryRecord` s go: any logger, TensorBoard, JSONL, CSV.

* Any logger that takes a dict of numbers: ``record.as_dict()`` (HF ``trainer.log(...)``,
  Lightning ``self.log_dict(...)``, ``wandb.log(..., step=record.step)``).
* :class:`TensorBoardSink`: scalars with ``add_scalar`` and the per-layer log2-magnitude
  histograms with ``add_histogram_raw`` (the buckets are already counted on the device: nothing is
  copied to numpy). Needs ``tensorboard`` (the ``tensorboard`` extra).
* :class:`JSONLSink`: one JSON object per interval, every layer's norm included (what
  :mod:`gradfuse.plot` reads back); non-finite numbers are written as "nan"/"inf" strings, so
  the file is standard JSON.
* :class:`CSVSink`: one row per interval, fixed columns (the scalars, then one column per layer).
"""

from __future__ import annotations

import csv
import json
import os

from ._tracking import from_json_float, json_float
from .histogram import bucket_exponent
from .telemetry import TelemetryRecord


def _jsonable(x):
    if isinstance(x, float):
        return json_float(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _decoded(x):
    if isinstance(x, str) and x in ("nan", "inf", "-inf"):
        return from_json_float(x)
    if isinstance(x, dict):
        return {k: _decoded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_decoded(v) for v in x]
    return x


class _FileSink:
    def __init__(self, path: str | os.PathLike, mode: str):
        if mode not in ("w", "a"):
            raise ValueError(f"{type(self).__name__}: mode must be 'w' (truncate) or 'a' (append), got {mode!r}")
        self.path = os.fspath(path)
        self._file = open(self.path, mode, newline="")

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class JSONLSink(_FileSink):
    """Append each record as one JSON line (flushed, so a crash keeps what was logged)."""

    def __init__(self, path: str | os.PathLike, mode: str = "w"):
        super().__init__(path, mode)

    def write(self, record: TelemetryRecord | dict) -> None:
        data = record.record() if isinstance(record, TelemetryRecord) else record
        if data.get("steps", 1) == 0:
            return
        self._file.write(json.dumps(_jsonable(data), allow_nan=False) + "\n")
        self._file.flush()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a :class:`JSONLSink` file, with "nan"/"inf" strings read back as floats."""
    with open(path) as f:
        return [_decoded(json.loads(line)) for line in f if line.strip()]


class CSVSink(_FileSink):
    """One row per record; the columns are fixed by the first record: ``step``, ``steps``, the
    scalar figures, then ``layer/<name>`` (the layer's largest norm in the interval; empty when
    it had no gradient)."""

    _SCALARS = ("total_norm_max", "total_norm_mean", "total_norm_p95", "total_norm_min", "total_norm_last",
                "clipped_steps", "nonfinite_steps", "skipped_steps", "clip_rate", "max_norm", "loss_mean", "loss_last")  # fmt: skip

    def __init__(self, path: str | os.PathLike, mode: str = "w"):
        super().__init__(path, mode)
        self._writer = csv.writer(self._file)
        self._layers: list[str] | None = None

    def write(self, record: TelemetryRecord) -> None:
        r = record.record()
        if r["steps"] == 0:
            return
        flat = record.as_dict(prefix="")
        if self._layers is None:
            self._layers = list(r["layer_norms"])
            self._writer.writerow(["step", "steps", *self._SCALARS, *(f"layer/{n}" for n in self._layers)])
        elif list(r["layer_norms"]) != self._layers:
            raise ValueError("CSVSink: this record's layers differ from the file's columns; use one sink per model")
        layers = ["" if r["layer_norms"][n] is None else r["layer_norms"][n] for n in self._layers]
        self._writer.writerow([r["step"], r["steps"], *(flat.get(k, "") for k in self._SCALARS), *layers])
        self._file.flush()


class TensorBoardSink:
    """Write records to a ``torch.utils.tensorboard.SummaryWriter`` (or one made for ``log_dir``)."""

    def __init__(self, writer=None, *, log_dir: str | None = None, prefix: str = "grad/"):
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("TensorBoardSink needs tensorboard: pip install 'gradfuse[tensorboard]'") from e
            writer = SummaryWriter(log_dir=log_dir)
        self.writer = writer
        self.prefix = prefix

    def write(self, record: TelemetryRecord) -> None:
        for tag, value in record.as_dict(self.prefix).items():
            self.writer.add_scalar(tag, value, global_step=record.step)
        hist = record.record().get("histograms")
        if hist:
            for name, counts in hist["layers"].items():
                self._histogram(f"{self.prefix}log2_abs/{name}", hist["first_bucket"], counts, hist["step"])

    def _histogram(self, tag: str, first: int, counts: list[int], step: int) -> None:
        """The finite non-zero elements over log2 |x| (bucket k: log2 |x| in [k, k+1), drawn up to
        the limit k + 1); zeros, Inf and NaN are left out (NaN/Inf: the nonfinite/ scalars)."""
        by_k = {bucket_exponent(first + i): c for i, c in enumerate(counts) if c and bucket_exponent(first + i) is not None}
        if not by_k:
            return
        ks = list(range(min(by_k), max(by_k) + 1))
        self.writer.add_histogram_raw(
            tag, min=float(ks[0]), max=float(ks[-1] + 1), num=sum(by_k.values()),
            sum=sum(c * (k + 0.5) for k, c in by_k.items()), sum_squares=sum(c * (k + 0.5) ** 2 for k, c in by_k.items()),
            bucket_limits=[float(k + 1) for k in ks], bucket_counts=[by_k.get(k, 0) for k in ks], global_step=step,
        )  # fmt: skip

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
