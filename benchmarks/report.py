"""Outputs: a progress bar while running, the terminal table, the JSON file and the PNG plot.

tqdm and matplotlib are optional: without them the progress is printed line by line and the plot
is skipped with a note.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from .rows import OK, Row
from .workloads import Workload

SCHEMA = "gradfuse-benchmarks/1"


class Progress:
    """A tqdm bar on stderr, or one printed line per cell when tqdm is missing."""

    def __init__(self, enabled: bool = True):
        self._enabled = enabled
        self._bar = None
        self._done = 0
        self._total = 0

    def start(self, total: int) -> None:
        self._total = total
        if not self._enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, unit="cell", file=sys.stderr, dynamic_ncols=True, leave=False)

    def label(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description(text, refresh=True)
        elif self._enabled:
            print(f"[{self._done + 1}/{self._total}] {text}", file=sys.stderr, flush=True)

    def advance(self) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.update(1)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# --------------------------------------------------------------------------------------------------
# Terminal table

_COLUMNS = (
    ("workload", "<"),
    ("dtype", "<"),
    ("scenario", "<"),
    ("impl", "<"),
    ("median ms", ">"),
    ("iqr ms", ">"),
    ("min ms", ">"),
    ("GB/s", ">"),
    ("%copy", ">"),
    ("x foreach", ">"),
    ("launch", ">"),
    ("sync", ">"),
    ("norm err", ">"),
    ("note", "<"),
)


def _num(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}" if x < 1 else f"{x:.{digits - 1}f}" if x < 10 else f"{x:.1f}"


def _cells(r: Row) -> list[str]:
    t = r.time or {}
    note = r.note if r.status == OK else f"{r.status.upper()}: {r.note}"
    if r.overhead_ms is not None:
        note = f"clip overhead {_num(r.overhead_ms)} ms" + (f"; {note}" if note else "")
    if r.compile_s is not None:
        note = f"compile {r.compile_s:.0f} s" + (f"; {note}" if note else "")
    err = (r.check or {}).get("norm_rel_err")
    return [
        r.workload,
        r.dtype,
        r.scenario,
        r.impl,
        _num(t.get("median_ms")),
        _num(t.get("iqr_ms")),
        _num(t.get("min_ms")),
        _num(r.gbps),
        f"{100 * r.copy_fraction:.0f}%" if r.copy_fraction is not None else "-",
        _num(r.speedup_vs_baseline),
        "-" if r.launches_per_call is None else str(r.launches_per_call),
        "-" if r.syncs_per_call is None else str(r.syncs_per_call),
        "-" if err is None else f"{err:.0e}",
        note,
    ]


def format_table(rows: list[Row]) -> str:
    """One line per row; the workload, dtype and scenario are printed only when they change."""
    lines = [[name for name, _ in _COLUMNS]]
    previous = None
    for r in rows:
        cells = _cells(r)
        if previous is not None:
            if r.key[:2] != previous[:2]:
                lines.append(None)  # blank line between (workload, dtype) groups
            for k in range(3):
                if r.key[: k + 1] == previous[: k + 1]:
                    cells[k] = ""
        previous = r.key
        lines.append(cells)
    widths = [max(len(line[c]) for line in lines if line) for c in range(len(_COLUMNS) - 1)]
    out = []
    for line in lines:
        if line is None:
            out.append("")
            continue
        body = "  ".join(f"{v:{align}{w}}" for v, w, (_, align) in zip(line, widths, _COLUMNS))
        out.append(f"{body}  {line[-1]}".rstrip())
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# JSON


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")


def payload(meta: dict, settings: dict, run, workloads: list[Workload]) -> dict:
    """Everything the run measured, with what is needed to reproduce and compare it."""
    return {
        "schema": SCHEMA,
        "meta": meta,
        "settings": settings,
        "copy_bandwidth": run.copy_bandwidth,
        "workloads": [
            {"name": w.name, "doc": w.doc, "num_tensors": w.num_tensors, "numel": w.numel, "full_numel": w.full_numel, "scale": w.scale}
            for w in workloads
        ],
        "gradient_sets": run.groups,
        "results": [r.as_dict() for r in run.rows],
        "notes": run.notes,
        "failures": run.failures,
    }


# --------------------------------------------------------------------------------------------------
# PNG


def write_plot(path: Path, rows: list[Row], title: str) -> str | None:
    """Median time and copy-bandwidth fraction per workload, dtype and implementation, one row of
    panels per scenario. Returns a note when matplotlib is missing (nothing is written then)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot written"

    ok = [r for r in rows if r.status == OK and r.median_ms]
    scenarios = list(dict.fromkeys(r.scenario for r in ok))
    workloads = list(dict.fromkeys(r.workload for r in ok))
    dtypes = list(dict.fromkeys(r.dtype for r in ok))
    impls = list(dict.fromkeys(r.impl for r in ok))
    if not ok:
        return "no successful result to plot"
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(impls)}
    by_key = {(r.workload, r.dtype, r.scenario, r.impl): r for r in ok}

    ncols = 2 * len(workloads)
    fig, axes = plt.subplots(len(scenarios), ncols, figsize=(4.2 * ncols, 2.8 * len(scenarios) + 1), squeeze=False)
    width = 0.8 / max(len(impls), 1)
    for si, scenario in enumerate(scenarios):
        for wi, workload in enumerate(workloads):
            ax_time, ax_frac = axes[si][2 * wi], axes[si][2 * wi + 1]
            for ii, impl in enumerate(impls):
                xs, times, fracs = [], [], []
                for di, dtype in enumerate(dtypes):
                    r = by_key.get((workload, dtype, scenario, impl))
                    if r is None:
                        continue
                    xs.append(di + (ii - (len(impls) - 1) / 2) * width)
                    times.append(r.median_ms)
                    fracs.append(r.copy_fraction or 0.0)
                if xs:
                    ax_time.bar(xs, times, width, color=colors[impl], label=impl)
                    ax_frac.bar(xs, fracs, width, color=colors[impl], label=impl)
            ax_time.set_yscale("log")
            ax_time.set_title(f"{workload} / {scenario}: median ms", fontsize=9)
            ax_frac.set_title(f"{workload} / {scenario}: fraction of copy BW", fontsize=9)
            ax_frac.axhline(1.0, color="grey", lw=0.6, ls="--")
            for ax in (ax_time, ax_frac):
                ax.set_xticks(range(len(dtypes)))
                ax.set_xticklabels(dtypes, fontsize=8)
                ax.tick_params(axis="y", labelsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[i]) for i in impls]
    height = 2.8 * len(scenarios) + 1
    fig.suptitle(title, y=1 - 0.1 / height, fontsize=10)
    fig.legend(handles, impls, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.4 / height), ncol=min(len(impls), 8), fontsize=9, frameon=False)
    top = 1 - 1.0 / height
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.04, top=top, wspace=0.3, hspace=0.45)  # tight_layout: seconds
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None
