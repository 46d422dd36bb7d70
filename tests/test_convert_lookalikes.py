"""The torchvision and timm adapters on CPU, against structural look-alikes of their blocks.

torchvision (and so timm) does not import on the CPU machines; the real-library tests in
``test_convert_torchvision_timm.py`` run on the GPU machine. These look-alikes copy the
module structure, attribute names and forward of torchvision's ``MBConv`` and timm's
``InvertedResidual`` / ``DepthwiseSeparableConv`` (as of torchvision 0.2x / timm 1.x), and
are registered under those libraries' module names so the adapters find them.
"""

from __future__ import annotations

import copy
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effnet_kernels as ek
from effnet_kernels.nn import PointwiseSpec

from .defects import planted
from .model_checks import assert_converted_matches, calibrated
from .test_nn import randomize_bn


# ---------------------------------------------------------------- torchvision look-alike
class Conv2dNormActivation(nn.Sequential):
    def __init__(self, cin, cout, k=1, stride=1, groups=1, act=True):
        layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout, eps=1e-3)]
        if act:
            layers.append(nn.SiLU(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, c, r):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)
        self.activation, self.scale_activation = nn.SiLU(inplace=True), nn.Sigmoid()

    def forward(self, x):
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return s * x


class TvStochasticDepth(nn.Module):
    def forward(self, x):
        return x


class TvMBConv(nn.Module):
    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        mid = cin * expand
        layers = [Conv2dNormActivation(cin, mid)] if mid != cin else []
        layers += [Conv2dNormActivation(mid, mid, k, stride, groups=mid), SqueezeExcitation(mid, max(1, cin // 4)),
                   Conv2dNormActivation(mid, cout, act=False)]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = TvStochasticDepth()

    def forward(self, x):
        result = self.block(x)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += x
        return result


TvMBConv.__name__ = "MBConv"


# ---------------------------------------------------------------- timm look-alike
class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, c, apply_act=True):
        super().__init__(c, eps=1e-3)
        self.drop = nn.Identity()
        self.act = nn.SiLU(inplace=True) if apply_act else nn.Identity()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class Conv2dSame(nn.Conv2d):
    """timm's dynamic TF-"same" conv: pads in forward from the input size (timm's own arithmetic,
    written out here so the test does not share ``effnet_kernels.nn.tf_same_padding``)."""

    def forward(self, x):
        def same(size, k, s):
            return max((math.ceil(size / s) - 1) * s + k - size, 0)

        ph, pw = same(x.shape[2], self.kernel_size[0], self.stride[0]), same(x.shape[3], self.kernel_size[1], self.stride[1])
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class TimmSqueezeExcite(nn.Module):
    def __init__(self, c, r):
        super().__init__()
        self.conv_reduce, self.act1 = nn.Conv2d(c, r, 1), nn.SiLU(inplace=True)
        self.conv_expand, self.gate = nn.Conv2d(r, c, 1), nn.Sigmoid()

    def forward(self, x):
        x_se = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * self.gate(x_se)


def _dw(c, k, stride, same):
    if same:
        return Conv2dSame(c, c, k, stride, groups=c, bias=False)
    return nn.Conv2d(c, c, k, stride, k // 2, groups=c, bias=False)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, k, stride, expand, same=False, act=nn.SiLU):
        super().__init__()
        mid = cin * expand
        self.has_skip = cin == cout and stride == 1
        self.conv_s2d = self.bn_s2d = None
        self.conv_pw, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), BatchNormAct2d(mid)
        self.conv_dw, self.bn2 = _dw(mid, k, stride, same), BatchNormAct2d(mid)
        self.bn1.act, self.bn2.act = act(), act()
        self.aa = nn.Identity()
        self.se = TimmSqueezeExcite(mid, max(1, cin // 4))
        self.conv_pwl, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), BatchNormAct2d(cout, apply_act=False)
        self.drop_path = nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.bn1(self.conv_pw(x))
        x = self.aa(self.bn2(self.conv_dw(x)))
        x = self.bn3(self.conv_pwl(self.se(x)))
        return self.drop_path(x) + shortcut if self.has_skip else x


class DepthwiseSeparableConv(nn.Module):
    def __init__(self, cin, cout, k, stride, same=False):
        super().__init__()
        self.has_skip = stride == 1 and cin == cout
        self.conv_s2d = self.bn_s2d = None
        self.conv_dw, self.bn1 = _dw(cin, k, stride, same), BatchNormAct2d(cin)
        self.aa = nn.Identity()
        self.se = TimmSqueezeExcite(cin, max(1, cin // 4))
        self.conv_pw, self.bn2 = nn.Conv2d(cin, cout, 1, bias=False), BatchNormAct2d(cout, apply_act=False)
        self.drop_path = nn.Identity()

    def forward(self, x):
        shortcut = x
        x = self.se(self.aa(self.bn1(self.conv_dw(x))))
        x = self.bn2(self.conv_pw(x))
        return self.drop_path(x) + shortcut if self.has_skip else x


@pytest.fixture
def lookalike_libraries(monkeypatch):
    tv = types.ModuleType("torchvision.models.efficientnet")
    tv.MBConv = TvMBConv
    timm_blocks = types.ModuleType("timm.models._efficientnet_blocks")
    timm_blocks.InvertedResidual, timm_blocks.DepthwiseSeparableConv = InvertedResidual, DepthwiseSeparableConv
    monkeypatch.setitem(sys.modules, "torchvision.models.efficientnet", tv)
    monkeypatch.setitem(sys.modules, "timm.models._efficientnet_blocks", timm_blocks)


def _check(model, x, n_fused):
    model = calibrated(model, x)
    eager = copy.deepcopy(model)
    keys = list(model.state_dict())
    ek.convert(model, backend="torch")
    report = ek.conversion_report(model)
    assert len(report.swapped) == n_fused and not report.skipped, report
    assert_converted_matches(eager, model, x, dtypes=(torch.float32, torch.bfloat16), expect_blocks=n_fused)
    assert list(model.state_dict()) == keys
    return model


@pytest.mark.parametrize("defect", ["pad_shift", "skip_silu", "gate_skew", "excite_skip", "drop_residual", "tf_same_swap"])
def test_negative_control_lookalike_checks_reject_defect(lookalike_libraries, defect):
    """The adapters' parity check fails under each planted defect (TF "same" padding included)."""
    x = torch.randn(2, 16, 11, 10)
    model = nn.Sequential(DepthwiseSeparableConv(16, 16, 3, 1, True), InvertedResidual(16, 24, 5, 2, 6, True),
                          InvertedResidual(24, 24, 3, 1, 6, True))
    model = _check(model, x, 3)
    eager = ek.revert(copy.deepcopy(model))
    assert_converted_matches(eager, model, x)  # clean, against the same reverted copy: passes
    with planted(defect), pytest.raises(AssertionError):
        assert_converted_matches(eager, model, x)


def test_torchvision_lookalike(lookalike_libraries):
    model = nn.Sequential(TvMBConv(16, 16, 3, 1, 1), TvMBConv(16, 24, 5, 2, 6), TvMBConv(24, 24, 3, 1, 6))
    model = _check(model, torch.randn(2, 16, 11, 10), 3)
    assert isinstance(model[1].plan.pre[0], PointwiseSpec) and isinstance(model[1].plan.post[0], PointwiseSpec)
    assert model[0].plan.pre == () and model[2].plan.residual
    ek.revert(model)
    assert all(type(b) is TvMBConv for b in model)


@pytest.mark.parametrize("same", [False, True])
def test_timm_lookalike(lookalike_libraries, same):
    model = nn.Sequential(DepthwiseSeparableConv(16, 16, 3, 1, same), InvertedResidual(16, 24, 5, 2, 6, same),
                          InvertedResidual(24, 24, 3, 1, 6, same))
    model = _check(model, torch.randn(2, 16, 11, 10), 3)
    assert model[1].plan.dw.padding == ("same" if same else (2, 2, 2, 2))
    assert isinstance(model[1].plan.pre[0], PointwiseSpec) and model[1].plan.pre[0].activation == "silu"
    assert isinstance(model[1].plan.post[0], PointwiseSpec) and model[1].plan.post[0].activation == "identity"


def test_timm_lookalike_train_mode_is_the_original(lookalike_libraries):
    model = randomize_bn(nn.Sequential(InvertedResidual(8, 8, 3, 1, 4)))
    ref = copy.deepcopy(model).train()
    ek.convert(model).train()
    x = torch.randn(4, 8, 6, 6)
    torch.testing.assert_close(model(x), ref(x))
    for (k, v), (_, v_ref) in zip(model.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(v, v_ref, msg=k)


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6, nn.Hardswish])
def test_timm_lookalike_activation_family(lookalike_libraries, act):
    """ReLU / ReLU6 / hard-swish blocks fuse, the expand conv's activation folded with its BN."""
    kind = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish"}[act]
    x = torch.randn(2, 8, 7, 7)
    model = calibrated(nn.Sequential(InvertedResidual(8, 8, 3, 1, 4, act=act)), x)
    eager = copy.deepcopy(model)
    ek.convert(model, backend="torch")
    report = ek.conversion_report(model)
    assert report.swapped == ["0"] and model[0].plan.dw.activation == kind, report
    assert model[0].plan.pre[0].activation == kind  # the expand conv's BN + activation folded too
    assert_converted_matches(eager, model, x, dtypes=(torch.float32, torch.bfloat16), expect_blocks=1)


def test_timm_lookalike_unknown_activation_is_left_alone(lookalike_libraries):
    model = nn.Sequential(InvertedResidual(8, 8, 3, 1, 4, act=nn.GELU))
    ek.convert(model)
    report = ek.conversion_report(model)
    assert list(report.skipped) == ["0"] and "GELU is not one the kernels recognise" in report.skipped["0"], report
    assert type(model[0]) is InvertedResidual


class MixedConv2d(nn.ModuleDict):
    """timm's MixedConv2d: one conv per kernel size on channel splits (no ``.padding``)."""

    def __init__(self, c, kernels=(3, 5)):
        super().__init__()
        self.splits = [c // len(kernels)] * len(kernels)
        for i, (k, ch) in enumerate(zip(kernels, self.splits)):
            self[str(i)] = nn.Conv2d(ch, ch, k, padding=k // 2, groups=ch, bias=False)

    def forward(self, x):
        return torch.cat([conv(t) for conv, t in zip(self.values(), torch.split(x, self.splits, 1))], 1)


def test_timm_lookalike_mixed_conv_is_left_alone_not_raised(lookalike_libraries):
    """MixNet's MixedConv2d depthwise conv used to raise AttributeError ('padding') inside convert()."""
    block = InvertedResidual(8, 8, 3, 1, 4)
    block.conv_dw = MixedConv2d(32)
    model = nn.Sequential(block, InvertedResidual(8, 8, 3, 1, 4))
    ek.convert(model)
    report = ek.conversion_report(model)
    assert report.swapped == ["1"] and list(report.skipped) == ["0"], report
    assert "MixedConv2d" in report.skipped["0"] and "adapter error" not in report.skipped["0"]
    assert type(model[0]) is InvertedResidual


def test_unexpected_layout_is_a_skipped_block_never_an_exception(lookalike_libraries):
    """The safety net: an exception inside an adapter becomes a skipped block with the reason."""
    broken = InvertedResidual(8, 8, 3, 1, 4)
    del broken.se  # a layout the adapter does not expect: AttributeError inside plan()
    model = nn.Sequential(broken, InvertedResidual(8, 8, 3, 1, 4))
    ek.convert(model)
    report = ek.conversion_report(model)
    assert report.swapped == ["1"], report
    assert report.skipped["0"].startswith("adapter error: AttributeError: "), report
    assert type(model[0]) is InvertedResidual


# ---------------------------------------------------------------- torchvision MobileNet / MNASNet look-alikes
class TvInvertedResidualV2(nn.Module):
    """torchvision MobileNetV2's InvertedResidual: [pw CNA ReLU6], dw CNA ReLU6, Conv2d, BatchNorm2d."""

    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        mid = cin * expand
        self.use_res_connect = stride == 1 and cin == cout
        layers = []
        if expand != 1:
            layers.append(Conv2dNormActivation(cin, mid))
        layers += [Conv2dNormActivation(mid, mid, 3, stride, groups=mid), nn.Conv2d(mid, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        for layer in layers:
            if isinstance(layer, Conv2dNormActivation):
                layer[2] = nn.ReLU6(inplace=True)
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class TvInvertedResidualV3(TvMBConv):
    """torchvision MobileNetV3's InvertedResidual: hard-swish, SE with ReLU and hard-sigmoid."""

    def __init__(self, cin, cout, k, stride, expand):
        super().__init__(cin, cout, k, stride, expand)
        for m in self.block.modules():
            if isinstance(m, Conv2dNormActivation) and len(m) == 3:
                m[2] = nn.Hardswish()
            if isinstance(m, SqueezeExcitation):
                m.activation, m.scale_activation = nn.ReLU(), nn.Hardsigmoid()


class TvMnasInvertedResidual(nn.Module):
    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        mid = cin * expand
        self.apply_residual = cin == cout and stride == 1
        self.layers = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, k, padding=k // 2, stride=stride, groups=mid, bias=False), nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True), nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return self.layers(x) + x if self.apply_residual else self.layers(x)


class TvFusedMBConv(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block = nn.Sequential(Conv2dNormActivation(c, c, 3))

    def forward(self, x):
        return self.block(x) + x


TvInvertedResidualV2.__name__ = TvInvertedResidualV3.__name__ = "InvertedResidual"
TvMnasInvertedResidual.__name__, TvFusedMBConv.__name__ = "_InvertedResidual", "FusedMBConv"


@pytest.fixture
def mobilenet_lookalikes(monkeypatch, lookalike_libraries):
    sys.modules["torchvision.models.efficientnet"].FusedMBConv = TvFusedMBConv
    for name, attr, cls in (("mobilenetv2", "InvertedResidual", TvInvertedResidualV2),
                            ("mobilenetv3", "InvertedResidual", TvInvertedResidualV3),
                            ("mnasnet", "_InvertedResidual", TvMnasInvertedResidual)):
        mod = types.ModuleType(f"torchvision.models.{name}")
        setattr(mod, attr, cls)
        monkeypatch.setitem(sys.modules, f"torchvision.models.{name}", mod)


def test_torchvision_mobilenet_mnasnet_lookalikes(mobilenet_lookalikes):
    x = torch.randn(2, 16, 11, 10)
    model = calibrated(nn.Sequential(
        TvInvertedResidualV2(16, 16, 1, 1), TvInvertedResidualV2(16, 24, 2, 6),
        TvInvertedResidualV3(24, 24, 5, 1, 3), TvMnasInvertedResidual(24, 24, 3, 1, 3), TvFusedMBConv(24)), x)
    eager = copy.deepcopy(model)
    keys = list(model.state_dict())
    ek.convert(model, backend="torch")
    report = ek.conversion_report(model)
    assert report.swapped == ["0", "1", "2", "3"] and list(report.skipped) == ["4"], report
    assert report.skipped["4"].startswith("FusedMBConv has a full kxk conv"), report
    assert list(model.state_dict()) == keys
    assert model[0].plan.pre == () and model[0].plan.se is None and model[0].plan.residual
    assert [model[i].plan.dw.activation for i in range(4)] == ["relu6", "relu6", "hardswish", "relu"]
    assert isinstance(model[1].plan.post[0], PointwiseSpec)
    se = model[2].plan.se
    assert (se.activation, se.gate_kind) == ("relu", "hardsigmoid")
    assert_converted_matches(eager, model, x, dtypes=(torch.float32, torch.bfloat16), expect_blocks=4)
    ek.revert(model)
    assert [type(b) for b in model] == [type(b) for b in eager]


def test_sync_batchnorm_is_accepted(lookalike_libraries):
    """SyncBatchNorm (eval, running stats) fuses like BatchNorm2d. ``convert_sync_batchnorm`` turns
    timm's BatchNormAct2d into a plain SyncBatchNorm that keeps ``act`` as an unused child: the
    fused block follows what the model computes (no activation there), not the leftover child."""
    x = torch.randn(2, 16, 11, 10)
    model = calibrated(nn.Sequential(InvertedResidual(16, 24, 5, 2, 6), TvMBConv(24, 24, 3, 1, 6)), x)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model).eval()
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) >= 4
    assert isinstance(model[0].bn2.act, nn.SiLU)  # carried along, never called
    eager = copy.deepcopy(model)
    ek.convert(model, backend="torch")
    assert ek.conversion_report(model).swapped == ["0", "1"]
    assert model[0].plan.dw.activation == "identity" and model[1].plan.dw.activation == "silu"
    assert_converted_matches(eager, model, x, expect_blocks=2)
