"""Adaptive thresholds and step counters (gradfuse.monitor); the Clipper that uses them is in test_clipper.py."""

import math

import pytest
import torch

import gradfuse
from gradfuse.monitor import NonFiniteCounter, QuantileThreshold, ZScoreThreshold


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))


def _set_grads(model, scale):
    for i, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, scale * (i + 1))


def test_zscore_threshold_matches_hand_computed_ema():
    thr = ZScoreThreshold(max_norm=100.0, alpha=0.5, z_thresh=2.0, warmup_steps=2)
    assert float(thr.threshold(torch.device("cpu"))) == 100.0  # warm-up: the cap
    thr.update(torch.tensor(1.0))
    thr.update(torch.tensor(3.0))
    mean, var = 2.0, (1 + 9) / 2 - 4  # warm-up statistics: 2.0, 1.0
    assert float(thr.mean) == pytest.approx(mean) and float(thr.var) == pytest.approx(var)
    assert float(thr.threshold(torch.device("cpu"))) == pytest.approx(mean + 2.0 * math.sqrt(var))
    thr.update(torch.tensor(10.0))  # a spike enters the EMA at the threshold (4.0), not at 10
    n = 4.0
    assert float(thr.mean) == pytest.approx(0.5 * mean + 0.5 * n)
    assert float(thr.var) == pytest.approx(0.5 * var + 0.5 * (n - mean) ** 2)
    thr.update(torch.tensor(float("nan")))  # ignored
    assert float(thr.mean) == pytest.approx(3.0)


def test_quantile_threshold_is_the_quantile_of_history():
    thr = QuantileThreshold(max_norm=50.0, quantile=0.5, history=4, warmup_steps=2)
    for n in (1.0, 2.0, 3.0, 4.0, 5.0):  # the ring keeps the last 4: 5, 2, 3, 4
        thr.update(torch.tensor(n))
    assert float(thr.threshold(torch.device("cpu"))) == pytest.approx(3.5)
    capped = QuantileThreshold(max_norm=1.0, quantile=0.5, history=4, warmup_steps=1)
    capped.update(torch.tensor(9.0))
    assert float(capped.threshold(torch.device("cpu"))) == 1.0


def test_threshold_state_dict_round_trip():
    a = ZScoreThreshold(warmup_steps=2)
    for n in (1.0, 2.0, 5.0):
        a.update(torch.tensor(n))
    b = ZScoreThreshold()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.threshold(torch.device("cpu")), b.threshold(torch.device("cpu")))


@pytest.mark.parametrize("make", [lambda: ZScoreThreshold(1e6, warmup_steps=2), lambda: QuantileThreshold(1e6, quantile=0.5, history=4, warmup_steps=1)],
                         ids=["zscore", "quantile"])  # fmt: skip
def test_threshold_state_is_a_copy_in_both_directions(make):
    """A saved state does not move with training, and a loaded one is not shared with its source."""
    cpu = torch.device("cpu")
    a = make()
    for n in (1.0, 2.0, 5.0):
        a.update(torch.tensor(n))
    state = a.state_dict()
    saved_threshold = a.threshold(cpu).clone()
    b = make()
    b.load_state_dict(state)
    for n in (40.0, 80.0):
        a.update(torch.tensor(n))  # moves a, not the saved state nor b
    assert not torch.equal(a.threshold(cpu), saved_threshold)
    assert torch.equal(b.threshold(cpu), saved_threshold)
    c = make()
    c.load_state_dict(state)
    assert torch.equal(c.threshold(cpu), saved_threshold)
    b.update(torch.tensor(1000.0))  # b moves; c, loaded from the same dict, does not
    assert torch.equal(c.threshold(cpu), saved_threshold)


@pytest.mark.parametrize(
    "cls, bad, error",
    [
        (ZScoreThreshold, dict(alpha=1.5), ValueError),
        (ZScoreThreshold, dict(alpha=1.0), ValueError),
        (ZScoreThreshold, dict(z_thresh=0), ValueError),
        (ZScoreThreshold, dict(z_thresh=float("nan")), ValueError),
        (ZScoreThreshold, dict(warmup_steps=0), ValueError),
        (ZScoreThreshold, dict(warmup_steps=2.5), TypeError),
        (ZScoreThreshold, dict(max_norm=-1.0), ValueError),
        (ZScoreThreshold, dict(max_norm="1"), TypeError),
        (QuantileThreshold, dict(max_norm=-1.0), ValueError),
        (QuantileThreshold, dict(max_norm=float("nan")), ValueError),
        (QuantileThreshold, dict(quantile=0.0), ValueError),
        (QuantileThreshold, dict(quantile=1.5), ValueError),
        (QuantileThreshold, dict(history=0), ValueError),
        (QuantileThreshold, dict(warmup_steps=True), TypeError),
    ],
)
def test_thresholds_reject_bad_settings_naming_them(cls, bad, error):
    (name, value), = bad.items()
    with pytest.raises(error, match=f"{cls.__name__}: {name} must be"):
        cls(**bad)


def test_thresholds_take_one_norm_per_entry_each_with_its_own_statistics():
    """Layer-wise adaptive clipping: a vector of norms gives a vector of thresholds, entry by entry
    what a scalar threshold fed that entry's norms gives."""
    norms = torch.tensor([[1.0, 10.0], [3.0, 30.0], [2.0, math.nan], [9.0, 20.0], [4.0, 25.0]])
    for make in (lambda: ZScoreThreshold(max_norm=100.0, alpha=0.5, z_thresh=2.0, warmup_steps=2),
                 lambda: QuantileThreshold(max_norm=100.0, quantile=0.5, history=3, warmup_steps=2)):  # fmt: skip
        vector, scalars = make(), [make(), make()]
        for row in norms:
            vector.update(row)
            for k, t in enumerate(scalars):
                t.update(row[k])
            want = torch.stack([t.threshold(torch.device("cpu")) for t in scalars])
            torch.testing.assert_close(vector.threshold(torch.device("cpu")), want)
        assert float(want[0]) < 100.0 and float(want[1]) < 100.0  # adaptive by now


def test_zscore_warmup_statistics_are_those_of_the_finite_norms():
    thr = ZScoreThreshold(max_norm=100.0, alpha=0.5, z_thresh=1.0, warmup_steps=3)
    for n in (2.0, math.nan, 4.0):
        thr.update(torch.tensor(n))
    assert float(thr.mean) == pytest.approx(3.0) and float(thr.var) == pytest.approx(1.0)


def _result(found_inf: float, coef: float):
    from gradfuse import ClipResult

    z = torch.zeros(1)
    return ClipResult(torch.tensor([1.0, found_inf, coef, coef]), z, z.double(), z, None, torch.float32, "torch")


def test_counter_counts_spikes_skips_and_runs_of_bad_steps():
    counter = NonFiniteCounter("cpu")
    yes, no = torch.tensor(True), torch.tensor(False)
    steps = [  # (found_inf, coef, spike, skipped)
        (0.0, 0.5, no, no), (0.0, 1.0, yes, yes), (1.0, 1.0, no, yes), (0.0, 0.5, no, no),
        (1.0, 1.0, no, no), (0.0, 1.0, yes, yes),
    ]  # fmt: skip
    for i, (found, coef, spike, skipped) in enumerate(steps):
        counter.update(_result(found, coef), spike=spike, skipped=skipped)
        if i == 2:
            assert int(counter.consecutive_bad) == 2 and int(counter.consecutive_nonfinite) == 1
    assert counter.as_dict() == {
        "steps": 6, "nonfinite_steps": 2, "clipped_steps": 2, "consecutive_nonfinite": 0,
        "spike_steps": 2, "skipped_steps": 3, "consecutive_bad": 2,
    }  # fmt: skip
