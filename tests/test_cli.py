"""``python -m effnet_kernels`` info / demo / bench on a machine without a GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from effnet_kernels import __main__ as cli


def test_info_lists_every_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("torch: available", "triton:", "cuda:"):
        assert name in out
    assert f"torch   {torch.__version__}" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU wording")
def test_demo_says_no_gpu_and_reports_parity(capsys):
    assert cli.main(["demo", "--batch", "2", "--resolution", "64", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "No GPU is visible" in out
    assert "16 blocks fused" in out
    lines = [line for line in out.splitlines() if "rel. error vs fp64" in line]
    assert len(lines) == 2 and all("parity ok" in line for line in lines), out
    errors = [float(line.split("vs fp64 ")[1].split()[0]) for line in lines]
    assert max(errors) < 1e-4
    sens = [float(line.split("output by ")[1].split()[0]) for line in out.splitlines() if "unrelated input" in line]
    assert len(sens) == 2 and min(sens) > 1e-2  # the demo's models depend on their input


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU wording")
def test_negative_control_demo_reports_a_planted_defect(capsys):
    from .defects import planted

    with planted("gate_skew"):
        assert cli.main(["demo", "--batch", "2", "--resolution", "64", "--repeats", "1"]) == 1
    assert "parity FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("argv, named", [
    (["--batch", "1"], "--batch must be at least 2"),
    (["--resolution", "16"], "--resolution must be at least 32"),
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--batch", "2", "--resolution", "32"], "on 2 values per channel"),
])
def test_demo_refuses_arguments_that_make_the_check_blind(argv, named, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", *argv])
    assert exc.value.code == 2 and named in capsys.readouterr().err


def test_the_smallest_allowed_demo_runs(capsys):
    """batch 8 at 32 px: 8 values per channel at the last stage, the least the check allows."""
    assert cli.main(["demo", "--batch", "8", "--resolution", "32", "--repeats", "1"]) == 0
    assert "parity ok" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_bench_without_gpu_runs_the_demo(monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(cli, "cmd_demo", lambda args: seen.setdefault("demo", args) and 0)
    assert cli.main(["bench", "--models", "b0"]) == 0
    assert "demo" in seen
    assert "the benchmark needs a CUDA GPU" in capsys.readouterr().out


def test_unknown_command_fails():
    proc = subprocess.run([sys.executable, "-m", "effnet_kernels", "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
