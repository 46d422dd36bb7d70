"""Module hooks on the modules a fused op stands for: the modules then run as they are, with their hooks
(a fused op would skip them: a feature extractor's hooks would collect nothing, a pre-hook that changes the
input would be ignored). Global module hooks see the fused module and leave fusion on."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import effnet_kernels as ek
from effnet_kernels.stem_head import FusedConvBNAct

from .model_checks import calibrated
from .test_ops_pointwise import _calls
from .test_stem_head import b0_pair  # noqa: F401 (the fixture: a calibrated ek.models B0 and its conversion)


def _block(model: nn.Module, i: int = 3) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, (ek.MBConv, ek.models.MBConvBlock))][i]


def test_a_forward_hook_inside_a_block_is_called(b0_pair):
    eager, converted, x = b0_pair
    block, eager_block = _block(converted), _block(eager)
    assert block.fused_active(x[:, :0]) and block.hooks_reason() is None
    seen = {}
    handles = [b.expand_conv.register_forward_hook(lambda m, i, o, k=k: seen.setdefault(k, o))
               for k, b in (("fused", block), ("eager", eager_block))]
    try:
        assert "Conv2d has a forward hook" in block.hooks_reason() and not block.fused_active()
        with torch.no_grad():
            out, ref = converted(x), eager(x)
        torch.testing.assert_close(seen["fused"], seen["eager"])
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    finally:
        for h in handles:
            h.remove()
    assert block.fused_active() and block.hooks_reason() is None  # hook gone: fused again


def test_a_pre_hook_that_changes_the_input_is_honoured(b0_pair):
    eager, converted, x = b0_pair
    h = torch.randn(2, *_block_input_shape(eager, x))
    block, eager_block = _block(converted), _block(eager)
    with torch.no_grad():
        plain = eager_block(h)
    handles = [b.project_conv.register_forward_pre_hook(lambda m, args: (args[0] * 3.0,))
               for b in (block, eager_block)]
    try:
        with torch.no_grad():
            want, got = eager_block(h), block(h)
        assert not torch.allclose(want, plain, atol=1e-3)  # the hook matters
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    finally:
        for handle in handles:
            handle.remove()


def _block_input_shape(model: nn.Module, x: torch.Tensor, i: int = 3) -> tuple[int, ...]:
    got = {}
    handle = _block(model, i).register_forward_pre_hook(lambda m, args: got.update(s=args[0].shape))
    with torch.no_grad():
        model(x)
    handle.remove()
    return tuple(got["s"][1:])


def test_a_backward_hook_in_training_runs_the_original_forward():
    torch.manual_seed(1)
    x = torch.randn(4, 16, 8, 8)
    block = ek.MBConv(16, 16, kernel_size=3, expand_ratio=4, backend="torch").train()
    assert block.train_unfused_reason(x) is None
    grads = []
    handle = block.dw_bn.register_full_backward_hook(lambda m, gi, go: grads.append(go[0]))
    assert "BatchNorm2d has a backward hook" in block.train_unfused_reason(x)
    block(x).sum().backward()
    handle.remove()
    assert len(grads) == 1 and grads[0].shape[1] == 64
    assert block.train_unfused_reason(x) is None


def test_a_hook_on_a_stem_child_runs_the_children():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 16, 16)
    stem = FusedConvBNAct.from_container(calibrated(ek.blocks.ConvBNAct(3, 8, 3, 2), x), backend="torch")
    assert _calls(stem, x)[0] == ["effnet.conv_bn_act"]
    seen = []
    handle = stem.bn.register_forward_hook(lambda m, i, o: seen.append(o))
    assert "BatchNorm2d has a forward hook" in stem.unfused_reason(x)
    names, out = _calls(stem, x)
    handle.remove()
    assert "effnet.conv_bn_act" not in names and len(seen) == 2  # _calls runs it twice
    assert stem.unfused_reason(x) is None


def test_a_global_module_hook_leaves_fusion_on(b0_pair):
    _, converted, x = b0_pair
    called = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: called.append(type(m).__name__))
    try:
        assert _block(converted).fused_active() and _block(converted).hooks_reason() is None
        with torch.no_grad():
            converted(x)
    finally:
        handle.remove()
    assert "MBConv" in called and "Linear" in called  # the fused blocks themselves, the classifier
    assert "Conv2d" not in called  # every conv ran inside a fused op
