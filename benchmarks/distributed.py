"""``python -m benchmarks.distributed``: gradfuse against torch on an FSDP2-sharded model, side by side.

One run spawns the ranks (gloo on 127.0.0.1 for CPU tensors, or NCCL with one GPU per rank where
several GPUs exist), shards a ~34M-parameter MLP with ``fully_shard`` (per block, then the root),
makes its gradients by one backward, and times ``gradfuse.clip_grad_norm_`` and
``torch.nn.utils.clip_grad_norm_`` on the same sharded gradients, alternating call by call, in two
scenarios: ``clip`` (max_norm = half the norm, so every call scales; the gradients are doubled
back, exactly, outside the timed region) and ``noclip`` (max_norm = 100x the norm: gradfuse skips
its scale pass on the device, torch multiplies by 1). A call's time is the slowest rank's; the table gives medians, the collectives
one call issues (``CommDebugMode``), and each total against the fp64 norm of the unsharded
gradients (the returned totals have the gradients' dtype, as torch's; gradfuse's fp32 total is the
correctness check). Writes ``benchmarks/out/distributed-<device-kind>.json`` or ``--out FILE.json``.

Exit status: 0 when gradfuse's totals were right on every rank, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SCENARIOS = {"clip": 0.5, "noclip": 100.0}  # max_norm as a multiple of the gradients' norm
OUT_DIR = Path(__file__).resolve().parent / "out"
TOTAL_RTOL = 1e-5  # gradfuse's total against the fp64 norm of the unsharded gradients


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=None, help="processes (default: GPUs if >= 2, else 2)")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto", help="auto: nccl with >= 2 GPUs, else gloo on CPU")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--scenarios", default="clip,noclip", help="comma-separated: clip, noclip")
    p.add_argument("--blocks", type=int, default=8, help="MLP blocks of 4.2M parameters (default 8: 33.6M)")
    p.add_argument("--width", type=int, default=1024, help="block width (hidden = 2x)")
    p.add_argument("--reps", type=int, default=20, help="timed calls per implementation and dtype")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (CPU; default: cores / ranks)")
    p.add_argument("--out", type=Path, default=None, help="the JSON file (default benchmarks/out/distributed-<device-kind>.json)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds before hung ranks are ended")
    args = p.parse_args(argv)
    unknown = [d for d in args.dtypes.split(",") if d.strip() not in DTYPES]
    if unknown:
        p.error(f"unknown dtypes {unknown}; choose from {list(DTYPES)}")
    unknown = [s for s in args.scenarios.split(",") if s.strip() not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenarios {unknown}; choose from {list(SCENARIOS)}")
    if args.backend == "auto":
        args.backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    if args.ranks is None:
        args.ranks = torch.cuda.device_count() if args.backend == "nccl" else 2
    if args.backend == "nccl" and args.ranks > torch.cuda.device_count():
        p.error(f"--backend nccl needs a GPU per rank: {args.ranks} ranks, {torch.cuda.device_count()} GPUs")
    if args.ranks < 2:
        p.error("--ranks must be at least 2")
    return args


def _model(blocks: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(blocks):
        layers += [torch.nn.Linear(width, 2 * width), torch.nn.GELU(), torch.nn.Linear(2 * width, width), torch.nn.LayerNorm(width)]
    return torch.nn.Sequential(*layers).to(device=device, dtype=dtype)


def _sharded_grads(args, dtype: torch.dtype, device: torch.device, mesh):
    from torch.distributed.fsdp import fully_shard

    model = _model(args.blocks, args.width, dtype, device)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    torch.manual_seed(1 + torch.distributed.get_rank())
    model(torch.randn(4, args.width, dtype=dtype, device=device)).square().sum().backward()
    return list(model.parameters())


def _timed(fn, device: torch.device) -> float:
    import torch.distributed as dist

    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _collectives(fn) -> int:
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as comm:
        fn()
    return comm.get_total_counts()


def _cell(args, dtype_name: str, scenario: str, device: torch.device, mesh) -> dict:
    import torch.distributed as dist

    import gradfuse

    dtype = DTYPES[dtype_name]
    params = _sharded_grads(args, dtype, device, mesh)
    grads = [q.grad for q in params]
    local = [g.to_local() for g in grads]
    full = [g.full_tensor().double() for g in grads]
    exact = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in full])))
    del full
    max_norm = SCENARIOS[scenario] * exact
    restore = 2.0 if scenario == "clip" else 1.0
    impls = {
        "gradfuse": lambda: gradfuse.clip_grad_norm_(params, max_norm),
        "torch": lambda: torch.nn.utils.clip_grad_norm_(params, max_norm),
    }
    times = {name: [] for name in impls}
    totals = {}
    for rep in range(args.warmup + args.reps):
        order = list(impls) if rep % 2 == 0 else list(reversed(impls))  # no implementation always goes first
        for name in order:
            seconds = _timed(lambda: totals.__setitem__(name, impls[name]()), device)
            if restore != 1.0:
                torch._foreach_mul_(local, restore)  # undo the clip by ~0.5 (exact doubling), untimed
            if rep >= args.warmup:
                times[name].append(seconds)
    collectives = {}
    for name, fn in impls.items():
        collectives[name] = _collectives(fn)
        if restore != 1.0:
            torch._foreach_mul_(local, restore)
    slowest = {}
    for name, ts in times.items():  # a call takes as long as its slowest rank
        t = torch.tensor(ts, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        slowest[name] = t.tolist()
    # The returned totals have the gradients' dtype (torch's); gradfuse's accumulation-dtype total is the check.
    rel = {name: abs(float(total.full_tensor()) - exact) / exact for name, total in totals.items()}
    accumulated = abs(float(gradfuse.clip_grads(params, max_norm, apply=False).total_norm) - exact) / exact
    ok = torch.tensor([float(accumulated <= TOTAL_RTOL)])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    ms = {name: 1e3 * statistics.median(ts) for name, ts in slowest.items()}
    best = {name: 1e3 * min(ts) for name, ts in slowest.items()}
    return {
        "dtype": dtype_name,
        "scenario": scenario,
        "parameters": sum(q.numel() for q in params),
        "local_elements_rank0": sum(t.numel() for t in local),
        "ms_per_call": ms,
        "ms_per_call_best": best,
        "ms_per_call_all": {name: [1e3 * x for x in ts] for name, ts in slowest.items()},
        "speedup": ms["torch"] / ms["gradfuse"],
        "collectives_per_call": collectives,
        "total_rel_error_vs_fp64": rel,
        "gradfuse_fp32_total_rel_error_vs_fp64": accumulated,
        "gradfuse_correct": bool(ok.item()),
    }


def _rank(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if args.backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) // args.ranks))
    dist.init_process_group(args.backend, rank=rank, world_size=args.ranks, timeout=datetime.timedelta(seconds=120))
    try:
        mesh = init_device_mesh(device.type, (args.ranks,))
        cells = [_cell(args, d.strip(), s.strip(), device, mesh) for d in args.dtypes.split(",") for s in args.scenarios.split(",")]
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"cells": cells, "threads_per_rank": torch.get_num_threads(), "device": str(device)}, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _table(cells: list[dict]) -> str:
    head = (
        "| dtype | scenario | parameters | gradfuse ms | torch ms | speed-up | best (gradfuse, torch) "
        "| collectives / call (gradfuse, torch) | total rel. error (gradfuse, torch) |"
    )
    lines = [head, "|" + "---|" * 9]
    for c in cells:
        ms, best, col, rel = c["ms_per_call"], c["ms_per_call_best"], c["collectives_per_call"], c["total_rel_error_vs_fp64"]
        lines.append(
            f"| {c['dtype']} | {c['scenario']} | {c['parameters'] / 1e6:.1f}M | {ms['gradfuse']:.2f} | {ms['torch']:.2f} | {c['speedup']:.2f}x "
            f"| {best['gradfuse']:.2f}, {best['torch']:.2f} "
            f"| {col['gradfuse']}, {col['torch']} | {rel['gradfuse']:.1e}, {rel['torch']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    import torch.multiprocessing as mp

    from . import environment

    args = parse_args(argv)
    device = torch.device("cuda", 0) if args.backend == "nccl" else torch.device("cpu")
    info = environment.describe(device)
    info["command"] = shlex.join(["python", "-m", "benchmarks.distributed", *(sys.argv[1:] if argv is None else argv)])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cells.json")
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [ctx.Process(target=_rank, args=(r, args, port, out)) for r in range(args.ranks)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + args.timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():  # hung: end it
                p.kill()
                p.join()
        if not os.path.exists(out):
            print(f"benchmarks.distributed: the ranks ended without results (exit codes {[p.exitcode for p in procs]})", file=sys.stderr)
            return 1
        with open(out) as f:
            run = json.load(f)
    result = {
        "meta": info,
        "settings": {"ranks": args.ranks, "backend": args.backend, "blocks": args.blocks, "width": args.width, "reps": args.reps,
                     "warmup": args.warmup, "threads_per_rank": run["threads_per_rank"], "sharding": "FSDP2 fully_shard per Linear, then the root"},  # fmt: skip
        "results": run["cells"],
    }
    path = args.out or OUT_DIR / f"distributed-{info['device_kind']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"FSDP2 on {args.ranks} {args.backend} ranks ({info['device']}, torch {info['torch']}), medians (and best) of {args.reps} calls, slowest rank:")
    print(_table(run["cells"]))
    print(f"wrote {path}")
    return 0 if all(c["gradfuse_correct"] for c in run["cells"]) else 1


if __name__ == "__main__":
    sys.exit(main())
