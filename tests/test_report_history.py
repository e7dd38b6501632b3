"""inspect_gradients (one fused read, one host read) and NormHistory (device ring, finite window)."""

import math

import numpy as np
import pytest
import torch
from helpers import assert_close_rel, assert_unchanged, snapshot

import gradfuse
from benchmarks.monitoring import HostReads
from gradfuse.history import NO_GRAD


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4), torch.nn.Linear(4, 2))


def _grads(model, scale=1.0, frozen=("0.weight",)):
    for name, p in model.named_parameters():
        p.grad = None if name in frozen else torch.randn_like(p) * scale


# -- inspect_gradients ------------------------------------------------------------------------


def test_report_matches_fp64_per_layer_and_reports_frozen_layers_by_name(backend):
    model = _model()
    _grads(model)
    named = dict(model.named_parameters())
    named["2.weight"].grad[1, 2] = float("nan")
    named["2.weight"].grad[0, 0] = float("inf")
    named["3.bias"].grad.mul_(100.0)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    before = snapshot(grads)
    report = gradfuse.inspect_gradients(model.named_parameters(), threshold=10.0, backend=backend)
    assert_unchanged(grads, before, "inspect_gradients modified a gradient")
    by_name = {d["name"]: d for d in report.layers}
    assert list(by_name) == [n for n, _ in model.named_parameters()]
    assert by_name["0.weight"]["has_grad"] is False and by_name["0.weight"]["grad_norm"] is None
    assert report.no_gradient == ["0.weight"]
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        d, g = by_name[name], p.grad.double()
        assert_close_rel(d["grad_norm"], float(torch.linalg.vector_norm(g)), 1e-6, name)
        assert_close_rel(d["max_abs"], float(g.abs().max()), 1e-7, name)
        assert (d["nan_count"], d["inf_count"]) == (int(g.isnan().sum()), int(g.isinf().sum())), name
    assert by_name["2.weight"]["has_nan"] and by_name["2.weight"]["has_inf"]
    assert [d["name"] for d in report.problematic_layers] == ["2.weight", "3.bias"]  # non-finite first
    assert report.has_explosion
    assert report.as_dict()["problematic_layers"][1] == {k: by_name["3.bias"][k] for k in ("name", "grad_norm", "max_abs", "has_nan", "has_inf")}
    text = repr(report)
    assert "EXPLODING" in text and "2.weight" in text and "no gradient: 1 layer(s) (0.weight)" in text


def test_report_without_explosion_and_the_threshold_is_per_layer(backend):
    model = _model()
    _grads(model, scale=0.01, frozen=())
    report = gradfuse.inspect_gradients(model, threshold=10.0, backend=backend)
    assert not report.has_explosion and report.problematic_layers == [] and report.no_gradient == []
    largest = max(report.layers, key=lambda d: d["grad_norm"])
    tight = gradfuse.inspect_gradients(model, threshold=largest["grad_norm"] * 0.999, backend=backend)
    assert [d["name"] for d in tight.problematic_layers] == [largest["name"]]


def test_report_reads_the_host_once():
    model = _model()
    _grads(model)
    gradfuse.inspect_gradients(model)  # plan built
    reads = HostReads()
    with reads.watching():
        gradfuse.inspect_gradients(model)
    assert reads.seen == ["Tensor.tolist"]


@pytest.mark.parametrize("bad, error, match", [(-1.0, ValueError, "threshold"), (torch.tensor(1.0), TypeError, "threshold"), ([1], TypeError, "parameters")])
def test_report_rejects_bad_arguments(bad, error, match):
    model = _model()
    _grads(model)
    args = (model, bad) if match == "threshold" else (bad,)
    with pytest.raises(error, match=match):
        gradfuse.inspect_gradients(*args)


# -- NormHistory ------------------------------------------------------------------------------

NORMS = [3.0, 1.0, math.nan, 4.0, 1.5, math.inf, 9.0, 2.0, 6.0, 5.0, 3.5]


def _result(total: float, layers=(1.0, 2.0)):
    """A ClipResult with the given total (and per-gradient norms), as a clip would return it."""
    r = gradfuse.clip_grads(_params([torch.full((4,), v / 2) for v in layers]), math.inf, apply=False)
    r.result[0] = total  # the total under test (the per-gradient rows stay those of the layers)
    return r


def _params(grads):
    out = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g
        out.append(p)
    return out


def _filled(capacity, norms=NORMS):
    h = gradfuse.NormHistory(capacity=capacity)
    for n in norms:
        h.update(_result(n))
    return h


@pytest.mark.parametrize("capacity", [4, 8, 100])
def test_history_summary_and_suggestion_match_numpy_on_the_finite_norms(capacity):
    h = _filled(capacity)
    kept = np.array(NORMS[-capacity:], dtype=np.float64)
    np.testing.assert_array_equal(h.norms().numpy(), kept.astype(np.float32))
    finite = kept[np.isfinite(kept)]
    s = h.summary()
    assert (s["count"], s["nonfinite"]) == (finite.size, kept.size - finite.size)
    assert s["mean"] == pytest.approx(finite.mean()) and s["max"] == finite.max()
    for key, q in (("median", 50), ("p95", 95), ("p99", 99)):
        assert s[key] == pytest.approx(np.percentile(finite, q))
    assert h.suggest_max_norm(0.95) == pytest.approx(np.quantile(finite, 0.95))
    assert float(h.quantile(0.9)) == pytest.approx(np.quantile(finite, 0.9), rel=1e-6)


@pytest.mark.parametrize("size", [1, 3, 5, 8])
def test_history_window_is_the_last_finite_norms_and_never_sees_nan(size):
    h = _filled(8)
    finite = [n for n in NORMS if math.isfinite(n)]
    w = h.window(size)
    last = np.array(finite[-size:])
    assert int(w.count) == len(last)
    assert float(w.mean) == pytest.approx(last.mean(), rel=1e-6)
    assert float(w.std) == pytest.approx(last.std(ddof=1) if len(last) > 1 else 0.0, rel=1e-5)
    assert float(h.window(size, correction=0).std) == pytest.approx(last.std(), rel=1e-5)
    h.update(_result(math.nan))  # a non-finite step changes nothing in the window
    again = h.window(size)
    assert torch.equal(again.mean, w.mean) and torch.equal(again.std, w.std) and torch.equal(again.count, w.count)


def test_history_window_with_fewer_finite_norms_than_asked():
    h = gradfuse.NormHistory(capacity=16, device="cpu")
    w = h.window(4)
    assert (int(w.count), float(w.mean), float(w.std)) == (0, 0.0, 0.0)
    h.update(_result(math.inf))
    h.update(_result(2.0))
    h.update(_result(4.0))
    w = h.window(4)
    assert (int(w.count), float(w.mean)) == (2, 3.0)
    assert float(w.std) == pytest.approx(math.sqrt(2.0))


def test_history_updates_and_windows_without_a_host_read():
    h = _filled(8)
    r = _result(2.0)
    reads = HostReads()
    with reads.watching():
        for _ in range(5):
            h.update(r, max_norm=torch.tensor(1.0), skipped=r.found_inf, loss=torch.tensor(0.5))
            h.window(4)
            h.quantile(0.95)
    assert reads.count == 0, reads.seen


def test_history_tracks_layers_by_name_with_frozen_layers_and_the_step_columns():
    model = _model()
    h = gradfuse.NormHistory(capacity=10, parameters=model, layers=["0.weight", "2.weight", "3.bias"])
    expect = []
    for step in range(3):
        _grads(model, frozen=("0.weight",) if step == 1 else ())
        r = gradfuse.clip_grads(model.parameters(), 0.5)
        norms = {n: float(torch.linalg.vector_norm(p.grad.double())) / float(r.scale) if p.grad is not None else NO_GRAD for n, p in model.named_parameters()}
        expect.append([norms[n] for n in h.layer_names])
        h.update(r, max_norm=0.5, skipped=step == 2, loss=float(step))
    rec = h.records()
    np.testing.assert_allclose(rec["layer_norms"], np.array(expect), rtol=1e-5)
    assert rec["layer_norms"][1, 0] == NO_GRAD
    np.testing.assert_array_equal(rec["step"], [1, 2, 3])
    np.testing.assert_array_equal(rec["max_norm"], [0.5] * 3)
    np.testing.assert_array_equal(rec["skipped"], [0, 0, 1])
    np.testing.assert_array_equal(rec["loss"], [0, 1, 2])
    assert h.summary("0.weight")["count"] == 2  # the frozen step is not a norm
    with pytest.raises(ValueError, match="unknown layer"):
        gradfuse.NormHistory(parameters=model, layers=["nope"])


def test_history_rejects_a_result_of_other_parameters():
    model = _model()
    h = gradfuse.NormHistory(parameters=model, layers="all")
    _grads(model, frozen=())
    r = gradfuse.clip_grads(model.parameters(), 1.0)
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="before zero_grad"):
        h.update(r)


def test_history_state_dict_resumes_exactly():
    whole = _filled(6)
    half = _filled(6, NORMS[:5])
    resumed = gradfuse.NormHistory(capacity=6)
    resumed.load_state_dict(half.state_dict())
    for n in NORMS[5:]:
        resumed.update(_result(n))
    assert resumed.summary() == whole.summary()
    assert torch.equal(resumed.window(6).mean, whole.window(6).mean)
    with pytest.raises(ValueError, match="capacity"):
        gradfuse.NormHistory(capacity=5).load_state_dict(half.state_dict())


def test_history_errors_name_the_problem():
    with pytest.raises(ValueError, match="capacity"):
        gradfuse.NormHistory(capacity=0)
    h = gradfuse.NormHistory()
    with pytest.raises(RuntimeError, match="nothing recorded"):
        h.summary()
    h.update(_result(math.nan))
    with pytest.raises(RuntimeError, match="no finite norm"):
        h.suggest_max_norm()
    with pytest.raises(ValueError, match="quantile"):
        h.suggest_max_norm(1.5)
    with pytest.raises(ValueError, match="size"):
        h.window(1001)


def test_the_host_read_counter_sees_item_and_bool_and_gpt2_shapes_are_gpt2s():
    from benchmarks.monitoring import GPT2_124M

    reads = HostReads()
    x = torch.tensor([1.0, 2.0])
    with reads.watching():
        x.sum().item()
        bool(x[0] > 0)
        x.tolist()
    assert {"Tensor.item", "Tensor.__bool__", "Tensor.tolist", "aten._local_scalar_dense"} <= set(reads.seen)
    shapes = GPT2_124M.tensors()
    assert len(shapes) == 148 and sum(math.prod(s) for _, s in shapes) == 124_439_808
