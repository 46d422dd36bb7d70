"""``python -m benchmarks.tune``: its plan, its refusals where nothing can be measured, its time budget.

Nothing here measures anything: the CPU has no GPU, so the command must say so and write
nothing; the loop's logic is tested with a fake tuner and a fake clock.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from benchmarks import tune  # noqa: E402
from effnet_kernels.models import depthwise_shapes  # noqa: E402
from effnet_kernels.triton import _tuning, _tuning_store  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def run_cli(args, tmp_path, **env):
    full = {**os.environ, "PYTHONPATH": str(REPO), _tuning_store.CACHE_ENV_VAR: str(tmp_path / "store"), **env}
    full.pop(_tuning_store.MODE_ENV_VAR, None)
    return subprocess.run([sys.executable, "-m", "benchmarks.tune", *args], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour: this machine has a GPU")
def test_on_a_cpu_it_says_there_is_no_gpu_and_writes_nothing(tmp_path):
    out = run_cli(["--models", "b0", "--batches", "2"], tmp_path)
    assert out.returncode == tune.EXIT_NO_GPU == 69
    assert "no CUDA GPU" in out.stderr and "nothing was written" in out.stderr
    assert not (tmp_path / "store").exists()


def test_the_plan_covers_every_depthwise_class_at_every_batch_headline_first(tmp_path):
    out = run_cli(["--models", "b0,b3", "--batches", "256,1", "--dry-run"], tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert str(tmp_path / "store") in lines[-1] and not (tmp_path / "store").exists()
    cases = tune.plan(["b0", "b3"], [256, 1], ["fp16"], ["channels_last"])
    assert [tune.label(tc) for tc in cases] == lines[:-1]
    for batch in (256, 1):
        shapes = {(c.c, c.h, c.w, c.k, c.stride) for c, _, _ in cases if c.n == batch}
        assert shapes == set(depthwise_shapes(["b0", "b3"]))
    batches = [c.n for c, _, _ in cases]
    assert batches == sorted(batches, reverse=True), "batch 256 (the headline) first"
    assert cases[0][0].model == "b0"
    both = tune.plan(["b0"], [8], ["fp16", "bf16"], ["channels_last", "nchw"])
    assert len(both) == 4 * len(depthwise_shapes(["b0"])) and {(d, l) for _, d, l in both} == {
        ("fp16", "channels_last"), ("fp16", "nchw"), ("bf16", "channels_last"), ("bf16", "nchw")}


def test_bad_arguments_are_named(tmp_path):
    for args, name in ((["--jobs", "-1"], "--jobs"), (["--time-budget", "-3"], "--time-budget"),
                       (["--models", "b9"], "--models"), (["--batches", "0"], "--batches")):
        out = run_cli(args + ["--dry-run"], tmp_path)
        assert out.returncode == 2 and name in out.stderr, (args, out.stderr)


def test_refusals_when_nothing_would_be_kept(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(_tuning.TUNE_ENV_VAR, raising=False)
    monkeypatch.delenv(_tuning_store.MODE_ENV_VAR, raising=False)
    cuda = torch.device("cuda")
    assert tune.refusal(cuda) == (0, "")
    assert tune.refusal(torch.device("cpu"))[0] == tune.EXIT_NO_GPU
    monkeypatch.setenv(_tuning_store.MODE_ENV_VAR, "ro")
    code, reason = tune.refusal(cuda)
    assert code == tune.EXIT_NOT_KEPT and "'ro'" in reason
    monkeypatch.setenv(_tuning_store.MODE_ENV_VAR, "rw")
    monkeypatch.setenv(_tuning.TUNE_ENV_VAR, "0")
    assert tune.refusal(cuda)[0] == tune.EXIT_NOT_KEPT
    monkeypatch.delenv(_tuning.TUNE_ENV_VAR)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tune.refusal(cuda)[0] == tune.EXIT_NO_GPU


def test_the_loop_stops_at_its_time_budget_and_survives_a_failing_shape(monkeypatch):
    """Fake tuner, fake clock: each shape takes 10 s."""
    now = [0.0]
    monkeypatch.setattr(tune.time, "perf_counter", lambda: now[0])
    cases = tune.plan(["b0"], [4], ["fp16"], ["channels_last"])[:6]
    seen, log = [], []

    def tune_one(tc):
        seen.append(tc)
        now[0] += 10.0
        if len(seen) == 2:
            raise RuntimeError("out of resources\nmore")
        return "tuned" if len(seen) % 2 else "store"

    counts = tune.run_plan(cases, tune_one, 25.0, log.append)
    assert seen == cases[:3], "starts no shape after 25 s"
    assert counts == {"tuned": 2, "failed": 1, "not run": 3}
    assert "failed: out of resources" in log[1] and "3 shapes not tuned" in log[-1]
    now[0] = 0.0
    assert tune.run_plan(cases, lambda tc: "fixed", 0.0, log.append) == {"fixed": 6}, "0 = no limit"


def test_compile_only_runs_every_candidate_once_and_keeps_nothing(monkeypatch, tmp_path):
    import triton.testing

    from effnet_kernels.triton._tuning import Config

    def no_timing(*a, **k):
        raise AssertionError("compile-only must not time")

    monkeypatch.setattr(triton.testing, "do_bench", no_timing)
    monkeypatch.setattr(_tuning, "tuning_enabled", lambda t: True)
    monkeypatch.setattr(_tuning, "interpreted", lambda t: False)
    monkeypatch.setattr(_tuning_store, "device_identity", lambda t: _tuning_store.Identity("G", (9, 0), "3.6.0"))
    monkeypatch.setenv(_tuning_store.CACHE_ENV_VAR, str(tmp_path))
    _tuning.clear_cache()
    ran = []
    a, b = Config(16, 16), Config(32, 32)
    _tuning.set_compile_only(True)
    try:
        assert _tuning.choose("k", torch.empty(1), lambda: ([a, b], b), ran.append, kernel_version="v") == b
    finally:
        _tuning.set_compile_only(False)
    assert ran == [a, b] and "k" not in _tuning._cache and not list(tmp_path.rglob("*.json"))
    _tuning.clear_cache()


# --- provenance: the triton_tune column says where a row's configs came from --------------------------

def test_tuning_state_names_the_store_mode_and_the_config_sources(monkeypatch):
    from benchmarks import env

    monkeypatch.delenv(_tuning.TUNE_ENV_VAR, raising=False)
    monkeypatch.delenv(_tuning.BUDGET_ENV_VAR, raising=False)
    monkeypatch.delenv(_tuning_store.MODE_ENV_VAR, raising=False)
    assert env.triton_tuning_state() == "on budget=30" == env.triton_tuning_state({})
    assert env.triton_tuning_state({"store": 12, "default": 1}) == "on budget=30 classes=store:12,default:1"
    monkeypatch.setenv(_tuning_store.MODE_ENV_VAR, "ro")
    monkeypatch.setenv(_tuning.TUNE_ENV_VAR, "0")
    assert env.triton_tuning_state({"store": 3}) == "off store=ro classes=store:3"


def test_an_op_benchmark_row_records_the_classes_its_triton_launches_used(tmp_path, monkeypatch):
    """A real (interpreted) Triton launch through ``benchmarks.ops``: the interpreter never times, so
    its one shape class is ``default``; the eager row launched no Triton kernel."""
    from benchmarks import ops
    from benchmarks.records import read_rows
    from effnet_kernels import backends

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(_tuning.TUNE_ENV_VAR, raising=False)
    monkeypatch.delenv(_tuning.BUDGET_ENV_VAR, raising=False)
    monkeypatch.delenv(_tuning_store.MODE_ENV_VAR, raising=False)
    backends._reset_caches()  # availability is cached: recompute it with the interpreter on
    _tuning.clear_cache()
    out = tmp_path / "ops.csv"
    argv = ["--models", "b0", "--batch", "1", "--resolution", "16", "--limit", "1", "--ops", "dwconv",
            "--providers", "eager,triton", "--device", "cpu", "--dtypes", "fp32", "--copy-mb", "1",
            "--warmup-s", "0", "--min-time-s", "0", "--min-iters", "1", "--max-iters", "1", "--out", str(out),
            "--quiet"]
    assert ops.main(argv) == 0
    rows = {r["provider"]: r for r in read_rows(out)}
    assert rows["triton"]["status"] == "ok", rows["triton"]["status"]
    assert rows["triton"]["triton_tune"] == "on budget=30 classes=default:1"
    assert rows["eager"]["triton_tune"] == "on budget=30"
    _tuning.clear_cache()
    monkeypatch.undo()
    backends._reset_caches()


def test_network_rows_record_each_jobs_config_sources(tmp_path, monkeypatch):
    from benchmarks import models, network
    from benchmarks.records import read_rows

    from .test_bench_records import TinyNet, cpu_network_argv

    usages = iter([{"store": 5, "fixed": 2}, {}])
    monkeypatch.setattr(network, "triton_usage", lambda: next(usages))
    monkeypatch.setitem(models._BUILDERS, "net", lambda: (TinyNet(), 8))
    monkeypatch.delenv(_tuning.TUNE_ENV_VAR, raising=False)
    monkeypatch.delenv(_tuning.BUDGET_ENV_VAR, raising=False)
    monkeypatch.delenv(_tuning_store.MODE_ENV_VAR, raising=False)
    out = tmp_path / "r.csv"
    assert network.main(cpu_network_argv(out, "eager,eager-folded")) == 0
    tunes = [r["triton_tune"] for r in read_rows(out)]
    assert tunes == ["on budget=30 classes=store:5,fixed:2", "on budget=30"]


def test_compile_workers_run_at_once_failures_are_logged_and_stragglers_stopped(tmp_path):
    """Fake workers: share 0 fails, share 1 hangs, share 2 finishes; all three start together."""
    import time

    script = tmp_path / "worker.py"
    script.write_text(
        "import sys, time, pathlib\n"
        f"pathlib.Path({str(tmp_path)!r}, 'started-' + sys.argv[-1].replace('/', '-')).touch()\n"
        "i = sys.argv[-1].split('/')[0]\n"
        "if i == '0':\n    print('noise\\nboom: out of resources', file=sys.stderr); sys.exit(3)\n"
        "if i == '1':\n    time.sleep(60)\n")
    log = []
    t0 = time.monotonic()
    tune.compile_in_workers([sys.executable, str(script)], 3, 3.0, log.append)
    assert time.monotonic() - t0 < 30
    assert sorted(p.name for p in tmp_path.glob("started-*")) == ["started-0-3", "started-1-3", "started-2-3"]
    assert log[0] == "compile worker 0: exit 3: boom: out of resources"
    assert log[1].startswith("compile worker 1: stopped after 3 s") and len(log) == 2


def test_main_compiles_in_workers_then_times_every_shape_in_order(monkeypatch, capsys):
    """main()'s wiring with the GPU parts faked: the workers get the same arguments and half the budget,
    then every shape of the plan is tuned here, with the per-process tuning budget lifted."""
    calls, tuned = [], []
    monkeypatch.setattr(tune, "refusal", lambda device: (0, ""))
    monkeypatch.setattr(tune, "compile_in_workers", lambda cmd, jobs, seconds, log: calls.append((cmd, jobs, seconds)))
    monkeypatch.setattr(tune, "tune_case", lambda tc, device: tuned.append(tc) or "tuned")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setenv(_tuning.BUDGET_ENV_VAR, "30")
    argv = ["--models", "b0", "--batches", "2", "--jobs", "2", "--time-budget", "100"]
    assert tune.main(argv) == 0
    ((cmd, jobs, seconds),) = calls
    assert cmd[1:] == ["-m", "benchmarks.tune", *argv] and (jobs, seconds) == (2, 50.0)
    assert tuned == tune.plan(["b0"], [2], ["fp16"], ["channels_last"])
    assert os.environ[_tuning.BUDGET_ENV_VAR] == "inf"
    assert f"{len(tuned)} shapes on Fake GPU: {len(tuned)} tuned" in capsys.readouterr().err
