"""Eager EfficientNet B0-B7 (effnet_kernels.models / .blocks) against efficientnet_pytorch
and a hand-written fp64 functional forward."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from effnet_kernels import models
from effnet_kernels.blocks import MBConvBlock, drop_path

try:  # the independent reference; installed on the CPU CI machine, maybe not elsewhere
    from efficientnet_pytorch import EfficientNet as EPEfficientNet
    from efficientnet_pytorch.utils import GlobalParams
    from efficientnet_pytorch.utils import round_filters as ep_round_filters
except ImportError:  # pragma: no cover
    EPEfficientNet = None

needs_ep = pytest.mark.skipif(EPEfficientNet is None, reason="efficientnet_pytorch is not installed")

EXPECTED_PARAMS = {
    "b0": 5_288_548,
    "b1": 7_794_184,
    "b2": 9_109_994,
    "b3": 12_233_232,
    "b4": 19_341_616,
    "b5": 30_389_784,
    "b6": 43_040_704,
    "b7": 66_347_960,
}


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- structure vs efficientnet_pytorch


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_param_count(name):
    with torch.device("meta"):  # structure only: no memory, no init
        m = models.EfficientNet(name)
    assert _numel(m) == EXPECTED_PARAMS[name]


@needs_ep
@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_structure_and_param_count_match_efficientnet_pytorch(name):
    with torch.device("meta"):
        ours = models.EfficientNet(name)
        theirs = EPEfficientNet.from_name(f"efficientnet-{name}")
    assert _numel(ours) == _numel(theirs) == EXPECTED_PARAMS[name]
    assert len(ours.blocks) == len(theirs._blocks)
    for i, (a, b) in enumerate(zip(ours.blocks, theirs._blocks)):
        got = (a.dw_conv.in_channels, a.dw_conv.kernel_size, tuple(a.dw_conv.stride),
               a.project_conv.out_channels, a.se.conv_reduce.out_channels)
        want = (b._depthwise_conv.in_channels, b._depthwise_conv.kernel_size, tuple(b._depthwise_conv.stride),
                b._project_conv.out_channels, b._se_reduce.out_channels)
        assert got == want, f"block {i}"
        assert hasattr(a, "expand_conv") == hasattr(b, "_expand_conv"), f"block {i}"
    assert ours.head.conv.out_channels == theirs._conv_head.out_channels
    assert ours.dropout.p == theirs._global_params.dropout_rate


def test_round_filters_known_values():
    b2 = [models.round_filters(c, 1.1) for c in (32, 16, 24, 40, 80, 112, 192, 320, 1280)]
    assert b2 == [32, 16, 24, 48, 88, 120, 208, 352, 1408]
    b7 = [models.round_filters(c, 2.0) for c in (32, 16, 24, 40, 80, 112, 192, 320, 1280)]
    assert b7 == [64, 32, 48, 80, 160, 224, 384, 640, 2560]
    assert models.round_filters(3, 1.0) == 8  # never below the divisor


@needs_ep
def test_round_filters_matches_efficientnet_pytorch():
    for width in sorted({p[0] for p in models.PARAMS.values()} | {0.35, 0.5, 0.75, 2.5}):
        gp = GlobalParams(width_coefficient=width, depth_divisor=8, min_depth=None)
        for c in (8, 16, 24, 32, 40, 80, 112, 192, 320, 1280, 3, 17):
            assert models.round_filters(c, width) == ep_round_filters(c, gp), (c, width)


def test_round_repeats():
    assert [models.round_repeats(r, 3.1) for r in (1, 2, 3, 4)] == [4, 7, 10, 13]
    assert [models.round_repeats(r, 1.0) for r in (1, 2, 3, 4)] == [1, 2, 3, 4]


def test_native_resolutions_and_attributes():
    want = {"b0": 224, "b1": 240, "b2": 260, "b3": 300, "b4": 380, "b5": 456, "b6": 528, "b7": 600}
    assert models.MODEL_NAMES == tuple(want)
    assert {n: models.native_resolution(n) for n in models.MODEL_NAMES} == want
    m = models.efficientnet("b2", num_classes=10)
    assert (m.name, m.resolution, m.classifier.out_features) == ("b2", 260, 10)


@pytest.mark.parametrize("call", [
    lambda: models.efficientnet("b8"),
    lambda: models.native_resolution("B0"),
    lambda: models.layer_shapes("efficientnet-b0"),
    lambda: models.EfficientNet("x"),
])
def test_bad_name_raises_naming_valid_names(call):
    with pytest.raises(ValueError, match="b0, b1, b2, b3, b4, b5, b6, b7"):
        call()


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="num_classes"):
        models.efficientnet("b0", num_classes=0)
    with pytest.raises(ValueError, match="kernel_size"):
        MBConvBlock(8, 8, 4, 1, 6)
    with pytest.raises(ValueError, match="drop_path_rate"):
        MBConvBlock(8, 8, 3, 1, 6, drop_path_rate=1.5)
    with pytest.raises(ValueError, match="resolution"):
        models.layer_shapes("b0", resolution=0)


def test_initialisation():
    m = models.efficientnet("b0")
    w = m.head.conv.weight  # fan_out = 1280 -> std sqrt(2 / 1280)
    assert abs(w.std().item() / math.sqrt(2 / 1280) - 1) < 0.02
    assert torch.equal(m.head.bn.weight, torch.ones_like(m.head.bn.weight))
    assert torch.equal(m.head.bn.bias, torch.zeros_like(m.head.bn.bias))
    bound = 1 / math.sqrt(1000)
    assert m.classifier.weight.abs().max() <= bound and m.classifier.weight.abs().max() > 0.9 * bound
    assert torch.equal(m.blocks[3].se.conv_reduce.bias, torch.zeros_like(m.blocks[3].se.conv_reduce.bias))


# ---------------------------------------------------------------- forward


def test_forward_train_step_has_gradients():
    m = models.efficientnet("b0", num_classes=7)
    y = m(torch.randn(2, 3, 32, 32))
    y.square().mean().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def _randomise_bn(block: torch.nn.Module) -> None:
    for bn in block.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.5, 0.5)


def _silu(t):
    return t / (1 + torch.exp(-t))


def _bn_eval(t, bn):
    v = lambda a: a.detach()[None, :, None, None]  # noqa: E731
    return (t - v(bn.running_mean)) / torch.sqrt(v(bn.running_var) + bn.eps) * v(bn.weight) + v(bn.bias)


def _mbconv_fp64(block: MBConvBlock, x: torch.Tensor, k: int, stride: int, expand: bool, se: bool) -> torch.Tensor:
    """Independent functional MBConv (eval mode) from the block's parameters."""
    h = x
    if expand:
        h = _silu(_bn_eval(F.conv2d(h, block.expand_conv.weight), block.expand_bn))
    mid = h.shape[1]
    h = F.conv2d(F.pad(h, (k // 2,) * 4), block.dw_conv.weight, stride=stride, groups=mid)
    h = _silu(_bn_eval(h, block.dw_bn))
    if se:
        s = h.sum((2, 3), keepdim=True) / (h.shape[2] * h.shape[3])
        s = _silu(F.conv2d(s, block.se.conv_reduce.weight, block.se.conv_reduce.bias))
        s = F.conv2d(s, block.se.conv_expand.weight, block.se.conv_expand.bias)
        h = h / (1 + torch.exp(-s))
    h = _bn_eval(F.conv2d(h, block.project_conv.weight), block.project_bn)
    if x.shape == h.shape and stride == 1:
        h = h + x
    return h


@pytest.mark.parametrize("cin,cout,k,stride,expand,se_ratio", [
    (16, 16, 5, 1, 6, 0.25),   # residual, SE, expanded
    (12, 20, 3, 2, 6, 0.25),   # strided, no residual
    (24, 16, 3, 1, 1, 0.25),   # no expansion (like B0's first block)
    (8, 8, 3, 1, 4, None),     # no SE
])
def test_mbconv_eval_matches_functional_fp64(cin, cout, k, stride, expand, se_ratio):
    block = MBConvBlock(cin, cout, k, stride, expand, se_ratio=se_ratio, drop_path_rate=0.3).double().eval()
    _randomise_bn(block)
    assert hasattr(block, "expand_conv") == (expand != 1)
    assert hasattr(block, "se") == bool(se_ratio)
    if se_ratio:
        assert block.se.conv_reduce.out_channels == max(1, int(cin * se_ratio))
    x = torch.randn(3, cin, 11, 9, dtype=torch.float64)
    with torch.no_grad():
        got = block(x)
        want = _mbconv_fp64(block, x, k, stride, expand != 1, bool(se_ratio))
    assert block.has_residual == (stride == 1 and cin == cout)
    assert got.shape == want.shape == (3, cout, (11 - 1) // stride + 1, (9 - 1) // stride + 1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_mbconv_explicit_padding():
    block = MBConvBlock(8, 16, 5, 1, 2, padding=0)
    assert block.dw_conv.padding == (0, 0)
    assert block(torch.randn(2, 8, 9, 9)).shape == (2, 16, 5, 5)
    with pytest.raises(ValueError, match="padding"):
        MBConvBlock(8, 8, 5, 1, 2, padding=0)  # the residual add would not fit


# ---------------------------------------------------------------- stochastic depth


def _branch(block: MBConvBlock, x: torch.Tensor) -> torch.Tensor:
    """The residual branch (output minus shortcut) with stochastic depth switched off."""
    rate, block.drop_path_rate = block.drop_path_rate, 0.0
    try:
        return block(x) - x
    finally:
        block.drop_path_rate = rate


def test_stochastic_depth_training_residual_drops_whole_samples():
    p = 0.5
    block = MBConvBlock(8, 8, 3, 1, 4, drop_path_rate=p).double().train()
    x = torch.randn(64, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        branch = _branch(block, x)  # training-mode BN uses batch stats: same for every call
        out = block(x)
    kept = torch.isclose(out, x + branch / (1 - p), rtol=1e-12, atol=1e-12).flatten(1).all(1)
    dropped = torch.equal(out[~kept], x[~kept])
    assert dropped, "a sample that is not kept-and-rescaled must be exactly the shortcut"
    assert 0 < int(kept.sum()) < 64, "with p=0.5 and 64 samples both outcomes must occur"


def test_stochastic_depth_off_in_eval_and_without_residual():
    res = MBConvBlock(8, 8, 3, 1, 4, drop_path_rate=0.9).double().eval()
    x = torch.randn(16, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(res(x), x + _branch(res, x), rtol=0, atol=0)

    strided = MBConvBlock(8, 8, 3, 2, 4, drop_path_rate=0.9).double().train()
    assert not strided.has_residual
    with torch.no_grad():
        a, b = strided(x), strided(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a.flatten(1).abs().sum(1) > 0).all()


def test_drop_path_function():
    x = torch.randn(4000, 3, 2, 2) + 3.0
    assert drop_path(x, 0.3, training=False) is x
    assert drop_path(x, 0.0, training=True) is x
    assert torch.equal(drop_path(x, 1.0, training=True), torch.zeros_like(x))
    y = drop_path(x, 0.25, training=True)
    ratio = (y / x).flatten(1)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio))  # per-sample
    first = ratio[:, 0]
    assert torch.all((first == 0) | torch.isclose(first, torch.tensor(1 / 0.75)))
    assert abs((ratio[:, 0] > 0).float().mean().item() - 0.75) < 0.04


def test_drop_path_schedule():
    with torch.device("meta"):
        m = models.EfficientNet("b0")
    n = len(m.blocks)
    assert [b.drop_path_rate for b in m.blocks] == [0.2 * i / n for i in range(n)]


# ---------------------------------------------------------------- layer_shapes


def test_layer_shapes_b0_structure():
    shapes = models.layer_shapes("b0")
    assert len(shapes) == 16
    assert [s.index for s in shapes] == list(range(16))
    assert [s.kernel for s in shapes] == [3, 3, 3, 5, 5, 3, 3, 3, 5, 5, 5, 5, 5, 5, 5, 3]
    assert [s.stride for s in shapes] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]
    assert [s.out_channels for s in shapes] == [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112,
                                               192, 192, 192, 192, 320]
    assert [s.expand_ratio for s in shapes] == [1] + [6] * 15
    assert [s.mid_channels for s in shapes] == [s.in_channels * s.expand_ratio for s in shapes]
    assert [s.se_reduced for s in shapes] == [max(1, s.in_channels // 4) for s in shapes]
    assert (shapes[0].H, shapes[0].W, shapes[0].in_channels) == (112, 112, 32)
    assert [s.Ho for s in shapes] == [112, 56, 56, 28, 28, 14, 14, 14, 14, 14, 14, 7, 7, 7, 7, 7]
    assert sum(s.has_residual for s in shapes) == 9
    assert all(s.batch == 1 and s.padding == s.kernel // 2 for s in shapes)
    assert models.layer_shapes("b0", batch=32)[5].batch == 32


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_forward_small_resolution_finite_and_layer_shapes_match(name):
    """Eval forward at a small size gives finite logits; every block's input/output shape,
    as seen by forward hooks on the real model, is what layer_shapes() says."""
    resolution = 35 if name == "b3" else 32  # one odd size: floor/ceil mistakes show
    m = models.efficientnet(name).eval()
    seen = []
    hooks = [b.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].shape, out.shape)))
             for b in m.blocks]
    with torch.no_grad():
        y = m(torch.randn(2, 3, resolution, resolution))
    for h in hooks:
        h.remove()
    assert y.shape == (2, 1000)
    assert torch.isfinite(y).all()
    assert y.std() > 0
    shapes = models.layer_shapes(name, batch=2, resolution=resolution)
    assert len(shapes) == len(seen) == len(m.blocks)
    for s, (i, o) in zip(shapes, seen):
        assert tuple(i) == (2, s.in_channels, s.H, s.W), s.index
        assert tuple(o) == (2, s.out_channels, s.Ho, s.Wo), s.index
        assert m.blocks[s.index].dw_conv.in_channels == s.mid_channels


def test_depthwise_shapes():
    classes = models.depthwise_shapes(["b0"])
    assert classes == sorted({s.depthwise for s in models.layer_shapes("b0")})
    assert (32, 112, 112, 3, 1) in classes and (96, 112, 112, 3, 2) in classes
    assert len(classes) == 12  # blocks 7, 10, 13, 14 repeat an earlier block's shape class
