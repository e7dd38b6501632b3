"""What the monitoring modules share: parameters by name, and where a clip's rows belong among them.

A :class:`~gradfuse.ClipResult` has one row per *gradient* (``tensor_norms[t]``), in the order of
the parameters that had one; a parameter whose ``.grad`` is None (a frozen layer) has no row.
:class:`Layers` keeps every parameter by name and turns a result's rows into per-layer rows, so a
frozen layer is reported as "no gradient" and never shifts its neighbours. It reads only Python
state (``p.grad is None``) and caches one device index per set of layers with a gradient.

Every step also gets one row of :data:`STEP_COLUMNS` (float32), written with a fixed number of
device ops by :func:`write_step`: the four values of ``ClipResult.result`` and what the caller
adds (the threshold, whether the step was skipped, the loss).
"""

from __future__ import annotations

import math

import torch

from . import _abi
from . import _validation as v
from ._engine import ClipResult

#: the per-step row: ``ClipResult.result`` (total, found_inf, coef, scale), then the caller's values.
STEP_COLUMNS = ("total_norm", "found_inf", "clip_coef", "scale", "max_norm", "skipped", "loss")
TOTAL, FOUND_INF, COEF, SCALE, MAX_NORM, SKIPPED, LOSS = range(len(STEP_COLUMNS))
assert (TOTAL, FOUND_INF, COEF, SCALE) == (_abi.RESULT_TOTAL, _abi.RESULT_FOUND_INF, _abi.RESULT_COEF, _abi.RESULT_SCALE)
assert _abi.RESULT_SIZE == 4


def named_parameters(parameters, owner: str) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) pairs from a module, ``named_parameters()``, or plain parameters
    (named ``param<i>``)."""
    if isinstance(parameters, torch.nn.Module):
        parameters = parameters.named_parameters()
    named = []
    for i, item in enumerate(v.as_list(parameters, owner)):
        if isinstance(item, torch.Tensor):
            named.append((f"param{i}", item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], torch.Tensor):
            named.append(item)
        else:
            raise TypeError(
                f"{owner}: parameters[{i}] is of type {type(item).__name__}; pass a module, "
                "model.named_parameters() ((name, parameter) pairs) or model.parameters()"
            )
    return named


class Layers:
    """The parameters, by name, and the map from a clip's gradient rows to them."""

    def __init__(self, parameters, owner: str):
        self.owner = owner
        self.named = named_parameters(parameters, owner)
        self.names = [name for name, _ in self.named]
        self.params = [p for _, p in self.named]
        self._index: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.names)

    def with_grad(self) -> tuple[int, ...]:
        """Positions of the parameters that have a gradient now."""
        return tuple(i for i, p in enumerate(self.params) if p.grad is not None)

    def rows(self, result: ClipResult) -> tuple[tuple[int, ...], torch.Tensor | None]:
        """(positions with a gradient, their device index or None when every layer has one).

        Raises when the number of gradients now differs from the result's rows: the result then
        belongs to other parameters, or ``.grad`` was reset since the clip."""
        present = self.with_grad()
        rows = result.tensor_norms.numel()
        if len(present) != rows:
            raise ValueError(
                f"{self.owner}: the clip result has {rows} per-gradient rows but {len(present)} of the "
                f"{len(self)} parameters have a gradient now; update with a result of these parameters, "
                "right after the clip and before zero_grad()"
            )
        if len(present) == len(self):
            return present, None
        device = result.tensor_norms.device
        key = (present, device)
        if key not in self._index:  # copied to the device once per set of frozen layers
            self._index[key] = torch.tensor(present, dtype=torch.int64, device=device)
        return present, self._index[key]

    def spread(self, values: torch.Tensor, index: torch.Tensor | None, fill: float) -> torch.Tensor:
        """Per-gradient ``values`` ([T, ...]) as per-layer rows ([L, ...]); ``fill`` where no gradient."""
        if index is None:
            return values
        out = torch.full((len(self), *values.shape[1:]), fill, dtype=values.dtype, device=values.device)
        return out.index_copy_(0, index, values)

    def check_names(self, names) -> list[int]:
        """Positions of ``names`` (each a parameter name given at construction)."""
        position = {name: i for i, name in enumerate(self.names)}
        unknown = [n for n in names if n not in position]
        if unknown:
            raise ValueError(f"{self.owner}: unknown layer name(s) {unknown[:5]}; the names are those of named_parameters()")
        return [position[n] for n in names]


def clipped(coef, found_inf, skipped):
    """Which steps count as clipped (torch or numpy booleans): the coefficient is below 1 and the
    step was applied (no NaN/Inf, not skipped). The one definition behind the counters, the
    telemetry and the plots."""
    return (coef < 1) & ~found_inf & ~skipped


def nonfinite_counts(result: ClipResult) -> torch.Tensor:
    """int64 [T, 2]: NaN and Inf elements per gradient; without counts (the torch backend unless
    ``stats=True``) 1/0 flags from max |x|: NaN where it is NaN, Inf where it is inf."""
    if result.tensor_counts is not None:
        return result.tensor_counts
    m = result.tensor_max_abs
    return torch.stack((m.isnan(), m.isinf()), dim=1).to(torch.int64)


def _put(cell: torch.Tensor, value, default: float) -> None:
    if value is None:
        cell.fill_(default)
    elif isinstance(value, torch.Tensor):
        cell.copy_(value.detach().reshape(()))
    else:
        cell.fill_(float(value))


def write_step(row: torch.Tensor, result: ClipResult, max_norm, skipped, loss) -> None:
    """Fill one :data:`STEP_COLUMNS` row on the device (no host read): ``max_norm`` (number or device
    scalar; None: NaN, unknown), ``skipped`` (bool or device scalar; None: not skipped), ``loss``
    (number or device scalar; None: NaN)."""
    row[:MAX_NORM].copy_(result.result)
    _put(row[MAX_NORM], max_norm, math.nan)
    _put(row[SKIPPED], skipped, 0.0)
    _put(row[LOSS], loss, math.nan)


def json_float(x: float | None):
    """A float JSON can hold: non-finite values as the strings "nan", "inf", "-inf"."""
    if x is None or math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def from_json_float(x) -> float:
    """The inverse of :func:`json_float` (None, "no gradient", reads as NaN)."""
    return math.nan if x is None else float(x)
