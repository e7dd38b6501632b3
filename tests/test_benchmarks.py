"""The benchmark suite (benchmarks/): a --quick run end to end, the correctness guard that fails it,
the canonical workloads, exit codes, the noise rules and the time budget.

The end-to-end run is a subprocess on CPU with tiny shapes; it asserts the JSON's figures, the
summary, the table and the PNG, not any speed. Nothing here needs a file outside the repository.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from benchmarks import __main__ as bench_main
from benchmarks import correctness, report, runner, schedule, timing
from benchmarks.rows import NOISY, OK, Row, derive_figures
from benchmarks.workloads import Workload, WorkloadError, canonical_workloads, load_workloads, scaled, tensor_dtypes

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = {"clip": 3, "noclip": 1, "norm": 1, "nonfinite-check": 3, "fused-optimizer": 1}

try:
    import matplotlib  # noqa: F401

    HAS_MATPLOTLIB = True
except ImportError:
    HAS_MATPLOTLIB = False


def _bench(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "benchmarks", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = _bench(
        "--quick", "--full", "--device", "cpu", "--workloads", "gpt2_124m,many_small_2048", "--dtypes", "bf16,mixed",
        "--out", str(out),
    )  # fmt: skip
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
                # noisy: timed, but a busy machine spread the timings past their median (no figure then)
                assert cell[impl]["status"] in ("ok", "noisy"), (workload, dtype, scenario, impl, cell[impl]["note"])
                assert cell[impl]["bytes"] == factor * group["bytes"]
            if scenario == "fused-optimizer":
                assert cell["adamw:step-only"]["status"] in ("ok", "noisy")


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


def test_quick_run_prints_table_then_summary_last_within_120_columns(quick_run):
    proc, out, data = quick_run
    lines = proc.stdout.splitlines()
    assert max(map(len, lines)) <= report.WIDTH
    assert "median ms" in proc.stdout and "GB/s" in proc.stdout and "copy bandwidth" in proc.stdout
    # the summary closes the output: one line per (workload, dtype), speed-up and %BW of gradfuse:cpu
    summary = [line.split() for line in lines[-4:]]
    assert [(p[0], p[2]) for p in summary] == [(w, d) for w in ("gpt2_124m", "many_small_2048") for d in ("bf16", "mixed")]
    header = lines[-5].split()
    assert header[:3] == ["workload", "elements", "dtype"] and header[3:7] == ["gradfuse", "torch", "speed-up", "%BW"]
    assert lines[-6].split()[:3] == ["clip", "(norm", "+"]  # the first scenario's title above its columns
    rows = {(r["workload"], r["dtype"], r["scenario"], r["impl"]): r for r in data["results"]}
    for parts in summary:  # the clip columns: gradfuse ms, torch ms, speed-up, %BW (or why there is no figure)
        gf, tf = rows[(parts[0], parts[2], "clip", "gradfuse:cpu")], rows[(parts[0], parts[2], "clip", "torch:foreach")]
        if gf["status"] != "ok" or tf["status"] != "ok":
            assert parts[3] in ("gradfuse:cpu:", "torch:foreach:", "noisy", "skipped") or parts[3] in (gf["status"], tf["status"])
            continue
        assert float(parts[3]) == pytest.approx(gf["time"]["median_ms"], rel=0.01)
        assert float(parts[4]) == pytest.approx(tf["time"]["median_ms"], rel=0.01)
        assert float(parts[5].rstrip("x")) == pytest.approx(gf["speedup_vs_baseline"], abs=0.006)
        assert float(parts[6].rstrip("%")) == pytest.approx(100 * gf["copy_fraction"], abs=0.51)
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
    """A user's workload folder: one file, "tiny"."""
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
    monkeypatch.setattr(bench_main, "import_gradfuse", lambda impls: _wrong_gradfuse())
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # --quick's 1 thread: not for this process
    out = tmp_path / "wrong.json"
    argv = [
        "--quick", "--device", "cpu", "--no-progress", "--no-plot", "--workloads-dir", str(_tiny_workloads(tmp_path)),
        "--workloads", "tiny", "--dtypes", "fp32", "--scenarios", "clip,norm", "--out", str(out),
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
        "--workloads", "tiny", "--dtypes", "fp32", "--scenarios", "norm", "--impls", "torch:foreach", "--out", str(out),
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
        return Row("w", "bf16", scenario, impl, bytes=nbytes, time={"median_ms": median_ms, "iqr_ms": 0.1})

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


# The canonical workloads, built from model configurations: the names, shapes and order of the JSON
# files the project used before (sha256 of their [[name, shape], ...] lists in compact JSON).
CANONICAL = {
    "gpt2_124m": (148, 124_439_808, "5c3d1595075ac1b4ca6e2cc46b8865c934c349fdfb95c9072ca8d0dd096fe1e5"),
    "llama2_7b": (291, 6_738_415_616, "274c1c574da43dc98a073c304d97c64354f6762da5919c415459e2ff2fed759f"),
    "llama_1b_like": (147, 953_223_168, "b80ca690dd31102e6b5fec14f3e339bf658e2696ed8391bcc8beab22602dbbf2"),
    "many_small_2048": (2048, 25_707_776, "b3707e2da31e3bf3615c710197b48198e76f520bc4f196b5586e9f4f9dcf92d7"),
}


def test_canonical_workloads_have_the_shapes_names_and_order_used_so_far():
    workloads = canonical_workloads()
    assert [w.name for w in workloads] == list(CANONICAL)
    for w in workloads:
        count, numel, digest = CANONICAL[w.name]
        listing = [[n, list(shape)] for n, shape in zip(w.tensor_names, w.shapes)]
        assert (w.num_tensors, w.numel, w.full_numel) == (count, numel, numel), w.name
        assert hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest() == digest, w.name


def test_canonical_workloads_match_the_models_they_name():
    by_name = {w.name: w for w in canonical_workloads()}
    gpt2 = dict(zip(by_name["gpt2_124m"].tensor_names, by_name["gpt2_124m"].shapes))
    assert gpt2["transformer.wte.weight"] == (50257, 768) and gpt2["transformer.h.11.mlp.c_fc.weight"] == (768, 3072)
    assert "lm_head.weight" not in gpt2  # tied to wte
    llama = dict(zip(by_name["llama2_7b"].tensor_names, by_name["llama2_7b"].shapes))
    assert llama["model.layers.31.mlp.down_proj.weight"] == (4096, 11008) and llama["lm_head.weight"] == (32000, 4096)
    assert by_name["many_small_2048"].shapes[:9] == ((256,), (1024,), (4096,), (16384,), (65536,), (777,), (3,), (12345,), (256,))


def test_workloads_dir_adds_user_files_and_rejects_a_canonical_name(tmp_path):
    folder = _tiny_workloads(tmp_path)
    names = [w.name for w in load_workloads(None, folder)]
    assert names == [*CANONICAL, "tiny"]
    (folder / "gpt2_124m.json").write_text(json.dumps({"tensors": [["w", [2]]]}))
    with pytest.raises(WorkloadError, match="is a canonical workload's name"):
        load_workloads(None, folder)
    with pytest.raises(WorkloadError, match="unknown workload"):
        load_workloads(["gpt3"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--workloads", "gpt3"], "unknown workload(s) gpt3; choose from gpt2_124m"),
        (["--workloads-dir", "/nonexistent/folder"], "no workload files"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_setup_problems_exit_2_with_the_reason(args, message, capsys):
    assert bench_main.main(["--quick", "--no-progress", "--no-plot", *args]) == 2
    assert message in capsys.readouterr().err


def test_bad_arguments_exit_2():
    proc = _bench("--dtypes", "fp8", timeout=120)
    assert proc.returncode == 2 and "unknown fp8" in proc.stderr


def test_gradfuse_not_importable_exits_2_unless_only_torch_is_asked_for(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "gradfuse", None)  # import gradfuse raises ImportError
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    argv = ["--quick", "--no-progress", "--no-plot", "--workloads-dir", str(_tiny_workloads(tmp_path)), "--workloads", "tiny"]
    assert bench_main.main(argv) == 2
    assert "gradfuse could not be imported" in capsys.readouterr().err
    out = tmp_path / "torch-only.json"
    assert bench_main.main([*argv, "--impls", "torch:foreach", "--scenarios", "norm", "--out", str(out)]) == 0
    assert {r["impl"] for r in json.loads(out.read_text())["results"]} == {"torch:foreach"}


def test_a_spread_above_the_median_is_measured_again_then_flagged(monkeypatch):
    delays = iter([0.0, 0.03, 0.0, 0.03, 0.0] * 3)  # 2 calls in 5 are 30 ms late: the IQR spans the gap

    def call(i):
        time.sleep(next(delays))

    row = Row("w", "fp32", "clip", "torch:foreach")
    policy = timing.RepeatPolicy(warmup=0, min_reps=5, max_reps=5, target_s=0.0)
    stats = runner._measure_steadily(row, call, lambda i: None, torch.device("cpu"), policy, retries=2)
    assert stats.noisy and row.status == NOISY and "in 3 tries" in row.note
    row.time = stats.as_ms()
    line = report.format_table([row])[1]
    assert "noisy" in line and f"{stats.median_s * 1e3:.3g}" not in line.split("noisy")[0]  # no figure printed

    steady = Row("w", "fp32", "clip", "torch:foreach")
    stats = runner._measure_steadily(steady, lambda i: None, lambda i: None, torch.device("cpu"), policy, retries=2)
    assert not stats.noisy and steady.status == OK


def test_a_clip_overhead_within_the_noise_is_not_a_figure():
    def row(impl, median_ms, iqr_ms):
        return Row("w", "bf16", "fused-optimizer", impl, bytes=None if impl == "adamw:step-only" else 10**6,
                   time={"median_ms": median_ms, "iqr_ms": iqr_ms})  # fmt: skip

    negative = [row("adamw:step-only", 10.0, 0.5), row("gradfuse:cpu", 9.8, 0.4), row("torch:foreach", 10.3, 0.6)]
    derive_figures(negative, copy_gbps=6.0)
    for r in negative[1:]:
        assert r.overhead_ms is None and r.gbps is None and "within noise" in r.note
    summary = report.format_summary(negative, 6.0, {"device": "cpu", "torch": "x", "cpu_threads": 1}, [])
    assert summary[-1].split() == ["w", "-", "bf16", "noise"]


def test_the_time_budget_skips_compiles_that_do_not_fit_and_cells_past_it(tmp_path):
    clock = schedule.Clock(budget_s=10.0, start=time.perf_counter() - 8.0)
    w = Workload("w", "", ("a",), ((4,),))
    from benchmarks.scenarios import SCENARIOS, TORCH_COMPILE

    cell = schedule.Cell(w, "fp32", SCENARIOS["clip"], TORCH_COMPILE, estimate_s=5.0)
    settings = types.SimpleNamespace(compile=runner.CompilePolicy(budget_s=None, spent_s=1.0), clock=clock)
    assert "time budget of 10 s" in runner._compile_skip_reason(settings, cell, remaining_s=0.0)
    cell.estimate_s = 0.5
    assert runner._compile_skip_reason(settings, cell, remaining_s=0.0) is None
    settings.compile.spent_s = 0.0  # no compile ran yet and this cell was not planned first: Inductor's start-up counts
    assert "time budget of 10 s" in runner._compile_skip_reason(settings, cell, remaining_s=0.0)
    settings.compile = runner.CompilePolicy(budget_s=3.0, spent_s=2.8)  # 2.8 + 0.5 > 3
    assert "compile budget of 3 s" in runner._compile_skip_reason(settings, cell, remaining_s=0.0)

    out = tmp_path / "late.json"
    proc = _bench("--quick", "--device", "cpu", "--no-progress", "--no-plot", "--workloads", "gpt2_124m", "--time-budget",
                  "0.001", "--scenarios", "norm", "--out", str(out), timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["results"]
    assert rows and all(r["status"] == "skipped" and "past the run's time budget" in r["note"] for r in rows)


def test_progress_eta_is_the_remaining_estimate_at_the_pace_so_far(capsys):
    w = Workload("w", "", ("a",), ((4,),))
    from benchmarks.scenarios import SCENARIOS, TORCH_FOREACH

    cells = [schedule.Cell(w, "fp32", SCENARIOS["clip"], TORCH_FOREACH, estimate_s=e) for e in (2.0, 3.0, 5.0)]
    clock = schedule.Clock(budget_s=None)
    progress = report.Progress(enabled=True)
    progress.start(cells, clock)
    assert progress.eta_s() == pytest.approx(10.0)  # no evidence yet: the estimates as they are
    clock.record(2.0, 16.0)  # the first cell ran 8x slower than estimated
    progress.advance(cells[0], 16.0)
    pace = (16.0 + clock.PRIOR_S) / (2.0 + clock.PRIOR_S)
    assert progress.eta_s() == pytest.approx(8.0 * pace)
    progress.advance(cells[1], None)  # skipped: its estimate leaves the plan
    assert progress.eta_s() == pytest.approx(5.0 * pace)
    progress.label("w fp32 clip torch:foreach")  # not a terminal: a line with the ETA
    err = capsys.readouterr().err
    assert "2/3 cells" in err and f"ETA {report._duration(5.0 * pace)}" in err


def test_missing_workloads_dir_is_a_clear_error(tmp_path):
    with pytest.raises(WorkloadError, match="no workload files"):
        load_workloads(None, tmp_path / "nowhere")
