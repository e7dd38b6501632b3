"""A gradient dashboard (matplotlib, the ``plot`` extra): ``gradfuse.plot.dashboard(source, path)``.

``source``: a :class:`~gradfuse.NormHistory` (one point per step), or a JSONL file written by
:class:`~gradfuse.JSONLSink` (one point per log interval: the largest norm, with the band from the
interval's mean to its max), or the list of its records. Panels, sharing the step axis:

1. the total gradient norm (log scale) against the clip threshold, with the clipped steps, the
   skipped steps and the steps with a NaN/Inf marked;
2. the loss, when there is one (the history's, or ``loss=``: an array or ``{label: array}``);
3. a layers x steps heatmap of the per-layer norms (log10; grey: no gradient; red: NaN/Inf).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ._tracking import clipped
from .history import NO_GRAD

_NORM, _THRESHOLD, _CLIP, _SKIP, _NAN = "#1f4e79", "#444444", "#f28e2b", "#7b3294", "#d62728"


@dataclass
class _Series:
    step: np.ndarray
    norm: np.ndarray  # per step, or each interval's max
    band: tuple[np.ndarray, np.ndarray] | None  # (mean, max) per interval
    threshold: np.ndarray
    clipped: np.ndarray  # bool per point
    skipped: np.ndarray
    nonfinite: np.ndarray
    loss: np.ndarray
    layer_names: list[str]
    layer_norms: np.ndarray  # [points, layers]; NO_GRAD (< 0) where no gradient
    per_step: bool


def _from_history(history) -> _Series:
    r = history.records()
    found, skipped = r["found_inf"] != 0, r["skipped"] != 0
    return _Series(
        step=r["step"], norm=r["total_norm"], band=None, threshold=r["max_norm"],
        clipped=clipped(r["clip_coef"], found, skipped), skipped=skipped, nonfinite=found, loss=r["loss"],
        layer_names=list(history.layer_names), layer_norms=r["layer_norms"], per_step=True,
    )  # fmt: skip


def _from_records(records: list[dict]) -> _Series:
    records = [r for r in records if r.get("steps")]
    if not records:
        raise ValueError("gradfuse.plot: the log holds no interval with steps")
    names = list(records[0]["layer_norms"])
    col = lambda f: np.array([f(r) for r in records], dtype=np.float64)  # noqa: E731
    layers = np.array([[NO_GRAD if r["layer_norms"].get(n) is None else float(r["layer_norms"][n]) for n in names] for r in records])
    return _Series(
        step=col(lambda r: r["step"]), norm=col(lambda r: r["total_norm"]["max"]),
        band=(col(lambda r: r["total_norm"]["mean"]), col(lambda r: r["total_norm"]["max"])),
        threshold=col(lambda r: r["max_norm"]["min"]), clipped=col(lambda r: r["clipped_steps"]) > 0,
        skipped=col(lambda r: r["skipped_steps"]) > 0, nonfinite=col(lambda r: r["nonfinite_steps"]) > 0,
        loss=col(lambda r: r["loss"]["mean"]), layer_names=names, layer_norms=layers.reshape(len(records), len(names)), per_step=False,
    )  # fmt: skip


def _series(source) -> _Series:
    if hasattr(source, "records") and hasattr(source, "layer_names"):
        return _from_history(source)
    if isinstance(source, (str, os.PathLike)):
        from .sinks import read_jsonl

        return _from_records(read_jsonl(source))
    if isinstance(source, list):
        return _from_records(source)
    raise TypeError(f"gradfuse.plot: source must be a NormHistory, a JSONL path or a list of records, not {type(source).__name__}")


def _norm_panel(ax, s: _Series) -> None:
    finite = np.isfinite(s.norm) & (s.norm > 0)
    shown = [s.norm[finite], s.threshold[np.isfinite(s.threshold) & (s.threshold > 0)]]
    if s.band is not None:
        shown.append(s.band[0][np.isfinite(s.band[0]) & (s.band[0] > 0)])
    shown = np.concatenate(shown)
    ceiling = float(shown.max()) * 10 if shown.size else 10.0
    floor = float(shown.min()) / 3 if shown.size else 0.1
    if s.band is not None:
        ax.fill_between(s.step, np.clip(s.band[0], floor, None), s.band[1], color=_NORM, alpha=0.15, lw=0, label="interval mean..max")
    ax.plot(s.step, np.where(finite, s.norm, np.nan), color=_NORM, lw=1.1, label="total norm" + ("" if s.per_step else " (interval max)"))
    if np.isfinite(s.threshold).any():
        ax.step(s.step, np.where(np.isfinite(s.threshold), s.threshold, np.nan), where="post", color=_THRESHOLD, ls="--", lw=1.0, label="clip threshold")
    top = ceiling / 3  # where the steps without a finite norm are marked
    for mask, color, marker, label in ((s.clipped, _CLIP, "o", "clipped"), (s.skipped, _SKIP, "x", "skipped")):
        if mask.any():
            y = np.where(finite, s.norm, top)[mask]
            ax.scatter(s.step[mask], y, s=14 if s.per_step else 22, color=color, marker=marker, zorder=5, label=f"{label} ({int(mask.sum())})")
    if s.nonfinite.any():
        for x in s.step[s.nonfinite]:
            ax.axvline(x, color=_NAN, alpha=0.35, lw=1.0)
        ax.scatter(s.step[s.nonfinite], np.full(int(s.nonfinite.sum()), top), marker="v", color=_NAN, s=30, zorder=4,
                   label=f"NaN/Inf ({int(s.nonfinite.sum())})")  # fmt: skip
    ax.set_yscale("log")
    ax.set_ylim(floor, ceiling)
    ax.set_ylabel("gradient norm")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), fontsize=7, ncol=6, frameon=False, borderaxespad=0.2)


_CURVES = ("#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#7f7f7f")


def _loss_panel(ax, step: np.ndarray, curves: dict[str, np.ndarray]) -> None:
    """The loss curves; the y range is set by where they start, so that a run that blows up leaves
    the panel at the top (marked with the step where it does) instead of flattening the others."""
    ys = [np.asarray(y, dtype=np.float64) for y in curves.values()]
    starts = [y[np.isfinite(y)][:5] for y in ys]
    starts = np.concatenate([a for a in starts if a.size]) if any(a.size for a in starts) else np.array([1.0])
    finite_all = np.concatenate([y[np.isfinite(y)] for y in ys]) if ys else np.array([1.0])
    positive = bool((finite_all > 0).all())
    top = float(np.max(np.abs(starts))) * (20 if positive else 3)
    bottom = float(finite_all[finite_all > 0].min()) / 2 if positive and (finite_all > 0).any() else None
    for i, (label, y) in enumerate(zip(curves, ys)):
        x = step[: len(y)] if len(y) <= len(step) else np.arange(1, len(y) + 1)
        color = _CURVES[i % len(_CURVES)]
        gone = ~np.isfinite(y) | (y > top)
        ax.plot(x, np.where(gone, np.nan, y), lw=1.1, label=label, color=color)
        if gone.any():  # where the run leaves the panel (blows up, or goes NaN/Inf)
            first = int(np.argmax(gone))
            nan_at = int(np.argmax(~np.isfinite(y))) if (~np.isfinite(y)).any() else None
            text = f"{label}: off the scale at step {x[first]:g}" + (f", NaN/Inf from {x[nan_at]:g}" if nan_at is not None else "")
            ax.scatter([x[first]], [top / 1.3], marker="^", s=40, color=color, zorder=4, clip_on=False)
            ax.annotate(text, (x[first], top / 1.3), textcoords="offset points", xytext=(6, -3), fontsize=7, color=color, va="top")
    if positive:
        ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    ax.set_ylabel("loss")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper right", fontsize=7)


def _heatmap_panel(fig, ax, s: _Series, max_layers: int) -> None:
    import matplotlib as mpl

    norms = s.layer_norms
    names = s.layer_names
    if len(names) > max_layers:  # the layers with the largest norms, in model order
        peak = np.nanmax(np.where(np.isfinite(norms), norms, np.inf), axis=0)
        keep = sorted(np.argsort(-peak, kind="stable")[:max_layers])
        norms, names = norms[:, keep], [names[i] for i in keep]
    values = norms.T  # [layers, points]
    finite = np.isfinite(values) & (values > 0)
    logs = np.where(finite, np.log10(np.where(finite, values, 1.0)), np.nan)
    cmap = mpl.colormaps["viridis"].with_extremes(bad="#d9d9d9")  # grey: no gradient (or an exact zero)
    edges = np.concatenate([s.step - 0.5, [s.step[-1] + 0.5]]) if s.per_step else _interval_edges(s.step)
    image = ax.pcolormesh(edges, np.arange(len(names) + 1), np.ma.masked_invalid(logs), cmap=cmap, shading="flat")
    bad = ~np.isfinite(values)
    if bad.any():
        overlay = np.ma.masked_where(~bad, np.ones_like(values))
        ax.pcolormesh(edges, np.arange(len(names) + 1), overlay, cmap=mpl.colors.ListedColormap([_NAN]), shading="flat")
    ax.set_yticks(np.arange(len(names)) + 0.5)
    ax.set_yticklabels([n if len(n) <= 28 else "..." + n[-25:] for n in names], fontsize=6 if len(names) > 16 else 7)
    ax.invert_yaxis()
    ax.set_xlabel("step")
    cbar = fig.colorbar(image, ax=ax, pad=0.01, fraction=0.03)
    cbar.set_label("log10 layer norm", fontsize=8)
    cbar.ax.tick_params(labelsize=7)


def _interval_edges(step: np.ndarray) -> np.ndarray:
    left = np.concatenate([[step[0] - (step[1] - step[0] if len(step) > 1 else 1)], step[:-1]])
    return np.concatenate([left, [step[-1]]])


def draw(source, fig, *, loss=None, title: str | None = None, max_layers: int = 40) -> None:
    """Draw the dashboard of ``source`` into ``fig`` (a matplotlib Figure or SubFigure)."""
    s = source if isinstance(source, _Series) else _series(source)
    curves = loss if isinstance(loss, dict) else ({"loss": loss} if loss is not None else {})
    if not curves and np.isfinite(s.loss).any():
        curves = {"loss": s.loss}
    has_layers = s.layer_norms.size > 0
    ratios = [3] + ([1.6] if curves else []) + ([max(1.5, min(4.0, 0.16 * min(len(s.layer_names), max_layers)))] if has_layers else [])
    axes = fig.subplots(len(ratios), 1, sharex=True, gridspec_kw={"height_ratios": ratios, "hspace": 0.08})
    axes = np.atleast_1d(axes)
    _norm_panel(axes[0], s)
    if curves:
        _loss_panel(axes[1], s.step, curves)
    if has_layers:
        _heatmap_panel(fig, axes[-1], s, max_layers)
    else:
        axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title, fontsize=11, x=0.02, ha="left")


def dashboard(source, path: str | os.PathLike | None = None, *, loss=None, title: str | None = None, max_layers: int = 40, width: float = 10.0):
    """The dashboard of ``source`` as a matplotlib Figure, saved to ``path`` (PNG, SVG, ...) when
    given. ``loss``: an array, or ``{label: array}`` to compare runs (default: the recorded loss).
    ``max_layers``: the heatmap keeps this many layers (the largest), in model order."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("gradfuse.plot needs matplotlib: pip install 'gradfuse[plot]'") from e
    s = _series(source)
    n_layers = min(len(s.layer_names), max_layers)
    has_loss = loss is not None or np.isfinite(s.loss).any()
    fig = Figure(figsize=(width, 4.0 + (1.8 if has_loss else 0) + (1.0 + 0.2 * n_layers if n_layers else 0)), layout="constrained")
    draw(s, fig, loss=loss, title=title, max_layers=max_layers)
    if path is not None:
        fig.savefig(path, dpi=130)
    return fig


__all__ = ["dashboard", "draw"]
