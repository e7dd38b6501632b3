"""Train a small MLP on synthetic data with each clipping mode and compare them to torch, step by step.

    python examples/train_toy.py                 # CPU: runs in seconds
    python examples/train_toy.py --device cuda   # GPU: fp16 autocast + GradScaler for the AMP modes

Modes (each pair starts from the same weights and sees the same batches):

  torch          torch.nn.utils.clip_grad_norm_ + AdamW(foreach)          reference for gradfuse
  gradfuse       gradfuse.clip_grad_norm_ + AdamW(foreach)                same math: matches torch
  torch-fused    torch.nn.utils.clip_grad_norm_ + AdamW(fused=True)       reference for handoff
  handoff        gradfuse.clip_grad_norm_for_optimizer_ + AdamW(fused)    the clip scale is divided
                 out inside the fused AdamW kernel: one read of the gradients, no scale pass
  torch-amp      autocast + GradScaler: unscale_ + clip_grad_norm_ + step + update
  amp-one-pass   autocast + GradScaler: gradfuse.unscale_and_clip_ (unscale, inf check, norm of the
                 unscaled grads, clip, in one read) + step + update
                 (CPU: bf16 autocast; bf16 needs no loss scaling, the GradScaler is there to run the
                 same code path as on CUDA, where it is fp16 autocast)

``--overflow-step`` multiplies one step's loss by inf in the AMP modes: both skip that step and halve
the loss scale. Every mode prints its loss curve; each gradfuse mode prints the largest parameter
difference from its torch reference over all steps: float rounding where the math is the same (the
fused clip rounds the scale once where torch rounds twice); under autocast the low-precision
forward amplifies those last bits, so the AMP pair is compared with a looser tolerance.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import gradfuse  # noqa: E402


def make_data(steps: int, batch: int, dim: int, device: str):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(dim, 1, generator=g)
    xs = torch.randn(steps, batch, dim, generator=g)
    ys = torch.tanh(xs @ teacher) * 3 + 0.1 * torch.randn(steps, batch, 1, generator=g)
    return xs.to(device), ys.to(device)


def make_model(dim: int, device: str):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(dim, 128), torch.nn.GELU(), torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Linear(128, 1)
    ).to(device)


def run(mode: str, args, xs, ys):
    device = args.device
    model = make_model(xs.shape[-1], device)
    fused = mode in ("torch-fused", "handoff", "torch-amp", "amp-one-pass")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, **({"fused": True} if fused else {"foreach": True}))
    amp = mode in ("torch-amp", "amp-one-pass")
    amp_dtype = torch.float16 if device == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device, init_scale=2.0**14, growth_interval=10) if amp else None
    counter = gradfuse.NonFiniteCounter()
    losses, params, scales = [], [], []
    for step in range(args.steps):
        autocast = torch.autocast(device, dtype=amp_dtype) if amp else contextlib.nullcontext()
        with autocast:
            loss = F.mse_loss(model(xs[step]).float(), ys[step])
        if amp and step == args.overflow_step:
            loss = loss * math.inf  # an overflow: every gradient becomes inf/NaN
        if mode in ("torch", "torch-fused"):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_norm)
            opt.step()
        elif mode == "gradfuse":
            loss.backward()
            gradfuse.clip_grad_norm_(model.parameters(), args.max_norm, backend=args.backend)
            opt.step()
        elif mode == "handoff":
            loss.backward()
            counter.update(gradfuse.clip_grad_norm_for_optimizer_(opt, args.max_norm, backend=args.backend))
            opt.step()  # divides the gradients by 1/coef inside the fused AdamW kernel
        elif mode == "torch-amp":
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_norm)
            scaler.step(opt)
            scaler.update()
        elif mode == "amp-one-pass":
            scaler.scale(loss).backward()
            counter.update(gradfuse.unscale_and_clip_(scaler, opt, args.max_norm, backend=args.backend))
            scaler.step(opt)  # skips on overflow (found_inf reaches the fused kernel on the device)
            scaler.update()
        opt.zero_grad()
        losses.append(loss.detach())
        params.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone())
        if scaler is not None:
            scales.append(scaler._scale.detach().clone())
    return {
        "losses": [float(x) for x in losses],  # host copies only now, after training
        "params": params,
        "scales": [float(s) for s in scales],
        "counts": counter.as_dict() if counter.counts is not None else None,
    }


# (mode, its torch reference, tolerance). fp32 modes differ from torch by float rounding only. Under
# autocast the forward runs in bf16/fp16, which turns those last-bit differences of the gradients
# into whole low-precision roundings of later activations: the curves agree, to a looser tolerance.
PAIRS = [("gradfuse", "torch", 1e-5), ("handoff", "torch-fused", 1e-5), ("amp-one-pass", "torch-amp", 2e-3)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--overflow-step", type=int, default=7, help="AMP modes: step whose loss is multiplied by inf (-1: none)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, help="gradfuse backend (default: auto)")
    parser.add_argument("--every", type=int, default=5, help="print the loss every N steps")
    args = parser.parse_args(argv)

    xs, ys = make_data(args.steps, args.batch, args.dim, args.device)
    print(f"device={args.device} gradfuse backends: {gradfuse.available_backends(args.device)} steps={args.steps}")
    results = {}
    for mode in ("torch", "gradfuse", "torch-fused", "handoff", "torch-amp", "amp-one-pass"):
        results[mode] = run(mode, args, xs, ys)

    modes = list(results)
    print("\nloss curves")
    print("step " + " ".join(f"{m:>13}" for m in modes))
    for step in range(0, args.steps, args.every):
        print(f"{step:4d} " + " ".join(f"{results[m]['losses'][step]:13.5f}" for m in modes))
    last = args.steps - 1
    print(f"{last:4d} " + " ".join(f"{results[m]['losses'][last]:13.5f}" for m in modes))

    ok = True
    print("\nlargest |param difference| from the torch reference, over all steps")
    for mine, ref, tol in PAIRS:
        diffs = [float((a - b).abs().max()) for a, b in zip(results[mine]["params"], results[ref]["params"])]
        worst = max(diffs)
        good = math.isfinite(worst) and worst <= tol
        ok &= good
        line = f"  {mine:>12} vs {ref:<11}: {worst:.3e} (step {diffs.index(worst)})  {'match' if good else 'MISMATCH'}"
        if results[mine]["scales"]:
            same = results[mine]["scales"] == results[ref]["scales"]
            ok &= same
            line += f"; loss scales {'identical' if same else 'DIFFER'} (last {results[mine]['scales'][-1]:g})"
        print(line)
    for mode in ("handoff", "amp-one-pass"):
        print(f"  {mode} counters (read once, at the end): {results[mode]['counts']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
