"""What taming costs: fused AGC and layer-wise clipping against the per-parameter loops they replace.

    python -m benchmarks.taming                                  # gpt2_124m, fp32 and bf16, this machine's device
    python -m benchmarks.taming --dtypes fp32 --reps 5 --out benchmarks/results/taming-cpu.json

Per configuration (operation x dtype x scenario), in one process, the implementations interleaved
rep by rep (so that drift on a shared machine hits them alike), every call on the same gradients
(restored, untimed, before each call):

  agc        ``gradfuse.adaptive_clip_grad_`` vs timm's ``adaptive_clip_grad`` (its loop, written out
             below: a unit-wise norm of the weight and of the gradient, a clamp, a where and a copy
             per parameter)
  layerwise  ``gradfuse.clip_grad_norm_per_tensor_`` vs torch per tensor with foreach ops
             (``_foreach_norm``, the coefficients, ``_foreach_mul_``)

Scenarios: ``clip`` (every unit / tensor is clipped: AGC clip_factor 0.01 with randn * 0.02 weights
and randn * 0.01 gradients; layer-wise max_norm 0.01) and ``noclip`` (none is: clip_factor 10, max_norm
inf), where gradfuse reads once and writes nothing. Each result records the medians, the minima and
each implementation's largest relative error against the baseline's formula run in fp64 (a check
of the timed code itself; torch's fp32 norm of the 38M-element embedding drifts by ~1e-3).
Shapes: GPT-2 small (124M parameters, 148 tensors), from its config.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import gradfuse
from benchmarks import environment
from benchmarks.models import GPT2Config

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GPT2_124M = GPT2Config(n_layer=12, n_embd=768, vocab_size=50257, n_positions=1024)
ROOT = Path(__file__).resolve().parent.parent


def unitwise_norm(x, norm_type=2.0):
    """timm.utils.agc.unitwise_norm."""
    if x.ndim <= 1:
        return x.norm(norm_type)
    return x.norm(norm_type, dim=tuple(range(1, x.ndim)), keepdim=True)


def timm_adaptive_clip_grad(parameters, clip_factor=0.01, eps=1e-3, norm_type=2.0):
    """timm.utils.agc.adaptive_clip_grad (timm 1.0), verbatim: the benchmark's baseline and the
    tests' reference."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    for p in parameters:
        if p.grad is None:
            continue
        p_data = p.detach()
        g_data = p.grad.detach()
        max_norm = unitwise_norm(p_data, norm_type=norm_type).clamp_(min=eps).mul_(clip_factor)
        grad_norm = unitwise_norm(g_data, norm_type=norm_type)
        clipped_grad = g_data * (max_norm / grad_norm.clamp(min=1e-6))
        new_grads = torch.where(grad_norm < max_norm, g_data, clipped_grad)
        p.grad.detach().copy_(new_grads)


def torch_per_tensor_clip(parameters, max_norm):
    """Each gradient to its own norm bound with torch's foreach ops (what clip_grad_norm_ per tensor does, batched)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norms = torch._foreach_norm(grads, 2.0)
    coefs = torch._foreach_clamp_max(torch._foreach_mul(torch._foreach_reciprocal(torch._foreach_add(norms, 1e-6)), max_norm), 1.0)
    torch._foreach_mul_(grads, coefs)  # min(1, max_norm / (norm + 1e-6)) for each


#: operation -> (scenario -> the argument, gradfuse call, baseline call, baseline name)
OPERATIONS = {
    "agc": (
        {"clip": 0.01, "noclip": 10.0},
        lambda params, x: gradfuse.adaptive_clip_grad_(params, x),
        lambda params, x: timm_adaptive_clip_grad(params, x),
        "timm",
    ),
    "layerwise": (
        {"clip": 0.01, "noclip": math.inf},
        lambda params, x: gradfuse.clip_grad_norm_per_tensor_(params, x),
        lambda params, x: torch_per_tensor_clip(params, x),
        "torch_foreach",
    ),
}


def make_params(dtype: torch.dtype, device: torch.device, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for _, shape in GPT2_124M.tensors():
        p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(device, dtype))
        p.grad = (torch.randn(shape, generator=g) * 0.01).to(device, dtype)
        params.append(p)
    return params


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(call, restore, device) -> float:
    restore()
    _sync(device)
    t = time.perf_counter()
    call()
    _sync(device)
    return (time.perf_counter() - t) * 1e3


def bench(op: str, dtype_name: str, scenario: str, device: torch.device, reps: int) -> dict:
    scenarios, fused, baseline, baseline_name = OPERATIONS[op]
    x = scenarios[scenario]
    params = make_params(DTYPES[dtype_name], device)
    saved = [p.grad.clone() for p in params]

    def restore():
        for p, s in zip(params, saved):
            p.grad.copy_(s)

    calls = {"gradfuse": lambda: fused(params, x), baseline_name: lambda: baseline(params, x)}
    # The fp64 reference: the baseline's formula on fp64 copies (the error of the timed code, not a test)
    ref = [torch.nn.Parameter(p.detach().double().clone()) for p in params]
    for q, s in zip(ref, saved):
        q.grad = s.double()
    baseline(ref, x)
    errors = {}
    for name, call in calls.items():  # warm-up (plans, caches), and each one's largest relative error
        _time(call, restore, device)
        errors[name] = max(float(((p.grad.double() - q.grad).abs() / q.grad.abs().clamp(min=1e-30)).max()) for p, q in zip(params, ref))
    del ref
    times = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            times[name].append(_time(call, restore, device))
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "operation": op, "dtype": dtype_name, "scenario": scenario, "argument": x if math.isfinite(x) else "inf",
        "num_tensors": len(params), "numel": sum(p.numel() for p in params), "reps": reps,
        "gradfuse_ms": med["gradfuse"], f"{baseline_name}_ms": med[baseline_name],
        "gradfuse_ms_min": min(times["gradfuse"]), f"{baseline_name}_ms_min": min(times[baseline_name]),
        "speedup": med[baseline_name] / med["gradfuse"], "speedup_of_min": min(times[baseline_name]) / min(times["gradfuse"]),
        "max_rel_err_vs_fp64": errors, "gradfuse_ms_reps": times["gradfuse"], f"{baseline_name}_ms_reps": times[baseline_name],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.taming", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--ops", default=",".join(OPERATIONS), help=f"comma-separated, from {', '.join(OPERATIONS)}")
    ap.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, from {', '.join(DTYPES)}")
    ap.add_argument("--scenarios", default="clip,noclip")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/out/taming-<device>.json)")
    args = ap.parse_args(argv)
    device = environment.pick_device(args.device)
    env = environment.describe(device, argv)
    env["command"] = "python -m benchmarks.taming" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    env["busy_cores_at_start"] = environment.busy_cores()
    results = []
    for op in args.ops.split(","):
        for dtype in args.dtypes.split(","):
            for scenario in args.scenarios.split(","):
                r = bench(op, dtype, scenario, device, args.reps)
                base = next(k for k in r if k.endswith("_ms") and k != "gradfuse_ms")
                print(f"{op:<10} {dtype:<5} {scenario:<7} gradfuse {r['gradfuse_ms']:8.1f} ms   {base[:-3]} {r[base]:8.1f} ms   "
                      f"{r['speedup']:5.2f}x   max rel err vs fp64 {r['max_rel_err_vs_fp64']}", flush=True)  # fmt: skip
                results.append(r)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "out" / f"taming-{env['device_kind']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"environment": env, "results": results}
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
