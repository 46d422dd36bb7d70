"""The benchmark runners on a real GPU: CUDA events, CUDA graphs, fused providers (``-m gpu``)."""

import pytest
import torch

from benchmarks import network, ops
from benchmarks.op_cases import OpCase
from benchmarks.records import read_rows
from benchmarks.timing import TimingConfig

pytestmark = pytest.mark.gpu

FAST = ["--copy-mb", "256", "--warmup-iters", "2", "--warmup-s", "0", "--min-time-s", "0.05",
        "--min-iters", "5", "--max-iters", "20", "--quiet"]


def test_network_runner_on_gpu(tmp_path):
    out = tmp_path / "r.csv"
    argv = ["--models", "b0", "--resolution", "64", "--batches", "1,4", "--dtypes", "fp16,fp32",
            "--providers", "eager,eager@nchw,fused-triton,fused-cuda", "--device", "cuda", "--out", str(out)] + FAST
    network.main(argv)
    rows = read_rows(out)
    assert len(rows) == 2 * 4 + 2 * 4 * 2  # batch 4: infer; batch 1: infer + infer-graph
    for r in rows:
        assert not r["status"].startswith("failed"), r
        if r["provider"] == "eager":
            assert r["status"] == "ok", r
    for r in rows:
        if r["status"] == "ok":
            assert float(r["img_per_s"]) > 0 and float(r["peak_mem_mb"]) > 0
            assert float(r["copy_gb_per_s"]) > 100  # any current GPU copies faster than this
            assert r["gpu"] == torch.cuda.get_device_name()


@pytest.mark.parametrize("case", [
    OpCase("dwconv", "b0", 8, 96, 56, 56, 3, 2), OpCase("se", "b0", 8, 144, 28, 28, reduced=6),
    OpCase("pointwise", "b0", 8, 24, 56, 56, cout=144, activation="silu"),
    OpCase("pointwise", "b0", 8, 144, 56, 56, cout=24, gate=True, residual=True),
], ids=lambda c: f"{c.op}-{c.shape}")
def test_op_runner_on_gpu(case):
    cfg = TimingConfig(warmup_iters=2, warmup_s=0.0, min_time_s=0.02, min_iters=5, max_iters=20)
    rows = ops.run_case(case, "fp16", "channels_last", ["eager", "triton", "cuda"], torch.device("cuda"), cfg, 3000.0)
    assert rows[0]["status"] == "ok"
    for r in rows:
        assert not r["status"].startswith("failed"), r


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_network_gate_passes_clean_kernels_and_rejects_planted_defects_on_gpu(tmp_path, backend):
    """The fused providers' network / fp32 / block-wise checks on real kernels: clean passes,
    a 1% SE-gate skew and a one-pixel padding shift fail."""
    from tests.defects import planted

    argv = ["--models", "b0", "--resolution", "64", "--batches", "4", "--dtypes", "fp16",
            "--providers", f"fused-{backend}", "--device", "cuda"] + FAST
    clean = tmp_path / "clean.csv"
    network.main(argv + ["--out", str(clean)])
    (row,) = read_rows(clean)
    if row["status"].startswith("skipped"):
        pytest.skip(row["status"])
    assert row["status"] == "ok" and "blocks 16/16 ok" in row["checks"], row
    for defect in ("gate_skew", "pad_shift"):
        out = tmp_path / f"{defect}.csv"
        with planted(defect, backend=backend):
            assert network.main(argv + ["--out", str(out)]) == 1
        (row,) = read_rows(out)
        assert row["status"].startswith("failed: "), (defect, row)


def test_eager_folded_on_gpu(tmp_path):
    out = tmp_path / "r.csv"
    argv = ["--models", "b0", "--resolution", "64", "--batches", "4", "--dtypes", "fp16,fp32",
            "--providers", "eager,eager-folded", "--device", "cuda", "--out", str(out)] + FAST
    assert network.main(argv) == 0
    rows = read_rows(out)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), rows
    assert all(r["note"].endswith("49 BatchNorms folded") for r in rows if r["provider"] == "eager-folded")
