"""One result row per (workload, dtype set, scenario, implementation), and the figures derived from rows."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .scenarios import ADAMW_STEP_ONLY, BASELINE, SCENARIOS

OK, SKIPPED, WRONG, ERROR = "ok", "skipped", "wrong", "error"


@dataclass
class Row:
    workload: str
    dtype: str
    scenario: str
    impl: str
    status: str = OK  # ok | skipped | wrong | error
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

    @property
    def key(self) -> tuple[str, str, str]:
        return self.workload, self.dtype, self.scenario

    @property
    def median_ms(self) -> float | None:
        return self.time["median_ms"] if self.time else None

    def as_dict(self) -> dict:
        return asdict(self)


def derive_figures(rows: list[Row], copy_gbps: float) -> None:
    """Fill gbps, copy_fraction, overhead_ms and speedup_vs_baseline in place."""
    medians = {(r.key, r.impl): r.median_ms for r in rows if r.status == OK and r.median_ms}
    for r in rows:
        if r.status != OK or not r.median_ms:
            continue
        base = medians.get((r.key, BASELINE.name))
        if base and r.impl != ADAMW_STEP_ONLY.name:
            r.speedup_vs_baseline = base / r.median_ms
        if r.bytes is None:
            continue
        seconds = r.median_ms * 1e-3
        if SCENARIOS[r.scenario].steps_optimizer:
            step = medians.get((r.key, ADAMW_STEP_ONLY.name))
            r.overhead_ms = r.median_ms - step if step else None
            seconds = r.overhead_ms * 1e-3 if r.overhead_ms and r.overhead_ms > 0 else None
        if seconds:
            r.gbps = r.bytes / seconds / 1e9
            r.copy_fraction = r.gbps / copy_gbps if copy_gbps else None
