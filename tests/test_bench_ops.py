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


def test_pointwise_min_bytes_and_shape_hand_computed():
    ex = OpCase("pointwise", "b0", 2, 16, 10, 10, cout=96, activation="silu")
    # x + weight (x's dtype) + fp32 bias + y
    assert ex.min_bytes(2) == 2 * 16 * 100 * 2 + 96 * 16 * 2 + 96 * 4 + 2 * 96 * 100 * 2
    assert ex.shape == "2x16x10x10/o96/silu" and (ex.ho, ex.wo) == (10, 10)
    pr = OpCase("pointwise", "b0", 2, 96, 5, 5, cout=24, gate=True, residual=True)
    # x + fp32 gate + weight + fp32 bias + residual + y
    assert pr.min_bytes(4) == 2 * 96 * 25 * 4 + 2 * 96 * 4 + 24 * 96 * 4 + 24 * 4 + 2 * (2 * 24 * 25 * 4)
    assert pr.shape == "2x96x5x5/o24/gate/res"
    gate_only = OpCase("pointwise", "b0", 2, 96, 5, 5, cout=24, gate=True)
    assert gate_only.shape == "2x96x5x5/o24/gate"
    assert gate_only.min_bytes(2) == pr.min_bytes(2) - 2 * 24 * 25 * 2
    for case in (ex, pr, gate_only, OpCase("pointwise", "m", 1, 3, 1, 2, cout=5, activation="relu6", residual=True)):
        assert op_cases.parse_pointwise_shape(case.shape, case.model) == case
    for bad in ("2x16x10x10/k3s1", "2x16x10x10/o4/gate/gate", "2x16x10x10/o4/bogus"):
        with pytest.raises(ValueError):
            op_cases.parse_pointwise_shape(bad)


def test_the_stem_case_is_the_models_stem_and_its_calls_agree():
    """``stem_case`` (the ``conv`` case ``benchmarks.tune`` tunes): B0's and B7's stems, their bytes by hand,
    and the eager chain, the fused op and the float64 reference computing the same thing."""
    stem = op_cases.stem_case("b0", 2)
    assert stem == OpCase("conv", "b0", 2, 3, 224, 224, k=3, stride=2, cout=32, activation="silu")
    assert (stem.ho, stem.wo) == (112, 112) and stem.shape == "2x3x224x224/o32/k3s2/silu"
    assert stem.min_bytes(2) == 2 * 3 * 224 * 224 * 2 + 32 * 27 * 2 + 32 * 4 + 2 * 32 * 112 * 112 * 2
    assert op_cases.stem_case("b7", 1) == OpCase("conv", "b7", 1, 3, 600, 600, 3, 2, cout=64, activation="silu")
    assert op_cases.stem_case("b0", 1, resolution=17).ho == 9
    tiny = op_cases.stem_case("b0", 2, resolution=9)
    cpu = torch.device("cpu")
    inp = op_cases.make_inputs(tiny, torch.float32, torch.channels_last, cpu, torch.Generator(cpu).manual_seed(0))
    ref = op_cases.reference(tiny, inp)
    assert ref.shape == (2, 32, 5, 5)
    seen = _aten_ops(op_cases.make_call(tiny, "eager", inp))
    assert seen.count("convolution") == 1 and "silu" in seen, seen
    fused = op_cases.make_call(tiny, "torch", inp)
    assert _aten_ops(fused).count("conv_bn_act") == 1
    for provider in ("eager", "torch"):
        out = op_cases.make_call(tiny, provider, inp)()
        assert out.is_contiguous(memory_format=torch.channels_last), provider
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5, msg=provider)


def test_cases_cover_b0_without_duplicates():
    cases = op_cases.cases_for_models(["b0", "b0"], batch=4)
    keys = [(c.op, c.shape) for c in cases]
    assert len(keys) == len(set(keys))
    dws = [c for c in cases if c.op == "dwconv"]
    assert dws[0] == OpCase("dwconv", "b0", 4, 32, 112, 112, 3, 1)  # first block: 32 ch at 112x112
    assert {c.k for c in dws} == {3, 5} and {c.stride for c in dws} == {1, 2}
    assert all(c.reduced >= 1 for c in cases if c.op == "se")
    with pytest.raises(ValueError, match="ops"):
        op_cases.cases_for_models(["b0"], 1, ops=["conv"])


def test_pointwise_cases_are_every_expand_projection_and_head_conv():
    from effnet_kernels.models import layer_shapes

    cases = op_cases.cases_for_models(["b0"], batch=4, ops=["pointwise"])
    assert {c.op for c in cases} == {"pointwise"}
    # B0's first block has expand ratio 1: its projection (32 -> 16, SE gate, no residual) comes first
    assert cases[0] == OpCase("pointwise", "b0", 4, 32, 112, 112, cout=16, gate=True)
    assert cases[1] == OpCase("pointwise", "b0", 4, 16, 112, 112, cout=96, activation="silu")
    layers = layer_shapes("b0", 4)
    last = layers[-1]
    want = {OpCase("pointwise", "b0", 4, last.out_channels, last.Ho, last.Wo, cout=1280, activation="silu",
                   pool=True).shape}  # head + pool
    for layer in layers:
        if layer.expand_ratio != 1:
            want.add(OpCase("pointwise", "b0", 4, layer.in_channels, layer.H, layer.W, cout=layer.mid_channels,
                            activation="silu").shape)
        want.add(OpCase("pointwise", "b0", 4, layer.mid_channels, layer.Ho, layer.Wo, cout=layer.out_channels,
                        gate=layer.se_reduced is not None, residual=layer.has_residual).shape)
    assert {c.shape for c in cases} == want and len(cases) == len(want)
    assert any(c.residual for c in cases) and any(c.gate and not c.residual for c in cases)
    assert all(c.activation == "silu" and not c.gate and not c.residual for c in cases if c.cout > c.c)


def test_pointwise_cases_b0_to_b7_at_batch_32():
    from effnet_kernels.models import MODEL_NAMES

    cases = op_cases.cases_for_models(MODEL_NAMES, 32)
    pw = [c for c in cases if c.op == "pointwise"]
    assert len({c.shape for c in pw}) == len(pw) == 173  # distinct shapes only
    assert sum(c.activation == "silu" for c in pw) == 55 + 8  # expand convs, the eight heads
    assert sum(c.gate for c in pw) == 110 and sum(c.residual for c in pw) == 54  # projections
    assert [c.op for c in cases[:3]] == ["dwconv", "se", "pointwise"]  # block order: expand, dw, se, project


@pytest.mark.parametrize("case", [
    OpCase("dwconv", "t", 2, 5, 7, 6, k=5, stride=2),
    OpCase("se", "t", 2, 6, 4, 3, reduced=2),
    OpCase("pointwise", "t", 2, 6, 5, 3, cout=20, activation="silu"),
    OpCase("pointwise", "t", 2, 20, 3, 5, cout=6, gate=True, residual=True),
    OpCase("pointwise", "t", 1, 12, 4, 4, cout=7, gate=True),
], ids=lambda c: f"{c.op}-{c.shape}")
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_pointwise_is_what_unconverted_pytorch_runs(dtype):
    gen = torch.Generator("cpu").manual_seed(0)
    cpu = torch.device("cpu")
    expand = OpCase("pointwise", "t", 2, 6, 5, 4, cout=12, activation="silu")
    inp = op_cases.make_inputs(expand, dtype, torch.channels_last, cpu, gen)
    seen = _aten_ops(op_cases.make_call(expand, "eager", inp))
    assert seen.count("convolution") == 1 and "silu" in seen and "mul" not in seen and "add" not in seen, seen
    assert any("batch_norm" in o for o in seen), seen
    project = OpCase("pointwise", "t", 2, 12, 5, 4, cout=6, gate=True, residual=True)
    inp = op_cases.make_inputs(project, dtype, torch.channels_last, cpu, gen)
    seen = _aten_ops(op_cases.make_call(project, "eager", inp))
    assert seen.count("convolution") == 1 and "mul" in seen and "add" in seen and "silu" not in seen, seen
    assert seen.index("mul") < seen.index("convolution") < seen.index("add"), seen  # excite, conv, BN, residual
    y = op_cases.make_call(project, "eager", inp)()
    assert y.dtype == dtype and y.shape == (2, 6, 5, 4) and y.is_contiguous(memory_format=torch.channels_last)
    # the eager gate is the fused one in x's dtype, [N, K, 1, 1]
    assert inp["gate"].dtype == torch.float32 and inp["gate"].shape == (2, 12)
    torch.testing.assert_close(inp["gate_eager"], inp["gate"].to(dtype)[:, :, None, None], rtol=0, atol=0)
    # the fused call is the op the converted block makes: ops.pointwise_conv with gate and residual
    fused = op_cases.make_call(project, "torch", inp)
    assert _aten_ops(fused).count("pointwise_conv") == 1
    assert fused().dtype == dtype


@pytest.mark.parametrize("defect", ["scale", "no_residual", "no_gate"])
def test_gate_rejects_a_wrong_pointwise(monkeypatch, defect):
    real = op_cases.make_call
    case = OpCase("pointwise", "t", 2, 12, 4, 4, cout=6, gate=True, residual=True)

    def wrong_for_torch(case, provider, inp):
        if provider != "torch":
            return real(case, provider, inp)
        if defect == "scale":
            call = real(case, provider, inp)
            return lambda: call() * 1.01
        drop = "residual" if defect == "no_residual" else "gate"
        return real(case, provider, {k: v for k, v in inp.items() if k != drop})

    monkeypatch.setattr(ops, "make_call", wrong_for_torch)
    rows = ops.run_case(case, "fp32", "channels_last", ["torch"], torch.device("cpu"), FAST, 1.0)
    assert rows[0]["status"].startswith("failed: output differs from eager"), rows


def test_pointwise_triton_row_skipped_until_the_backend_implements_it(monkeypatch):
    """The Triton GEMM lands separately: a triton backend without "pointwise_conv" gives a
    skipped row (as any unavailable provider), one with it a measured, gated row."""
    from effnet_kernels import backends, reference

    backends._ensure_registered()
    case = OpCase("pointwise", "t", 2, 8, 3, 3, cout=4, gate=True, residual=True)

    def fake_triton(impls):
        return backends._Backend("triton", lambda: [], lambda op, t, args=(): [], lambda: impls)

    monkeypatch.setitem(backends._REGISTRY, "triton", fake_triton({"se_excite": reference.se_excite}))
    rows = ops.run_case(case, "fp32", "nchw", ["eager", "triton"], torch.device("cpu"), FAST, 1.0)
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"].startswith("skipped: ") and "does not implement 'pointwise_conv'" in rows[1]["status"]
    assert "us_p50" not in rows[1]
    monkeypatch.setitem(backends._REGISTRY, "triton", fake_triton({"pointwise_conv": reference.pointwise_conv}))
    rows = ops.run_case(case, "fp32", "nchw", ["eager", "triton"], torch.device("cpu"), FAST, 1.0)
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    assert rows[1]["min_bytes"] == case.min_bytes(4) and rows[1]["speedup_vs_eager"] > 0


def test_classes_first_puts_one_shape_per_auto_table_class_in_front():
    from benchmarks.auto_table import classes_of_row
    from effnet_kernels.models import MODEL_NAMES

    cases = op_cases.cases_for_models(MODEL_NAMES, 32)
    ordered = ops.classes_first(cases)
    assert sorted(ordered, key=cases.index) == cases  # a permutation

    def keys(case):
        return classes_of_row({"op": case.op, "shape": case.shape, "dtype": "fp16", "layout": "channels_last"})

    every = {k for c in cases for k in keys(c)}
    covered, n_first = set(), 0
    for c in ordered:
        new = set(keys(c)) - covered
        if not new:
            break
        covered |= new
        n_first += 1
    assert covered == every  # the front decides every class
    assert (n_first, len(every), len(cases)) == (36, 37, 377)
    assert {k.split("/")[0] for k in every} == {"dwconv", "se", "se_gate", "pw"}
    front, rest = ordered[:n_first], ordered[n_first:]
    assert front == [c for c in cases if c in front] and rest == [c for c in cases if c in rest]  # stable


def test_main_runs_pointwise_in_class_order(tmp_path):
    out = tmp_path / "ops.csv"
    argv = ["--models", "b0", "--ops", "pointwise,dwconv", "--order", "classes", "--batch", "1",
            "--resolution", "16", "--limit", "3", "--dtypes", "bf16", "--providers", "eager,torch,cuda",
            "--device", "cpu", "--out", str(out), "--copy-mb", "1", "--warmup-s", "0", "--min-time-s", "0",
            "--min-iters", "2", "--max-iters", "2", "--quiet"]
    assert ops.main(argv) == 0
    rows = read_rows(out)
    cases = ops.classes_first(op_cases.cases_for_models(["b0"], 1, ["pointwise", "dwconv"], 16), "bf16")[:3]
    assert [(r["op"], r["shape"], r["provider"]) for r in rows] == [
        (c.op, c.shape, p) for c in cases for p in ("eager", "torch", "cuda")]
    assert "pointwise" in {r["op"] for r in rows}
    for r in rows:
        assert r["status"] == "ok" or (r["provider"] == "cuda" and r["status"].startswith("skipped: ")), r


def test_gpu_session_ops_step_measures_every_family_classes_first(tmp_path):
    import re
    import shlex
    from pathlib import Path

    script = (Path(__file__).resolve().parent.parent / "scripts" / "gpu_session.sh").read_text()
    default = shlex.split(re.search(r"\$\{OPS_ARGS:-([^}]*)\}", script).group(1))
    assert "--ops" not in default and "pointwise" in op_cases.OPS  # every family, the new one included
    assert default[default.index("--order") + 1] == "classes"
    # the default command line parses and runs (nothing timed: the budget is used up at once)
    out = tmp_path / "ops.csv"
    assert ops.main(default + ["--device", "cpu", "--out", str(out), "--copy-mb", "1", "--time-budget", "1e-9",
                               "--quiet"]) == 0
    assert not out.exists()
