"""Adaptive thresholds and per-layer statistics (gradfuse.monitor)."""

import math

import pytest
import torch

import gradfuse
from gradfuse.monitor import GradClipper, QuantileThreshold, ZScoreThreshold


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


@pytest.mark.parametrize(
    "cls, bad, error",
    [
        (ZScoreThreshold, dict(alpha=1.5), ValueError),
        (ZScoreThreshold, dict(alpha=1.0), ValueError),
        (ZScoreThreshold, dict(z_thresh=0), ValueError),
        (ZScoreThreshold, dict(z_thresh=float("nan")), ValueError),
        (ZScoreThreshold, dict(warmup_steps=0), ValueError),
        (ZScoreThreshold, dict(warmup_steps=2.5), ValueError),
        (ZScoreThreshold, dict(max_norm=-1.0), ValueError),
        (ZScoreThreshold, dict(max_norm="1"), TypeError),
        (QuantileThreshold, dict(max_norm=-1.0), ValueError),
        (QuantileThreshold, dict(max_norm=float("nan")), ValueError),
        (QuantileThreshold, dict(quantile=0.0), ValueError),
        (QuantileThreshold, dict(quantile=1.5), ValueError),
        (QuantileThreshold, dict(history=0), ValueError),
        (QuantileThreshold, dict(warmup_steps=True), ValueError),
    ],
)
def test_thresholds_reject_bad_settings_naming_them(cls, bad, error):
    (name, value), = bad.items()
    with pytest.raises(error, match=f"{cls.__name__}: {name} must be"):
        cls(**bad)


def test_grad_clipper_takes_plain_parameters_too():
    model, ref = _model(), _model()
    _set_grads(model, 5.0)
    _set_grads(ref, 5.0)
    result = GradClipper(model.parameters(), max_norm=1.0).step()
    torch.testing.assert_close(result.total_norm, torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    clipper = GradClipper(list(model.parameters()), max_norm=1.0)
    clipper.step()
    assert set(clipper.stats()["layer_max_norms"]) == {f"param{i}" for i in range(4)}


@pytest.mark.parametrize(
    "args, error, match",
    [
        (([1, 2], 1.0), TypeError, r"GradClipper: parameters\[0\] is of type int"),
        (([("w", 3)], 1.0), TypeError, r"parameters\[0\] is of type tuple"),
        ((None, 1.0), TypeError, "GradClipper: parameters must be"),
        (((), -1.0), ValueError, "GradClipper: max_norm must be >= 0"),
        (((), 1.0, "two"), ValueError, "GradClipper: norm_type"),
    ],
)
def test_grad_clipper_rejects_bad_arguments_at_construction(args, error, match):
    with pytest.raises(error, match=match):
        GradClipper(*args)
    with pytest.raises(ValueError, match="nonfinite"):
        GradClipper((), nonfinite="ignore")


def test_grad_clipper_counts_and_layers_match_torch():
    model = _model()
    ref = _model()
    clipper = GradClipper(model.named_parameters(), max_norm=1.0)
    for step, scale in enumerate([0.01, 5.0, float("nan"), 0.02]):
        _set_grads(model, scale)
        _set_grads(ref, scale)
        result = clipper.step()
        expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        torch.testing.assert_close(result.total_norm, expected, equal_nan=True)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, equal_nan=True)
    stats = clipper.stats(top_k=2)
    assert stats["steps"] == 4
    assert stats["clipped_steps"] == 1  # 5.0 clips; tiny ones do not; NaN gives a NaN coef (not < 1)
    assert stats["nonfinite_steps"] == 1
    assert stats["consecutive_nonfinite"] == 0  # the NaN step was followed by a finite one
    names = [n for n, _ in model.named_parameters()]
    _set_grads(ref, 0.02)  # the last step's gradients, before clipping
    last = {n: float(torch.linalg.vector_norm(q.grad)) for n, q in zip(names, ref.parameters())}
    assert [n for n, _ in stats["top_layers"]] == sorted(last, key=last.get, reverse=True)[:2]
    # Every layer held NaNs at step 2: the running max shows it (fmax would hide it behind 5.0's).
    assert all(math.isnan(stats["layer_max_norms"][name]) for name in names)


def test_grad_clipper_layer_max_shows_nan_of_one_layer_and_stays_aligned_with_a_frozen_layer():
    model = _model()
    model[0].weight.requires_grad_(False)  # frozen: no gradient, no row in the clip's result
    clipper = GradClipper(model.named_parameters(), max_norm=1e6)
    for scale in (1.0, 3.0):
        for i, p in enumerate(model.parameters()):
            p.grad = None if i == 0 else torch.full_like(p, scale * (i + 1))
        if scale == 3.0:
            model[2].weight.grad[0, 0] = float("nan")
        clipper.step()
    stats = clipper.stats()["layer_max_norms"]
    assert stats["0.weight"] == 0.0  # never had a gradient
    assert stats["0.bias"] == pytest.approx(3.0 * 2 * math.sqrt(5), rel=1e-6)  # 5 elements of 3 * 2
    assert math.isnan(stats["2.weight"])
    assert stats["2.bias"] == pytest.approx(3.0 * 4, rel=1e-6)


def test_grad_clipper_with_adaptive_threshold_clips_a_spike():
    model = _model()
    clipper = GradClipper(model.named_parameters(), ZScoreThreshold(max_norm=1e3, warmup_steps=3, z_thresh=2.0))
    for scale in (1.0, 1.1, 0.9, 1.0):
        _set_grads(model, scale)
        clipper.step()
    _set_grads(model, 100.0)
    before = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    result = clipper.step()
    after = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
    assert float(result.clip_coef) < 0.1
    assert float(after) < float(before) / 10
    assert gradfuse.ClipResult is type(result)


def test_grad_clipper_without_grads_returns_none():
    model = _model()
    assert GradClipper(model.named_parameters()).step() is None
    assert GradClipper(model.named_parameters()).stats() == {"steps": 0}
