"""convert() on torchvision and timm EfficientNets (these import on the GPU machine, skip elsewhere)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import effnet_kernels as ek

from .defects import planted
from .model_checks import assert_converted_matches, calibrated

pytestmark = pytest.mark.adapters


def _check_model(model: nn.Module, fused_type_names: set[str], size: int = 64, expect_swapped=None) -> nn.Module:
    """Convert a calibrated ``model``: every block of those types fused, same keys and Parameters,
    DESIGN-rule parity end to end (fp32) and block by block (fp32, bf16), revert restores."""
    x = torch.randn(2, 3, size, size)
    model = calibrated(model, x)
    eager = copy.deepcopy(model)
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    with torch.no_grad():
        ref = model(x)
    originals = [n for n, m in model.named_modules() if type(m).__name__ in fused_type_names]
    ek.convert(model, backend="torch")
    report = ek.conversion_report(model)
    assert sorted(report.swapped) == sorted(originals), report
    if expect_swapped is not None:
        assert len(report.swapped) == expect_swapped
    assert list(model.state_dict()) == keys
    assert all(params[k] is p for k, p in model.named_parameters())
    assert_converted_matches(eager, model, x, dtypes=(torch.float32, torch.bfloat16), expect_blocks=len(originals))
    converted = copy.deepcopy(model)
    ek.revert(model)
    assert not any(isinstance(m, ek.MBConv) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref)
    return converted


def _check_train_step(model: nn.Module, size: int = 32) -> None:
    ref_model = calibrated(model, torch.randn(4, 3, size, size)).train()
    fused = ek.convert(copy.deepcopy(ref_model)).train()
    x = torch.randn(4, 3, size, size)
    outs = []
    for m in (ref_model, fused):
        torch.manual_seed(7)
        out = m(x)
        out.square().mean().backward()
        outs.append((out, {k: p.grad for k, p in m.named_parameters()}, m.state_dict()))
    torch.testing.assert_close(outs[1][0], outs[0][0])
    for k, g in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][k], g, msg=k)
    for k, v in outs[0][2].items():
        torch.testing.assert_close(outs[1][2][k], v, msg=k)


@pytest.mark.parametrize("name", ["efficientnet_b0", "efficientnet_b3"])
def test_torchvision_efficientnet(name):
    tvm = pytest.importorskip("torchvision.models")
    _check_model(getattr(tvm, name)(), {"MBConv"}, expect_swapped=16 if name.endswith("b0") else None)


def test_torchvision_train_step():
    tvm = pytest.importorskip("torchvision.models")
    _check_train_step(tvm.efficientnet_b0())


@pytest.mark.parametrize("name", ["efficientnet_b0", "tf_efficientnet_b0", "efficientnet_b2"])
def test_timm_efficientnet(name):
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, pretrained=False)
    _check_model(model, {"InvertedResidual", "DepthwiseSeparableConv"}, size=67 if name.startswith("tf_") else 64)


def test_timm_train_step():
    timm = pytest.importorskip("timm")
    _check_train_step(timm.create_model("efficientnet_b0", pretrained=False, drop_path_rate=0.2))


def test_timm_unfusable_activation_left_alone():
    timm = pytest.importorskip("timm")
    model = timm.create_model("mobilenetv3_large_100", pretrained=False)  # hard-swish / ReLU blocks
    ek.convert(model)
    report = ek.conversion_report(model)
    assert report.skipped, "expected blocks with non-SiLU activations to be left alone"
    assert all(("not SiLU" in why) or ("sigmoid" in why) for why in report.skipped.values()), report


@pytest.mark.parametrize("defect", ["pad_shift", "skip_silu", "gate_skew", "excite_skip", "drop_residual"])
def test_negative_control_torchvision_check_rejects_defect(defect):
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    eager = calibrated(tvm.efficientnet_b0(), x)
    converted = ek.convert(copy.deepcopy(eager), backend="torch")
    with planted(defect), pytest.raises(AssertionError):
        assert_converted_matches(eager, converted, x)


@pytest.mark.parametrize("defect", ["tf_same_swap", "squeeze_skew", "gate_skew"])
def test_negative_control_timm_check_rejects_defect(defect):
    """timm's own TF "same" padding (Conv2dSame) against a fused block with the split swapped."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    eager = calibrated(timm.create_model("tf_efficientnet_b0", pretrained=False), x)
    converted = ek.convert(copy.deepcopy(eager), backend="torch")
    with planted(defect), pytest.raises(AssertionError):
        assert_converted_matches(eager, converted, x)
