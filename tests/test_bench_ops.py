"""benchmarks.ops / op_cases: shapes, minimum bytes, the gate and the CSV, on the CPU."""

import pytest
import torch

from benchmarks import op_cases, ops
from benchmarks.op_cases import OpCase
from benchmarks.records import OPS_COLUMNS, read_rows
from benchmarks.timing import TimingConfig

FAST = TimingConfig(warmup_iters=1, warmup_s=0.0, min_time_s=0.0, min_iters=2, max_iters=3)


def test_min_bytes_hand_computed():
    dw = OpCase("dwconv", "b0", 2, 8, 10, 10, k=3, stride=2)
    assert (dw.ho, dw.wo) == (5, 5)
    assert dw.min_bytes(2) == 2 * 8 * 100 * 2 + 2 * 8 * 25 * 2 + 2 * 8 * 4
    se = OpCase("se", "b0", 2, 8, 5, 5, reduced=2)
    assert se.min_bytes(4) == 2 * (2 * 8 * 25 * 4) + 2 * 8 * 4
    assert dw.shape == "2x8x10x10/k3s2" and se.shape == "2x8x5x5/r2"


def test_cases_cover_b0_without_duplicates():
    cases = op_cases.cases_for_models(["b0", "b0"], batch=4)
    keys = [(c.op, c.c, c.h, c.w, c.k, c.stride, c.reduced) for c in cases]
    assert len(keys) == len(set(keys))
    dws = [c for c in cases if c.op == "dwconv"]
    assert dws[0] == OpCase("dwconv", "b0", 4, 32, 112, 112, 3, 1)  # first block: 32 ch at 112x112
    assert {c.k for c in dws} == {3, 5} and {c.stride for c in dws} == {1, 2}
    assert all(c.reduced >= 1 for c in cases if c.op == "se")
    with pytest.raises(ValueError, match="ops"):
        op_cases.cases_for_models(["b0"], 1, ops=["conv"])


@pytest.mark.parametrize("case", [
    OpCase("dwconv", "t", 2, 5, 7, 6, k=5, stride=2),
    OpCase("se", "t", 2, 6, 4, 3, reduced=2),
])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_eager_and_fused_match_reference_and_rows(case, dtype):
    rows = ops.run_case(case, dtype, "channels_last", ["eager", "torch"], torch.device("cpu"), FAST, 10.0)
    assert [r["provider"] for r in rows] == ["eager", "torch"]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["min_bytes"] == case.min_bytes(4 if dtype == "fp32" else 2)
        assert r["gb_per_s"] == pytest.approx(r["min_bytes"] / (r["us_p50"] * 1e-6) / 1e9)
        assert r["frac_of_copy"] == pytest.approx(r["gb_per_s"] / 10.0)
        assert r["max_rel_err"] < (1e-5 if dtype == "fp32" else 2e-2)
    assert rows[0]["speedup_vs_eager"] == 1.0
    assert rows[1]["speedup_vs_eager"] == pytest.approx(rows[0]["us_p50"] / rows[1]["us_p50"])


def test_gate_rejects_a_wrong_op(monkeypatch):
    real = op_cases.make_call

    def wrong_for_torch(case, provider, inp):
        call = real(case, provider, inp)
        if provider != "torch":
            return call
        return lambda: (call()[0] * 1.01, call()[1])

    monkeypatch.setattr(ops, "make_call", wrong_for_torch)
    case = OpCase("dwconv", "t", 1, 4, 6, 6)
    rows = ops.run_case(case, "fp32", "nchw", ["torch"], torch.device("cpu"), FAST, 1.0)
    assert len(rows) == 1  # eager timed only as the baseline
    assert rows[0]["status"].startswith("failed: output differs from eager")
    assert "us_p50" not in rows[0]


def test_unavailable_backend_is_skipped():
    case = OpCase("se", "t", 1, 4, 3, 3, reduced=1)
    rows = ops.run_case(case, "fp32", "channels_last", ["eager", "cuda"], torch.device("cpu"), FAST, 1.0)
    assert rows[1]["status"].startswith("skipped: ") and "cuda" in rows[1]["status"]


def test_main_appends_csv(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFNET_COMMIT", "c0ffee")
    out = tmp_path / "ops.csv"
    argv = ["--models", "b0", "--batch", "1", "--resolution", "16", "--limit", "2", "--dtypes", "fp32",
            "--providers", "eager,torch", "--device", "cpu", "--out", str(out), "--copy-mb", "1",
            "--warmup-s", "0", "--min-time-s", "0", "--min-iters", "2", "--max-iters", "2", "--quiet"]
    assert ops.main(argv) == 0
    rows = read_rows(out)
    assert list(rows[0]) == list(OPS_COLUMNS)
    assert [(r["op"], r["provider"]) for r in rows] == [("dwconv", "eager"), ("dwconv", "torch"),
                                                         ("se", "eager"), ("se", "torch")]
    assert {r["commit"] for r in rows} == {"c0ffee"} and {r["status"] for r in rows} == {"ok"}


def test_main_time_budget_stops_before_running(tmp_path):
    out = tmp_path / "ops.csv"
    argv = ["--models", "b0", "--batch", "1", "--resolution", "16", "--dtypes", "fp32", "--providers", "eager",
            "--device", "cpu", "--out", str(out), "--copy-mb", "1", "--time-budget", "1e-9", "--quiet"]
    assert ops.main(argv) == 0
    assert not out.exists()


def _aten_ops(fn) -> list[str]:
    """The aten overloads ``fn()`` dispatches (names like ``mean.dim``), in call order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


POOLS = {"mean", "sum", "avg_pool2d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_se_reuses_the_mean_the_eager_dwconv_chain_computed(dtype):
    # the pool is timed once, in the dwconv chain, on both sides: the eager SE baseline is
    # reduce/expand + sigmoid + mul on that mean, never a second pass over y
    gen = torch.Generator("cpu").manual_seed(0)
    dw = OpCase("dwconv", "t", 2, 6, 8, 8, k=3, stride=1)
    dw_ops = _aten_ops(op_cases.make_call(dw, "eager", op_cases.make_inputs(dw, dtype, torch.channels_last, torch.device("cpu"), gen)))
    assert [o for o in dw_ops if o in POOLS] == ["mean"], dw_ops
    se = OpCase("se", "t", 2, 6, 8, 8, reduced=2)
    inp = op_cases.make_inputs(se, dtype, torch.channels_last, torch.device("cpu"), gen)
    se_ops = _aten_ops(op_cases.make_call(se, "eager", inp))
    assert not POOLS & set(se_ops), se_ops
    assert se_ops.count("convolution") == 2 and {"silu", "sigmoid", "mul"} <= set(se_ops), se_ops
    # the mean it starts from is exactly what the eager dwconv chain returns for its y
    dw_inp = op_cases.make_inputs(dw, dtype, torch.channels_last, torch.device("cpu"), gen)
    y, mean = op_cases.make_call(dw, "eager", dw_inp)()
    assert mean.dtype == y.dtype and mean.shape == (2, 6, 1, 1)
    assert inp["pooled_eager"].dtype == dtype and inp["pooled_eager"].shape == (2, 6, 1, 1)
    torch.testing.assert_close(inp["pooled_eager"], inp["x"].mean((2, 3), keepdim=True), rtol=0, atol=0)
    # and both sides of the dwconv comparison still pass the gate on their means
    rows = ops.run_case(dw, "fp32" if dtype == torch.float32 else "bf16", "nchw", ["eager", "torch"],
                        torch.device("cpu"), FAST, 1.0)
    assert [r["status"] for r in rows] == ["ok", "ok"], rows


def test_gate_checks_the_eager_dwconv_means_too(monkeypatch):
    real = op_cases.make_call

    def wrong_eager_mean(case, provider, inp):
        call = real(case, provider, inp)
        if provider != "eager":
            return call
        return lambda: (call()[0], call()[1] * 1.05)

    monkeypatch.setattr(ops, "make_call", wrong_eager_mean)
    rows = ops.run_case(OpCase("dwconv", "t", 1, 4, 6, 6), "fp32", "nchw", ["eager"], torch.device("cpu"), FAST, 1.0)
    assert rows[0]["status"].startswith("failed: output differs from eager"), rows


def test_cudnn_benchmark_is_on_for_cuda_runs(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    ops.configure_device(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    ops.configure_device(torch.device("cuda"))
    assert torch.backends.cudnn.benchmark is True
    # main() sets it before anything runs (a CUDA run with nothing to time: no GPU needed)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    seen = {}

    def versions(device):
        seen["bench"] = torch.backends.cudnn.benchmark  # the first thing main() does on the device
        return {}

    monkeypatch.setattr(ops, "collect_versions", versions)
    monkeypatch.setattr(ops, "measure_copy_bandwidth", lambda device, nbytes: 1.0)
    monkeypatch.setattr(ops, "cases_for_models", lambda *a, **k: [])
    assert ops.main(["--models", "b0", "--device", "cuda", "--out", str(tmp_path / "ops.csv"), "--quiet"]) == 0
    assert seen == {"bench": True} and torch.backends.cudnn.benchmark is True
