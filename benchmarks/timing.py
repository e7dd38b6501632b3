"""Measurement: per-call times (CUDA events or perf_counter), launch and sync counts, copy bandwidth.

Every timed call ``call(i)`` gets an index ``i``; the caller maps it to a gradient set (rotation)
and gives an untimed ``between(i)`` that runs right after it (restoring clipped gradients).
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import torch

# Runtime/driver calls that block the host until the device is done.
SYNC_API_NAMES = frozenset(
    {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cuStreamSynchronize", "cuCtxSynchronize", "cudaMemcpy"}
)


@dataclass(frozen=True)
class Stats:
    """Seconds per call: median, quartiles and extremes over ``reps`` calls."""

    median_s: float
    p25_s: float
    p75_s: float
    min_s: float
    max_s: float
    reps: int

    @classmethod
    def from_samples(cls, samples: list[float]) -> Stats:
        if len(samples) >= 2:
            p25, _, p75 = statistics.quantiles(samples, n=4, method="inclusive")
        else:
            p25 = p75 = samples[0]
        return cls(statistics.median(samples), p25, p75, min(samples), max(samples), len(samples))

    @property
    def iqr_s(self) -> float:
        return self.p75_s - self.p25_s

    @property
    def noisy(self) -> bool:
        """A spread (IQR) above the median: the machine's noise drowns the figure."""
        return self.iqr_s > self.median_s

    def as_ms(self) -> dict:
        d = {k.replace("_s", "_ms"): v * 1e3 for k, v in asdict(self).items() if k != "reps"}
        return {**d, "iqr_ms": self.iqr_s * 1e3, "reps": self.reps}


@dataclass(frozen=True)
class RepeatPolicy:
    """How many calls to make: ``warmup`` untimed, then enough for ``target_s`` within the bounds."""

    warmup: int
    min_reps: int
    max_reps: int
    target_s: float

    def reps_for(self, seconds_per_call: float) -> int:
        wanted = math.ceil(self.target_s / max(seconds_per_call, 1e-7))
        return max(self.min_reps, min(self.max_reps, wanted))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    call: Callable[[int], object],
    between: Callable[[int], None],
    device: torch.device,
    policy: RepeatPolicy,
    start: int = 0,
) -> Stats:
    """Warm up, pick the repeat count from the warm-up times, then time each call."""
    i = start
    warm = []
    for _ in range(policy.warmup):
        synchronize(device)
        t0 = time.perf_counter()
        call(i)
        synchronize(device)
        warm.append(time.perf_counter() - t0)
        between(i)
        i += 1
    reps = policy.reps_for(statistics.median(warm) if warm else 0.0)
    timer = _time_cuda if device.type == "cuda" else _time_cpu
    return Stats.from_samples(timer(call, between, device, range(i, i + reps)))


def _time_cpu(call, between, device, indices) -> list[float]:
    samples = []
    for i in indices:
        t0 = time.perf_counter()
        call(i)
        samples.append(time.perf_counter() - t0)
        between(i)
    return samples


def _time_cuda(call, between, device, indices) -> list[float]:
    """CUDA events around each call: the device time from the call's first to its last work,
    including gaps where the device waited for the host (so launch-bound calls are charged)."""
    pairs = []
    synchronize(device)
    for i in indices:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call(i)
        end.record()
        between(i)
        pairs.append((start, end))
    synchronize(device)
    return [s.elapsed_time(e) * 1e-3 for s, e in pairs]


def count_launches_and_syncs(call: Callable[[int], object], device: torch.device, index: int) -> tuple[int, int]:
    """Device launches (kernels, memcpys, memsets) and host syncs of one call ``call(index)`` on CUDA.

    Syncs: the larger of torch's sync-debug warnings and the synchronising runtime calls the
    profiler saw inside the call (the latter also catches syncs made outside torch, by compiled
    extensions; the profiler's own synchronize when it stops is outside the call and not counted).
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                torch.cuda.set_sync_debug_mode("warn")
                with record_function(_CALL_RANGE):
                    call(index)
                torch.cuda.set_sync_debug_mode(0)
                _wait_without_sync_call(device)  # so the profiler sees every launch finish
        finally:
            torch.cuda.set_sync_debug_mode(0)
    warned = sum("synchroniz" in str(w.message) for w in caught)
    events = prof.events()
    on_device = torch.autograd.DeviceType.CUDA
    window = next(e.time_range for e in events if e.name == _CALL_RANGE and e.device_type != on_device)
    # the range itself may also show on the device timeline as an annotation: not a launch
    launches = sum(e.device_type == on_device and e.name != _CALL_RANGE for e in events)
    sync_calls = sum(
        e.name in SYNC_API_NAMES and window.start <= e.time_range.start and e.time_range.end <= window.end
        for e in events
    )
    return launches, max(warned, sync_calls)


_CALL_RANGE = "benchmarks::call"


def _wait_without_sync_call(device: torch.device) -> None:
    """Wait for the device by polling an event: no synchronising call for the counters to see."""
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    while not done.query():
        time.sleep(1e-4)


def copy_bandwidth(device: torch.device, nbytes: int, policy: RepeatPolicy) -> dict:
    """The machine's copy bandwidth: a ``nbytes`` device-to-device (or host memcpy) copy.

    Bytes moved = read + write = 2 * nbytes; GB = 1e9 bytes.
    """
    numel = nbytes // 4
    src = torch.ones(numel, device=device)  # written pages (no lazy zeros); quicker to make than randn
    dst = torch.empty_like(src)
    stats = measure(lambda i: dst.copy_(src), lambda i: None, device, policy)
    moved = 2 * numel * 4
    threads = torch.get_num_threads()
    method = "device-to-device copy_, CUDA events" if device.type == "cuda" else f"host copy_, {threads} thread{'s' * (threads != 1)}"
    del src, dst
    return {"gbps": moved / stats.median_s / 1e9, "bytes_moved": moved, "method": method, "time": stats.as_ms()}
