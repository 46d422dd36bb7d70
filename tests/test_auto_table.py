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
