"""One result row per (workload, dtype set, scenario, implementation), and the figures derived from rows."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .scenarios import ADAMW_STEP_ONLY, BASELINE, SCENARIOS

# noisy: timed, but the spread exceeded the median in every try, so no figure is derived from it
OK, SKIPPED, WRONG, ERROR, NOISY = "ok", "skipped", "wrong", "error", "noisy"


@dataclass
class Row:
    workload: str
    dtype: str
    scenario: str
    impl: str
    status: str = OK  # ok | skipped | wrong | error | noisy
    note: str = ""
    bytes: int | None = None  # the least the operation must move (None for the step alone)
    time: dict | None = None  # Stats.as_ms(): median_ms, p25_ms, p75_ms, min_ms, max_ms, iqr_ms, reps
    overhead_ms: float | None = None  # fused-optimizer: median minus the step alone's median
    gbps: float | None = None  # bytes / median (fused-optimizer: bytes / overhead)
    copy_fraction: float | None = None  # gbps / the machine's copy bandwidth
    speedup_vs_baseline: float | None = None  # torch:foreach median / this median
    launches_per_call: int | None = None
    syncs_per_call: int | None = None
    compile_s: float | None = None  # torch:compile: duration of the first (compiling) call
    check: dict | None = None  # correctness.Check.as_dict()
    wall_s: float | None = None  # seconds the whole cell took (guard, warm-up, timed calls)
    estimate_s: float | None = None  # the schedule's estimate of wall_s
    threads: int | None = None  # torch CPU threads the cell ran with

    @property
    def key(self) -> tuple[str, str, str]:
        return self.workload, self.dtype, self.scenario

    @property
    def median_ms(self) -> float | None:
        return self.time["median_ms"] if self.time else None

    def as_dict(self) -> dict:
        return asdict(self)


def derive_figures(rows: list[Row], copy_gbps: float) -> None:
    """Fill gbps, copy_fraction, overhead_ms and speedup_vs_baseline in place (ok rows only).

    A clip overhead (fused-optimizer: median minus the step alone's median) no larger than the
    spread (IQR) of either timing is the machine's noise: no overhead figure, a note instead.
    """
    timed = {(r.key, r.impl): r for r in rows if r.status == OK and r.median_ms}
    for r in timed.values():
        base = timed.get((r.key, BASELINE.name))
        if base and r.impl != ADAMW_STEP_ONLY.name:
            r.speedup_vs_baseline = base.median_ms / r.median_ms
        if r.bytes is None:
            continue
        seconds = r.median_ms * 1e-3
        if SCENARIOS[r.scenario].steps_optimizer:
            step = timed.get((r.key, ADAMW_STEP_ONLY.name))
            seconds = None
            if step:
                overhead = r.median_ms - step.median_ms
                spread = max(r.time["iqr_ms"], step.time["iqr_ms"])
                if overhead > spread:
                    r.overhead_ms, seconds = overhead, overhead * 1e-3
                else:
                    r.note = _join(r.note, f"clip overhead within noise ({overhead:+.3g} ms, spread {spread:.3g} ms)")
        if seconds:
            r.gbps = r.bytes / seconds / 1e9
            r.copy_fraction = r.gbps / copy_gbps if copy_gbps else None


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)
