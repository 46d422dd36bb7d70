"""scripts/gpu_session.sh and its pytest deadline plugin, simulated on the CPU.

The one GPU call is the scarcest resource: every step's command line must parse, every
step must leave its log, $OUT must hold only what the device tool returns (at most 8
files, plain names, no deeper than 2 folders), and a test step that runs out of time
must still write its JUnit XML.
"""

import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_session.sh"


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _fake_nvidia_smi(bin_dir: Path) -> None:
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\ncase "$*" in *query-gpu*) echo 580.00.00;; *) echo "fake nvidia-smi";; esac\n')
    smi.chmod(0o755)


def test_session_runs_every_step_and_returns_what_the_device_tool_can_fetch(tmp_path):
    _fake_nvidia_smi(tmp_path / "bin")
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "OUT": str(out),
        "PYTHON": sys.executable,
        "EFFNET_COMMIT": "cafe1234",
        "STEPS": "env,tests,ops,net256,compile,net1",
        # every network step parses its full command line and prints its plan
        "NET_ARGS": "--dry-run",
        "PYTEST_ARGS": "-k test_bench_gpu",
        "PYTEST_WORKERS": "0",  # xdist: see test_deadline_plugin_works_under_xdist
        "OPS_ARGS": "--models b0 --ops se --limit 1 --batch 1 --dtypes fp32 --device cpu --copy-mb 1 "
                    "--warmup-s 0 --min-time-s 0 --min-iters 1 --max-iters 2 --quiet",
        "SESSION_BUDGET": "400",
    }
    env.pop("EFFNET_PYTEST_DEADLINE", None)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    assert "commit cafe1234" in summary
    for step in ("env", "tests", "ops", "net256", "compile", "net1"):
        assert re.search(rf"^{step}\s+rc=0\b", summary, re.M), summary
    # what comes back from $OUT: at most 8 plain files with plain names
    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    assert len(files) <= 8
    assert {"summary.txt", "logs.tar.gz", "junit_gpu.xml", "ops.csv"} <= set(files)
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs = {Path(m.name).name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
    assert set(logs) == {f"{s}.log" for s in ("env", "tests", "ops", "net256", "compile", "net1")}
    assert "fake nvidia-smi" in logs["env.log"] and "commit cafe1234" in logs["env.log"]
    # the default subset: eager + fused for B0-B7 at 256 and 1, torch.compile for B0 only
    fused = "providers=['eager@channels_last', 'fused-triton@channels_last', 'fused-cuda@channels_last']"
    assert "24 jobs" in logs["net256.log"] and fused in logs["net256.log"] and "batches=[256]" in logs["net256.log"]
    assert "1 jobs: models=['b0'] batches=[256]" in logs["compile.log"] and "compile@channels_last" in logs["compile.log"]
    assert "24 jobs" in logs["net1.log"] and fused in logs["net1.log"] and "batches=[1]" in logs["net1.log"]
    assert all(f"{out}/results.csv" in logs[f"{s}.log"] for s in ("net256", "compile", "net1"))


def test_session_skips_steps_once_the_budget_is_used_up(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "EFFNET_COMMIT": "x",
           "STEPS": "net256,net1", "SESSION_BUDGET": "20", "NET_ARGS": "--dry-run"}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    assert re.search(r"^net256\s+skipped: session budget used up", summary, re.M), summary


def _run_pytest(tmp_path: Path, deadline: float | str | None) -> tuple[subprocess.CompletedProcess, str]:
    # test_first runs past the deadline (it moves the deadline to "now" when it has none:
    # deterministic however slowly pytest starts); test_second would start after it
    (tmp_path / "test_slow.py").write_text(
        "import os, time\n"
        "def test_first():\n"
        "    if os.environ.get('EFFNET_PYTEST_DEADLINE') == 'at-first-test':\n"
        "        os.environ['EFFNET_PYTEST_DEADLINE'] = str(time.time())\n"
        "    time.sleep(0.1)\n"
        "def test_second():\n    pass\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("EFFNET_PYTEST_DEADLINE", None)
    if deadline is not None:
        env["EFFNET_PYTEST_DEADLINE"] = str(deadline)
    junit = tmp_path / "junit.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "benchmarks.pytest_deadline",
         f"--junitxml={junit}", "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_slow.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return proc, junit.read_text() if junit.exists() else ""


def test_deadline_plugin_skips_tests_that_would_start_late_and_junit_is_written(tmp_path):
    proc, junit = _run_pytest(tmp_path, "at-first-test")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 1 skipped" in proc.stdout
    assert "not run: session deadline passed" in proc.stdout
    assert "1 tests not run: the session deadline" in proc.stdout
    assert 'tests="2"' in junit and 'skipped="1"' in junit


@pytest.mark.parametrize("deadline", [None, "far"])
def test_deadline_plugin_is_inert_without_a_passed_deadline(tmp_path, deadline):
    proc, junit = _run_pytest(tmp_path, None if deadline is None else time.time() + 3600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout and "deadline" not in proc.stdout


def test_deadline_plugin_works_under_xdist(tmp_path):
    pytest.importorskip("xdist")
    (tmp_path / "test_x.py").write_text("def test_a():\n    pass\n\ndef test_b():\n    pass\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "EFFNET_PYTEST_DEADLINE": str(time.time() - 1)}
    junit = tmp_path / "junit.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", "-p", "benchmarks.pytest_deadline",
         f"--junitxml={junit}", "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_x.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 tests not run: the session deadline" in proc.stdout
    assert 'skipped="2"' in junit.read_text()
