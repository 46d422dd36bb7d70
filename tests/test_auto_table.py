"""``auto`` picks the backend measured fastest per shape class; the table comes from op benchmarks."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from effnet_kernels import auto_table, backends
from benchmarks import auto_table as table_tool


@pytest.fixture(autouse=True)
def _restore_table():
    yield
    auto_table.set_table(None)


def test_size_buckets_are_factor_four():
    assert [auto_table.size_bucket(n) for n in (1, 3, 4, 15, 16, 63, 64)] == [0, 0, 1, 1, 2, 2, 3]


def test_class_of_call_matches_the_generator_for_the_same_shape():
    x = torch.empty(2, 8, 9, 9).contiguous(memory_format=torch.channels_last).half()
    w = torch.empty(8, 1, 5, 5)
    runtime = auto_table.class_of_call("dwconv_bn_act", (x, w, None, None, [2, 2], [2, 2, 2, 2], True, True))
    row = {"op": "dwconv", "shape": "2x8x9x9/k5s2", "dtype": "fp16", "layout": "channels_last"}
    assert table_tool.classes_of_row(row) == [runtime]
    y = torch.empty(2, 8, 9, 9).half()
    se_row = {"op": "se", "shape": "2x8x9x9/r2", "dtype": "fp16", "layout": "nchw"}
    assert table_tool.classes_of_row(se_row) == [
        auto_table.class_of_call("se_excite", (y, torch.empty(2, 8))),
        auto_table.class_of_call("se_gate", (torch.empty(2, 8).half(),)),
    ]


def _rows(tmp_path, rows):
    path = tmp_path / "ops.csv"
    cols = ["gpu", "op", "shape", "dtype", "layout", "provider", "us_p50", "status"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, cols)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_generator_picks_the_faster_backend_per_class(tmp_path):
    base = {"gpu": "NVIDIA H100", "dtype": "fp16", "layout": "channels_last", "status": "ok"}
    rows = [
        {**base, "op": "dwconv", "shape": "256x96x112x112/k3s2", "provider": "triton", "us_p50": "300"},
        {**base, "op": "dwconv", "shape": "256x96x112x112/k3s2", "provider": "cuda", "us_p50": "250"},
        {**base, "op": "dwconv", "shape": "256x96x112x112/k3s2", "provider": "eager", "us_p50": "900"},
        {**base, "op": "dwconv", "shape": "1x672x14x14/k5s1", "provider": "triton", "us_p50": "9"},
        {**base, "op": "dwconv", "shape": "1x672x14x14/k5s1", "provider": "cuda", "us_p50": "12"},
        {**base, "op": "se", "shape": "32x1152x7x7/r48", "provider": "cuda", "us_p50": "20"},
        {**base, "op": "se", "shape": "32x1152x7x7/r48", "provider": "triton", "us_p50": "failed", "status": "failed: x"},
    ]
    out = tmp_path / "auto.json"
    assert table_tool.main([str(_rows(tmp_path, rows)), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["measured_on"] == ["NVIDIA H100"]
    classes = data["classes"]
    assert classes[auto_table.shape_class("dwconv", "fp16", "channels_last", 256 * 96 * 56 * 56, 3, 2)] == "cuda"
    assert classes[auto_table.shape_class("dwconv", "fp16", "channels_last", 672 * 14 * 14, 5, 1)] == "triton"
    assert classes[auto_table.shape_class("se", "fp16", "channels_last", 32 * 1152 * 49)] == "cuda"
    assert "eager" not in classes.values()


def test_auto_prefers_the_measured_backend(monkeypatch):
    """On a GPU tensor (meta stands in) auto tries the table's choice first, then the fixed order."""
    calls = []

    def spy(name):
        return backends._Backend(name, lambda: [], lambda op, t, args=(): [],
                                 lambda: {"se_excite": lambda *a: calls.append(name)})

    backends._ensure_registered()
    for name in ("triton", "cuda"):
        monkeypatch.setitem(backends._REGISTRY, name, spy(name))
    monkeypatch.setitem(backends.AUTO_ORDER, "meta", ("cuda", "triton", "torch"))
    y, gate = torch.empty(2, 8, 4, 4, device="meta"), torch.empty(2, 8, device="meta")
    backends.resolve("se_excite", "auto", y, (y, gate))()
    assert calls == ["cuda"]  # no table entry: the fixed order
    auto_table.set_table({auto_table.class_of_call("se_excite", (y, gate)): "triton"})
    backends.resolve("se_excite", "auto", y, (y, gate))()
    assert calls == ["cuda", "triton"]


def test_committed_table_is_valid_and_names_real_backends():
    data = json.loads(auto_table.TABLE_PATH.read_text())
    assert set(data) >= {"version", "classes", "measured_on"}
    assert set(data["classes"].values()) <= {"triton", "cuda"}


def _pointwise_args(n=2, k=8, h=5, w=5, cout=16, gate=False, residual=False, pool=False, dtype=torch.float16,
                    layout=torch.channels_last, device="cpu"):
    x = torch.empty(n, k, h, w, dtype=dtype, device=device).contiguous(memory_format=layout)
    g = torch.empty(n, k, device=device) if gate else None
    r = torch.empty(n, cout, h, w, dtype=dtype, device=device).contiguous(memory_format=layout) if residual else None
    return (x, torch.empty(cout, k, device=device), torch.empty(cout, device=device), g, r,
            "silu" if not (gate or residual) else "identity", pool)


def test_pointwise_classes_name_variant_and_bucket():
    key = auto_table.class_of_call("pointwise_conv", _pointwise_args())
    assert key == f"pw/fp16/channels_last/expand/b{auto_table.size_bucket(2 * 5 * 5 * (8 + 16))}"
    assert auto_table.class_of_call("pointwise_conv", _pointwise_args(gate=True)).split("/")[3] == "project"
    assert auto_table.class_of_call("pointwise_conv", _pointwise_args(residual=True)).split("/")[3] == "project"
    assert auto_table.class_of_call("pointwise_conv", _pointwise_args(gate=True, residual=True)).split("/")[3] == "project"
    assert auto_table.class_of_call("pointwise_conv", _pointwise_args(pool=True)).split("/")[3] == "pool"
    assert auto_table.class_of_call("pointwise_conv", _pointwise_args(layout=torch.contiguous_format,
                                                                      dtype=torch.bfloat16)).startswith("pw/bf16/nchw/")
    # the bucket grows with M*(K+Cout): 4x the pixels is the next bucket
    small = auto_table.class_of_call("pointwise_conv", _pointwise_args(h=8, w=8))
    big = auto_table.class_of_call("pointwise_conv", _pointwise_args(h=16, w=16))
    assert int(big.rsplit("/b", 1)[1]) == int(small.rsplit("/b", 1)[1]) + 1
    assert auto_table.class_of_call("pointwise_conv", _pointwise_args(dtype=torch.float64)) is None
    with pytest.raises(ValueError, match="variant"):
        auto_table.shape_class("pw", "fp16", "nchw", 10, variant="bogus")


@pytest.mark.parametrize("dtype,layout", [("fp16", "channels_last"), ("bf16", "nchw"), ("fp32", "channels_last")])
def test_pointwise_rows_map_to_the_keys_the_benchmarked_calls_have(monkeypatch, dtype, layout):
    """For every B0 pointwise case the benchmark runs, the class the generator gives its row
    is the class of the effnet::pointwise_conv call the benchmark actually makes."""
    from benchmarks import op_cases
    from benchmarks.jobs import LAYOUTS

    seen = []
    real = backends.resolve

    def spy(op, requested, tensor, args=()):
        seen.append(auto_table.class_of_call(op, args))
        return real(op, requested, tensor, args)

    monkeypatch.setattr(backends, "resolve", spy)
    gen = torch.Generator("cpu").manual_seed(0)
    cases = op_cases.cases_for_models(["b0"], 2, ["pointwise"], resolution=32)
    assert len(cases) > 10
    for case in cases:
        inp = op_cases.make_inputs(case, op_cases.DTYPES[dtype], LAYOUTS[layout], torch.device("cpu"), gen)
        seen.clear()
        op_cases.make_call(case, "torch", inp)()
        row = {"op": "pointwise", "shape": case.shape, "dtype": dtype, "layout": layout}
        assert seen == table_tool.classes_of_row(row), case
        assert seen[0].split("/")[3] == ("pool" if case.pool else "project" if case.gate or case.residual else "expand")


def test_pointwise_rows_match_what_a_converted_block_calls(monkeypatch):
    """The benchmark's pointwise shapes are exactly the expand / projection / head calls a converted
    B0 makes in eval (same shapes, gate and residual flags), so its classes are theirs."""
    import effnet_kernels
    from benchmarks import op_cases
    from effnet_kernels import models

    calls = []
    real = backends.resolve

    def spy(op, requested, tensor, args=()):
        if op == "pointwise_conv":
            x, weight, _, gate, residual, activation, pool = args
            n, k, h, w = x.shape
            calls.append(op_cases.OpCase("pointwise", "", n, k, h, w, cout=weight.shape[0], activation=activation,
                                         gate=gate is not None, residual=residual is not None, pool=pool).shape)
        return real(op, requested, tensor, args)

    model = effnet_kernels.convert(models.efficientnet("b0").eval())
    monkeypatch.setattr(backends, "resolve", spy)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    cases = op_cases.cases_for_models(["b0"], 1, ["pointwise"], resolution=64)
    assert len(calls) == 15 + 16 + 1 and set(calls) == {c.shape for c in cases}  # expand, projection, head + pool
    assert calls[-1].endswith("/silu/pool")


def test_pointwise_table_entry_changes_the_auto_choice(monkeypatch):
    """Without an entry auto serves pointwise_conv with the fixed order (cuda: cuDNN + aten);
    a measured entry for its pw/... class puts triton first; other classes keep the order."""
    calls = []

    def spy(name):
        return backends._Backend(name, lambda: [], lambda op, t, args=(): [],
                                 lambda: {"pointwise_conv": lambda *a: calls.append(name)})

    backends._ensure_registered()
    for name in ("triton", "cuda"):
        monkeypatch.setitem(backends._REGISTRY, name, spy(name))
    monkeypatch.setitem(backends.AUTO_ORDER, "meta", backends.AUTO_ORDER["cuda"])
    expand = _pointwise_args(device="meta")
    project = _pointwise_args(gate=True, residual=True, device="meta")
    auto_table.set_table({})
    backends.resolve("pointwise_conv", "auto", expand[0], expand)()
    assert calls == ["cuda"]  # no entry: AUTO_ORDER, cuda first
    auto_table.set_table({auto_table.class_of_call("pointwise_conv", expand): "triton"})
    backends.resolve("pointwise_conv", "auto", expand[0], expand)()
    backends.resolve("pointwise_conv", "auto", project[0], project)()  # another class: still the fixed order
    assert calls == ["cuda", "triton", "cuda"]
    # a table entry naming a backend that lacks the op falls through to the fixed order
    monkeypatch.setitem(backends._REGISTRY, "triton", backends._Backend(
        "triton", lambda: [], lambda op, t, args=(): [], lambda: {"se_excite": lambda *a: None}))
    backends.resolve("pointwise_conv", "auto", expand[0], expand)()
    assert calls[-1] == "cuda"


def test_generator_decides_pointwise_classes_from_rows(tmp_path):
    base = {"gpu": "NVIDIA H200", "dtype": "fp16", "layout": "channels_last", "status": "ok", "op": "pointwise"}
    rows = [
        {**base, "shape": "32x16x112x112/o96/silu", "provider": "triton", "us_p50": "80"},
        {**base, "shape": "32x16x112x112/o96/silu", "provider": "cuda", "us_p50": "100"},
        {**base, "shape": "32x16x112x112/o96/silu", "provider": "eager", "us_p50": "10"},
        {**base, "shape": "32x96x56x56/o24/gate", "provider": "cuda", "us_p50": "50"},
        {**base, "shape": "32x96x56x56/o24/gate", "provider": "triton", "status": "skipped: no GEMM yet",
         "us_p50": ""},
    ]
    out = tmp_path / "auto.json"
    assert table_tool.main([str(_rows(tmp_path, rows)), "--out", str(out)]) == 0
    classes = json.loads(out.read_text())["classes"]
    assert classes == {
        auto_table.pointwise_class("fp16", "channels_last", 32, 16, 112, 112, 96, False, False, False): "triton",
        auto_table.pointwise_class("fp16", "channels_last", 32, 96, 56, 56, 24, True, False, False): "cuda",
    }
    assert all(k.startswith("pw/fp16/channels_last/") for k in classes)


def test_committed_table_has_no_pointwise_entry_until_measured():
    data = json.loads(auto_table.TABLE_PATH.read_text())
    if not data["measured_on"]:
        assert not [k for k in data["classes"] if k.startswith("pw/")]


def test_rows_of_1x1_channels_last_tensors_use_the_layout_the_call_sees():
    # channels_last memory of a [N, C, 1, 1] tensor is also NCHW-contiguous: the op call sees nchw
    y = torch.empty(2, 8, 1, 1).contiguous(memory_format=torch.channels_last).half()
    runtime = auto_table.class_of_call("se_excite", (y, torch.empty(2, 8)))
    assert runtime.startswith("se/fp16/nchw/")
    row = {"op": "se", "shape": "2x8x1x1/r2", "dtype": "fp16", "layout": "channels_last"}
    assert table_tool.classes_of_row(row)[0] == runtime
    pw = _pointwise_args(h=1, w=1, gate=True)
    row = {"op": "pointwise", "shape": "2x8x1x1/o16/gate", "dtype": "fp16", "layout": "channels_last"}
    assert table_tool.classes_of_row(row) == [auto_table.class_of_call("pointwise_conv", pw)]
    assert auto_table.stored_layout("channels_last", 8, 2, 1) == "channels_last"
    assert auto_table.stored_layout("channels_last", 1, 4, 4) == "nchw"
