"""Frozen BatchNorm modules of the real libraries (second CI env, ``-m adapters``): timm's
``freeze_batch_norm_2d`` (``FrozenBatchNormAct2d`` in place of ``BatchNormAct2d``, torchvision's
``FrozenBatchNorm2d`` in place of ``BatchNorm2d``) and torchvision models built with
``norm_layer=FrozenBatchNorm2d``, BatchNorm calibrated before freezing.

Every block fuses (counted), the stems and heads of torchvision's models too; eval logits by the
DESIGN rule end to end and block by block; a training step with the frozen modules (every block on
the fused frozen path) by the rule, gradients included; revert gives the model back; frozen after
convert() the blocks re-plan onto the frozen modules (and back when unfrozen). Negative
control: a planted defect fails the eval and the training check. Small inputs (64 x 64, batch 2).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import effnet_kernels as ek
from effnet_kernels import testing
from effnet_kernels._norms import is_frozen_batchnorm

from .defects import planted
from .model_checks import assert_converted_matches, assert_train_parity, calibrated
from .test_ops_pointwise import _Ops

pytestmark = pytest.mark.adapters

timm = pytest.importorskip("timm")
tvm = pytest.importorskip("torchvision.models")
from timm.layers.norm_act import FrozenBatchNormAct2d  # noqa: E402
from timm.utils.model import freeze_batch_norm_2d  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402


def _x() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 3, 64, 64)


def timm_frozen_b0(x: torch.Tensor) -> nn.Module:
    """timm's efficientnet_b0 (random init, stochastic depth 0.2), calibrated on ``x``, then frozen by timm."""
    torch.manual_seed(0)
    model = calibrated(timm.create_model("efficientnet_b0", pretrained=False, drop_path_rate=0.2), x)
    return freeze_batch_norm_2d(model)


def torchvision_frozen(name: str, x: torch.Tensor, **norm_kwargs) -> nn.Module:
    """torchvision's ``name`` built with ``norm_layer=FrozenBatchNorm2d``, holding the state of a BatchNorm
    twin calibrated on ``x``."""
    torch.manual_seed(0)
    twin = calibrated(getattr(tvm, name)(), x)
    model = getattr(tvm, name)(norm_layer=functools.partial(FrozenBatchNorm2d, **norm_kwargs))
    model.load_state_dict(twin.state_dict())  # FrozenBatchNorm2d drops num_batches_tracked
    return model.eval()


def _convert(eager: nn.Module, x: torch.Tensor, blocks: int, convs: list[str]) -> nn.Module:
    assert not any(isinstance(m, nn.BatchNorm2d) for m in eager.modules()), "not every BatchNorm is frozen"
    keys = list(eager.state_dict())
    converted = ek.convert(copy.deepcopy(eager), backend="torch")
    report = ek.conversion_report(converted)
    assert len(report.swapped) == blocks and not report.skipped and report.fused_convs == convs, report
    assert list(converted.state_dict()) == keys
    assert all(converted.get_submodule(n).fused_active(x) for n in report.swapped)
    with torch.no_grad(), _Ops() as rec:
        converted(x)
    assert rec.names.count("effnet.dwconv_bn_act") == blocks, rec.names
    return converted


def _check_eval(eager: nn.Module, x: torch.Tensor, blocks: int, convs: list[str]) -> nn.Module:
    converted = _convert(eager, x, blocks, convs)
    assert_converted_matches(eager, converted, x, expect_blocks=blocks)
    reverted = ek.revert(copy.deepcopy(converted))
    assert [type(m) for m in reverted.modules()] == [type(m) for m in eager.modules()]
    with torch.no_grad():
        torch.testing.assert_close(reverted(x), eager(x))
    return converted


def _check_train(eager: nn.Module, x: torch.Tensor) -> None:
    eager = copy.deepcopy(eager).train()
    fused = ek.convert(copy.deepcopy(eager), backend="torch").train()
    names = testing.fused_block_names(fused)
    reasons = {n: fused.get_submodule(n).train_unfused_reason(x) for n in names}
    assert names and not any(reasons.values()), reasons
    assert not any(list(m.parameters()) for m in fused.modules() if is_frozen_batchnorm(m))
    testing.assert_sensitive(copy.deepcopy(eager), x, testing.FP32_RELATIVE[testing.BACKWARD_FACTOR])
    assert_train_parity(eager, fused, x, steps=1, per_tensor=False)


# ---------------------------------------------------------------- timm
def test_timm_freeze_batch_norm_2d_efficientnet_b0():
    x = _x()
    eager = timm_frozen_b0(x)
    assert sum(isinstance(m, FrozenBatchNormAct2d) for m in eager.modules()) == 49
    converted = _check_eval(eager, x, 16, ["conv_stem", "conv_head"])  # FrozenBatchNormAct2d: BN, then its SiLU
    assert [converted.forward_features.unfused_reason(c, x) for c in ("stem", "head")] == [None, None]
    block = converted.blocks[1][0]
    assert block.plan.pre[0].activation == "silu" and block.plan.dw.activation == "silu"


def test_timm_freeze_after_convert_replans_and_unfreeze_goes_back():
    """Frozen after convert(): each block sees its new norms and fuses them; unfrozen again, BatchNormAct2d."""
    x = _x()
    torch.manual_seed(0)
    model = calibrated(timm.create_model("efficientnet_b0", pretrained=False), x)
    eager = freeze_batch_norm_2d(copy.deepcopy(model))
    converted = freeze_batch_norm_2d(ek.convert(copy.deepcopy(model), backend="torch"))
    names = testing.fused_block_names(converted)
    assert len(names) == 16 and all(converted.get_submodule(n).fused_active(x) for n in names)
    assert all(isinstance(converted.get_submodule(n).plan.dw.bn, FrozenBatchNormAct2d) for n in names)
    assert_converted_matches(eager, converted, x, expect_blocks=16)
    converted.train()
    assert all(converted.get_submodule(n).train_unfused_reason(x) is None for n in names)
    from timm.layers import BatchNormAct2d
    from timm.utils.model import unfreeze_batch_norm_2d

    converted = unfreeze_batch_norm_2d(converted).train()
    assert all(converted.get_submodule(n).train_unfused_reason(x) is None for n in names)  # re-plans
    assert all(type(converted.get_submodule(n).plan.dw.bn) is BatchNormAct2d for n in names)


def test_timm_frozen_efficientnet_b0_trains_fused():
    """The blocks, and the stem and head (conv + FrozenBatchNormAct2d: one op with autograd through the fold)."""
    x = _x()
    eager = timm_frozen_b0(x)
    _check_train(eager, x)
    fused = ek.convert(copy.deepcopy(eager), backend="torch").train()
    assert [fused.forward_features.unfused_reason(c, x) for c in ("stem", "head")] == [None, None]


# ---------------------------------------------------------------- torchvision
def test_torchvision_efficientnet_b0_with_frozen_norm_layer():
    x = _x()
    eager = torchvision_frozen("efficientnet_b0", x)
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in eager.modules()) == 49
    converted = _check_eval(eager, x, 16, ["features.0", "features.8"])
    assert converted.features[0].unfused_reason(x) is None


def test_torchvision_efficientnet_b0_with_frozen_norm_layer_trains_fused():
    x = _x()
    _check_train(torchvision_frozen("efficientnet_b0", x), x)


def test_torchvision_mobilenet_v3_small_with_frozen_norm_layer():
    x = _x()
    eager = torchvision_frozen("mobilenet_v3_small", x, eps=1e-3)
    _check_eval(eager, x, 11, ["features.0", "features.12"])


# ---------------------------------------------------------------- negative controls
@pytest.mark.parametrize("defect", ["gate_skew", "residual_shift"])
def test_negative_control_timm_frozen_eval(defect):
    x = _x()
    eager = timm_frozen_b0(x)
    converted = _convert(eager, x, 16, ["conv_stem", "conv_head"])
    assert_converted_matches(eager, converted, x)  # clean: passes
    with planted(defect), pytest.raises(AssertionError):
        assert_converted_matches(eager, converted, x)


def test_negative_control_torchvision_frozen_training():
    x = _x()
    eager = torchvision_frozen("efficientnet_b0", x).train()
    fused = ek.convert(copy.deepcopy(eager), backend="torch").train()
    with planted("skip_silu"), pytest.raises(AssertionError):
        assert_train_parity(eager, fused, x, steps=1, per_tensor=False)
