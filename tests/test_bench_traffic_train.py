"""benchmarks.traffic --mode train: one training step's kernels and bytes, against hand counts (torch 2.13)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import effnet_kernels
from benchmarks import models as bench_models
from benchmarks import traffic
from benchmarks.records import read_rows
from effnet_kernels.blocks import ConvBNAct, MBConvBlock

from .test_bench_traffic import F16, F32, HW, N, X_BYTES, Y_BYTES, conv_bn_silu

W_BYTES = 8 * 4 * F32  # the conv weight                        128
C_BYTES = 8 * F32  # one [8] float32 tensor (BN weight, bias, stats)  32


def hand_train_step() -> dict[str, traffic.OpTraffic]:
    """conv_bn_silu() training on [2, 4, 5, 5] float32, loss ``out.float().sum()`` (``.float()``: no op)."""
    return {
        # forward
        "aten::add_": traffic.OpTraffic(1, 0, 2 * 8),  # num_batches_tracked += 1: int64, read and written
        "aten::convolution": traffic.OpTraffic(1, X_BYTES + Y_BYTES, W_BYTES),
        # reads y, weight, bias, running mean/var (their update is not in the schema: not written);
        # writes out and the saved batch mean and invstd
        "aten::native_batch_norm": traffic.OpTraffic(1, Y_BYTES + Y_BYTES + 2 * C_BYTES, 4 * C_BYTES),
        "aten::silu": traffic.OpTraffic(1, 2 * Y_BYTES),
        "aten::sum": traffic.OpTraffic(1, Y_BYTES + F32),  # the loss
        # backward: the loss's gradient, then each op's backward in turn
        "aten::ones_like": traffic.OpTraffic(1, F32),  # d loss / d loss; sum's backward expands it (a view)
        "aten::silu_backward": traffic.OpTraffic(1, 3 * Y_BYTES),  # the expanded grad (full size), BN out; grad
        # grad, y, saved mean/invstd; writes grad_y, grad weight, grad bias; weight, running stats: constants
        "aten::native_batch_norm_backward": traffic.OpTraffic(1, 3 * Y_BYTES + 4 * C_BYTES, 3 * C_BYTES),
        # grad_y, x -> grad weight only (x needs no grad); the weight is read
        "aten::convolution_backward": traffic.OpTraffic(1, Y_BYTES + X_BYTES + W_BYTES, W_BYTES),
    }


GRAD_BYTES = W_BYTES + 2 * C_BYTES  # each Parameter's gradient, written once


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_conv_bn_silu_training_step_hand_count(device):
    model = conv_bn_silu().to(device)
    got = traffic.count_train_step(model, torch.zeros(N, 4, 5, 5, device=device))
    hand = hand_train_step()
    assert got.by_op == hand
    assert got.kernels == 9
    assert got.activation_bytes == sum(v.bytes for v in hand.values())
    assert got.constant_bytes == sum(v.constant_bytes for v in hand.values()) and got.cached_bytes == 0
    # backward's gradients become the .grad (AccumulateGrad steals them: detach, no copy kernel)
    assert got.skipped == {"aten::detach": 3, "aten::empty": 1, "aten::expand": 1}
    assert got.grad_bytes == GRAD_BYTES
    assert all(p.grad is not None for p in model.parameters())
    assert not any(m.training for m in model.modules())  # its eval mode is restored


def test_accumulating_gradients_adds_into_them():
    model = conv_bn_silu().to("meta")
    got = traffic.count_train_step(model, torch.empty(N, 4, 5, 5, device="meta"), accumulate=True)
    hand = hand_train_step()
    # one in-place add per Parameter: reads the new gradient (an activation), reads and writes .grad
    # (the warm-up's: a constant, like the Parameter)
    assert got.by_op["aten::add_"] == traffic.OpTraffic(1 + 3, GRAD_BYTES, 2 * 8 + 2 * GRAD_BYTES)
    assert {k: v for k, v in got.by_op.items() if k != "aten::add_"} == {
        k: v for k, v in hand.items() if k != "aten::add_"}
    assert got.grad_bytes == 2 * GRAD_BYTES and got.cached_bytes == 0


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_loss_ops_of_a_half_linear(device):
    model = nn.Linear(4, 3).to(device, torch.float16)
    got = traffic.count_train_step(model, torch.zeros(N, 4, device=device, dtype=torch.float16))
    x, out, out32, w, b = N * 4 * F16, N * 3 * F16, N * 3 * F32, 3 * 4 * F16, 3 * F16
    assert got.by_op == {
        "aten::addmm": traffic.OpTraffic(1, x + out, b + w),
        "aten::_to_copy": traffic.OpTraffic(2, 2 * (out + out32)),  # out.float(); its backward casts the grad back
        "aten::sum": traffic.OpTraffic(2, out32 + F32 + out + b),  # the loss; the bias gradient
        "aten::ones_like": traffic.OpTraffic(1, F32),
        "aten::mm": traffic.OpTraffic(1, out + x + w),  # the weight gradient
    }
    assert got.grad_bytes == w + b


def test_backward_runs_where_the_mode_is_seen():
    """The dispatch-mode stack is thread-local; on the CPU and meta the autograd engine runs
    backward on the calling thread, which the mode is on: counted from another thread the step
    is the same, its backward ops included."""
    model = conv_bn_silu().to("meta")
    x = torch.empty(N, 4, 5, 5, device="meta")
    here = traffic.count_train_step(model, x)
    there: list[traffic.TrafficCount] = []
    worker = threading.Thread(target=lambda: there.append(traffic.count_train_step(model, x)))
    worker.start()
    worker.join()
    assert there[0].by_op == here.by_op == hand_train_step()


def test_negative_control_a_step_without_backward_counts_fewer_kernels(monkeypatch):
    model = conv_bn_silu().to("meta")
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: None)  # planted: backward never runs
    got = traffic.count_train_step(model, torch.empty(N, 4, 5, 5, device="meta"))
    assert got.kernels == 5 and got.by_op != hand_train_step() and got.grad_bytes == 0
    assert not any(k.endswith("_backward") for k in got.by_op)


def test_negative_control_decomposing_every_composite_op_breaks_the_hand_count(monkeypatch):
    # silu_backward has a kernel of its own and a CompositeImplicitAutograd one: the dispatcher runs
    # the kernel, so must the count (decomposed, it is sigmoid, mul, fill, sub, ... kernels)
    monkeypatch.setattr(traffic, "_decomposes", lambda func, device: func.namespace != "effnet" and
                        torch._C._dispatch_has_kernel_for_dispatch_key(
                            func.name(), torch._C.DispatchKey.CompositeImplicitAutograd))
    got = traffic.count_train_step(conv_bn_silu().to("meta"), torch.empty(N, 4, 5, 5, device="meta"))
    assert "aten::silu_backward" not in got.by_op and got.kernels > 9


def mbconv_net() -> nn.Sequential:
    """Two MBConv blocks (the first residual, with stochastic depth), on meta."""
    with torch.device("meta"):
        return nn.Sequential(MBConvBlock(16, 16, 3, 1, 4, drop_path_rate=0.2), MBConvBlock(16, 24, 3, 2, 4))


def _x(n: int) -> torch.Tensor:
    return torch.empty(n, 16, 8, 8, device="meta").contiguous(memory_format=torch.channels_last)


def _effnet(count: traffic.TrafficCount) -> dict[str, int]:
    return {k: v.kernels for k, v in count.by_op.items() if k.startswith("effnet::")}


def test_converted_mbconv_training_step_counts_the_fused_training_ops(monkeypatch):
    eager = mbconv_net()
    converted = effnet_kernels.convert(copy.deepcopy(eager))
    assert sum(isinstance(m, effnet_kernels.MBConv) for m in converted.modules()) == 2
    got = traffic.count_train_step(converted, _x(N))
    # forward: depthwise, gate, the projection taking the gate on load per block; backward (RecomputedMBConv):
    # the depthwise and the projection recomputed, then each op's backward
    assert _effnet(got) == {"effnet::dwconv_bn_act_train": 4, "effnet::se_gate": 2, "effnet::pointwise_conv": 4,
                            "effnet::dwconv_bn_act_train_backward": 2, "effnet::se_gate_backward": 2,
                            "effnet::pointwise_conv_backward": 2}
    assert got.effnet_kernels == 16
    # the expand convs (float32: not folded) in the forward and again in the recompute, each backward once
    assert got.by_op["aten::convolution"].kernels == 4 and got.by_op["aten::convolution_backward"].kernels == 2
    assert got.grad_bytes == sum(p.numel() * F32 for p in converted.parameters())
    plain = traffic.count_train_step(eager, _x(N))
    assert _effnet(plain) == {} and plain.by_op["aten::convolution_backward"].kernels == 10
    per_image = traffic.traffic_per_image(converted, _x, N, train=True)
    assert per_image.at_double.kernels == per_image.kernels == got.kernels
    assert per_image.activation_bytes_per_image > 0 and per_image.fixed_activation_bytes > 0  # grads, statistics
    # negative control: counting only the forward sees no backward op, and fewer kernels
    monkeypatch.setattr(torch.Tensor, "backward", lambda self, *a, **k: None)
    forward = traffic.count_train_step(converted, _x(N))
    assert _effnet(forward) == {"effnet::dwconv_bn_act_train": 2, "effnet::se_gate": 2, "effnet::pointwise_conv": 2}
    assert forward.kernels < got.kernels


class TinyTrafficNet(nn.Module):
    """Stem, one MBConv block, pooled linear head: the "traffic-train-test" model at 16x16."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 16, 3, stride=2)
        self.block = MBConvBlock(16, 16, 3, 1, 4)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def test_cli_train_mode_writes_rows_and_its_own_readme_section(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench_models._BUILDERS, "traffic-train-test", lambda: (TinyTrafficNet(), 16))
    csv, readme = tmp_path / "t.csv", tmp_path / "README.md"
    readme.write_text(f"{traffic.MARK_START}\neval stays\n{traffic.MARK_END}\n"
                      f"{traffic.TRAIN_MARK_START}\nstale\n{traffic.TRAIN_MARK_END}\n")
    common = ["--models", "traffic-train-test", "--batch", "2", "--dtype", "fp32", "--csv", str(csv)]
    assert traffic.main(common + ["--md", str(tmp_path / "e.md")]) == 0  # an eval row first
    assert traffic.main(common + ["--mode", "train", "--md", str(tmp_path / "t.md"), "--readme", str(readme)]) == 0
    rows = read_rows(csv)
    assert [(r["mode"], r["provider"]) for r in rows] == [
        ("infer", "eager"), ("infer", "converted"), ("train", "eager"), ("train", "converted")]
    eager, conv = rows[2:]
    assert int(conv["effnet_kernels"]) > 0 and int(conv["converted_blocks"]) == 1
    assert int(eager["grad_bytes"]) == int(conv["grad_bytes"]) > 0
    assert int(eager["kernels"]) > int(rows[0]["kernels"])  # a step launches more than a forward
    assert "traffic-train-test @16 train:" in capsys.readouterr().out
    text = readme.read_text()
    assert "eval stays" in text and "stale" not in text  # only the train section is rewritten
    train_md = (tmp_path / "t.md").read_text()
    assert train_md.startswith("### Memory traffic per training step, per image")
    assert "· train · batches 2 and 4" in train_md and f"| traffic-train-test | 16 | {eager['kernels']} |" in train_md
    assert train_md in text
    eval_md = traffic.traffic_table(rows)  # the eval table leaves the train rows out
    assert "· eval ·" in eval_md and "· train ·" not in eval_md and f"| {rows[0]['kernels']} |" in eval_md
    assert traffic.traffic_table(rows[:2], "train") == "_no training-step traffic results_\n"
