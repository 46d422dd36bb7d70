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
    model = _check(model, x, 3)  # clean: passes
    eager = ek.revert(copy.deepcopy(model))
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


def test_timm_lookalike_relu_block_is_left_alone(lookalike_libraries):
    model = nn.Sequential(InvertedResidual(8, 8, 3, 1, 4, act=nn.ReLU))
    ek.convert(model)
    report = ek.conversion_report(model)
    assert list(report.skipped) == ["0"] and "ReLU is not SiLU" in report.skipped["0"]
    assert type(model[0]) is InvertedResidual
