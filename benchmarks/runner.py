"""The benchmark loop: for each workload, dtype set, scenario and implementation, check once, then time."""

from __future__ import annotations

import gc
import itertools
import time
from dataclasses import dataclass, field

import torch

from . import correctness, environment, timing
from .rows import ERROR, NOISY, OK, SKIPPED, WRONG, Row, derive_figures
from .scenarios import (
    ADAMW_STEP_ONLY,
    TORCH_COMPILE,
    TORCH_FOREACH,
    TORCH_LOOP,
    Impl,
    PreparedCall,
    Scenario,
    Unsupported,
    gradfuse_impl,
    max_norm_for,
    prepare,
    returned_norm,
)
from .schedule import COMPILE_FIRST_S, Cell, Clock, estimate_cells
from .workloads import GradGroup, Workload, make_grad_group, nbytes, rotation_count, tensor_dtypes

# A timing whose interquartile range exceeds its median says nothing: measured again up to this
# many times (the steadiest try kept), then flagged as noisy instead of reported.
NOISE_RETRIES = 2


@dataclass
class CompilePolicy:
    """Which cells get a torch.compile contender, and how many seconds of compiling are allowed."""

    scenarios: frozenset[str] | None = None  # None: every scenario
    dtype_sets: frozenset[str] | None = None
    max_tensors: int | None = None
    budget_s: float | None = None
    enabled: bool = True
    spent_s: float = 0.0

    def allows(self, workload: Workload, dtype_set: str, scenario: str) -> bool:
        return (
            self.enabled
            and (self.scenarios is None or scenario in self.scenarios)
            and (self.dtype_sets is None or dtype_set in self.dtype_sets)
            and (self.max_tensors is None or workload.num_tensors <= self.max_tensors)
        )

    def would_exceed(self, estimate_s: float) -> bool:
        """Whether a compile of about ``estimate_s`` would take the compiling past the budget."""
        return self.budget_s is not None and self.spent_s + estimate_s > self.budget_s

    def describe(self) -> str:
        if not self.enabled:
            return "torch:compile off"
        parts = [
            f"scenarios {','.join(sorted(self.scenarios))}" if self.scenarios is not None else "every scenario",
            f"dtypes {','.join(sorted(self.dtype_sets))}" if self.dtype_sets is not None else "every dtype",
        ]
        if self.max_tensors is not None:
            parts.append(f"workloads of at most {self.max_tensors} tensors")
        if self.budget_s is not None:
            parts.append(f"until {self.budget_s:.0f} s of compiling are spent")
        return "torch:compile for " + ", ".join(parts)


@dataclass
class Settings:
    device: torch.device
    workloads: list[Workload]
    dtype_sets: list[str]
    scenarios: list[Scenario]
    impl_filter: set[str] | None  # implementation names or families ("gradfuse", "torch"); None: all
    repeat: timing.RepeatPolicy
    compile: CompilePolicy
    cache_bytes: int  # the rotation of gradient sets spans 3x this; 0: no rotation
    copy_bytes: int
    copy_repeat: timing.RepeatPolicy
    clock: Clock = field(default_factory=lambda: Clock(None))  # the run's time budget
    adapt_threads: bool = False  # before each gradient group, lower torch's CPU threads if cores are taken


@dataclass
class SuiteRun:
    rows: list[Row] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    copy_bandwidth: dict | None = None
    hurried: bool = False  # behind the time budget: the cells left take the fewest timed calls


def implementations(device: torch.device, gradfuse, impl_filter: set[str] | None, notes: list[str]) -> list[Impl]:
    impls = []
    if gradfuse is not None:
        for backend in gradfuse.available_backends(device):
            if device.type == "cpu" and backend == "triton":
                notes.append("gradfuse:triton not benchmarked on CPU: it runs there only in Triton's interpreter")
                continue
            impls.append(gradfuse_impl(backend))
    impls += [TORCH_FOREACH, TORCH_LOOP, TORCH_COMPILE]
    if impl_filter is not None:
        impls = [i for i in impls if i.name in impl_filter or i.family in impl_filter]
    return [ADAMW_STEP_ONLY, *impls]  # the step alone is needed for every fused-optimizer overhead


def plan_cells(settings: Settings, impls: list[Impl]) -> list[Cell]:
    """Every cell of the run, grouped by (workload, dtype set); the compile cells come last, so that
    the budget decides on them (a compile cannot be interrupted) with the real time left."""
    cells = [
        Cell(w, d, s, impl)
        for w in settings.workloads
        for d in settings.dtype_sets
        for s in settings.scenarios
        for impl in impls
        if _takes_part(impl, w, d, s, settings.compile)
    ]
    return [c for c in cells if not c.impl.compiled] + [c for c in cells if c.impl.compiled]


def _takes_part(impl: Impl, w: Workload, dtype_set: str, scenario: Scenario, policy: CompilePolicy) -> bool:
    if impl is ADAMW_STEP_ONLY:
        return scenario.steps_optimizer
    if impl.compiled:
        return policy.allows(w, dtype_set, scenario.name)
    return True


# Copy bandwidth before and after the cells further apart than this: something else ran meanwhile.
BUSY_RATIO = 0.75


def run_suite(settings: Settings, gradfuse, progress) -> SuiteRun:
    run = SuiteRun()
    device = settings.device
    impls = implementations(device, gradfuse, settings.impl_filter, run.notes)
    if settings.adapt_threads:
        _adapt_threads(run, "the start")
    copy_before = timing.copy_bandwidth(device, settings.copy_bytes, settings.copy_repeat)
    if any(i.compiled for i in impls):
        run.notes.append(settings.compile.describe() + ("" if settings.compile.enabled else " (--compile on/auto to include it)"))
    cells = plan_cells(settings, impls)
    estimate_cells(cells, copy_before["gbps"], settings.repeat, settings.cache_bytes, cuda=device.type == "cuda")
    progress.start(cells, settings.clock)
    remaining = sum(c.estimate_s for c in cells)
    # Compile cells yield (they are skipped when they would not fit), so only the timed cells left
    # decide whether the timed cells must hurry.
    remaining_timed = sum(c.estimate_s for c in cells if not c.impl.compiled)
    for (_, dtype_set), group_cells in itertools.groupby(cells, key=lambda c: (c.workload.name, c.dtype_set)):
        group_cells = list(group_cells)
        w = group_cells[0].workload
        if settings.adapt_threads:
            _adapt_threads(run, f"{w.name} {dtype_set}")
        group = None if settings.clock.past_budget() else _make_group(settings, w, dtype_set, run)
        for cell in group_cells:
            remaining -= cell.estimate_s
            if not cell.impl.compiled:
                remaining_timed -= cell.estimate_s
            if settings.clock.past_budget():
                run.rows.append(_not_run(cell, f"not run: past the run's time budget of {settings.clock.budget_s:.0f} s"))
            if group is None or settings.clock.past_budget():
                progress.advance(cell, None)
                continue
            _run_scheduled(settings, run, group, cell, gradfuse, progress, remaining, remaining_timed)
        del group
        _free(device)
    _copy_bandwidth_after(settings, run, copy_before)
    derive_figures(run.rows, run.copy_bandwidth["gbps"])
    return run


def _run_scheduled(settings: Settings, run: SuiteRun, group: GradGroup, cell: Cell, gradfuse, progress,
                   remaining_s: float, remaining_timed_s: float) -> None:
    """Run one cell of the plan: hurried once the timed cells left would end past the budget;
    timed and recorded. ``remaining_s``: estimated seconds of every cell after this one."""
    if not run.hurried and not cell.impl.compiled and settings.clock.behind(cell.estimate_s + remaining_timed_s):
        run.hurried = True
        run.notes.append(
            f"the run fell behind its time budget of {settings.clock.budget_s:.0f} s: from {cell.label} on, "
            f"every cell took the fewest timed calls ({settings.repeat.min_reps}) on one gradient set (its "
            "rotation no longer defeats the cache), with no re-measurement of noisy timings"
        )
    progress.label(cell.label)
    t0 = time.perf_counter()
    row = run_cell(settings, group, cell, gradfuse, remaining_s, run.hurried)
    row.wall_s, row.estimate_s, row.threads = time.perf_counter() - t0, cell.estimate_s, torch.get_num_threads()
    ran = row.status != SKIPPED
    if ran:  # a skipped cell leaves the plan: its estimate must not count as done work
        settings.clock.record(cell.estimate_s, row.wall_s)
    run.rows.append(row)
    if cell.impl.is_gradfuse and row.status in (WRONG, ERROR):
        message = f"{cell.impl.name} on {cell.workload.name}/{cell.dtype_set}/{cell.scenario.name}: {row.note}"
        run.failures.append(message)
        progress.write(("WRONG RESULT: " if row.status == WRONG else "ERROR: ") + message)
    progress.advance(cell, row.wall_s if ran else None)


def _copy_bandwidth_after(settings: Settings, run: SuiteRun, copy_before: dict) -> None:
    """Measure again after the cells; the better one is the reference (a busy moment only slows)."""
    copy_after = timing.copy_bandwidth(settings.device, settings.copy_bytes, settings.copy_repeat)
    run.copy_bandwidth = {
        **max(copy_before, copy_after, key=lambda c: c["gbps"]),
        "gbps_before_and_after": [copy_before["gbps"], copy_after["gbps"]],
    }
    low, high = sorted((copy_before["gbps"], copy_after["gbps"]))
    if low < BUSY_RATIO * high:
        run.notes.append(
            f"the machine was busy during this run: copy bandwidth {copy_before['gbps']:.1f} GB/s before the cells "
            f"and {copy_after['gbps']:.1f} after; other work shares it, so re-run before trusting these figures"
        )


def _adapt_threads(run: SuiteRun, label: str) -> None:
    threads, why = environment.free_threads(torch.get_num_threads())
    if why:
        torch.set_num_threads(threads)
        run.notes.append(f"from {label} on: {why}")


def _not_run(cell: Cell, note: str) -> Row:
    return Row(cell.workload.name, cell.dtype_set, cell.scenario.name, cell.impl.name, status=SKIPPED, note=note)


def _make_group(settings: Settings, w: Workload, dtype_set: str, run: SuiteRun) -> GradGroup | None:
    set_bytes = nbytes(w, tensor_dtypes(w, dtype_set))
    count = rotation_count(set_bytes, settings.cache_bytes) if settings.cache_bytes else 1
    try:
        group = make_grad_group(w, dtype_set, settings.device, count)
    except torch.OutOfMemoryError:
        run.notes.append(f"{w.name}/{dtype_set}: {count} gradient sets of {set_bytes / 1e9:.2f} GB do not fit; skipped")
        _free(settings.device)
        return None
    if not any((g["workload"], g["dtype"]) == (w.name, dtype_set) for g in run.groups):  # compile cells rebuild it
        run.groups.append({"workload": w.name, "dtype": dtype_set, "bytes": group.nbytes, "rotation_sets": count, "norms": group.norms})
    return group


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_cell(settings: Settings, group: GradGroup, cell: Cell, gradfuse, remaining_s: float = 0.0, hurried: bool = False) -> Row:
    """Prepare, check once against fp64, time, count launches and syncs: one result row.

    ``remaining_s``: estimated seconds of the cells planned after this one (for the time budget).
    ``hurried``: the run is behind its budget: the fewest timed calls, all on gradient set 0, and
    no re-measurement of a noisy timing.
    """
    device = settings.device
    impl, scenario = cell.impl, cell.scenario
    row = Row(group.workload.name, group.dtype_set, scenario.name, impl.name)
    if impl is not ADAMW_STEP_ONLY:
        row.bytes = scenario.bytes_factor * group.nbytes
    if impl.compiled:
        reason = _compile_skip_reason(settings, cell, remaining_s)
        if reason:
            row.status, row.note = SKIPPED, reason
            return row
    max_norm = max_norm_for(scenario, group)
    repeat = settings.repeat
    if hurried:
        repeat = timing.RepeatPolicy(repeat.warmup, repeat.min_reps, repeat.min_reps, 0.0)
    call: PreparedCall | None = None
    try:
        call = prepare(impl, scenario, group, max_norm, device, gradfuse)
        restore = _first_call(row, call, impl, scenario, max_norm, settings)
        if row.status != OK:
            return row
        if hurried:
            timed, timed_restore = (lambda i: call(0)), (lambda i: restore(0))
        else:
            timed, timed_restore = call, restore
            for i in range(1, len(group.sets)):  # first use of every set (plans, optimizer state): untimed
                call(i)
                restore(i)
        stats = _measure_steadily(row, timed, timed_restore, device, repeat, retries=0 if hurried else NOISE_RETRIES)
        row.time = stats.as_ms()
        if device.type == "cuda":
            _count_launches_and_syncs(row, call, restore, device)
    except Unsupported as e:
        row.status, row.note = SKIPPED, str(e)
    except Exception as e:  # a broken implementation is reported, the run goes on
        if impl.compiled:
            row.status, row.note = SKIPPED, f"torch.compile failed: {type(e).__name__}: {_first_line(e)}"
        else:
            row.status, row.note = ERROR, f"{type(e).__name__}: {_first_line(e)}"
        _free(device)
    finally:
        if call is not None:
            call.close()
    return row


def _compile_skip_reason(settings: Settings, cell: Cell, remaining_s: float) -> str | None:
    estimate = cell.estimate_s
    if settings.compile.spent_s == 0 and not cell.startup_s:  # the planned first compile was skipped: this one starts Inductor
        estimate += COMPILE_FIRST_S
    if settings.compile.would_exceed(estimate):
        return f"compile budget of {settings.compile.budget_s:.0f} s would be passed (--compile-budget)"
    if not settings.clock.fits(estimate, remaining_s):
        return f"would not end within the run's time budget of {settings.clock.budget_s:.0f} s (--time-budget)"
    return None


def _measure_steadily(row: Row, call, restore, device: torch.device, repeat: timing.RepeatPolicy, retries: int) -> timing.Stats:
    """Time the calls; a try whose spread (IQR) exceeds its median is repeated up to ``retries``
    times, the steadiest kept, and the row is flagged noisy when every try was."""
    tries = [timing.measure(call, restore, device, repeat, start=1)]
    while tries[-1].noisy and len(tries) <= retries:
        tries.append(timing.measure(call, restore, device, repeat, start=1))
    stats = min(tries, key=lambda s: s.iqr_s / s.median_s)
    if stats.noisy:
        row.status = NOISY
        row.note = (
            f"spread (IQR {stats.iqr_s * 1e3:.3g} ms) above the median ({stats.median_s * 1e3:.3g} ms) "
            f"in {len(tries)} tries: the machine's noise, no figure"
        )
    elif len(tries) > 1:
        row.note = f"measured {len(tries)} times: the first tries were noisy"
    return stats


def _count_launches_and_syncs(row: Row, call: PreparedCall, restore, device: torch.device) -> None:
    try:
        row.launches_per_call, row.syncs_per_call = timing.count_launches_and_syncs(call, device, 0)
    except Exception as e:  # a profiler problem must not turn a measured row into an error
        row.note = (row.note + "; " if row.note else "") + f"launch/sync count failed: {type(e).__name__}: {_first_line(e)}"
    finally:
        restore(0)


def _first_call(row: Row, call: PreparedCall, impl: Impl, scenario: Scenario, max_norm, settings: Settings):
    """Run call 0 on set 0 and check it against fp64; return the untimed restore for later calls."""
    device = settings.device
    grads = call.group.set(0).grads
    snap = correctness.take_snapshot(grads) if impl is not ADAMW_STEP_ONLY else None
    timing.synchronize(device)
    t0 = time.perf_counter()
    try:
        result = call(0)
        timing.synchronize(device)
    except (NotImplementedError, TypeError) as e:
        if impl.is_gradfuse and scenario.steps_optimizer:  # the hand-off is feature-detected by calling it
            raise Unsupported(f"gradfuse hand-off not available: {type(e).__name__}: {_first_line(e)}") from e
        raise
    if impl.compiled:
        row.compile_s = time.perf_counter() - t0
        settings.compile.spent_s += row.compile_s
    if snap is None:
        return _no_restore
    _record_check(row, impl, _check(call, snap, result, max_norm))
    if not correctness.grads_changed(snap, grads):
        return _no_restore
    restore = _restorer(call.group)
    restore(0)
    return restore


def _check(call: PreparedCall, snap: correctness.Snapshot, result, max_norm) -> correctness.Check:
    """The guard on call 0; with an optimizer, on the first Adam moments it left."""
    opt = call.optimizer(0)
    if opt is None:
        return correctness.check_call(snap, returned_norm(result), max_norm, call.group.set(0).grads)
    moments = [opt.state[p]["exp_avg"] for p in call.group.set(0).params]
    beta1 = opt.param_groups[0]["betas"][0]
    return correctness.check_call(snap, returned_norm(result), max_norm, call.group.set(0).grads, moments, beta1)


def _record_check(row: Row, impl: Impl, check: correctness.Check) -> None:
    row.check = check.as_dict()
    if check.ok:
        return
    if impl.is_gradfuse:
        row.status, row.note = WRONG, "; ".join(check.problems)
        return
    # torch's own rounding (fp16/bf16 norms, fp16 coefficient): reported, not a failure
    errors = [f"{what} rel err {err:.1e}" for what, err in (("norm", check.norm_rel_err), ("values", check.values_max_rel_err)) if err]
    row.note = f"outside gradfuse's tolerance ({', '.join(errors)})"


def _no_restore(i: int) -> None:
    return None


def _restorer(group: GradGroup):
    def restore(i: int) -> None:
        """Undo the ~0.5 clip exactly (a power of two), untimed: every call sees the same norm."""
        with torch.no_grad():
            torch._foreach_mul_(group.set(i).grads, 2.0)

    return restore


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""
