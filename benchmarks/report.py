"""Outputs: a progress bar while running, the summary and the full table, the JSON file and the PNG.

Every line printed is at most ``WIDTH`` characters. tqdm and matplotlib are optional: without them
the progress is printed line by line and the plot is skipped with a note.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path

from .rows import OK, Row
from .scenarios import BASELINE, SCENARIOS
from .workloads import Workload

SCHEMA = "gradfuse-benchmarks/1"
WIDTH = 120


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Progress on stderr whose fraction and ETA count the cells' estimated seconds, scaled by the
    pace of the cells done so far (``schedule.Clock``): a tqdm bar on a terminal, else (a log, a
    pipe, no tqdm) one line every ``LINE_EVERY_S`` seconds."""

    LINE_EVERY_S = 10.0

    def __init__(self, enabled: bool = True):
        self._enabled = enabled
        self._bar = None
        self._cells = 0
        self._done = 0
        self._remaining_s = 0.0
        self._total_s = 0.0
        self._clock = None
        self._last_line = -math.inf

    def start(self, cells, clock) -> None:
        self._cells, self._clock = len(cells), clock
        self._remaining_s = self._total_s = sum(c.estimate_s for c in cells)
        if not self._enabled or not sys.stderr.isatty():
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(
            total=max(self._total_s, 1e-9), file=sys.stderr, leave=False, ncols=WIDTH,
            bar_format="{desc}{percentage:3.0f}%|{bar}| {postfix[0]}", postfix=[self._status()],
        )  # fmt: skip

    def eta_s(self) -> float:
        return self._clock.pace * self._remaining_s if self._clock else 0.0

    def _status(self) -> str:
        elapsed = self._clock.elapsed_s if self._clock else 0.0
        return f"{self._done}/{self._cells} cells, {_duration(elapsed)} elapsed, ETA {_duration(self.eta_s())}"

    def label(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description_str(f"{text[:44]:<44} ", refresh=False)
            self._bar.postfix[0] = self._status()  # a list, so that tqdm adds no ", " before it
            self._bar.refresh()
        elif self._enabled and self._clock is not None and self._clock.elapsed_s - self._last_line >= self.LINE_EVERY_S:
            self._last_line = self._clock.elapsed_s
            done = 1 - self._remaining_s / self._total_s if self._total_s else 1.0
            print(f"[{100 * done:3.0f}% {self._status()}] {text}", file=sys.stderr, flush=True)

    def advance(self, cell, wall_s: float | None) -> None:
        """``cell`` is done (``wall_s`` None: skipped without running, its estimate leaves the plan)."""
        self._done += 1
        self._remaining_s = max(0.0, self._remaining_s - cell.estimate_s)
        if wall_s is None:
            self._total_s -= cell.estimate_s
        if self._bar is None:
            return
        self._bar.postfix[0] = self._status()
        if wall_s is None:
            self._bar.total = max(self._total_s, self._bar.n, 1e-9)
            self._bar.refresh()
        else:
            self._bar.update(cell.estimate_s)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def wrap(text: str, first: str = "", rest: str | None = None) -> list[str]:
    """``text`` in lines of at most WIDTH characters, the first prefixed by ``first``."""
    rest = " " * len(first) if rest is None else rest
    return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False) or [first]


def _num(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}" if x < 1 else f"{x:.{digits - 1}f}" if x < 10 else f"{x:.1f}"


def _align(lines: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(line[c]) for line in lines if line) for c in range(len(lines[0]))]
    out = []
    for line in lines:
        if not line:
            out.append("")
            continue
        cells = [f"{v:>{w}}" if c in right else f"{v:<{w}}" for c, (v, w) in enumerate(zip(line, widths))]
        out.append("  ".join(cells).rstrip())
    return out


# --------------------------------------------------------------------------------------------------
# The summary: a few lines a person reads first

# The scenarios the summary shows, most telling first; as many as fit the width.
SUMMARY_SCENARIOS = ("clip", "noclip", "fused-optimizer", "norm")
SUMMARY_TITLES = {
    "clip": "clip (norm + scale)",
    "noclip": "no clip needed",
    "fused-optimizer": "+ fused AdamW step",
    "norm": "norm only",
}


def headline_impl(rows: list[Row]) -> str | None:
    """The gradfuse contender the summary shows: the first fused backend run (auto's choice), else
    gradfuse's torch path."""
    names = list(dict.fromkeys(r.impl for r in rows if r.impl.startswith("gradfuse:")))
    fused = [n for n in names if n != "gradfuse:torch"]
    return (fused or names or [None])[0]


def _summary_cells(rows: dict, key: tuple, impl: str) -> list[str]:
    """gradfuse ms, torch ms, speed-up and %BW of one (workload, dtype, scenario); for the fused
    optimizer, the ms each clip adds to the step alone and their ratio."""
    optimizer = SCENARIOS[key[2]].steps_optimizer
    width = 3 if optimizer else 4
    ours, base = rows.get((*key, impl)), rows.get((*key, BASELINE.name))
    if ours is None or base is None:
        return ["-"] * width
    for r in (ours, base):
        if r.status != OK:  # noisy, skipped, wrong: no figure
            return [r.status, "", ""] + [""] * (width - 3)
    if optimizer:
        if ours.overhead_ms is None or base.overhead_ms is None:
            return ["noise", "", ""]
        return [_num(ours.overhead_ms), _num(base.overhead_ms), f"{base.overhead_ms / ours.overhead_ms:.2f}x"]
    bw = f"{100 * ours.copy_fraction:.0f}%" if ours.copy_fraction is not None else "-"
    return [_num(ours.median_ms), _num(base.median_ms), f"{ours.speedup_vs_baseline:.2f}x", bw]


def format_summary(rows: list[Row], copy_gbps: float, meta: dict, workloads: list[Workload]) -> list[str]:
    impl = headline_impl(rows)
    if impl is None:
        return ["no gradfuse result to summarise (see the notes)"]
    by_key = {(r.workload, r.dtype, r.scenario, r.impl): r for r in rows}
    present = {r.scenario for r in rows}
    scenarios = [s for s in SUMMARY_SCENARIOS if s in present]
    groups = list(dict.fromkeys((r.workload, r.dtype) for r in rows))
    sizes = {w.name: w for w in workloads}
    for n in range(len(scenarios), 0, -1):  # as many scenarios as fit the width
        shown = scenarios[:n]
        header = ["workload", "elements", "dtype"]
        for s in shown:
            header += ["gradfuse", "torch", "speed-up"] + ([] if SCENARIOS[s].steps_optimizer else ["%BW"])
        table = [header] + [
            [w, _count(sizes[w].numel) if w in sizes else "-", d, *(c for s in shown for c in _summary_cells(by_key, (w, d, s), impl))]
            for w, d in groups
        ]
        lines = _align(table, right=set(range(1, len(header))) - {2})
        titles = _titles(lines[0], header, shown)
        if max(len(titles), *map(len, lines)) <= WIDTH:
            break
    counts = sorted({r.threads for r in rows if r.threads}, reverse=True) or [meta["cpu_threads"]]
    threads = " then ".join(map(str, counts))
    text = (
        f"{impl} against torch.nn.utils.clip_grad_norm_(foreach=True) on {meta['device']} (torch {meta['torch']}, "
        f"{threads} CPU thread{'s' * (counts != [1])}): median ms per call, speed-up, and %BW: the bytes the call must "
        f"move per second as a share of this machine's copy bandwidth, {copy_gbps:.1f} GB/s."
    )
    if any(w.numel != w.full_numel for w in workloads):
        text += " Workloads shrunk to the elements shown (every first dimension scaled, tensors kept; --scale 1: full size)."
    return wrap(text) + ["", titles] + lines


def _titles(header_line: str, header: list[str], shown: list[str]) -> str:
    """The scenario titles, each starting above its first sub-column of the aligned header line."""
    starts, pos = [], 0
    for cell in header:  # the aligned header line holds the cells in order, separated by spaces
        pos = header_line.index(cell, pos)
        starts.append(pos)
        pos += len(cell)
    out, col = "", 3
    for s in shown:
        out = f"{out:<{starts[col]}}{SUMMARY_TITLES[s]}"
        col += 3 if SCENARIOS[s].steps_optimizer else 4
    return out


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


# --------------------------------------------------------------------------------------------------
# The full table (--full)

_COLUMNS = ("workload", "dtype", "scenario", "impl", "median ms", "iqr ms", "GB/s", "%copy", "x torch", "launch", "sync", "norm err", "")
_RIGHT = set(range(4, 12))


def _row_cells(r: Row, footnote) -> list[str]:
    t = r.time or {}
    note = r.note if r.status == OK else f"{r.status.upper()}: {r.note}"
    if r.overhead_ms is not None:
        note = f"clip overhead {_num(r.overhead_ms)} ms" + (f"; {note}" if note else "")
    if r.compile_s is not None:
        note = f"compile {r.compile_s:.0f} s" + (f"; {note}" if note else "")
    figures = r.status == OK  # a noisy, skipped or wrong row has no figure
    err = (r.check or {}).get("norm_rel_err")
    return [
        r.workload, r.dtype, r.scenario, r.impl,
        _num(t.get("median_ms")) if figures else r.status, _num(t.get("iqr_ms")) if figures else "-",
        _num(r.gbps), f"{100 * r.copy_fraction:.0f}%" if r.copy_fraction is not None else "-",
        _num(r.speedup_vs_baseline),
        "-" if r.launches_per_call is None else str(r.launches_per_call),
        "-" if r.syncs_per_call is None else str(r.syncs_per_call),
        "-" if err is None else f"{err:.0e}",
        footnote(note) if note else "",
    ]  # fmt: skip


def format_table(rows: list[Row]) -> list[str]:
    """One line per row (workload, dtype and scenario printed when they change); notes become
    numbered footnotes below, so that no line passes WIDTH. Columns empty in every row are left out."""
    notes: dict[str, int] = {}

    def footnote(text: str) -> str:
        return f"[{notes.setdefault(text, len(notes) + 1)}]"

    lines: list[list[str] | None] = [list(_COLUMNS)]
    previous = None
    for r in rows:
        cells = _row_cells(r, footnote)
        if previous is not None:
            if r.key[:2] != previous[:2]:
                lines.append(None)
            for k in range(3):
                if r.key[: k + 1] == previous[: k + 1]:
                    cells[k] = ""
        previous = r.key
        lines.append(cells)
    keep = [c for c in range(len(_COLUMNS)) if c < 4 or any(line[c] not in ("", "-") for line in lines[1:] if line)]
    table = [[line[c] for c in keep] if line else None for line in lines]
    out = _align(table, right={i for i, c in enumerate(keep) if c in _RIGHT})
    for text, n in notes.items():
        out += wrap(text, f"[{n}] ")
    return out


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
