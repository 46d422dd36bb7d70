"""Converted models under autocast compute as the eager ones do (bf16 autocast on the CPU).

Inside ``torch.autocast`` an eager MBConv's convolutions run in the autocast dtype, BatchNorm and
the activations follow their input, and the residual add promotes back to the block input's
dtype; the fused ops have no autocast rule, so each fused module casts its input where the
module it replaces starts with a convolution (``nn.autocast_input``). Checked: every fused block's
and the stem's / head's output dtype is the eager twin's, the kernels are called with
autocast-dtype inputs, and the values meet the parity rule against fp64 with eager-under-autocast
as the plain comparator; eval and frozen-BatchNorm training (its gradients too). Negative
control: without the cast the dtype check fails.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import effnet_kernels as ek
from effnet_kernels import models, testing
from effnet_kernels import nn as ek_nn
from effnet_kernels.blocks import MBConvBlock
from torch.utils._python_dispatch import TorchDispatchMode

from tests.model_checks import assert_train_parity, calibrated
from tests.parity import assert_parity

BF16 = torch.bfloat16
BLOCKS = {
    "stride2_se": dict(in_channels=8, out_channels=12, kernel_size=3, stride=2, expand_ratio=4),
    "residual_se": dict(in_channels=8, out_channels=8, kernel_size=5, stride=1, expand_ratio=4),
    "no_expand": dict(in_channels=8, out_channels=8, kernel_size=3, stride=1, expand_ratio=1),
}


class _EffnetInputs(TorchDispatchMode):
    """Records ``(op, dtype of its first tensor argument)`` of every ``effnet::`` op that dispatches."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "effnet":
            first = next(a for a in args if isinstance(a, torch.Tensor))
            self.calls.append((func._opname, first.dtype))
        return func(*args, **(kwargs or {}))


def _autocast():
    return torch.autocast("cpu", dtype=BF16)


def _pair(cfg: dict):
    eager = calibrated(MBConvBlock(**cfg), torch.randn(4, cfg["in_channels"], 12, 12)).eval()
    return eager, ek.convert(copy.deepcopy(eager), backend="torch")


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_eval_blocks_under_autocast_are_the_eager_block(name):
    eager, fused = _pair(BLOCKS[name])
    x = torch.randn(3, 8, 12, 12)
    with torch.no_grad():
        ref64 = copy.deepcopy(eager).double()(x.double())
        with _autocast():
            plain = eager(x)
            with _EffnetInputs() as rec:
                out = fused(x)
    assert out.dtype == plain.dtype, (out.dtype, plain.dtype)
    tensors_in = [(op, dt) for op, dt in rec.calls if op != "se_gate"]  # the gate takes the fp32 squeeze
    assert tensors_in and all(dt == BF16 for _, dt in tensors_in), rec.calls
    assert_parity(out, ref64, plain, BF16, what=name)


def test_b0_under_autocast_every_fused_module_keeps_the_eager_dtype():
    torch.manual_seed(0)
    model = models.efficientnet("b0", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    model = calibrated(model, x).eval()
    # not blind: an unrelated input moves the logits far more than bf16's allowance (~2e-2 relative)
    testing.assert_sensitive(model, x, 2e-2)
    fused = ek.convert(copy.deepcopy(model), backend="torch")
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double())
    dtypes = {}  # the head's output: the fused model pools it in the same op (forward_pooled), the logits show it

    def hook(tag):
        def record(module, inputs, output):
            dtypes.setdefault(module._ac_name, {})[tag] = output.dtype
        return record

    for tag, net in (("eager", model), ("fused", fused)):
        for name, m in net.named_modules():
            if name.startswith("blocks.") and name.count(".") == 1 or name in ("stem", "head"):
                m._ac_name = name
                m.register_forward_hook(hook(tag))
    with torch.no_grad(), _autocast():
        plain, out = model(x), fused(x)
    both = {k: d for k, d in dtypes.items() if len(d) == 2}
    assert len(both) == 17 and all(d["fused"] == d["eager"] for d in both.values()), dtypes
    assert out.dtype == plain.dtype == BF16
    assert_parity(out, ref64, plain, BF16, what="B0 logits")


def _frozen(module: nn.Module) -> nn.Module:
    module.train()
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return module


@pytest.mark.parametrize("name", ["stride2_se", "residual_se"])
def test_frozen_batchnorm_training_under_autocast(name):
    eager, fused = _pair(BLOCKS[name])
    ref = copy.deepcopy(eager).double()
    for m in (eager, fused, ref):
        _frozen(m)
    x = torch.randn(3, 8, 12, 12)
    assert fused.train_unfused_reason(x) is None
    results = {}
    for tag, model, inp in (("ref", ref, x.double()), ("eager", eager, x), ("fused", fused, x)):
        xr = inp.clone().requires_grad_()
        ctx = _autocast() if tag != "ref" else torch.autocast("cpu", enabled=False)
        with ctx:
            out = model(xr)
        out.float().square().sum().backward() if tag != "ref" else out.square().sum().backward()
        results[tag] = (out, xr.grad, {n: p.grad for n, p in model.named_parameters()})
    out, gx, grads = results["fused"]
    assert out.dtype == results["eager"][0].dtype
    assert_parity(out, results["ref"][0], results["eager"][0], BF16, what="output")
    assert_parity(gx, results["ref"][1], results["eager"][1], BF16, "backward", "grad x")
    for n, g in grads.items():
        assert_parity(g, results["ref"][2][n], results["eager"][2][n], BF16, "backward", n)


def test_negative_control_without_the_cast_the_dtypes_differ(monkeypatch):
    monkeypatch.setattr(ek_nn, "autocast_input", lambda x: x)
    eager, fused = _pair(BLOCKS["stride2_se"])
    x = torch.randn(3, 8, 12, 12)
    with torch.no_grad(), _autocast():
        assert fused(x).dtype != eager(x).dtype


def test_batch_statistics_training_under_autocast_without_expand():
    """Training with batch statistics: where the depthwise conv is the block's first (no expand) the
    depthwise op gets the autocast dtype, as eager's conv does; parity over two SGD steps by the
    training rule (tests/model_checks.assert_train_parity)."""
    eager, fused = _pair(BLOCKS["no_expand"])
    eager.train(), fused.train()
    x = torch.randn(3, 8, 12, 12)
    assert fused.train_unfused_reason(x) is None
    with _autocast(), _EffnetInputs() as rec:
        out = fused(x.clone().requires_grad_())
        plain = eager(x)
    assert ("dwconv_bn_act_train", BF16) in rec.calls, rec.calls
    assert out.dtype == plain.dtype
    out.float().sum().backward()  # the backward's recompute runs under the forward's autocast state
    assert_train_parity(*(copy.deepcopy(m) for m in (eager, fused)), x, steps=2, dtype=BF16, context=_autocast)
