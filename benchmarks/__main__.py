"""``python -m benchmarks``: every gradfuse backend against torch.nn.utils clipping, side by side.

Exit status: 0 when every gradfuse result was right; 1 when one was wrong or a gradfuse call raised;
2 when the run could not start as asked (bad arguments, an unknown workload or unreadable workload
file, no such device, gradfuse not importable while gradfuse contenders are asked for).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from . import environment, report, timing
from .environment import SetupError
from .runner import CompilePolicy, Settings, run_suite
from .scenarios import SCENARIOS
from .schedule import Clock
from .workloads import DTYPE_SETS, REPO_ROOT, load_workloads, scaled, scaled_to, truncated

CPU_MAX_NUMEL = 4_000_000  # --scale auto on CPU: each workload shrunk to about this many elements
CPU_SKIP_ABOVE_NUMEL = 2_000_000_000  # workloads this large run on CPU only when named (llama2_7b)
QUICK_MAX_NUMEL = 1 << 16
QUICK_MAX_TENSORS = 48

REPEATS = {
    "cpu": timing.RepeatPolicy(warmup=1, min_reps=5, max_reps=20, target_s=0.1),
    "cuda": timing.RepeatPolicy(warmup=3, min_reps=10, max_reps=100, target_s=0.2),
    "quick": timing.RepeatPolicy(warmup=1, min_reps=3, max_reps=3, target_s=0.0),
}
COPY_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30, "quick": 32 << 20}  # far above every cache
COPY_REPEATS = timing.RepeatPolicy(warmup=2, min_reps=10, max_reps=10, target_s=0.0)

# torch.compile under --compile auto. On CPU, Inductor needs ~30 s per graph for ~150 tensors (~50 s
# for the first graph of a process) and ~10 min for 2048 (measured on 2 cores), so only the headline
# cell of each workload compiles; a compile cannot be interrupted, so 2048-tensor graphs are left out
# on GPU too.
COMPILE_AUTO = {
    "cpu": CompilePolicy(scenarios=frozenset({"clip"}), dtype_sets=frozenset({"bf16"}), max_tensors=256, budget_s=90),
    "cuda": CompilePolicy(scenarios=frozenset({"clip", "norm"}), max_tensors=512, budget_s=300),
}
# The default run per device. On CPU it must end within 3 minutes on 2 cores, everything included:
# bf16 and fp32, the scenarios that tell most, and a time budget the cells are planned into.
DEFAULT_DTYPES = {"cpu": ["bf16", "fp32"], "cuda": list(DTYPE_SETS), "quick": list(DTYPE_SETS)}
DEFAULT_SCENARIOS = {"cpu": ["clip", "noclip", "norm", "fused-optimizer"], "cuda": list(SCENARIOS), "quick": list(SCENARIOS)}
TIME_BUDGET_S = {"cpu": 150.0, "cuda": None}


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark gradfuse's backends against torch.nn.utils.clip_grad_norm_ (see benchmarks/README.md).",
    )
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--workloads-dir", help="a folder of your own workload *.json files, run besides the canonical ones")
    p.add_argument("--workloads", type=_names, help="comma-separated workload names (default: all; on CPU all but the GPU-sized)")
    p.add_argument(
        "--dtypes", type=_names, help=f"comma-separated, from {','.join(DTYPE_SETS)} (default: bf16,fp32 on CPU, all on GPU)"
    )
    p.add_argument("--scenarios", type=_names, help=f"comma-separated, from {','.join(SCENARIOS)} (default: see README)")
    p.add_argument(
        "--impls",
        type=_names,
        help="comma-separated implementations or families: gradfuse, torch, gradfuse:cpu, torch:foreach, torch:loop, torch:compile (default: all)",
    )
    p.add_argument(
        "--scale",
        default="auto",
        help="multiply every tensor's first dimension by this factor; auto (default): 1 on GPU, "
        f"on CPU each workload shrunk to about {CPU_MAX_NUMEL:,} elements",
    )
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="torch.compile contender (default auto: see README)")
    p.add_argument("--compile-budget", type=float, help="stop compiling after this many seconds of compile time")
    p.add_argument("--repeats", type=int, help="timed calls per cell (default: as many as fit a time budget)")
    p.add_argument(
        "--time-budget",
        type=float,
        help="seconds the run should take at most (default: 150 on CPU, none on GPU; 0: none): compile cells that "
        "would not fit are skipped, and a run that falls behind takes the fewest timed calls",
    )
    p.add_argument("--full", action="store_true", help="print the full table (every row) before the summary")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 3 repeats, 1 thread: checks the suite runs, in seconds")
    p.add_argument("--out", help="JSON output path; the PNG goes beside it (default: benchmarks/out/<device-kind>.json, git-ignored)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-cell lines")
    args = p.parse_args(argv)
    for name, allowed in (("dtypes", DTYPE_SETS), ("scenarios", SCENARIOS)):
        bad = [v for v in getattr(args, name) or [] if v not in allowed]
        if bad:
            p.error(f"--{name}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    if args.scale != "auto":
        try:
            args.scale = float(args.scale)
        except ValueError:
            p.error(f"--scale must be auto or a number, not {args.scale!r}")
        if not 0 < args.scale <= 1:
            p.error("--scale must be in (0, 1]")
    for name in ("repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.time_budget is not None and args.time_budget < 0:
        p.error("--time-budget must be >= 0")
    return args


def select_workloads(args, device: torch.device, notes: list[str]):
    workloads = load_workloads(args.workloads, args.workloads_dir)
    if device.type == "cpu" and args.workloads is None:
        big = [w for w in workloads if w.full_numel > CPU_SKIP_ABOVE_NUMEL]
        for w in big:
            notes.append(f"{w.name} ({w.full_numel / 1e9:.1f}e9 elements) is GPU-only; name it with --workloads to run it scaled on CPU")
        workloads = [w for w in workloads if w not in big]
    if args.quick:
        return [scaled_to(truncated(w, QUICK_MAX_TENSORS), QUICK_MAX_NUMEL) for w in workloads]
    if args.scale != "auto":
        return [scaled(w, args.scale) for w in workloads]
    return [scaled_to(w, CPU_MAX_NUMEL) for w in workloads] if device.type == "cpu" else workloads


def compile_policy(args, device: torch.device) -> CompilePolicy:
    if args.compile == "off" or (args.quick and args.compile == "auto"):
        return CompilePolicy(enabled=False)
    if args.compile == "on":
        return CompilePolicy(budget_s=args.compile_budget)
    auto = COMPILE_AUTO[device.type]
    budget = args.compile_budget if args.compile_budget is not None else auto.budget_s
    return CompilePolicy(auto.scenarios, auto.dtype_sets, auto.max_tensors, budget)


def repeat_policy(args, device: torch.device) -> timing.RepeatPolicy:
    policy = REPEATS["quick" if args.quick else device.type]
    if args.repeats is not None:
        policy = timing.RepeatPolicy(policy.warmup, args.repeats, args.repeats, 0.0)
    return policy


def output_paths(args, device: torch.device) -> tuple[Path, Path]:
    if args.out:
        json_path = Path(args.out)
        if json_path.suffix != ".json":
            json_path = json_path.with_name(json_path.name + ".json")
    else:
        # Never benchmarks/results/ by default: those are the committed reference runs.
        kind = environment.device_kind(device)
        json_path = REPO_ROOT / "benchmarks" / "out" / (f"{kind}-quick.json" if args.quick else f"{kind}.json")
    return json_path, json_path.with_suffix(".png")


def import_gradfuse(impl_filter: list[str] | None):
    """gradfuse, or None when only torch contenders are asked for and it cannot be imported."""
    try:
        import gradfuse
    except Exception as e:  # not built, or broken: a setup problem, not a wrong result
        if impl_filter and not any(name.startswith("gradfuse") for name in impl_filter):
            return None
        raise SetupError(
            f"gradfuse could not be imported ({type(e).__name__}: {e}); install it (see the README) "
            "or run only the torch contenders with --impls torch"
        ) from e
    return gradfuse


def time_budget(args, device: torch.device) -> float | None:
    if args.time_budget is not None:
        return args.time_budget or None
    return None if args.quick else TIME_BUDGET_S[device.type]


def build_settings(args, device: torch.device, workloads, clock: Clock) -> Settings:
    mode = "quick" if args.quick else device.type
    return Settings(
        device=device,
        workloads=workloads,
        dtype_sets=args.dtypes or DEFAULT_DTYPES[mode],
        scenarios=[SCENARIOS[s] for s in args.scenarios or DEFAULT_SCENARIOS[mode]],
        impl_filter=set(args.impls) if args.impls else None,
        repeat=repeat_policy(args, device),
        compile=compile_policy(args, device),
        cache_bytes=0 if args.quick else environment.cache_bytes(device),
        copy_bytes=COPY_BYTES[mode],
        copy_repeat=COPY_REPEATS,
        clock=clock,
        # on CPU, unless --threads fixed it: fewer threads whenever other processes take cores
        adapt_threads=device.type == "cpu" and not args.threads and not args.quick,
    )


def settings_json(args, settings: Settings) -> dict:
    return {
        "mode": "quick" if args.quick else settings.device.type,
        "scale": args.scale,
        "dtypes": settings.dtype_sets,
        "time_budget_s": settings.clock.budget_s,
        "scenarios": {s.name: {"bytes_factor": s.bytes_factor} for s in settings.scenarios},
        "impls": args.impls,
        "repeat": vars(settings.repeat),
        "compile": settings.compile.describe(),
        "compile_seconds_spent": settings.compile.spent_s,
        "cache_bytes_defeated": settings.cache_bytes,
    }


def print_report(args, run, meta: dict, workloads, written: str) -> None:
    lines = report.format_table(run.rows) + [""] if args.full else []
    bw = run.copy_bandwidth
    before, after = bw["gbps_before_and_after"]
    lines += report.wrap(
        f"copy bandwidth {bw['gbps']:.1f} GB/s, the better of {before:.1f} before and {after:.1f} after the cells "
        f"({bw['method']})"
    )
    for note in run.notes:
        lines += report.wrap(note, "note: ")
    lines += report.wrap(f"wrote {written}" + ("" if args.full else "; every row: --full"))
    lines += [""] + report.format_summary(run.rows, bw["gbps"], meta, workloads)
    print("\n".join(lines))
    if run.failures:
        print(f"\nFAILED: {len(run.failures)} gradfuse result(s) wrong or broken:", file=sys.stderr)
        for f in run.failures:
            print("\n".join(report.wrap(f, "  ")), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    clock_start = time.perf_counter()
    args = parse_args(argv)
    try:
        return run(args, argv, clock_start)
    except SetupError as e:
        print(f"benchmarks: {e}", file=sys.stderr)
        return 2


def run(args, argv, clock_start: float) -> int:
    device = environment.pick_device(args.device)
    notes: list[str] = []
    threads = args.threads or (1 if args.quick else None)  # --quick measures nothing: one thread is enough
    if threads:
        torch.set_num_threads(threads)
    workloads = select_workloads(args, device, notes)
    gradfuse = import_gradfuse(args.impls)
    if gradfuse is None:
        notes.append("gradfuse could not be imported; only the torch contenders asked for ran")
    settings = build_settings(args, device, workloads, Clock(time_budget(args, device), clock_start))
    json_path, png_path = output_paths(args, device)
    meta = environment.describe(device, argv)

    progress = report.Progress(enabled=not args.no_progress)
    try:
        suite = run_suite(settings, gradfuse, progress)
    finally:
        progress.close()
    suite.notes[:0] = notes

    written = str(json_path)
    if not args.no_plot:
        title = f"gradfuse vs torch.nn.utils — {meta['device']} — {meta['date']}"
        plot_note = report.write_plot(png_path, suite.rows, title)
        if plot_note:
            suite.notes.append(plot_note)
        else:
            written += f" and {png_path}"
    report.write_json(json_path, report.payload(meta, settings_json(args, settings), suite, workloads))
    print_report(args, suite, meta, workloads, written)
    return 1 if suite.failures else 0


if __name__ == "__main__":
    sys.exit(main())
