"""Stems and heads (conv + BN + activation containers) fused by ``convert``: one op each in eval,
the container's own children, keys and behaviour otherwise."""

from __future__ import annotations

import copy
import pickle
import re

import pytest
import torch
from torch import nn

import effnet_kernels as ek
from effnet_kernels.blocks import ConvBNAct
from effnet_kernels.stem_head import FusedConvBNAct, fusable_reason

from .defects import planted
from .model_checks import assert_network_parity, calibrated
from .test_ops_pointwise import _calls as _ops_of


@pytest.fixture(scope="module")
def b0_pair():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    eager = calibrated(ek.models.efficientnet("b0"), x)
    return eager, ek.convert(copy.deepcopy(eager), backend="torch"), x


def test_convert_fuses_the_stem_and_head_and_keeps_keys(b0_pair):
    eager, converted, x = b0_pair
    report = ek.conversion_report(converted)
    assert report.fused_convs == ["stem", "head"] and len(report.swapped) == 16
    assert "2 stem/head convs fused" in str(report)
    assert isinstance(converted.stem, FusedConvBNAct) and isinstance(converted.head, nn.Sequential)
    assert list(converted.state_dict()) == list(eager.state_dict())
    assert converted.stem[0] is converted.stem.conv  # still indexable and iterable like the container
    assert converted.head.conv.out_channels == 1280
    assert_network_parity(eager, converted, x)


def test_each_is_one_op(b0_pair):
    _, converted, x = b0_pair
    stem_names, y = _ops_of(converted.stem, x)
    assert stem_names == ["effnet.conv_bn_act"]
    head_in = torch.randn(2, 320, 2, 2)
    assert _ops_of(converted.head, head_in)[0] == ["effnet.pointwise_conv"]
    with torch.no_grad():
        torch.testing.assert_close(y, ek.revert(copy.deepcopy(converted)).stem(x), rtol=1e-5, atol=1e-5)


def test_negative_control_network_check_rejects_a_stem_padding_shift(b0_pair):
    eager, converted, x = b0_pair
    with planted("conv_pad_shift"), pytest.raises(AssertionError, match="network output"):
        assert_network_parity(eager, converted, x)


def _pair(container: nn.Module, x: torch.Tensor):
    eager = calibrated(container, x)
    return eager, ek.convert(copy.deepcopy(eager), backend="torch")


def test_training_runs_the_children_in_sequence():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 9, 9)
    eager, fused = _pair(ConvBNAct(3, 8, 3, 2), x)
    assert isinstance(fused, FusedConvBNAct)
    eager.train(), fused.train()
    torch.testing.assert_close(fused(x), eager(x))
    for a, b in zip(eager.buffers(), fused.buffers()):  # running statistics updated alike
        torch.testing.assert_close(b, a)
    assert fused.unfused_reason() == "training"


FROZEN_CONTAINERS = {"stem": (lambda: ConvBNAct(3, 8, 3, 2), (4, 3, 9, 9), "effnet.conv_bn_act", "conv_pad_shift"),
                     "head": (lambda: ConvBNAct(6, 12, 1, 1), (4, 6, 5, 5), "effnet.pointwise_conv",
                              "pointwise_skip_act")}


def _frozen_pair(kind: str):
    from .test_train_frozen_bn import freeze_bn

    make, shape, _, _ = FROZEN_CONTAINERS[kind]
    torch.manual_seed(3)
    x = torch.randn(shape)
    eager, fused = _pair(make(), x)
    assert isinstance(fused, FusedConvBNAct)
    return freeze_bn(eager.train()), freeze_bn(fused.train()), x


@pytest.mark.parametrize("kind", list(FROZEN_CONTAINERS))
def test_frozen_batchnorm_in_training_is_one_op_with_autograd(kind):
    """Training with the BatchNorm in eval mode (fine-tuning): the one op, no BatchNorm or aten conv, and output,
    x's gradient and every parameter gradient by DESIGN's rule against an fp64 twin; the running statistics stay."""
    from .test_train_frozen_bn import assert_frozen_step

    eager, fused, x = _frozen_pair(kind)
    assert fused.unfused_reason(x) is None
    names, _ = _ops_of(fused, x)
    assert [n for n in names if n.startswith("effnet.")] == [FROZEN_CONTAINERS[kind][2]], names
    assert not any("batch_norm" in n or "convolution" in n for n in names), names
    assert_frozen_step(eager, fused, x)
    fused.bn.train()  # batch statistics again: the children in sequence
    assert fused.unfused_reason(x) == "training"


@pytest.mark.parametrize("kind", list(FROZEN_CONTAINERS))
def test_negative_control_frozen_training_check_rejects_defect(kind):
    from .test_train_frozen_bn import assert_frozen_step

    eager, fused, x = _frozen_pair(kind)
    with planted(FROZEN_CONTAINERS[kind][3]), pytest.raises(AssertionError):
        assert_frozen_step(eager, fused, x)


def test_a_replaced_child_is_honoured():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 8, 8)
    eager, fused = _pair(ConvBNAct(3, 8, 3, 1), x)
    for m in (eager, fused):
        m.act = nn.ReLU6()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x), rtol=1e-5, atol=1e-5)
    assert fused.unfused_reason() is None  # still one op, now with relu6
    for m in (eager, fused):
        m.act = nn.GELU()
    assert "GELU" in fused.unfused_reason()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x))


def test_float64_runs_eagerly_and_an_explicit_kernel_backend_refuses_it():
    torch.manual_seed(3)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    eager = calibrated(ConvBNAct(3, 4, 3, 2).double(), x)
    fused = ek.convert(copy.deepcopy(eager), backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x))
    pinned = ek.convert(copy.deepcopy(eager), backend="triton")
    with pytest.raises(ek.BackendUnavailableError, match="float64"):
        pinned(x)


def test_revert_deepcopy_pickle_and_filter():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 8, 8)
    eager, fused = _pair(ConvBNAct(3, 4, 3, 2), x)
    with torch.no_grad():
        want = fused(x)
        for other in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
            assert isinstance(other, FusedConvBNAct)
            torch.testing.assert_close(other(x), want)
    back = ek.revert(fused)
    assert type(back) is ConvBNAct and back.conv is fused.conv
    net = nn.Sequential(ConvBNAct(3, 4, 3, 2), ConvBNAct(4, 4, 1))
    ek.convert(net, filter_fn=lambda m, name: name != "1")
    assert isinstance(net[0], FusedConvBNAct) and type(net[1]) is ConvBNAct
    assert ek.convert(net) is net and isinstance(net[0], FusedConvBNAct)  # converting twice changes nothing


def test_unfusable_containers_are_left_alone():
    grouped = ConvBNAct(4, 4, 3)
    grouped.conv = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False)
    dilated = ConvBNAct(4, 4, 3)
    dilated.conv = nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False)
    gelu = ConvBNAct(4, 4, 3, activation=nn.GELU())
    for c in (grouped, dilated, gelu):
        assert fusable_reason(c) is not None
        assert type(ek.convert(c)) is ConvBNAct
    with pytest.raises(ValueError, match="cannot fuse"):
        FusedConvBNAct.from_container(gelu)


def _padded_container(pad: nn.Module) -> nn.Sequential:
    """Hugging Face's stem layout: a pad module, then an unpadded stride-2 conv, BN and SiLU."""
    return nn.Sequential(pad, nn.Conv2d(3, 8, 3, 2, padding=0, bias=False), nn.BatchNorm2d(8), nn.SiLU())


def test_a_leading_zero_pad_is_part_of_the_one_op():
    torch.manual_seed(5)
    x = torch.randn(2, 3, 9, 10)  # odd and even sizes: the asymmetric pad lands on different edges
    eager = calibrated(_padded_container(nn.ZeroPad2d((0, 1, 0, 1))), x)
    fused = FusedConvBNAct.from_container(copy.deepcopy(eager), backend="torch")
    names, y = _ops_of(fused, x)
    assert names == ["effnet.conv_bn_act"]
    with torch.no_grad():
        want = eager(x)
    assert y.shape == want.shape == (2, 8, 4, 5)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    # the pad is honoured, not assumed: the same container with the pad on the other edges differs
    other = copy.deepcopy(eager)
    other[0] = nn.ZeroPad2d((1, 0, 1, 0))
    with torch.no_grad():
        assert not torch.allclose(other(x), want, atol=1e-3)
        torch.testing.assert_close(FusedConvBNAct.from_container(other, backend="torch")(x), other(x),
                                   rtol=1e-5, atol=1e-5)
    assert list(fused.state_dict()) == list(eager.state_dict())


@pytest.mark.parametrize("pad, why", [(nn.ConstantPad2d((0, 1, 0, 1), 1.0), "not a ZeroPad2d"),
                                      (nn.ReflectionPad2d(1), "not .*conv, BatchNorm"),
                                      (nn.ZeroPad2d((0, -1, 0, 1)), "non-negative")])
def test_a_pad_that_is_not_a_zero_pad_is_refused(pad, why):
    container = _padded_container(pad)
    assert re.search(why, fusable_reason(container))
    with pytest.raises(ValueError, match="cannot fuse"):
        FusedConvBNAct.from_container(container)


def test_a_constant_zero_pad_counts_as_a_zero_pad():
    torch.manual_seed(6)
    x = torch.randn(2, 3, 8, 8)
    eager = calibrated(_padded_container(nn.ConstantPad2d((1, 1, 1, 1), 0.0)), x)
    fused = FusedConvBNAct.from_container(copy.deepcopy(eager), backend="torch")
    names, y = _ops_of(fused, x)
    assert names == ["effnet.conv_bn_act"]
    with torch.no_grad():
        torch.testing.assert_close(y, eager(x), rtol=1e-5, atol=1e-5)


def test_compiled_converted_model_fullgraph(b0_pair):
    _, converted, x = b0_pair
    with torch.no_grad():
        want = converted(x)
        got = torch.compile(converted, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_head_and_the_pool_are_one_op_in_a_converted_network(b0_pair):
    """effnet_kernels.models: the converted head computes conv + BN + SiLU + global average pool in
    one pointwise_conv(pool=True); the [N, 1280, H, W] map is never formed."""
    eager, converted, x = b0_pair
    names, out = _ops_of(converted, x)
    assert names.count("effnet.pointwise_conv") == 15 + 16 + 1 and "aten.mean" not in names
    assert "aten.adaptive_avg_pool2d" not in names and "aten._adaptive_avg_pool2d" not in names
    feats = torch.randn(2, 320, 3, 2)
    with torch.no_grad():
        want = torch.flatten(nn.functional.adaptive_avg_pool2d(eager.head(feats), 1), 1)
        torch.testing.assert_close(converted.head.forward_pooled(feats), want, rtol=1e-5, atol=1e-6)
    # forward_features still returns the head's feature map
    with torch.no_grad():
        want = eager.forward_features(x)
        torch.testing.assert_close(converted.forward_features(x), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_a_replaced_pool_is_honoured(b0_pair):
    eager, converted, x = b0_pair
    eager, converted = copy.deepcopy(eager), copy.deepcopy(converted)
    for m in (eager, converted):
        m.pool = nn.AdaptiveMaxPool2d(1)
    names, out = _ops_of(converted, x)
    assert "aten.adaptive_max_pool2d" in names
    with torch.no_grad():
        torch.testing.assert_close(out, eager(x), rtol=1e-4, atol=1e-4 * eager(x).abs().max().item())
