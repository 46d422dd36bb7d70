"""benchmarks/microbench runs (on the CPU with MICROBENCH_DEVICE=cpu) and writes GB/s into the JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.environments import child_pytest_env

ROOT = Path(__file__).resolve().parent.parent


def test_microbench_smoke_on_cpu(tmp_path):
    pytest.importorskip("pytest_benchmark")
    out = tmp_path / "mb.json"
    env = child_pytest_env(MICROBENCH_DEVICE="cpu", MICROBENCH_MODELS="b0", MICROBENCH_BATCH="1",
                           MICROBENCH_DTYPE="fp32", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/microbench",
           "-k", "(se-1x96x56x56 and not pointwise) or dwconv-1x96x112x112 or pointwise-1x16x112x112",
           f"--benchmark-json={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    benches = json.loads(out.read_text())["benchmarks"]
    assert {(b["extra_info"]["op"], b["extra_info"]["provider"]) for b in benches} == {
        ("se", "eager"), ("se", "torch"), ("dwconv", "eager"), ("dwconv", "torch"),
        ("pointwise", "eager"), ("pointwise", "torch")}
    assert {b["extra_info"]["shape"] for b in benches if b["extra_info"]["op"] == "pointwise"} == {"1x16x112x112/o96/silu"}
    for b in benches:
        info = b["extra_info"]
        assert info["gb_per_s"] == pytest.approx(info["min_bytes"] / b["stats"]["median"] / 1e9)
        assert info["max_rel_err"] < 1e-5
        assert b["stats"]["rounds"] == 50
