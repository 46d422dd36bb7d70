"""benchmarks.traffic: kernels and bytes per dispatched op, against hand counts (torch 2.13)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import effnet_kernels
from benchmarks import memory, traffic
from benchmarks.records import append_rows, read_rows

F32, F16 = 4, 2


def conv_bn_silu() -> nn.Sequential:
    """conv 4->8 1x1 (no bias) -> BN(8) -> SiLU, counted on [2, 4, 5, 5] float32."""
    return nn.Sequential(nn.Conv2d(4, 8, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU()).eval()


N, HW = 2, 5 * 5
X_BYTES = N * 4 * HW * F32  # the input                     800
Y_BYTES = N * 8 * HW * F32  # conv out = BN out = SiLU out  1600


def hand_conv_bn_silu(device: str) -> dict[str, traffic.OpTraffic]:
    # Eval BatchNorm dispatches as native_batch_norm(training=False): on meta its saved mean and
    # inverse std are [C] float32 outputs; on the CPU they are empty (zero bytes).
    bn_stats = 2 * 8 * F32 if device == "meta" else 0
    return {
        "aten::convolution": traffic.OpTraffic(1, X_BYTES + Y_BYTES, 8 * 4 * F32),  # reads x, weight; writes y
        "aten::native_batch_norm": traffic.OpTraffic(1, Y_BYTES + Y_BYTES + bn_stats, 4 * 8 * F32),  # + 4 x [8]
        "aten::silu": traffic.OpTraffic(1, Y_BYTES + Y_BYTES),
    }


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_conv_bn_silu_hand_count(device):
    model = conv_bn_silu().to(device)
    got = traffic.count_traffic(model, torch.zeros(N, 4, 5, 5, device=device))
    hand = hand_conv_bn_silu(device)
    assert got.by_op == hand
    assert got.kernels == 3
    assert got.activation_bytes == sum(v.bytes for v in hand.values())
    assert got.read_bytes == X_BYTES + Y_BYTES + Y_BYTES
    assert got.constant_bytes == (8 * 4 + 4 * 8) * F32 and got.cached_bytes == 0
    assert got.skipped == {"aten::empty": 1}  # batch_norm's (empty) reserve: an allocation, no kernel
    assert got.calls == 4


def flatten_linear() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()


def test_views_count_nothing():
    got = traffic.count_traffic(flatten_linear().to("meta"), torch.empty(N, 3, 2, 2, device="meta"))
    # flatten -> view, weight.t() -> t: views; addmm reads bias, the flat x, weight.t(); writes [2, 3]
    assert got.skipped == {"aten::t": 1, "aten::view": 1}
    assert got.by_op == {"aten::addmm": traffic.OpTraffic(1, (N * 12 + N * 3) * F32, (3 + 12 * 3) * F32)}
    assert got.kernels == 1


class _TransposeReshape(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2).reshape(x.shape[0], -1) * 2  # not viewable: clone + _unsafe_view


def test_reshape_that_copies_is_one_clone():
    got = traffic.count_traffic(_TransposeReshape(), torch.empty(N, 3, 4, device="meta"))
    assert {k: v.kernels for k, v in got.by_op.items()} == {"aten::clone": 1, "aten::mul": 1}
    assert got.by_op["aten::clone"].bytes == 2 * N * 12 * F32
    assert got.skipped == {"aten::transpose": 1, "aten::_unsafe_view": 1}


class _InPlace(nn.Module):
    def forward(self, x):
        y = x + 1
        y.add_(x)  # reads y and x, writes y
        z = torch.empty_like(y)
        z.copy_(y)  # overwrite-only: reads y, writes z
        return torch.zeros_like(z).fill_(3.0)  # zeros: a fill kernel (writes); fill_: writes


def test_in_place_and_fill_ops():
    got = traffic.count_traffic(_InPlace(), torch.empty(4, 8, device="meta"))
    b = 4 * 8 * F32
    assert got.by_op == {
        "aten::add": traffic.OpTraffic(1, 2 * b),  # x + 1: the 1 is a Python number, not a tensor
        "aten::add_": traffic.OpTraffic(1, 3 * b),
        "aten::copy_": traffic.OpTraffic(1, 2 * b),
        "aten::zeros_like": traffic.OpTraffic(1, b),  # its input gives only the shape
        "aten::fill_": traffic.OpTraffic(1, b),
    }
    assert got.skipped.get("aten::empty_like") == 1  # an allocation
    assert set(got.skipped) <= {"aten::empty_like", "aten::detach"}  # (the scalar's wrapping: a view)


def test_inference_mode_decomposes_like_no_grad():
    model = conv_bn_silu().to("meta")
    x = torch.empty(N, 4, 5, 5, device="meta")
    with torch.inference_mode():
        got = traffic.count_traffic(model, x)
    assert got.by_op == hand_conv_bn_silu("meta")


def test_modes_are_restored():
    model = conv_bn_silu().train().to("meta")
    traffic.count_traffic(model, torch.empty(N, 4, 5, 5, device="meta"))
    assert all(m.training for m in model.modules())


class _DWConv(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(c, 1, 3, 3, dtype=torch.float16))
        self.register_buffer("scale", torch.empty(c))
        self.register_buffer("shift", torch.empty(c))

    def forward(self, x):
        return effnet_kernels.ops.dwconv_bn_act(x, self.weight, self.scale, self.shift, padding=1, squeeze=True)


def test_one_effnet_op_is_one_kernel_and_nothing_inside_counts():
    c, h = 16, 8
    with torch.device("meta"):
        model = _DWConv(c)
    x = torch.empty(N, c, h, h, device="meta", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    got = traffic.count_traffic(model, x)
    x_bytes = N * c * h * h * F16
    mean_bytes = N * c * F32  # the fused SE squeeze, [N, C] float32: an activation
    assert got.calls == 1 and got.skipped == {}  # the fake kernel's torch.empty is not seen
    assert got.by_op == {"effnet::dwconv_bn_act": traffic.OpTraffic(
        1, x_bytes + x_bytes + mean_bytes, c * 9 * F16 + 2 * c * F32)}
    assert got.kernels == got.effnet_kernels == 1


def test_converted_mbconv_counts_its_effnet_ops_and_cached_folds():
    with torch.device("meta"):
        block = effnet_kernels.MBConv(16, 16, 3, 1, 4).eval()
    x = torch.empty(N, 16, 8, 8, device="meta", dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    got = traffic.count_traffic(block, x)
    assert {k: v.kernels for k, v in got.by_op.items() if k.startswith("effnet::")} == {
        "effnet::pointwise_conv": 2, "effnet::dwconv_bn_act": 1, "effnet::se_gate": 1}  # the four-kernel block
    assert got.cached_bytes > 0  # folded BatchNorms, cached at the warm-up: constants
    cold = traffic.count_traffic(copy.deepcopy(block), x, warmup=False)
    assert cold.kernels > got.kernels  # the first forward also folds


def test_converted_block_counts_the_same_on_cpu_as_on_meta():
    # On the CPU the effnet ops run a real backend (the torch reference: many aten ops inside);
    # none of them is seen, so the count is the meta one (no BatchNorm is left to differ).
    torch.manual_seed(0)
    block = effnet_kernels.MBConv(16, 16, 3, 1, 4).eval()
    x = torch.randn(N, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    cpu = traffic.count_traffic(block, x)
    meta = traffic.count_traffic(block.to("meta"), x.to("meta"))
    assert cpu.by_op == meta.by_op and cpu.calls == meta.calls and cpu.effnet_kernels == 4


@torch.library.custom_op("traffic_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return (x * 2).clone()


@_twice.register_fake
def _(x):
    return torch.empty_like(x).clone()


class _Twice(nn.Module):
    def forward(self, x):
        return _twice(x)


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_any_custom_op_is_one_kernel_whatever_runs_inside(device):
    # Nothing is keyed on op names: an op the counter has never heard of (as effnet::pointwise_conv
    # will be) counts as one kernel reading its input and writing its output, on its fake or real kernel.
    got = traffic.count_traffic(_Twice(), torch.zeros(3, 4, device=device))
    assert got.by_op == {"traffic_test::twice": traffic.OpTraffic(1, 2 * 12 * F32)}
    assert got.calls == 1 and got.effnet_kernels == 0


def b0_at(resolution: int, batch: int = 1) -> tuple[traffic.PerImage, traffic.PerImage, int]:
    model, _ = memory._build("b0", "meta")
    model = model.to(dtype=torch.float16, memory_format=torch.channels_last).eval()
    converted = effnet_kernels.convert(copy.deepcopy(model))
    make = memory._input_maker(resolution, "meta", torch.float16, torch.channels_last)
    blocks = sum(isinstance(m, effnet_kernels.MBConv) for m in converted.modules())
    return traffic.traffic_per_image(model, make, batch), traffic.traffic_per_image(converted, make, batch), blocks


def test_converted_b0_moves_less_in_fewer_kernels_and_rows_round_trip(tmp_path):
    eager, conv, blocks = b0_at(64)
    assert blocks == 16
    # per block: depthwise + gate + projection, + expand in the 15 blocks that have one; + stem + head
    assert conv.kernels < eager.kernels and conv.at_batch.effnet_kernels == 3 * 16 + 15 + 2
    assert eager.at_batch.effnet_kernels == 0
    assert 0 < conv.activation_bytes_per_image < eager.activation_bytes_per_image
    # per image: the slope; at batch 1 the fixed part is the meta BN's [C] float32 stats
    for c in (eager, conv):
        assert c.at_double.kernels == c.kernels
        assert c.fixed_activation_bytes >= 0
    rows = traffic.rows_for("b0", 64, {"eager": eager, "converted": conv}, blocks, batch=1, dtype="fp16",
                            layout="channels_last", wall_s=0.1, versions={"torch": "t", "commit": "abc"})
    path = tmp_path / "t.csv"
    append_rows(path, rows, traffic.TRAFFIC_COLUMNS)
    back = read_rows(path)
    assert [r["provider"] for r in back] == ["eager", "converted"]
    assert int(back[0]["kernels"]) == eager.kernels and int(back[1]["kernels"]) == conv.kernels
    assert float(back[1]["act_bytes_per_img"]) == conv.activation_bytes_per_image
    table = traffic.traffic_table(back)
    assert f"| b0 | 64 | {eager.kernels} | {conv.kernels} | {conv.kernels / eager.kernels:.2f} |" in table
    # rows counted under another torch (the adapters environment's library models): both named
    other = traffic.rows_for("timm-b0", 64, {"eager": eager, "converted": conv}, blocks, batch=1, dtype="fp16",
                             layout="channels_last", wall_s=0.1, versions={"torch": "t2", "commit": "def"})
    append_rows(path, other, traffic.TRAFFIC_COLUMNS)
    assert "(torch t, t2, commit abc, def)" in traffic.traffic_table(read_rows(path))


def test_cli_writes_csv_md_and_readme_for_b0(tmp_path, capsys):
    csv, md, readme = tmp_path / "t.csv", tmp_path / "t.md", tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{traffic.MARK_START}\nstale text\n{traffic.MARK_END}\nafter\n")
    rc = traffic.main(["--models", "b0", "--batch", "1", "--dtype", "bf16", "--memory-format", "nchw",
                       "--csv", str(csv), "--md", str(md), "--readme", str(readme), "--by-op"])
    assert rc == 0
    rows = read_rows(csv)
    assert [(r["model"], r["provider"], r["dtype"], r["layout"], r["resolution"]) for r in rows] == [
        ("b0", p, "bf16", "nchw", "224") for p in ("eager", "converted")]
    assert int(rows[0]["kernels"]) == 238 and int(rows[1]["kernels"]) < 238
    out = capsys.readouterr().out
    assert "effnet::dwconv_bn_act" in out and "aten::convolution" in out
    text = readme.read_text()
    assert text.startswith(f"# x\n\nbefore\n{traffic.MARK_START}\n") and text.endswith(f"{traffic.MARK_END}\nafter\n")
    assert "stale text" not in text and "| b0 | 224 | 238 |" in text
    assert md.read_text() in text


def test_cli_rejects_unknown_model_and_readme_without_markers(tmp_path, capsys):
    rc = traffic.main(["--models", "b9", "--csv", str(tmp_path / "t.csv"), "--md", str(tmp_path / "t.md")])
    assert rc == 2 and "b9" in capsys.readouterr().err
    readme = tmp_path / "R.md"
    readme.write_text("no markers\n")
    rc = traffic.main(["--report-only", "--csv", str(tmp_path / "t.csv"), "--md", str(tmp_path / "t.md"),
                       "--readme", str(readme)])
    assert rc == 2 and readme.read_text() == "no markers\n"


# --------------------------------------------------------------------------- negative controls

def test_negative_control_counting_views_breaks_the_hand_count(monkeypatch):
    monkeypatch.setattr(traffic, "classify", lambda func: traffic.KERNEL)  # planted: views launch kernels
    got = traffic.count_traffic(flatten_linear().to("meta"), torch.empty(N, 3, 2, 2, device="meta"))
    assert got.kernels != 1 and got.by_op != {"aten::addmm": traffic.OpTraffic(1, 15 * N * F32, 39 * F32)}
    got = traffic.count_traffic(conv_bn_silu().to("meta"), torch.empty(N, 4, 5, 5, device="meta"))
    assert got.kernels != 3  # the empty reserve becomes a kernel


def test_negative_control_ignoring_effnet_ops_breaks_the_count(monkeypatch):
    real = traffic.classify
    monkeypatch.setattr(traffic, "classify",
                        lambda func: traffic.QUERY if func.namespace == "effnet" else real(func))
    with torch.device("meta"):
        model = _DWConv(16)
    got = traffic.count_traffic(model, torch.empty(N, 16, 8, 8, device="meta", dtype=torch.float16))
    assert got.kernels == 0 and got.by_op == {}


def test_an_in_place_restride_is_not_a_kernel():
    """``as_strided_`` mutates only metadata (the pool of a channels_last map restrides its result)."""
    assert traffic.classify(torch.ops.aten.as_strided_.default) == traffic.VIEW
    x = torch.empty(N, 8, 4, 4, device="meta", dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    got = traffic.count_traffic(nn.AdaptiveAvgPool2d(1), x)
    assert got.kernels == 1 and "aten::as_strided_" not in got.by_op
