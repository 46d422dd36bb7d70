"""benchmarks.network: argument parsing, CSV rows, the correctness gate, on the CPU."""

import math

import pytest
import torch
from torch import nn

from benchmarks import models, network, providers
from benchmarks.records import NETWORK_COLUMNS, read_rows

FAST = ["--device", "cpu", "--copy-mb", "1", "--warmup-iters", "1", "--warmup-s", "0", "--min-time-s", "0",
        "--min-iters", "2", "--max-iters", "3", "--quiet", "--buffers", "2"]


class StandIn(nn.Module):
    """A few MBConv-like layers; fast on the CPU."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        # pooled to 2x2, not 1x1: the logits depend on where things are, so the model is sensitive
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5))

    def forward(self, x):
        return self.head(self.dw(self.stem(x)))


class Wrong(nn.Module):
    """Fast and wrong: the provider the gate must reject."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 1.05


class Spy(nn.Module):
    def __init__(self, inner, seen):
        super().__init__()
        self.inner, self.seen = inner, seen

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.inner(x)


def _broken(model, device):
    raise RuntimeError("cannot build this one")


def _unavailable(model, device):
    raise providers.ProviderSkipped("needs hardware we lack")


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI machine is small and shared; one thread is faster there
    seen = {"spy1": [], "spy2": []}
    monkeypatch.setitem(models._BUILDERS, "standin", lambda: (StandIn(), 16))

    def _missing():
        raise models.ModelUnavailable("library zzz is not importable")

    monkeypatch.setitem(models._BUILDERS, "missing", _missing)
    for p in (providers.Provider("wrong", lambda m, d: Wrong(m)), providers.Provider("broken", _broken),
              providers.Provider("unavail", _unavailable),
              providers.Provider("spy1", lambda m, d: Spy(m, seen["spy1"])),
              providers.Provider("spy2", lambda m, d: Spy(m, seen["spy2"]))):
        monkeypatch.setitem(providers.PROVIDERS, p.name, p)
    monkeypatch.setenv("EFFNET_COMMIT", "testcommit")
    yield seen
    torch.set_num_threads(threads)


def test_defaults_and_provider_specs():
    args = network.parse_args([])
    assert args.batches == [1, 32, 256]
    assert args.dtypes == ["fp16", "bf16", "fp32", "tf32"]
    assert ("eager", "nchw") in args.providers and ("eager", "channels_last") in args.providers
    assert ("fused-triton", "channels_last") in args.providers and ("fused-cuda", "channels_last") in args.providers
    for name in ("eager-folded", "compile-freeze", "fused-triton+compile", "fused-cuda+compile"):
        assert (name, "channels_last") in args.providers
    assert args.models[:8] == ["b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7"]
    assert network.parse_provider_spec("fused-cuda@nhwc") == ("fused-cuda", "channels_last")
    args = network.parse_args(["--skip-max-autotune", "--batches", "1,8", "--dtypes", "bf16"])
    assert all(name != "compile-max-autotune" for name, _ in args.providers)
    assert args.batches == [1, 8] and args.dtypes == ["bf16"]
    assert network.plan_size(args) == len(args.models) * 2 * 1 * len(args.providers)


@pytest.mark.parametrize("argv, message", [
    (["--dtypes", "fp8"], "--dtypes: 'fp8' is not one of"),
    (["--batches", "0"], "--batches: '0' is not a valid value"),
    (["--providers", "nope"], "name must be one of"),
    (["--providers", "eager@sideways"], "layout must be one of"),
    (["--min-iters", "9", "--max-iters", "3"], "max_iters"),
])
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        network.parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_dry_run_touches_nothing(tmp_path, capsys):
    out = tmp_path / "r.csv"
    assert network.main(["--models", "standin", "--dry-run", "--out", str(out)]) == 0
    assert not out.exists()
    assert "jobs" in capsys.readouterr().out


def test_gate_rejects_wrong_provider_and_rows_are_complete(tmp_path, _setup):
    out = tmp_path / "r.csv"
    argv = ["--models", "standin", "--batches", "2", "--dtypes", "fp32", "--out", str(out),
            "--providers", "eager,eager@nchw,wrong,broken,unavail,spy1,spy2"] + FAST
    assert network.main(argv) == 1  # failures present
    rows = {r["provider"] + "@" + r["layout"]: r for r in read_rows(out)}
    assert len(rows) == 7
    assert list(read_rows(out)[0]) == list(NETWORK_COLUMNS)
    wrong = rows["wrong@channels_last"]
    assert wrong["status"].startswith("failed: output differs from eager")
    assert wrong["img_per_s"] == "" and wrong["ms_p50"] == ""
    assert float(wrong["max_rel_err"]) == pytest.approx(0.05, rel=1e-3)
    assert rows["broken@channels_last"]["status"] == "failed: prepare: RuntimeError: cannot build this one"
    assert rows["unavail@channels_last"]["status"] == "skipped: needs hardware we lack"
    for key in ("eager@channels_last", "eager@nchw", "spy1@channels_last"):
        r = rows[key]
        assert r["status"] == "ok", r
        assert r["commit"] == "testcommit" and r["gpu"] == "cpu" and r["batch"] == "2" and r["mode"] == "infer"
        assert float(r["max_rel_err"]) < 1e-4
        ips, p50 = float(r["img_per_s"]), float(r["ms_p50"])
        assert ips == pytest.approx(2 / (p50 / 1e3), rel=1e-4)
        assert float(r["ms_p20"]) <= p50 <= float(r["ms_p80"])
        bound = float(r["copy_gb_per_s"]) * 1e9 / (float(r["act_mb_per_img"]) * 1e6)
        assert float(r["bound_img_per_s"]) == pytest.approx(bound, rel=1e-4)
        assert float(r["frac_of_bound"]) == pytest.approx(ips / bound, rel=1e-3)
        assert float(r["gflops_per_img"]) > 0
    # the same input data for every provider: both spies saw identical buffers
    spy1, spy2 = _setup["spy1"], _setup["spy2"]
    assert spy1 and len(spy1) == len(spy2)
    assert all(torch.equal(a, b) for a, b in zip(spy1, spy2))
    assert len({float(x.sum()) for x in spy1}) == 2  # two rotated buffers, different data


def test_batch1_graph_and_train_modes_and_append(tmp_path):
    out = tmp_path / "r.csv"
    argv = ["--models", "standin,missing", "--batches", "1", "--dtypes", "fp32,bf16", "--providers", "eager",
            "--modes", "infer,train", "--out", str(out)] + FAST
    assert network.main(argv) == 0
    rows = read_rows(out)
    standin = [r for r in rows if r["model"] == "standin"]
    assert [(r["dtype"], r["mode"]) for r in standin] == [
        ("fp32", "infer"), ("fp32", "infer-graph"), ("fp32", "train"),
        ("bf16", "infer"), ("bf16", "infer-graph"), ("bf16", "train")]
    assert {r["status"] for r in standin if r["mode"] == "infer-graph"} == {"skipped: CUDA graphs need a CUDA device"}
    assert all(r["status"] == "ok" for r in standin if r["mode"] != "infer-graph")
    bf16, fp32 = (float(next(r["act_mb_per_img"] for r in standin if r["dtype"] == d)) for d in ("bf16", "fp32"))
    assert fp32 == pytest.approx(2 * bf16)
    missing = [r for r in rows if r["model"] == "missing"]
    assert len(missing) == 6 and all("library zzz is not importable" in r["status"] for r in missing)
    assert all(r["status"].startswith("skipped") for r in missing)
    # a second run appends under the same single header
    assert network.main(["--models", "standin", "--batches", "2", "--dtypes", "fp32", "--providers", "eager",
                         "--out", str(out)] + FAST) == 0
    assert out.read_text().count("gpu,driver") == 1
    assert len(read_rows(out)) == len(rows) + 1


def test_time_budget_skips_remaining_jobs(tmp_path):
    out = tmp_path / "r.csv"
    argv = ["--models", "standin", "--batches", "2,3", "--dtypes", "fp32", "--providers", "eager",
            "--out", str(out), "--time-budget", "1e-9"] + FAST
    assert network.main(argv) == 0
    rows = read_rows(out)
    assert len(rows) == 2 and all(r["status"].startswith("skipped: time budget") for r in rows)


def test_fused_torch_provider_converts_and_passes_the_gate(tmp_path):
    pytest.importorskip("efficientnet_pytorch")
    import effnet_kernels

    out = tmp_path / "r.csv"
    argv = ["--models", "tiny", "--batches", "2", "--dtypes", "fp32", "--providers", "eager,fused-torch",
            "--out", str(out)] + FAST
    code = network.main(argv)
    rows = {r["provider"]: r for r in read_rows(out)}
    if not hasattr(effnet_kernels, "convert"):
        assert rows["fused-torch"]["status"].startswith("skipped")
        return
    assert code == 0, rows
    assert rows["fused-torch"]["status"] == "ok"
    assert float(rows["fused-torch"]["max_rel_err"]) < 1e-4
    # fused providers also pass the tight fp32 gate and the block-wise check, on a sensitive model
    checks = rows["fused-torch"]["checks"]
    assert "fp32 " in checks and "blocks 7/7 ok" in checks and float(rows["fused-torch"]["sensitivity"]) > 0.1
    assert "fp32 " not in rows["eager"]["checks"]
    assert not math.isnan(float(rows["fused-torch"]["img_per_s"]))


class Greedy(StandIn):
    """Runs out of (pretend) memory above the BatchNorm calibration batch (8)."""

    def forward(self, x):
        if x.shape[0] > models.CALIBRATION_BATCH:
            raise torch.cuda.OutOfMemoryError("pretend: CUDA out of memory")
        return super().forward(x)


def test_batch_shrinks_to_what_fits(tmp_path, monkeypatch):
    monkeypatch.setitem(models._BUILDERS, "greedy", lambda: (Greedy(), 16))
    out = tmp_path / "r.csv"
    argv = ["--models", "greedy", "--batches", "32", "--dtypes", "fp32", "--providers", "eager", "--out", str(out)] + FAST
    assert network.main(argv) == 0
    (row,) = read_rows(out)
    assert row["batch"] == "8" and row["requested_batch"] == "32" and row["status"] == "ok"
    assert row["note"] == "batch 32 did not fit (out of memory)"
    out2 = tmp_path / "r2.csv"
    assert network.main(argv[:-len(FAST)] + ["--out", str(out2), "--no-fit"] + FAST) == 1
    (row,) = read_rows(out2)
    assert row["batch"] == "32" and row["status"].startswith("failed: reference: OutOfMemoryError")


def test_roofline_columns_equal_a_direct_count_per_element_size(tmp_path):
    from benchmarks.roofline import measure

    out = tmp_path / "r.csv"
    argv = ["--models", "standin", "--batches", "2", "--dtypes", "fp32,fp16", "--providers", "eager",
            "--out", str(out)] + FAST
    assert network.main(argv) == 0
    for row in read_rows(out):
        direct = measure(StandIn(), 16, 4 if row["dtype"] == "fp32" else 2)
        assert float(row["act_mb_per_img"]) == pytest.approx(direct.mb_per_image, rel=1e-5)
        assert float(row["gflops_per_img"]) == pytest.approx(direct.gflops_per_image, rel=1e-5)


@pytest.mark.parametrize("argv", [
    ["--models", "b0,b7", "--batches", "1,256", "--dtypes", "fp16", "--dry-run"],
    ["--models=b0", "--providers", "eager@nchw,fused-cuda", "--time-budget", "100", "--quiet", "--out", "x.csv"],
    ["--help"],
])
def test_cli_bench_forwards_its_arguments_to_the_network_benchmark(monkeypatch, argv):
    from effnet_kernels import __main__ as cli

    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(network, "main", lambda args: seen.append(list(args)) or 7)
    assert cli.main(["bench"] + argv) == 7
    assert seen == [argv]
