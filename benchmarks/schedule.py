"""The run's plan and clock: every cell with an estimate of its seconds, and the time budget.

The estimates drive the progress bar (its fraction and ETA are in estimated seconds, scaled by how
fast the cells done so far ran against their estimates) and the budget: a compile cell starts only
when it and everything planned after it still fit, and once the run falls behind, the cells left
take the fewest repeats. A compile cannot be interrupted, so its estimate is deliberately high.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .scenarios import ADAMW_STEP_ONLY, Impl, Scenario
from .timing import RepeatPolicy
from .workloads import Workload, nbytes, rotation_count, tensor_dtypes

# Cost model, fitted to runs on the 2-core CPU machine (wall seconds per cell against the estimate).
# Time per call: bytes moved / copy bandwidth * SLOWDOWN + tensors * PER_TENSOR_S.
SLOWDOWN = {"gradfuse": 1.5, "torch:foreach": 3.5, "torch:loop": 4.0, "gradfuse:torch": 6.0, "adamw": 13.0}
PER_TENSOR_S = {"gradfuse": 0.5e-6, "torch:foreach": 2e-6, "torch:loop": 12e-6, "gradfuse:torch": 3e-6, "adamw": 2e-6}
CELL_OVERHEAD_S = 0.02  # preparing the call, the correctness guard's bookkeeping
CHECK_PASSES = 4  # the guard's fp64 norm and samples, in reads of the gradient set
# torch.compile on CPU, measured with a cold Inductor cache: ~0.2 s per tensor, plus ~20 s for the
# first compile in a process (Inductor's own start-up); the on-disk cache makes repeats far faster.
COMPILE_PER_TENSOR_S = 0.2
COMPILE_FIRST_S = 20.0
COMPILE_PER_TENSOR_S_CUDA = 0.1


@dataclass
class Cell:
    """One (workload, dtype set, scenario, implementation) to run, and its estimated seconds."""

    workload: Workload
    dtype_set: str
    scenario: Scenario
    impl: Impl
    estimate_s: float = 0.0
    startup_s: float = 0.0  # part of estimate_s: the process's first compile (Inductor's start-up)

    @property
    def label(self) -> str:
        return f"{self.workload.name} {self.dtype_set} {self.scenario.name} {self.impl.name}"


def _cost_key(impl: Impl) -> str:
    if impl is ADAMW_STEP_ONLY:
        return "adamw"
    if impl.is_gradfuse:
        return "gradfuse:torch" if impl.backend == "torch" else "gradfuse"
    return "torch:loop" if not impl.foreach else "torch:foreach"


def call_seconds(cell: Cell, copy_gbps: float) -> float:
    """Estimated seconds of one call of ``cell``."""
    w = cell.workload
    set_bytes = nbytes(w, tensor_dtypes(w, cell.dtype_set))
    key = _cost_key(cell.impl)
    moved = set_bytes * (cell.scenario.bytes_factor if cell.impl is not ADAMW_STEP_ONLY else 1)
    seconds = moved / (copy_gbps * 1e9) * SLOWDOWN[key] + w.num_tensors * PER_TENSOR_S[key]
    if cell.scenario.steps_optimizer and cell.impl is not ADAMW_STEP_ONLY:  # clip + the step
        seconds += set_bytes / (copy_gbps * 1e9) * SLOWDOWN["adamw"] + w.num_tensors * PER_TENSOR_S["adamw"]
    return seconds


def estimate_cell(cell: Cell, copy_gbps: float, repeat: RepeatPolicy, cache_bytes: int, *, cuda: bool) -> float:
    """Estimated wall seconds of ``cell``: the guard, one untimed call per gradient set, the
    warm-up and the timed calls, each followed by its restore (a scale pass)."""
    w = cell.workload
    set_bytes = nbytes(w, tensor_dtypes(w, cell.dtype_set))
    sets = rotation_count(set_bytes, cache_bytes) if cache_bytes else 1
    per_call = call_seconds(cell, copy_gbps)
    restore = 2 * set_bytes / (copy_gbps * 1e9) * SLOWDOWN["gradfuse"] + w.num_tensors * PER_TENSOR_S["torch:foreach"]
    calls = sets + repeat.warmup + repeat.reps_for(per_call)
    seconds = CELL_OVERHEAD_S + CHECK_PASSES * set_bytes / (copy_gbps * 1e9) + calls * (per_call + restore)
    if cell.impl.compiled:
        per_tensor = COMPILE_PER_TENSOR_S_CUDA if cuda else COMPILE_PER_TENSOR_S
        seconds += w.num_tensors * per_tensor
    return seconds


def estimate_cells(cells: list[Cell], copy_gbps: float, repeat: RepeatPolicy, cache_bytes: int, *, cuda: bool) -> None:
    """Each cell's estimate; the first compile cell also carries Inductor's start-up."""
    for c in cells:
        c.estimate_s = estimate_cell(c, copy_gbps, repeat, cache_bytes, cuda=cuda)
    first = next((c for c in cells if c.impl.compiled), None)
    if first is not None:
        first.startup_s = COMPILE_FIRST_S
        first.estimate_s += COMPILE_FIRST_S


class Clock:
    """Elapsed time against the run's time budget, and how fast cells run against their estimates."""

    # The pace starts as "on estimate" and moves with evidence: this many estimated seconds of
    # prior, so that one slow first cell (plans, thread pools, caches) does not set it alone.
    PRIOR_S = 5.0

    def __init__(self, budget_s: float | None, start: float | None = None):
        self.budget_s = budget_s
        self.start = time.perf_counter() if start is None else start
        self.estimated_done_s = 0.0
        self.actual_done_s = 0.0

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    def record(self, estimate_s: float, actual_s: float) -> None:
        self.estimated_done_s += estimate_s
        self.actual_done_s += actual_s

    @property
    def pace(self) -> float:
        """Actual over estimated seconds of the cells done, with the prior (at least 0.25)."""
        return max(0.25, (self.actual_done_s + self.PRIOR_S) / (self.estimated_done_s + self.PRIOR_S))

    def past_budget(self) -> bool:
        return self.budget_s is not None and self.elapsed_s > self.budget_s

    def fits(self, estimate_s: float, then_s: float) -> bool:
        """Whether ``estimate_s`` more, followed by ``then_s`` of other planned work, ends within the budget."""
        if self.budget_s is None:
            return True
        return self.elapsed_s + self.pace * (estimate_s + then_s) <= self.budget_s

    def behind(self, remaining_s: float) -> bool:
        """Whether the cells left, at the pace so far, would end past the budget."""
        return not self.fits(0.0, remaining_s)
