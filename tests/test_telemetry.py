"""Telemetry (interval aggregates, one host read per collect), log2 histograms, sinks, plots, and the
exploding-gradients example."""

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gradfuse
from benchmarks.monitoring import HostReads
from gradfuse import histogram as H

ROOT = Path(__file__).resolve().parent.parent


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4), torch.nn.Linear(4, 2))


def _steps(model, telemetry, scales, backend=None, history=None, histogram_at=()):
    """One clip per scale (max_norm 3): a NaN in 2.bias at scale NaN, 0.weight frozen at scale 0.5.
    Returns the pre-clip per-layer fp64 norms (None: no gradient) and the pre-clip totals."""
    layers, totals = [], []
    for step, scale in enumerate(scales):
        for name, p in model.named_parameters():
            frozen = name == "0.weight" and scale == 0.5
            p.grad = None if frozen else torch.randn_like(p) * (1.0 if math.isnan(scale) else scale)
        if math.isnan(scale):
            dict(model.named_parameters())["2.bias"].grad[1] = math.nan
        norms = {n: None if p.grad is None else float(torch.linalg.vector_norm(p.grad.double())) for n, p in model.named_parameters()}
        layers.append(norms)
        totals.append(math.sqrt(sum(v * v for v in norms.values() if v is not None)))
        r = gradfuse.clip_grads(model.parameters(), 3.0, nonfinite="skip", backend=backend)
        skipped = r.found_inf
        telemetry.update(r, max_norm=3.0, skipped=skipped, loss=float(step), histograms=step in histogram_at)
        if history is not None:
            history.update(r, max_norm=3.0, skipped=skipped, loss=float(step))
    return layers, totals


SCALES = [0.1, 2.0, 0.5, math.nan, 5.0, 0.3]


def test_interval_figures_match_numpy_on_the_same_steps(backend):
    model = _model()
    tel = gradfuse.Telemetry(model, top_k=3)
    layers, totals = _steps(model, tel, SCALES, backend)
    rec = tel.collect()
    r = rec.record()
    finite = np.array([t for t in totals if math.isfinite(t)])
    assert (r["step"], r["steps"], r["finite_steps"]) == (6, 6, 5)
    assert r["total_norm"]["max"] == pytest.approx(finite.max(), rel=1e-6)
    assert r["total_norm"]["mean"] == pytest.approx(finite.mean(), rel=1e-6)
    assert r["total_norm"]["p95"] == pytest.approx(np.percentile(finite, 95), rel=1e-6)
    assert r["total_norm"]["min"] == pytest.approx(finite.min(), rel=1e-6)
    assert r["clipped_steps"] == sum(t > 3.0 for t in finite)
    assert (r["nonfinite_steps"], r["skipped_steps"]) == (1, 1)
    assert r["loss"] == {"mean": 2.5, "max": 5.0, "last": 5.0}
    assert r["max_norm"] == {"last": 3.0, "min": 3.0}
    for name in r["layer_norms"]:
        seen = [s[name] for s in layers if s[name] is not None]
        want = math.nan if any(math.isnan(x) for x in seen) else max(seen)
        got = r["layer_norms"][name]
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-6), name
    assert r["nonfinite_layers"] == [{"name": "2.bias", "nan": 1, "inf": 0}]
    finite_layers = {n: v for n, v in r["layer_norms"].items() if math.isfinite(v)}
    assert [n for n, _ in r["top_layers"]] == sorted(finite_layers, key=finite_layers.get, reverse=True)[:3]
    flat = rec.as_dict()
    assert flat["grad/nonfinite/2.bias"] == 1.0 and flat["grad/clipped_steps"] == r["clipped_steps"]
    assert set(flat) >= {"grad/total_norm_max", "grad/total_norm_p95", "grad/skipped_steps", "grad/loss_mean", "grad/max_norm"}
    assert all(isinstance(v, float) for v in flat.values())


def test_frozen_layers_all_interval_are_no_gradient_and_intervals_reset():
    model = _model()
    tel = gradfuse.Telemetry(model)
    _steps(model, tel, [0.5, 0.5])
    first = tel.collect().record()
    assert first["no_gradient"] == ["0.weight"] and first["layer_norms"]["0.weight"] is None
    _steps(model, tel, [1.0] * 70)  # longer than the first row buffer (64)
    second = tel.collect().record()
    assert second["steps"] == 70 and second["step"] == 72 and second["no_gradient"] == []
    assert second["nonfinite_steps"] == 0 and second["nonfinite_layers"] == []
    assert tel.collect().record() == {"step": 72, "steps": 0}
    assert tel.collect().as_dict() == {}


def test_updates_never_read_the_host_and_a_collect_reads_once():
    model = _model()
    tel = gradfuse.Telemetry(model)
    _steps(model, tel, [1.0])  # buffers allocated, plan built
    tel.collect().record()
    r = gradfuse.clip_grads(model.parameters(), 3.0)
    reads = HostReads()
    with reads.watching():
        for _ in range(5):
            tel.update(r, max_norm=torch.tensor(3.0), skipped=r.found_inf, loss=torch.tensor(1.0), histograms=True)
        record = tel.collect()
    assert reads.count == 0, reads.seen
    with reads.watching():
        record.record()
        record.as_dict()
    assert reads.seen == ["Tensor.cpu", "Tensor.tolist"]  # one copy, read once


def test_without_counts_the_torch_backend_flags_layers_from_max_abs():
    model = _model()
    tel = gradfuse.Telemetry(model)
    _steps(model, tel, [1.0, math.nan], backend="torch")
    r = tel.collect().record()
    assert r["nonfinite_layers"] == [{"name": "2.bias", "nan": 1, "inf": 0}]  # a flag: counts need stats=True


def test_telemetry_histograms_are_those_of_the_gradients_at_the_step_asked():
    model = _model()
    tel = gradfuse.Telemetry(model)
    _steps(model, tel, [1.0, 0.5, 2.0], histogram_at=(1,))
    grads_at_1 = None
    r = tel.collect().record()
    assert r["histograms"]["step"] == 2
    # the histogram step had 0.weight frozen: it has no histogram; the others count every element
    assert "0.weight" not in r["histograms"]["layers"]
    counts = {n: sum(c) for n, c in r["histograms"]["layers"].items()}
    assert counts == {n: p.numel() for n, p in model.named_parameters() if n != "0.weight"}
    assert grads_at_1 is None


def _numpy_buckets(g: torch.Tensor) -> np.ndarray:
    x = (torch.view_as_real(g) if g.is_complex() else g).detach().double().numpy().ravel()
    out = np.zeros(H.NUM_BUCKETS, dtype=np.int64)
    zero, nan, inf = x == 0, np.isnan(x), np.isinf(x)
    out[H.ZERO_BUCKET], out[H.NAN_BUCKET], out[H.INF_BUCKET] = zero.sum(), nan.sum(), inf.sum()
    rest = x[~(zero | nan | inf)]
    np.add.at(out, np.floor(np.log2(np.abs(rest))).astype(int) - H.MIN_EXP + 1, 1)
    return out


def _special(dtype):
    g = (torch.randn(3000) * torch.logspace(-30, 4, 3000)).to(dtype)
    g[:5], g[5], g[6], g[7] = 0.0, math.nan, math.inf, -math.inf
    return g


HIST_GRADS = [
    _special(torch.float16), _special(torch.bfloat16), _special(torch.float32),
    torch.tensor([1e-8, 3e-6, 6e-8, -2e-7], dtype=torch.float16),  # fp16 subnormals
    torch.tensor([1e-40, 3e-39], dtype=torch.bfloat16),  # bf16 subnormals (2^-133 and up)
    torch.empty(0), torch.randn(7, dtype=torch.float64), torch.randn(3, dtype=torch.complex64),
]  # fmt: skip


@pytest.mark.parametrize("per_tensor", [True, False], ids=["per-tensor", "chunked"])
def test_log2_histograms_match_numpy_floor_log2(per_tensor, monkeypatch):
    if not per_tensor:  # the off-CPU path (concatenated chunks, row offsets), run on the CPU
        real = H._count_patterns
        monkeypatch.setattr(H, "_count_patterns", lambda raw, flats, chunk, per_tensor: real(raw, flats, 1000, False))
    h = gradfuse.log2_histograms(HIST_GRADS)
    for i, g in enumerate(HIST_GRADS):
        np.testing.assert_array_equal(h[i].numpy(), _numpy_buckets(g), err_msg=f"gradient {i} ({g.dtype})")
    assert H.bucket_label(H.ZERO_BUCKET) == "zero" and H.bucket_label(1) == f"2^{H.MIN_EXP}" and H.bucket_label(H.NAN_BUCKET) == "nan"


def test_log2_histograms_make_no_host_read():
    gradfuse.log2_histograms(HIST_GRADS[:3])
    reads = HostReads()
    with reads.watching():
        gradfuse.log2_histograms(HIST_GRADS[:3])
    assert reads.count == 0, reads.seen


# -- sinks ----------------------------------------------------------------------------------


def _records(n_intervals=2, histogram_at=(2,)):
    model = _model()
    tel = gradfuse.Telemetry(model)
    out = []
    for _ in range(n_intervals):
        _steps(model, tel, SCALES, histogram_at=histogram_at)
        out.append(tel.collect())
    return model, out


def test_jsonl_round_trip_keeps_nan_and_is_standard_json(tmp_path):
    _, recs = _records()
    path = tmp_path / "grad.jsonl"
    with gradfuse.JSONLSink(path) as sink:
        for r in recs:
            sink.write(r)
    for line in path.read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    back = gradfuse.read_jsonl(path)
    assert len(back) == 2
    want = recs[1].record()
    assert math.isnan(back[1]["layer_norms"]["2.bias"]) and back[1]["total_norm"] == want["total_norm"]
    assert back[1]["histograms"] == want["histograms"]


def test_csv_has_fixed_columns_one_row_per_interval(tmp_path):
    model, recs = _records()
    path = tmp_path / "grad.csv"
    with gradfuse.CSVSink(path) as sink:
        for r in recs:
            sink.write(r)
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 2 and rows[1]["step"] == "12"
    assert [c for c in rows[0] if c.startswith("layer/")] == [f"layer/{n}" for n, _ in model.named_parameters()]
    assert float(rows[0]["total_norm_max"]) == pytest.approx(recs[0].record()["total_norm"]["max"])
    assert rows[0]["layer/2.bias"] == "nan"


def test_tensorboard_scalars_and_raw_histograms(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, recs = _records(1)
    sink = gradfuse.TensorBoardSink(log_dir=str(tmp_path))
    sink.write(recs[0])
    sink.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert "grad/total_norm_max" in scalars and "grad/nonfinite/2.bias" in scalars
    assert acc.Scalars("grad/total_norm_max")[0].value == pytest.approx(recs[0].record()["total_norm"]["max"], rel=1e-6)
    hist = acc.Histograms("grad/log2_abs/2.weight")[0]
    assert hist.step == 3 and hist.histogram_value.num == 20  # 4 x 5 elements, all finite non-zero


# -- plots ----------------------------------------------------------------------------------


def test_dashboard_from_a_history_and_from_a_jsonl_log(tmp_path):
    pytest.importorskip("matplotlib")
    model = _model()
    tel = gradfuse.Telemetry(model)
    history = gradfuse.NormHistory(parameters=model, layers="all")
    log = tmp_path / "log.jsonl"
    with gradfuse.JSONLSink(log) as sink:
        for _ in range(3):
            _steps(model, tel, SCALES, history=history)
            sink.write(tel.collect())
    png = tmp_path / "history.png"
    fig = gradfuse.plot.dashboard(history, png, title="test")
    assert png.stat().st_size > 10_000
    assert len(fig.axes) == 4  # norms, loss, heatmap, colour bar
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(x.startswith("NaN/Inf (3)") for x in labels) and any(x.startswith("skipped (3)") for x in labels)
    fig = gradfuse.plot.dashboard(str(log), tmp_path / "log.png", loss={"a": [1.0, 2.0, math.nan]})
    assert (tmp_path / "log.png").stat().st_size > 10_000 and len(fig.axes) == 4
    with pytest.raises(TypeError, match="source"):
        gradfuse.plot.dashboard(42)


# -- GradClipper feeds both -----------------------------------------------------------------


def test_grad_clipper_feeds_history_and_telemetry_with_its_threshold():
    model = _model()
    history = gradfuse.NormHistory(parameters=model, layers="all")
    tel = gradfuse.Telemetry(model)
    clipper = gradfuse.GradClipper(model.named_parameters(), 0.25, nonfinite="skip", history=history, telemetry=tel)
    for scale in (1.0, math.nan, 0.01):
        for p in model.parameters():
            p.grad = torch.full_like(p, scale)
        clipper.step()
    rec = history.records()
    np.testing.assert_array_equal(rec["max_norm"], [0.25] * 3)
    np.testing.assert_array_equal(rec["skipped"], [0, 1, 0])
    r = tel.collect().record()
    assert (r["clipped_steps"], r["skipped_steps"], r["nonfinite_steps"]) == (1, 1, 1)


# -- the example ----------------------------------------------------------------------------


def _example():
    spec = importlib.util.spec_from_file_location("exploding_gradients", ROOT / "examples" / "exploding_gradients.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task, steps", [("rnn", 60), ("mlp", 150)])
def test_example_unclipped_diverges_and_clipped_converges(task, steps):
    eg = _example()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {mode: eg.train(eg.TASKS[task], mode, steps=steps, seed=1) for mode in eg.MODES}
    finally:
        torch.set_num_threads(threads)
    assert not all(map(math.isfinite, runs["none"].losses)), "the unclipped run should blow up to NaN/Inf"
    for mode in ("p95", "autoclip"):
        run = runs[mode]
        assert all(map(math.isfinite, run.losses)), mode
        assert run.final_loss < 0.7 * run.losses[0], (mode, run.losses[0], run.final_loss)
    assert 0.1 < runs["p95"].max_norm < 10.0  # the p95 of the calibration steps' norms
    assert "DIVERGED" in eg.table(list(runs.values()))


# -- on a GPU -------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_monitoring_never_syncs_and_collect_copies_into_pinned_memory():
    model = _model().cuda()
    history = gradfuse.NormHistory(parameters=model, layers="all")
    tel = gradfuse.Telemetry(model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    for _ in range(2):  # plans, buffers, tables
        r = gradfuse.clip_grads(model.parameters(), 1.0)
        history.update(r, max_norm=1.0)
        tel.update(r, max_norm=1.0, histograms=True)
    tel.collect().record()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            r = gradfuse.clip_grads(model.parameters(), 1.0)
            history.update(r, max_norm=1.0, skipped=r.found_inf)
            tel.update(r, max_norm=1.0, histograms=True)
            history.window(8)
        record = tel.collect()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert record._host.is_pinned() and record._host.device.type == "cpu"
    got = record.record()
    assert got["steps"] == 3 and sum(sum(c) for c in got["histograms"]["layers"].values()) == sum(p.numel() for p in model.parameters())


@pytest.mark.gpu
def test_cuda_histograms_equal_the_cpu_ones():
    grads = [g.cuda() for g in HIST_GRADS]
    torch.testing.assert_close(gradfuse.log2_histograms(grads).cpu(), gradfuse.log2_histograms(HIST_GRADS), rtol=0, atol=0)
