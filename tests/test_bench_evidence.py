"""The benchmark's correctness gate can fail: calibrated models, negative controls, sensitivity.

Issue #8: with random BatchNorm statistics a provider fed zeros passed the gate. Here the
gate must reject wrong providers (zeros, another input buffer) in fp32 and bf16, fused
providers with a planted defect (each of the network, fp32 and block-wise checks on its
own), and refuse to time a model whose output does not depend on its input.
"""

import pytest
import torch
from torch import nn

from benchmarks import gate, jobs, models, network, providers
from benchmarks.records import read_rows
from tests.defects import planted

pytest.importorskip("efficientnet_pytorch")

FAST = ["--device", "cpu", "--copy-mb", "1", "--warmup-iters", "1", "--warmup-s", "0", "--min-time-s", "0",
        "--min-iters", "2", "--max-iters", "2", "--quiet", "--buffers", "2"]


class FedZeros(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.zeros_like(x))


class FedOther(nn.Module):
    """Runs the model on another (fixed, random) input buffer of the same shape."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        gen = torch.Generator().manual_seed(12345)
        return self.inner(torch.randn(x.shape, generator=gen).to(x))


class Blind(nn.Module):
    """Output almost independent of the input: what random BatchNorm statistics gave B0."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 5)
        self.register_buffer("logits", torch.linspace(1.0, 2.0, 5))

    def forward(self, x):
        y = self.head(self.bn(self.conv(x)).mean((2, 3)))
        return self.logits + 1e-7 * y


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for p in (providers.Provider("zeros", lambda m, d: FedZeros(m)), providers.Provider("other", lambda m, d: FedOther(m))):
        monkeypatch.setitem(providers.PROVIDERS, p.name, p)
    monkeypatch.setitem(models._BUILDERS, "blind", lambda: (Blind(), 8))
    monkeypatch.setenv("EFFNET_COMMIT", "testcommit")
    yield
    torch.set_num_threads(threads)


def _run(tmp_path, providers_, dtypes="fp32", model="tiny", name="r.csv"):
    out = tmp_path / name
    argv = ["--models", model, "--batches", "2", "--dtypes", dtypes, "--providers", providers_, "--out", str(out)] + FAST
    code = network.main(argv)
    return code, {(r["provider"], r["dtype"]): r for r in read_rows(out)}


def test_tiny_is_calibrated_and_sensitive():
    model, res = models.build_model("tiny")
    x = models.calibration_batch(res, "cpu")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    # running stats are those of the calibration batch, not the defaults (0 / 1) nor random
    first = bns[0]
    assert not torch.allclose(first.running_var, torch.ones_like(first.running_var))
    assert float(gate.rel_err(model(x[:2]), model(torch.randn_like(x[:2])))) > 0.3


def test_gate_rejects_zeros_and_another_buffer_and_passes_eager_and_fused(tmp_path):
    code, rows = _run(tmp_path, "eager,zeros,other,fused-torch", "fp32,bf16")
    assert code == 1
    for dtype in ("fp32", "bf16"):
        for bad in ("zeros", "other"):
            r = rows[(bad, dtype)]
            assert r["status"].startswith("failed: output differs from eager"), r
            assert float(r["max_rel_err"]) > 0.3 and r["img_per_s"] == ""
        for good in ("eager", "fused-torch"):
            r = rows[(good, dtype)]
            assert r["status"] == "ok", r
            assert float(r["sensitivity"]) > gate.SENSITIVITY_MARGIN * float(r["checks"].split("<=")[1].split(";")[0])
        fused = rows[("fused-torch", dtype)]["checks"]
        assert "fp32 " in fused and "blocks 7/7 ok" in fused, fused
    assert float(rows[("fused-torch", "fp32")]["max_rel_err"]) < 1e-5


@pytest.mark.parametrize("defect", ["gate_skew", "pad_shift"])
def test_gate_rejects_fused_provider_with_planted_defect(tmp_path, defect):
    with planted(defect):
        code, rows = _run(tmp_path, "fused-torch", "fp32")
    assert code == 1
    assert rows[("fused-torch", "fp32")]["status"].startswith("failed: "), rows


def test_fp32_gate_and_blockwise_each_reject_a_gate_skew_on_their_own(tmp_path, monkeypatch):
    """With the network gate made blind, the fp32 gate catches a 1% SE-gate skew; with the fp32
    gate made blind too, the block-wise check does."""
    monkeypatch.setitem(gate.FLOOR, "bf16", 1e3)
    with planted("gate_skew"):
        code, rows = _run(tmp_path, "fused-torch", "bf16", name="a.csv")
    status = rows[("fused-torch", "bf16")]["status"]
    assert code == 1 and status.startswith("failed: fp32 gate: rel err"), status
    assert float(status.split("rel err ")[1].split()[0]) > 1e3 * gate.FP32_TIGHT
    monkeypatch.setattr(gate, "FP32_TIGHT", 1e3)
    with planted("gate_skew"):
        code, rows = _run(tmp_path, "fused-torch", "bf16", name="b.csv")
    status = rows[("fused-torch", "bf16")]["status"]
    assert code == 1 and status.startswith("failed: blockwise: "), status
    # the same loosened gates pass the clean kernels (but call the model blind: limits of 1e3)
    code, rows = _run(tmp_path, "fused-torch", "bf16", name="c.csv")
    assert rows[("fused-torch", "bf16")]["status"].startswith("failed: insensitive"), rows


def test_fp32_tolerance_has_room_over_correct_kernels_and_rejects_a_one_percent_skew():
    model, res = models.build_model("tiny")
    import copy

    import effnet_kernels

    fused = effnet_kernels.convert(copy.deepcopy(model), backend="torch")
    x = torch.randn(2, 3, res, res)
    with torch.no_grad():
        ref = model(x)
        clean = gate.check_fp32(fused(x), ref)
        with planted("squeeze_skew"):  # the smallest effect of the planted 1% defects
            skewed = gate.check_fp32(fused(x), ref)
    assert clean.ok and clean.err * 3 < gate.FP32_TIGHT, clean
    assert not skewed.ok and skewed.err > 10 * skewed.limit, skewed


def test_insensitive_model_gets_failed_rows_not_timings(tmp_path):
    code, _ = _run(tmp_path, "eager,eager@nchw", "fp32", model="blind")
    rows = read_rows(tmp_path / "r.csv")
    assert code == 1 and sorted(r["layout"] for r in rows) == ["channels_last", "nchw"]
    for r in rows:
        assert r["status"].startswith("failed: insensitive: an unrelated input moves the eager fp32 output by"), r
        assert r["img_per_s"] == "" and float(r["sensitivity"]) < 1e-5


def test_sticky_cuda_errors_are_recognised():
    assert jobs.is_sticky_cuda_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert jobs.is_sticky_cuda_error(RuntimeError("Triton Error [CUDA]: unspecified launch failure"))
    assert jobs.is_sticky_cuda_error(RuntimeError("CUDA error: device-side assert triggered"))
    wrapped = ValueError("dwconv failed")
    wrapped.__cause__ = RuntimeError("CUDA error: misaligned address")
    assert jobs.is_sticky_cuda_error(wrapped)
    assert not jobs.is_sticky_cuda_error(RuntimeError("shape mismatch"))
    assert not jobs.is_sticky_cuda_error(torch.cuda.OutOfMemoryError("CUDA out of memory"))
