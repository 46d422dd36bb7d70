"""Frozen BatchNorm *modules* (torchvision's ``FrozenBatchNorm2d``, timm's ``FrozenBatchNormAct2d``) convert
and fuse: in eval as eval-mode BatchNorm does, in training through the frozen-BatchNorm fused path
(:mod:`effnet_kernels._frozen_block`), with gradients only for the convs, the SE weights and x.

torchvision and timm do not import in this environment: the look-alikes below copy their classes'
buffers and forward exactly and carry their module names (what :mod:`effnet_kernels._norms` reads);
:func:`freeze` does what ``timm.utils.model.freeze_batch_norm_2d`` does. The real libraries are
checked in ``test_convert_frozen_bn_libraries.py`` (``-m adapters``).

* recognition: the classes, a subclass keeping the forward, not one with its own forward, not a
  same-named class from elsewhere;
* eval: the package's B0 (blocks, stem and head) and timm / torchvision look-alike blocks, every
  block fused, DESIGN-rule parity (fp32 end to end, fp32 and bf16 block by block), the fused ops ran,
  the same state_dict keys, revert gives the model back; a ``drop`` inside keeps a block eager;
* training: per-block frozen step by the rule (output, loss, x's gradient, every parameter gradient;
  buffers unchanged), SGD steps, the network end to end; mixed frozen modules and training
  BatchNorms train eagerly with the reason;
* efficientnet_pytorch's blocks with frozen modules, eval and training; torch.compile(fullgraph=True);
* the fold cache sees in-place and ``.data`` updates of the buffers;
* negative controls: planted defects fail the eval and the training checks.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import effnet_kernels as ek
from effnet_kernels import models, testing
from effnet_kernels._norms import (
    bn_uses_batch_stats, bn_uses_running_stats, is_batchnorm, is_frozen_batchnorm, normalises_only, num_features,
)
from effnet_kernels.blocks import MBConvBlock
from effnet_kernels.stem_head import FusedConvBNAct

from .defects import planted
from .model_checks import assert_converted_matches, assert_train_parity, calibrated
from .test_convert_lookalikes import (  # noqa: F401  (the look-alikes' fixture)
    BatchNormAct2d, DepthwiseSeparableConv, InvertedResidual, TvMBConv, lookalike_libraries,
)
from .test_ops_pointwise import _Ops
from .test_train_frozen_bn import assert_compiled_training_matches, assert_frozen_step, assert_runs_the_frozen_ops
from .test_train_fused import BLOCKS


# ---------------------------------------------------------------- look-alikes
class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d (torchvision 0.29): four buffers, its exact forward."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


FrozenBatchNorm2d.__module__ = "torchvision.ops.misc"


class FrozenBatchNormAct2d(nn.Module):
    """timm.layers.norm_act.FrozenBatchNormAct2d (timm 1.0): the same buffers, then ``act(drop(x))``."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.drop = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        x = x * scale + bias
        return self.act(self.drop(x))


FrozenBatchNormAct2d.__module__ = "timm.layers.norm_act"


def freeze(module: nn.Module) -> nn.Module:
    """``timm.utils.model.freeze_batch_norm_2d`` on the look-alikes: every ``BatchNormAct2d`` becomes a
    ``FrozenBatchNormAct2d`` (its ``act`` and ``drop`` moved over), every other ``BatchNorm2d`` a
    ``FrozenBatchNorm2d`` (no ``num_features``, as torchvision's class has none); the affine cloned, the
    running statistics shared."""
    if isinstance(module, nn.BatchNorm2d):
        act = isinstance(module, BatchNormAct2d)
        res = (FrozenBatchNormAct2d if act else FrozenBatchNorm2d)(module.num_features)
        res.weight.data = module.weight.data.clone().detach()
        res.bias.data = module.bias.data.clone().detach()
        res.running_mean.data = module.running_mean.data
        res.running_var.data = module.running_var.data
        res.eps = module.eps
        if act:
            res.drop, res.act = module.drop, module.act
        return res.train(module.training)
    for name, child in module.named_children():
        new = freeze(child)
        if new is not child:
            module.add_module(name, new)
    return module


def frozen_count(model: nn.Module) -> int:
    return sum(is_frozen_batchnorm(m) for m in model.modules())


# ---------------------------------------------------------------- recognition
def test_frozen_modules_are_recognised_by_class_and_library():
    plain, act = FrozenBatchNorm2d(4), FrozenBatchNormAct2d(4)
    for m in (plain, act):
        assert is_frozen_batchnorm(m) and is_batchnorm(m) and num_features(m) == 4
        assert bn_uses_running_stats(m.train()) and not bn_uses_batch_stats(m)  # train mode too
    assert normalises_only(plain) and not normalises_only(act)

    class Keeps(FrozenBatchNorm2d):  # a subclass keeping the forward
        pass

    class Own(FrozenBatchNorm2d):
        def forward(self, x):
            return x

    assert is_frozen_batchnorm(Keeps(4)) and not is_frozen_batchnorm(Own(4))
    elsewhere = type("FrozenBatchNorm2d", (nn.Module,), {"forward": FrozenBatchNorm2d.forward})
    assert not is_frozen_batchnorm(elsewhere())  # same name, not from torchvision or timm
    bn = nn.BatchNorm2d(4)
    assert not is_frozen_batchnorm(bn) and bn_uses_batch_stats(bn.train()) and bn_uses_running_stats(bn.eval())


# ---------------------------------------------------------------- eval
def _frozen_b0(x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    return freeze(calibrated(models.efficientnet("b0", num_classes=10), x))


def test_b0_with_frozen_modules_fuses_every_block_stem_and_head():
    x = torch.randn(2, 3, 64, 64)
    eager = _frozen_b0(x)
    assert frozen_count(eager) == 49 and not any(isinstance(m, nn.BatchNorm2d) for m in eager.modules())
    keys = list(eager.state_dict())
    converted = ek.convert(copy.deepcopy(eager), backend="torch")
    report = ek.conversion_report(converted)
    assert len(report.swapped) == 16 and not report.skipped and report.fused_convs == ["stem", "head"], report
    assert isinstance(converted.stem, FusedConvBNAct) and converted.stem.unfused_reason(x) is None
    assert list(converted.state_dict()) == keys
    with torch.no_grad(), _Ops() as rec:
        converted(x)
    names = [n for n in rec.names if n.startswith("effnet.")]
    assert names.count("effnet.dwconv_bn_act") == 16 and names.count("effnet.conv_bn_act") == 1, names
    assert "aten.convolution" not in rec.names, rec.names
    assert_converted_matches(eager, converted, x, dtypes=(torch.float32, torch.bfloat16), expect_blocks=16)
    ek.revert(converted)
    assert [type(m) for m in converted.modules()] == [type(m) for m in eager.modules()]
    assert list(converted.state_dict()) == keys


def test_timm_and_torchvision_lookalike_blocks_with_frozen_modules(lookalike_libraries):
    x = torch.randn(2, 16, 11, 10)
    model = calibrated(nn.Sequential(DepthwiseSeparableConv(16, 16, 3, 1, True), InvertedResidual(16, 24, 5, 2, 6),
                                     TvMBConv(24, 24, 3, 1, 6)), x)
    eager = freeze(model)
    assert isinstance(eager[1].bn2, FrozenBatchNormAct2d) and isinstance(eager[2].block[0][1], FrozenBatchNorm2d)
    keys = list(eager.state_dict())
    converted = ek.convert(copy.deepcopy(eager), backend="torch")
    assert ek.conversion_report(converted).swapped == ["0", "1", "2"]
    assert converted[1].plan.dw.activation == "silu" and converted[1].plan.pre[0].activation == "silu"
    assert all(m.fused_active(x) for m in converted)
    assert list(converted.state_dict()) == keys
    assert_converted_matches(eager, converted, x, dtypes=(torch.float32, torch.bfloat16), expect_blocks=3)


def test_a_drop_inside_the_frozen_norm_keeps_the_block_eager(lookalike_libraries):
    block = freeze(calibrated(nn.Sequential(InvertedResidual(8, 8, 3, 1, 4)), torch.randn(2, 8, 6, 6)))
    block[0].bn2.drop = nn.Dropout(0.1)
    ek.convert(block)
    report = ek.conversion_report(block)
    assert list(report.skipped) == ["0"] and "dropout inside" in report.skipped["0"], report


def test_efficientnet_pytorch_with_frozen_modules():
    """efficientnet_pytorch's blocks (TF "same" padding, drop connect) with FrozenBatchNorm2d: all 16 fuse, in
    eval by the rule and in training on the frozen path."""
    from .test_convert_efficientnet_pytorch import build  # skips where efficientnet_pytorch does not import

    x = torch.randn(2, 3, 64, 64)
    eager = freeze(build("b0", image_size=64, x=x))
    assert frozen_count(eager) == 49 and not any(isinstance(m, nn.BatchNorm2d) for m in eager.modules())
    converted = ek.convert(copy.deepcopy(eager), backend="torch")
    names = testing.fused_block_names(converted)
    assert len(names) == 16 and not ek.conversion_report(converted).skipped
    assert_converted_matches(eager, converted, x, expect_blocks=16)
    converted.train()
    assert all(converted.get_submodule(n).train_unfused_reason(x) is None for n in names)


# ---------------------------------------------------------------- training
def frozen_block_pair(cfg: dict, *, batch: int = 4, size: int = 8):
    """A calibrated ``MBConvBlock`` with frozen modules for its BatchNorms and its converted twin, both training."""
    block = MBConvBlock(**cfg)
    x = torch.randn(batch, cfg["in_channels"], size, size)
    eager = freeze(calibrated(block, x))
    fused = ek.convert(copy.deepcopy(eager), backend="torch")
    assert isinstance(fused, ek.MBConv)
    return eager.train(), fused.train(), x


@pytest.mark.parametrize("name", ["expand_se_residual_drop", "no_expand_se", "k5_s2_se"])
def test_frozen_module_block_trains_fused_by_the_rule(name):
    eager, fused, x = frozen_block_pair(BLOCKS[name])
    assert frozen_count(fused) == (3 if "expand_bn" in fused._modules else 2)
    assert not any(list(m.parameters()) for m in fused.modules() if is_frozen_batchnorm(m))
    assert fused.train_unfused_reason(x) is None
    assert_frozen_step(eager, fused, x)  # every Parameter's gradient: the convs' and the SE weights'
    assert_train_parity(eager, fused, x, steps=2)


def test_frozen_module_block_runs_the_fused_ops_and_leaves_the_buffers():
    eager, fused, x = frozen_block_pair(dict(BLOCKS["expand_se_residual_drop"], drop_path_rate=0.0))
    before = {n: b.clone() for n, b in fused.named_buffers()}
    assert_runs_the_frozen_ops(fused, x)
    assert all(torch.equal(b, before[n]) for n, b in fused.named_buffers())
    assert all(b.grad is None for b in fused.buffers())


def test_lookalike_blocks_with_frozen_modules_train_fused(lookalike_libraries):
    x = torch.randn(4, 16, 8, 8)
    eager = freeze(calibrated(nn.Sequential(InvertedResidual(16, 16, 3, 1, 4), TvMBConv(16, 16, 3, 1, 4)), x)).train()
    fused = ek.convert(copy.deepcopy(eager), backend="torch").train()
    assert [m.train_unfused_reason(x) for m in fused] == [None, None]
    assert_frozen_step(eager, fused, x)


def test_b0_with_frozen_modules_trains_fused():
    x = torch.randn(2, 3, 64, 64)
    eager = _frozen_b0(x).train()
    fused = ek.convert(copy.deepcopy(eager), backend="torch").train()
    names = testing.fused_block_names(fused)
    assert len(names) == 16 and all(fused.get_submodule(n).train_unfused_reason() is None for n in names)
    testing.assert_sensitive(copy.deepcopy(eager), x, testing.FP32_RELATIVE[testing.BACKWARD_FACTOR])
    with _Ops() as rec:
        fused(x)
    assert rec.names.count("effnet.dwconv_bn_act") == 16 and "aten.native_batch_norm" not in rec.names
    # one step: the second overflowed in every run (compared inf with inf), as in test_train_frozen_bn
    assert_train_parity(eager, fused, x, steps=1, per_tensor=False)


def test_mixed_frozen_modules_and_training_batchnorms_train_eagerly():
    block = calibrated(MBConvBlock(**BLOCKS["expand_se_residual_drop"]), torch.randn(4, 8, 8, 8))
    block.project_bn = freeze(block.project_bn)
    x = torch.randn(4, 8, 8, 8)
    fused = ek.convert(copy.deepcopy(block), backend="torch").train()
    block.train()
    reason = fused.train_unfused_reason(x)
    assert reason is not None and "projection BatchNorm is a FrozenBatchNorm2d (frozen statistics)" in reason, reason
    assert "training" in reason
    torch.manual_seed(0)
    want = block(x)
    torch.manual_seed(0)
    torch.testing.assert_close(fused(x), want)
    for (n, a), b in zip(block.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b, a, msg=n)  # the training BatchNorms updated as eager's


def test_frozen_module_block_compiles_fullgraph():
    """torch.compile (aot_eager) traces the frozen-module path in one graph, in training and in eval."""
    eager, fused, x = frozen_block_pair(BLOCKS["expand_se_residual_drop"], batch=8)
    assert_compiled_training_matches(eager, fused, x)
    eager.eval(), fused.eval()
    with torch.no_grad():
        want = eager(x)
        torch.testing.assert_close(torch.compile(fused, backend="aot_eager", fullgraph=True)(x), want,
                                   rtol=1e-5, atol=1e-5 * float(want.abs().max()))


# ---------------------------------------------------------------- the fold cache
def test_the_fold_cache_sees_updates_of_the_buffers():
    eager, fused, x = frozen_block_pair(BLOCKS["expand_se_residual_drop"])
    eager.eval(), fused.eval()
    with torch.no_grad():
        before = fused(x)
        assert "_fold_cache" in fused.plan.dw.__dict__ and "_fold_cache" in fused.plan.post[0].__dict__
        for m in (eager, fused):
            m.dw_bn.running_var.mul_(1.5)  # in place: the version counter moves
            m.project_bn.weight.add_(0.25)
            m.expand_bn.bias.data = m.expand_bn.bias.data + 0.5  # new storage
        ye, yf = eager(x), fused(x)
    assert (yf - before).abs().max() > 1e-2 * before.abs().max(), "the updates did not change the output"
    torch.testing.assert_close(yf, ye, rtol=1e-5, atol=1e-5 * float(ye.abs().max()))


# ---------------------------------------------------------------- negative controls
@pytest.mark.parametrize("defect", ["pad_shift", "gate_skew", "residual_shift"])
def test_negative_control_eval(defect):
    x = torch.randn(2, 16, 11, 10)
    eager = freeze(calibrated(nn.Sequential(MBConvBlock(16, 16, 3, 1, 4), MBConvBlock(16, 24, 5, 2, 6)), x))
    converted = ek.convert(copy.deepcopy(eager), backend="torch")
    assert_converted_matches(eager, converted, x)  # clean: passes
    with planted(defect), pytest.raises(AssertionError):
        assert_converted_matches(eager, converted, x)


@pytest.mark.parametrize("defect", ["skip_silu", "excite_skip", "grad_drop_squeeze", "drop_residual"])
def test_negative_control_training(defect):
    eager, fused, x = frozen_block_pair(dict(BLOCKS["expand_se_residual_drop"], drop_path_rate=0.0))
    assert_frozen_step(copy.deepcopy(eager), copy.deepcopy(fused), x)  # clean: passes
    with planted(defect), pytest.raises(AssertionError):
        assert_frozen_step(eager, fused, x)
