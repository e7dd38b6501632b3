"""Spike skipping on the device: OLMo-core's sigma rule over a window of recent norms (and losses).

A step is a spike when its total gradient norm (or its loss, when given) lies more than ``sigma``
standard deviations above the mean of the last ``window`` values::

    spike = count >= warmup  and  x - mean > sigma * std        (x finite; mean, std of the window)

The window is :meth:`gradfuse.NormHistory.window`: the last values of the steps that were taken
(finite and not skipped), so neither a NaN nor the spike itself can poison the statistics that
judge the next step. Everything stays on the device: the rule returns a flag that gates the
optimizer step (``gradfuse.Clipper``), and nothing is read back.
"""

from __future__ import annotations

import math
import numbers

import torch


class SpikeRule:
    """Skip a step whose norm (or loss) z-score exceeds ``sigma`` (OLMo-core: 6 sigma, window 128,
    active once half the window is filled).

    ``window``: how many recent values the mean and std are taken over; ``warmup``: how many must
    be in the window before the rule acts (default ``window // 2``); ``on_loss``: also judge the
    loss when the step is given one.
    """

    def __init__(self, sigma: float = 6.0, window: int = 128, warmup: int | None = None, *, on_loss: bool = True):
        owner = "SpikeRule"
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not 0 < sigma < math.inf:
            raise ValueError(f"{owner}: sigma must be a positive number, got {sigma!r}")
        if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 2:
            raise ValueError(f"{owner}: window must be an integer >= 2, got {window!r}")
        warmup = window // 2 if warmup is None else warmup
        if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or not 2 <= warmup <= window:
            raise ValueError(f"{owner}: warmup must be an integer in [2, window={window}], got {warmup!r}")
        self.sigma, self.window, self.warmup, self.on_loss = float(sigma), int(window), int(warmup), bool(on_loss)

    def _outlier(self, x: torch.Tensor, stats) -> torch.Tensor:
        x = x.detach().reshape(()).to(torch.float32)
        active = stats.count >= self.warmup
        return active & torch.isfinite(x) & (x - stats.mean > self.sigma * stats.std)

    @torch.no_grad()
    def check(self, history, total_norm: torch.Tensor, loss: torch.Tensor | None = None) -> torch.Tensor:
        """This step's spike flag (a bool device scalar), judged against ``history`` (a
        :class:`gradfuse.NormHistory` not yet updated with this step)."""
        spike = self._outlier(total_norm, history.window(self.window))
        if loss is not None and self.on_loss:
            spike = spike | self._outlier(loss, history.window(self.window, of="loss"))
        return spike

    def __repr__(self) -> str:
        return f"SpikeRule(sigma={self.sigma:g}, window={self.window}, warmup={self.warmup}, on_loss={self.on_loss})"
