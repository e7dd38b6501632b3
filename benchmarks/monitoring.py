"""What monitoring costs: a bare clip vs the clip plus per-layer statistics, history and telemetry.

    python -m benchmarks.monitoring                       # gpt2_124m, bf16 and fp32, this machine's device
    python -m benchmarks.monitoring --dtypes bf16 --steps 20 --out benchmarks/out/monitoring.json

Per configuration (dtype x scenario), in one process, interleaved rep by rep so that drift hits
both alike:

  bare       ``gradfuse.clip_grads(params, max_norm)``
  monitored  the same clip, then ``NormHistory.update`` (every layer tracked) and
             ``Telemetry.update`` every step, with ``Telemetry.collect`` (the one host read of an
             interval) every ``--log-every`` steps

and, timed apart: the monitoring updates alone on a fixed result (``monitor_only``), one
``collect`` and its read, and one log2-histogram step. The overhead is ``monitored / bare - 1``
(goal: <= 10%; on a shared machine the medians move by more than that from rep to rep, so the
ratio of the fastest reps and ``monitor_only`` are recorded too). Host reads per step are counted over ``--steps`` monitored steps with no collect:
calls of ``Tensor.item/.tolist/.cpu/.numpy/__bool__/__float__/__int__`` and ``aten._local_scalar_dense``
(and, on CUDA, torch's sync debug mode set to error). Goal: 0.

Scenarios: ``clip`` (max_norm 0: the scale pass runs on every call; the gradients become zeros,
which costs the kernels the same as any finite value) and ``noclip`` (max_norm inf: one read only).
Shapes: GPT-2 small (124M parameters, 148 tensors, HF naming), built from its config.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gradfuse
from benchmarks.environment import describe
from benchmarks.models import GPT2Config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SCENARIOS = {"clip": 0.0, "noclip": math.inf}
ROOT = Path(__file__).resolve().parent.parent
GPT2_124M = GPT2Config(n_layer=12, n_embd=768, vocab_size=50257, n_positions=1024)  # 148 tensors, 124.4M elements


def named_params(dtype: torch.dtype, device: torch.device) -> list[tuple[str, torch.nn.Parameter]]:
    g = torch.Generator(device="cpu").manual_seed(0)
    out = []
    for name, shape in GPT2_124M.tensors():
        p = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
        p.grad = (torch.randn(shape, generator=g) * 0.01).to(device, dtype)
        out.append((name, p))
    return out


class HostReads(TorchDispatchMode):
    """Counts the reads of device values by the host: the Python calls that read a tensor's value
    (patched for the duration) and ``aten._local_scalar_dense`` (what ``item()``/``bool()`` call)."""

    _METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")

    def __init__(self):
        super().__init__()
        self.count = 0
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self._hit("aten._local_scalar_dense")
        return func(*args, **(kwargs or {}))

    def _hit(self, what: str) -> None:
        self.count += 1
        self.seen.append(what)

    @contextlib.contextmanager
    def watching(self):
        originals = {m: getattr(torch.Tensor, m) for m in self._METHODS}

        def counted(name, fn):
            def wrapper(t, *a, **k):
                self._hit(f"Tensor.{name}")
                return fn(t, *a, **k)

            return wrapper

        try:
            for m, fn in originals.items():
                setattr(torch.Tensor, m, counted(m, fn))
            with self:
                yield self
        finally:
            for m, fn in originals.items():
                setattr(torch.Tensor, m, fn)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_call(fn, device: torch.device, calls: int) -> float:
    """Seconds per call of ``fn(i)`` over ``calls`` calls (the device is waited for at both ends)."""
    _sync(device)
    t0 = time.perf_counter()
    for i in range(calls):
        fn(i)
    _sync(device)
    return (time.perf_counter() - t0) / calls


def run_config(dtype_name: str, scenario: str, device: torch.device, reps: int, calls: int, steps: int, log_every: int) -> dict:
    named = named_params(DTYPES[dtype_name], device)
    params = [p for _, p in named]
    max_norm = SCENARIOS[scenario]
    history = gradfuse.NormHistory(capacity=1000, parameters=named, layers="all")
    telemetry = gradfuse.Telemetry(named)

    def bare(i):
        gradfuse.clip_grads(params, max_norm)

    def monitored(i):
        r = gradfuse.clip_grads(params, max_norm)
        history.update(r, max_norm=max_norm)
        telemetry.update(r, max_norm=max_norm)
        if (i + 1) % log_every == 0:
            telemetry.collect().record()

    for fn in (bare, monitored):  # warm-up: plans, buffers, caches
        fn(0), fn(1)
    bare_t, mon_t = [], []
    for _ in range(reps):  # interleaved
        bare_t.append(_per_call(bare, device, calls))
        mon_t.append(_per_call(monitored, device, calls))

    fixed = gradfuse.clip_grads(params, max_norm)

    def monitor_only(i):
        history.update(fixed, max_norm=max_norm)
        telemetry.update(fixed, max_norm=max_norm)

    monitor_only(0)
    only = statistics.median(_per_call(monitor_only, device, max(calls, 20)) for _ in range(reps))
    telemetry.collect()
    collect_t = statistics.median(_time_collect(telemetry, fixed, max_norm, device) for _ in range(reps))
    hist_t = _time_once(lambda: telemetry.update(fixed, max_norm=max_norm, histograms=True), device)
    telemetry.collect()

    reads = HostReads()
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        with reads.watching():
            for _ in range(steps):
                r = gradfuse.clip_grads(params, max_norm)
                history.update(r, max_norm=max_norm)
                telemetry.update(r, max_norm=max_norm)
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
    bare_ms, mon_ms = statistics.median(bare_t) * 1e3, statistics.median(mon_t) * 1e3
    return {
        "workload": "gpt2_124m", "dtype": dtype_name, "scenario": scenario, "num_tensors": len(params),
        "numel": sum(p.numel() for p in params), "reps": reps, "calls_per_rep": calls, "log_every": log_every,
        "bare_ms": bare_ms, "monitored_ms": mon_ms, "overhead_pct": 100 * (mon_ms / bare_ms - 1),
        "overhead_pct_of_min": 100 * (min(mon_t) / min(bare_t) - 1),
        "bare_ms_reps": [t * 1e3 for t in bare_t], "monitored_ms_reps": [t * 1e3 for t in mon_t],
        "monitor_only_ms": only * 1e3, "monitor_only_pct": 100 * only * 1e3 / bare_ms,
        "collect_ms": collect_t * 1e3, "histogram_step_ms": hist_t * 1e3,
        "host_reads_per_step": reads.count / steps, "host_reads_seen": sorted(set(reads.seen)), "steps_counted": steps,
    }  # fmt: skip


def _time_once(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _time_collect(telemetry, result, max_norm, device) -> float:
    """One interval's collect and read (after 10 updates)."""
    for _ in range(10):
        telemetry.update(result, max_norm=max_norm)
    return _time_once(lambda: telemetry.collect().record(), device)


def environment(device: torch.device, argv: list[str]) -> dict:
    info = describe(device, argv)
    info["command"] = shlex.join(["python", "-m", "benchmarks.monitoring", *argv])
    return info


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m benchmarks.monitoring", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: " + ",".join(DTYPES))
    ap.add_argument("--scenarios", default="clip,noclip", help="comma-separated: " + ",".join(SCENARIOS))
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--calls", type=int, default=5, help="calls per timed rep")
    ap.add_argument("--steps", type=int, default=10, help="monitored steps whose host reads are counted")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--out", default=None, help="results JSON (default: benchmarks/out/monitoring-<device type>.json)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for dtype_name in args.dtypes.split(","):
        for scenario in args.scenarios.split(","):
            row = run_config(dtype_name, scenario, device, args.reps, args.calls, args.steps, args.log_every)
            rows.append(row)
            print(
                f"gpt2_124m {dtype_name:<4} {scenario:<6}  bare {row['bare_ms']:8.3f} ms  monitored {row['monitored_ms']:8.3f} ms "
                f"({row['overhead_pct']:+5.1f}%; fastest reps {row['overhead_pct_of_min']:+5.1f}%)  monitor alone {row['monitor_only_ms']:6.3f} ms ({row['monitor_only_pct']:4.1f}%)  "
                f"collect {row['collect_ms']:6.3f} ms  histograms {row['histogram_step_ms']:7.1f} ms  host reads/step {row['host_reads_per_step']:g}",
                flush=True,
            )
    out = {"environment": environment(device, argv), "results": rows}
    path = Path(args.out) if args.out else ROOT / "benchmarks" / "out" / f"monitoring-{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
