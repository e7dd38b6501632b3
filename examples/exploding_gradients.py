"""Exploding gradients, seen and tamed: a vanilla RNN and a deep MLP trained without and with gradfuse.

    python examples/exploding_gradients.py                  # CPU, about a minute; writes the dashboard
    python examples/exploding_gradients.py --out my.png --steps 300

Two classic ways to blow up a training run, each trained from the same weights on the same batches:

  rnn   a vanilla RNN (tanh, recurrent weights with spectral radius 1) predicting the next value of
        noisy sine waves, sequences of length 100, plain SGD at a large learning rate
  mlp   a 10-layer ReLU MLP without residuals (Kaiming init), plain SGD at a large learning rate

and three ways to train each (the same linear learning-rate warm-up in all three):

  none       no clipping: the norm grows by orders of magnitude and the loss goes to NaN/Inf
  p95        record the norms of the warm-up steps in a gradfuse.NormHistory, then clip at
             history.suggest_max_norm(0.95) (a fixed max_norm, the usual rule)
  autoclip   gradfuse.GradClipper with gradfuse.QuantileThreshold (AutoClip: clip at the 90th
             percentile of the norms seen so far, after the same calibration steps; the threshold
             stays on the device, no host sync)

Every run records a NormHistory (total norm, threshold, clipped/NaN steps, loss, every layer's norm);
the dashboard (gradfuse.plot) of each task's p95 run is written with the losses of all three runs.

The default seed is 1. With seed 0 the MLP's first steps already reach norms of 15 (a deep ReLU net
at init), so the fixed p95 of those steps is too loose to save the run, while the adaptive
threshold still does; ZClip (gradfuse.ZScoreThreshold, no cap) lost one RNN seed of three in our
runs, because its EMA follows a norm that grows step after step.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import gradfuse  # noqa: E402

MODES = ("none", "p95", "autoclip")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "exploding_gradients.png")


class VanillaRNN(nn.Module):
    """h_t = tanh(W_ih x_t + W_hh h_{t-1} + b), y_t = W_o h_t; W_hh orthogonal times ``radius``."""

    def __init__(self, hidden: int = 32, radius: float = 1.0):
        super().__init__()
        self.rnn = nn.RNN(1, hidden, nonlinearity="tanh", batch_first=True)
        with torch.no_grad():
            self.rnn.weight_hh_l0.copy_(torch.linalg.qr(torch.randn(hidden, hidden))[0] * radius)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


def deep_mlp(depth: int = 10, width: int = 64, inputs: int = 16) -> nn.Sequential:
    layers = []
    for i in range(depth):
        layers += [nn.Linear(inputs if i == 0 else width, width), nn.ReLU()]
    net = nn.Sequential(*layers, nn.Linear(width, 1))
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        net[-1].weight.mul_(0.1)  # a small output at init: the first losses (and norms) are moderate
    return net


@dataclass(frozen=True)
class Task:
    name: str
    lr: float
    warmup: int  # steps of linear learning-rate warm-up
    calibrate: int  # the first steps, whose norms set the p95 threshold (and ZClip's warm-up)

    def model(self) -> nn.Module:
        return VanillaRNN() if self.name == "rnn" else deep_mlp()

    def batch(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.name == "rnn":  # next-value prediction on noisy sine waves, length 100
            t = torch.arange(101.0)
            phase = torch.rand(32, 1, generator=g) * 2 * math.pi
            freq = 0.05 + 0.1 * torch.rand(32, 1, generator=g)
            y = torch.sin(freq * t + phase) + 0.05 * torch.randn(32, 101, generator=g)
            return y[:, :-1, None], y[:, 1:, None]
        x = torch.randn(256, 16, generator=g)  # a smooth target of a random projection
        w = torch.linspace(-1.0, 1.0, 16)
        return x, torch.sin(x @ w / 2)[:, None]


TASKS = {"rnn": Task("rnn", lr=0.5, warmup=20, calibrate=10), "mlp": Task("mlp", lr=0.4, warmup=30, calibrate=20)}


@dataclass
class Run:
    task: str
    mode: str
    losses: list[float]
    history: gradfuse.NormHistory
    max_norm: float | None  # the fixed threshold of the p95 mode

    @property
    def diverged(self) -> bool:
        """The loss became NaN/Inf or ended above its starting value."""
        return not all(map(math.isfinite, self.losses)) or self.final_loss > self.losses[0]

    @property
    def final_loss(self) -> float:
        tail = self.losses[-10:]
        return sum(tail) / len(tail)


def adaptive_threshold(task: Task):
    """AutoClip: the 90th percentile of the norms seen so far, after the calibration steps (no cap)."""
    return gradfuse.QuantileThreshold(quantile=0.9, warmup_steps=task.calibrate)


def train(task: Task, mode: str, steps: int = 150, seed: int = 0) -> Run:
    """Train ``task`` for ``steps`` SGD steps in ``mode`` (see the module docstring)."""
    torch.manual_seed(seed)
    model = task.model()
    opt = torch.optim.SGD(model.parameters(), lr=task.lr)
    g = torch.Generator().manual_seed(seed + 1)
    history = gradfuse.NormHistory(capacity=steps, parameters=model, layers="all")
    clipper = None
    if mode == "autoclip":
        clipper = gradfuse.GradClipper(model.named_parameters(), adaptive_threshold(task), history=history)
    max_norm = math.inf
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = task.lr * min(1.0, (step + 1) / task.warmup)
        if mode == "p95" and step == task.calibrate:
            max_norm = history.suggest_max_norm(0.95)  # the first steps' norms: one host read, once
        x, y = task.batch(g)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if clipper is not None:
            clipper.step()
        else:  # "none" measures without clipping (max_norm inf), "p95" clips after the warm-up
            history.update(gradfuse.clip_grads(model.parameters(), max_norm), max_norm=max_norm)
        losses.append(loss.item())  # the example's own loss log; gradfuse itself never syncs
        opt.step()
    return Run(task.name, mode, losses, history, max_norm if mode == "p95" else None)


def _loss_with(history: gradfuse.NormHistory, losses: list[float]) -> list[float]:
    return [x if math.isfinite(x) else math.nan for x in losses][: history.steps]


def table(runs: list[Run]) -> str:
    lines = [f"{'task':<5} {'mode':<6} {'max_norm':>9} {'first loss':>11} {'final loss':>11} {'max norm':>10} {'clipped':>8} {'NaN/Inf':>8}  result"]
    for r in runs:
        rec = r.history.records()
        finite = rec["total_norm"][~(rec["found_inf"] != 0)]
        clipped = int(((rec["clip_coef"] < 1) & (rec["found_inf"] == 0)).sum())
        threshold = f"{r.max_norm:.3g}" if r.max_norm is not None else ("adaptive" if r.mode == "autoclip" else "-")
        lines.append(
            f"{r.task:<5} {r.mode:<6} {threshold:>9} {r.losses[0]:>11.4g} {r.final_loss:>11.4g} {float(finite.max()):>10.3g} "
            f"{clipped:>8} {int((rec['found_inf'] != 0).sum()):>8}  {'DIVERGED' if r.diverged else 'converged'}"
        )
    return "\n".join(lines)


def main(argv=None) -> list[Run]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=1, help="seed 0: see the module docstring (default: %(default)s)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="dashboard PNG (default: %(default)s)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # small models: threads cost more than they give
    runs = [train(task, mode, args.steps, args.seed) for task in TASKS.values() for mode in MODES]
    print(table(runs))
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 11), layout="constrained")
    for sub, name in zip(fig.subfigures(1, len(TASKS)), TASKS):
        shown = next(r for r in runs if r.task == name and r.mode == "p95")
        curves = {f"{r.mode}": _loss_with(shown.history, r.losses) for r in runs if r.task == name}
        title = {"rnn": "vanilla RNN (tanh, length 100)", "mlp": "10-layer ReLU MLP, no residuals"}[name]
        gradfuse.plot.draw(shown.history, sub, loss=curves, title=f"{title}: clipped at the p95 of the first {TASKS[name].calibrate} norms = {shown.max_norm:.3g}", max_layers=22)
    fig.savefig(args.out, dpi=110)
    print(f"dashboard: {args.out}")
    return runs


if __name__ == "__main__":
    main()
