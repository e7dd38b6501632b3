"""The benchmark suite (benchmarks/): a --quick run end to end, and the correctness guard that fails it.

The end-to-end run is a subprocess on CPU with tiny shapes; it asserts the JSON's figures, the
table and the PNG, not any speed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from benchmarks import __main__ as bench_main
from benchmarks import correctness
from benchmarks.rows import Row, derive_figures
from benchmarks.workloads import Workload, WorkloadError, find_workloads_dir, scaled, tensor_dtypes

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = {"clip": 3, "noclip": 1, "norm": 1, "nonfinite-check": 3, "fused-optimizer": 1}

try:
    import matplotlib  # noqa: F401

    HAS_MATPLOTLIB = True
except ImportError:
    HAS_MATPLOTLIB = False


def _has_workloads() -> bool:
    try:
        find_workloads_dir()
    except WorkloadError:
        return False
    return True


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    if not _has_workloads():
        pytest.skip("no shared/workloads beside or inside the repo")
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable, "-m", "benchmarks", "--quick", "--device", "cpu", "--no-progress",
        "--workloads", "gpt2_124m,many_small_2048", "--dtypes", "bf16,mixed", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc, out, json.loads(out.read_text())


def test_quick_run_json_has_environment_and_copy_bandwidth(quick_run):
    _, _, data = quick_run
    assert data["schema"] == "gradfuse-benchmarks/1"
    meta = data["meta"]
    for key in ("device", "device_kind", "torch", "triton", "gradfuse", "python", "date", "command"):
        assert key in meta, key
    assert meta["device_type"] == "cpu" and meta["device_kind"].startswith("cpu-")
    assert meta["torch"] == torch.__version__
    assert meta["command"].startswith("python -m benchmarks") and "--quick" in meta["command"]
    bw = data["copy_bandwidth"]
    assert bw["gbps"] > 0 and bw["bytes_moved"] > 0
    assert data["failures"] == []


def test_quick_run_has_every_scenario_and_contender(quick_run):
    _, _, data = quick_run
    rows = data["results"]
    groups = {(g["workload"], g["dtype"]): g for g in data["gradient_sets"]}
    assert set(groups) == {(w, d) for w in ("gpt2_124m", "many_small_2048") for d in ("bf16", "mixed")}
    for (workload, dtype), group in groups.items():
        for scenario, factor in SCENARIOS.items():
            cell = {r["impl"]: r for r in rows if (r["workload"], r["dtype"], r["scenario"]) == (workload, dtype, scenario)}
            for impl in ("gradfuse:torch", "torch:foreach", "torch:loop"):
                assert cell[impl]["status"] == "ok", (workload, dtype, scenario, impl, cell[impl]["note"])
                assert cell[impl]["bytes"] == factor * group["bytes"]
            if scenario == "fused-optimizer":
                assert cell["adamw:step-only"]["status"] == "ok"


def test_quick_run_figures_are_consistent(quick_run):
    _, _, data = quick_run
    copy_gbps = data["copy_bandwidth"]["gbps"]
    ok = [r for r in data["results"] if r["status"] == "ok"]
    assert ok
    for r in ok:
        t = r["time"]
        assert t["reps"] == 3
        assert 0 < t["min_ms"] <= t["p25_ms"] <= t["median_ms"] <= t["p75_ms"] <= t["max_ms"]
        assert math.isclose(t["iqr_ms"], t["p75_ms"] - t["p25_ms"], rel_tol=1e-9, abs_tol=1e-12)
        if r["scenario"] != "fused-optimizer":
            assert math.isclose(r["gbps"], r["bytes"] / (t["median_ms"] * 1e-3) / 1e9, rel_tol=1e-9)
        if r["gbps"] is not None:
            assert math.isclose(r["copy_fraction"], r["gbps"] / copy_gbps, rel_tol=1e-9)
        if r["impl"] == "torch:foreach":
            assert r["speedup_vs_baseline"] == pytest.approx(1.0)
        if r["impl"].startswith("gradfuse:"):
            assert r["check"]["ok"], r["check"]
            assert r["check"]["norm_rel_err"] <= r["check"]["norm_tol"]
        assert r["launches_per_call"] is None and r["syncs_per_call"] is None  # CPU: not counted


def test_quick_run_prints_table_and_writes_png(quick_run):
    proc, out, _ = quick_run
    assert "median ms" in proc.stdout and "GB/s" in proc.stdout and "gpt2_124m" in proc.stdout
    assert "copy bandwidth:" in proc.stdout
    png = out.with_suffix(".png")
    if HAS_MATPLOTLIB:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not png.exists()


# --------------------------------------------------------------------------------------------------
# The correctness guard


def _grads(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype) * 0.01 for s in ((300, 7), (5,), (4096,))]


def test_guard_accepts_a_right_clip_and_rejects_a_slightly_wrong_norm():
    grads = _grads()
    snap = correctness.take_snapshot(grads)
    max_norm = snap.total / 2
    coef = correctness.expected_coef(max_norm, snap.total)
    torch._foreach_mul_(grads, coef)
    right = correctness.check_call(snap, torch.tensor(snap.total, dtype=torch.float32), max_norm, grads)
    assert right.ok, right.problems
    wrong = correctness.check_call(snap, torch.tensor(snap.total * (1 + 1e-4), dtype=torch.float32), max_norm, grads)
    assert not wrong.ok and "total norm" in wrong.problems[0]


def test_guard_rejects_gradients_scaled_by_a_wrong_coefficient():
    grads = _grads(torch.bfloat16)
    snap = correctness.take_snapshot(grads)
    max_norm = snap.total / 2
    torch._foreach_mul_(grads, correctness.expected_coef(max_norm, snap.total) * 1.02)
    check = correctness.check_call(snap, torch.tensor(snap.total), max_norm, grads)
    assert not check.ok and "gradients differ" in check.problems[-1]


def test_guard_rejects_gradients_touched_when_nothing_clips():
    grads = _grads(torch.float16)
    snap = correctness.take_snapshot(grads)
    grads[1].mul_(0.5)
    assert correctness.grads_changed(snap, grads)
    check = correctness.check_call(snap, torch.tensor(snap.total, dtype=torch.float16), 100 * snap.total, grads)
    assert not check.ok


def _tiny_workloads(tmp_path: Path) -> Path:
    folder = tmp_path / "workloads"
    folder.mkdir()
    (folder / "tiny.json").write_text(json.dumps({"doc": "tiny", "tensors": [["w", [64, 32]], ["b", [32]]]}))
    return folder


def _wrong_gradfuse():
    """A gradfuse whose only backend returns a norm 1% too large."""

    def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None, *, backend=None):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach) * 1.01

    def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None, *, backend=None):
        return torch.nn.utils.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach) * 1.01

    return types.SimpleNamespace(
        available_backends=lambda device: ["torch"], clip_grad_norm_=clip_grad_norm_, get_total_norm=get_total_norm
    )


def test_a_wrong_gradfuse_result_fails_the_run_and_names_the_cell(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_main, "import_gradfuse", lambda notes: _wrong_gradfuse())
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # --quick's 1 thread: not for this process
    out = tmp_path / "wrong.json"
    argv = [
        "--quick", "--device", "cpu", "--no-progress", "--no-plot", "--workloads-dir", str(_tiny_workloads(tmp_path)),
        "--dtypes", "fp32", "--scenarios", "clip,norm", "--out", str(out),
    ]  # fmt: skip
    assert bench_main.main(argv) == 1
    err = capsys.readouterr().err
    assert "gradfuse:torch on tiny/fp32/clip" in err and "gradfuse:torch on tiny/fp32/norm" in err
    data = json.loads(out.read_text())
    wrong = [r for r in data["results"] if r["impl"] == "gradfuse:torch"]
    assert [r["status"] for r in wrong] == ["wrong", "wrong"]
    assert all(r["time"] is None for r in wrong)  # a wrong result is not timed
    assert [r["status"] for r in data["results"] if r["impl"] == "torch:foreach"] == ["ok", "ok"]


def test_a_busy_machine_is_named_in_the_notes(tmp_path, monkeypatch, capsys):
    from benchmarks import runner, timing

    measured = iter([10.0, 30.0])  # copy bandwidth before, then after the cells

    def copy_bandwidth(device, nbytes, repeat):
        return {"gbps": next(measured), "method": "fake"}

    monkeypatch.setattr(timing, "copy_bandwidth", copy_bandwidth)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    out = tmp_path / "busy.json"
    argv = [
        "--quick", "--device", "cpu", "--no-progress", "--no-plot", "--workloads-dir", str(_tiny_workloads(tmp_path)),
        "--dtypes", "fp32", "--scenarios", "norm", "--impls", "torch:foreach", "--out", str(out),
    ]  # fmt: skip
    assert bench_main.main(argv) == 0
    assert "the machine was busy during this run" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["copy_bandwidth"]["gbps"] == 30.0
    assert any("10.0 GB/s before the cells and 30.0 after" in n for n in data["notes"])
    assert runner.BUSY_RATIO * 30.0 > 10.0  # the threshold the note depends on


def test_default_output_is_not_the_committed_results(monkeypatch):
    args = bench_main.parse_args(["--device", "cpu"])
    json_path, png_path = bench_main.output_paths(args, torch.device("cpu"))
    assert json_path.parent == REPO / "benchmarks" / "out" and png_path.suffix == ".png"


def test_derived_figures_bandwidth_speedup_and_clip_overhead():
    def row(scenario, impl, median_ms, nbytes):
        return Row("w", "bf16", scenario, impl, bytes=nbytes, time={"median_ms": median_ms})

    rows = [
        row("clip", "torch:foreach", 4.0, 3_000_000),
        row("clip", "gradfuse:cpu", 1.0, 3_000_000),
        row("fused-optimizer", "adamw:step-only", 10.0, None),
        row("fused-optimizer", "torch:foreach", 14.0, 1_000_000),
        row("fused-optimizer", "gradfuse:cpu", 10.5, 1_000_000),
    ]
    derive_figures(rows, copy_gbps=6.0)
    fast = rows[1]
    assert fast.gbps == pytest.approx(3.0) and fast.copy_fraction == pytest.approx(0.5)
    assert fast.speedup_vs_baseline == pytest.approx(4.0) and rows[0].speedup_vs_baseline == pytest.approx(1.0)
    assert rows[2].gbps is None and rows[2].speedup_vs_baseline is None
    handoff = rows[4]
    assert handoff.overhead_ms == pytest.approx(0.5) and handoff.gbps == pytest.approx(2.0)
    assert handoff.speedup_vs_baseline == pytest.approx(14.0 / 10.5)


# --------------------------------------------------------------------------------------------------
# Workloads


def test_scale_shrinks_first_dimensions_and_mixed_keeps_1d_tensors_fp32():
    w = Workload("w", "", ("a", "b", "c"), ((1000, 64), (64,), (3,)))
    s = scaled(w, 0.1)
    assert s.shapes == ((100, 64), (6,), (1,)) and s.scale == pytest.approx(0.1)
    assert tensor_dtypes(w, "mixed") == [torch.bfloat16, torch.float32, torch.float32]
    all_1d = Workload("v", "", ("a", "b", "c"), ((5,), (6,), (7,)))
    assert tensor_dtypes(all_1d, "mixed") == [torch.bfloat16, torch.float32, torch.bfloat16]


def test_missing_workloads_dir_is_a_clear_error(tmp_path):
    with pytest.raises(WorkloadError, match="no workload files"):
        find_workloads_dir(tmp_path / "nowhere")
