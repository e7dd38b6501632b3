"""``inspect_gradients``: which layers explode or hold NaN/Inf, by name, from one fused read.

The usual hand-written ``detect_exploding_gradients`` loops over ``named_parameters()`` calling
``grad.norm().item()``, ``isnan(grad).any()`` and ``isinf(grad).any()``: three passes and three host
syncs per parameter. Here one read of every gradient (the clip's reduce, ``apply=False``: nothing is
scaled) gives each gradient's norm, max |x| and NaN/Inf counts, and one host read brings them back.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from . import _engine, _validation as v
from ._tracking import Layers, nonfinite_counts


@dataclass(frozen=True)
class GradientReport:
    """Per-layer gradient statistics of one step, on the host.

    ``layers``: one dict per parameter, in ``named_parameters()`` order: ``name``, ``has_grad``,
    ``grad_norm`` (the ``norm_type`` norm), ``max_abs``, ``nan_count``, ``inf_count``, ``has_nan``,
    ``has_inf``, ``shape``, ``dtype`` (the statistics are None where ``has_grad`` is False).
    ``problematic_layers``: the layers whose norm exceeds ``threshold`` or that hold a NaN/Inf,
    non-finite ones first, then by decreasing norm. ``has_explosion``: there is one.
    """

    total_norm: float
    threshold: float
    norm_type: float
    layers: tuple[dict, ...]

    @property
    def problematic_layers(self) -> list[dict]:
        bad = [d for d in self.layers if d["has_grad"] and (d["has_nan"] or d["has_inf"] or d["grad_norm"] > self.threshold)]
        return sorted(bad, key=lambda d: (not (d["has_nan"] or d["has_inf"]), -_sortable(d["grad_norm"])))

    @property
    def has_explosion(self) -> bool:
        return bool(self.problematic_layers)

    @property
    def no_gradient(self) -> list[str]:
        """Names of the parameters that had no gradient (frozen, or unused in the forward)."""
        return [d["name"] for d in self.layers if not d["has_grad"]]

    @property
    def nonfinite_layers(self) -> list[str]:
        return [d["name"] for d in self.layers if d["has_grad"] and (d["has_nan"] or d["has_inf"])]

    def largest(self, k: int = 5) -> list[dict]:
        """The ``k`` layers with the largest finite norms."""
        finite = [d for d in self.layers if d["has_grad"] and math.isfinite(d["grad_norm"])]
        return sorted(finite, key=lambda d: -d["grad_norm"])[:k]

    def as_dict(self) -> dict:
        """The ``detect_exploding_gradients`` shape, plus the total and the layers without a gradient."""
        keys = ("name", "grad_norm", "max_abs", "has_nan", "has_inf")
        return {
            "has_explosion": self.has_explosion,
            "total_norm": self.total_norm,
            "problematic_layers": [{k: d[k] for k in keys} for d in self.problematic_layers],
            "no_gradient": self.no_gradient,
        }

    def table(self, top_k: int = 5) -> str:
        """A text table: the problematic layers, then the largest others, then the frozen count."""
        shown = self.problematic_layers
        names = {d["name"] for d in shown}
        shown = shown + [d for d in self.largest(top_k + len(shown)) if d["name"] not in names][:top_k]
        width = max([len("layer")] + [len(d["name"]) for d in shown])
        state = "EXPLODING" if self.has_explosion else "ok"
        with_grad = len(self.layers) - len(self.no_gradient)
        lines = [
            f"gradient report: {state}; total norm {self.total_norm:.4g} (L{self.norm_type:g}), threshold {self.threshold:g}, "
            f"{len(self.problematic_layers)} problematic of {with_grad} layers with a gradient",
            f"  {'layer':<{width}}  {'grad_norm':>11}  {'max_abs':>11}  {'NaN':>6}  {'Inf':>6}  flag",
        ]
        for d in shown:
            flag = "NaN/Inf" if d["has_nan"] or d["has_inf"] else ("> threshold" if d["grad_norm"] > self.threshold else "")
            lines.append(
                f"  {d['name']:<{width}}  {d['grad_norm']:>11.4g}  {d['max_abs']:>11.4g}  {d['nan_count']:>6}  {d['inf_count']:>6}  {flag}"
            )
        if self.no_gradient:
            listed = ", ".join(self.no_gradient[:4]) + (", ..." if len(self.no_gradient) > 4 else "")
            lines.append(f"  no gradient: {len(self.no_gradient)} layer(s) ({listed})")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.table()


def _sortable(x: float) -> float:
    return math.inf if math.isnan(x) else x


@torch.no_grad()
def inspect_gradients(named_parameters, threshold: float = 10.0, norm_type: float = 2.0, *, backend: str | None = None) -> GradientReport:
    """Report every layer's gradient norm, max |x| and NaN/Inf counts (nothing is modified).

    ``named_parameters``: a module, ``model.named_parameters()``, or plain parameters (named
    ``param<i>``). A layer is problematic when its norm exceeds ``threshold`` or it holds a NaN or
    Inf. One fused read of the gradients and one host read of the results.
    """
    fn = "inspect_gradients"
    layers = Layers(named_parameters, fn)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"{fn}: threshold must be a number, not {type(threshold).__name__}")
    if not float(threshold) >= 0:
        raise ValueError(f"{fn}: threshold must be >= 0, got {threshold}")
    p = v.check_norm_type(norm_type, fn)
    present = layers.with_grad()
    stats: list[float] = []
    total = 0.0
    if present:
        grads = [layers.params[i].grad for i in present]
        dtypes = v.check_grads(grads, p, None, fn)
        r = _engine.clip(grads, 0.0, p, apply=False, backend=backend, stats=True, dtypes=dtypes)
        t = len(grads)
        device = r.tensor_norms.device
        packed = torch.cat([
            r.total_norm.reshape(1).to(device, torch.float64),
            r.tensor_norms.to(torch.float64),
            r.tensor_max_abs.to(torch.float64),
            nonfinite_counts(r).to(torch.float64).t().reshape(-1),
        ])  # fmt: skip
        total, *stats = packed.tolist()  # the one host read
        norms, max_abs, nans, infs = (stats[k * t : (k + 1) * t] for k in range(4))
    row = {i: k for k, i in enumerate(present)}
    out = []
    for i, (name, param) in enumerate(layers.named):
        d = {"name": name, "has_grad": i in row, "shape": tuple(param.shape), "dtype": str(param.dtype).replace("torch.", "")}
        if i in row:
            k = row[i]
            d.update(grad_norm=norms[k], max_abs=max_abs[k], nan_count=int(nans[k]), inf_count=int(infs[k]))
            d.update(has_nan=d["nan_count"] > 0, has_inf=d["inf_count"] > 0)
        else:
            d.update(grad_norm=None, max_abs=None, nan_count=None, inf_count=None, has_nan=None, has_inf=None)
        out.append(d)
    return GradientReport(total_norm=total, threshold=float(threshold), norm_type=p, layers=tuple(out))
