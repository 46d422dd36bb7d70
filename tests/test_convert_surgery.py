"""A converted model stays right after whatever users do to it next.

Each test applies the same change to a converted efficientnet_pytorch B0 and to its
unconverted twin, then checks parity by DESIGN's rule on the calibrated (input-sensitive)
model: SyncBatchNorm conversion, assigning children, ``apply``, dtype moves,
``load_state_dict``, deepcopy, ``torch.save``/``torch.load`` and pickling, in-place edits of
BatchNorm parameters.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import effnet_kernels as ek

from .model_checks import assert_blockwise_parity, assert_converted_matches, assert_network_parity, calibrated

efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")


@pytest.fixture
def pair():
    """(eager, converted, x): a calibrated efficientnet_pytorch B0 at 64x64 (8 values per channel at
    the last stage: fewer make the deep stages amplify rounding) and its conversion."""
    from efficientnet_pytorch import EfficientNet

    x = torch.randn(2, 3, 64, 64)
    eager = calibrated(EfficientNet.from_name("efficientnet-b0", image_size=64), x)
    return eager, ek.convert(copy.deepcopy(eager), backend="torch"), x


def fused_blocks(model):
    return [m for m in model.modules() if isinstance(m, ek.MBConv)]


def test_sync_batchnorm_conversion_then_eval(pair):
    eager, converted, x = pair
    eager = nn.SyncBatchNorm.convert_sync_batchnorm(eager).eval()
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(converted).eval()
    assert all(isinstance(b._bn1, nn.SyncBatchNorm) for b in converted._blocks)
    assert_network_parity(eager, converted, x)
    # every block now reads the SyncBatchNorm modules (fused, or eager with the reason given)
    for block in fused_blocks(converted):
        assert block.plan.original._bn1 is block._bn1
        assert block.unfusable_reason is None or "SyncBatchNorm" in block.unfusable_reason


def test_assigning_a_child_is_seen(pair):
    eager, converted, x = pair
    for model in (eager, converted):
        old = model._blocks[3]._bn1
        new = nn.BatchNorm2d(old.num_features, eps=old.eps).eval()
        new.load_state_dict(old.state_dict())
        with torch.no_grad():
            new.running_var.mul_(3.0)
            new.bias.add_(0.5)
        model._blocks[3]._bn1 = new
    block = converted._blocks[3]
    assert_converted_matches(eager, converted, x)
    assert block.plan.dw.bn is block._bn1 and block.unfusable_reason is None


def test_an_unfusable_replacement_runs_eager_with_a_reason(pair):
    eager, converted, x = pair
    for model in (eager, converted):
        c = model._blocks[2]._bn1.num_features
        model._blocks[2]._bn1 = nn.GroupNorm(4, c)
    assert_network_parity(eager, converted, x)
    block = converted._blocks[2]
    assert not block.fused_active() and "GroupNorm" in block.unfusable_reason
    assert block.plan.original._bn1 is block._bn1


def test_children_replaced_inside_a_nested_container_are_seen():
    x = torch.randn(2, 8, 6, 6)
    fused = calibrated(ek.MBConv(8, 8, expand_ratio=2, backend="torch"), x)
    eager = ek.revert(copy.deepcopy(fused))
    new = nn.Conv2d(fused.se.conv_expand.in_channels, fused.se.conv_expand.out_channels, 1)
    for m in (eager, fused):
        m.se.conv_expand = copy.deepcopy(new)
    assert fused.plan.se is not None
    assert_converted_matches(eager, fused, x)
    assert fused.plan.se.conv_expand is fused.se.conv_expand


def test_apply_and_in_place_batchnorm_edits(pair):
    from effnet_kernels.testing import calibrate_batchnorm

    eager, converted, x = pair
    assert_network_parity(eager, converted, x)  # warms the folded-BN caches

    def perturb(m):
        if isinstance(m, nn.Conv2d):
            with torch.no_grad():
                m.weight.mul_(1.1)

    for model in (eager, converted):
        model.apply(perturb)
        calibrate_batchnorm(model, x, jitter=0.0)  # in-place statistics for the new weights, the same in both
    assert_converted_matches(eager, converted, x)
    with torch.no_grad():  # in-place edits of the last block's BatchNorms (nothing downstream to amplify them)
        for model in (eager, converted):
            model._blocks[15]._bn1.running_var.mul_(0.8)
            model._blocks[15]._bn2.weight.add_(0.2)
    assert_converted_matches(eager, converted, x)


def test_load_state_dict_from_another_model(pair):
    eager, converted, x = pair
    other = copy.deepcopy(eager)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.9)
    other = calibrated(other, x, seed=5)
    converted.load_state_dict(other.state_dict())
    assert_converted_matches(other, converted, x)


def test_float64_runs_the_eager_block_and_kernel_backends_refuse_it(pair):
    eager, converted, x = pair
    e64, c64 = copy.deepcopy(eager).double(), copy.deepcopy(converted).double()
    with torch.no_grad():
        torch.testing.assert_close(c64(x.double()), e64(x.double()), rtol=1e-12, atol=1e-12)
    pinned = ek.convert(copy.deepcopy(eager), backend="triton").double()
    with pytest.raises(ek.BackendUnavailableError, match="float64"), torch.no_grad():
        pinned(x.double())
    auto = ek.convert(copy.deepcopy(eager)).double()  # backend auto: defers to use_backend()
    with ek.use_backend("cuda"), pytest.raises(ek.BackendUnavailableError, match="float64"), torch.no_grad():
        auto(x.double())


def test_half_and_bfloat16_moves(pair):
    eager, converted, x = pair
    assert_blockwise_parity(eager, converted, x, torch.bfloat16, expect_blocks=16)  # on .to(bfloat16) copies
    x_block = torch.randn(2, 16, 8, 8)
    fused = calibrated(ek.MBConv(16, 16, kernel_size=5, expand_ratio=4, backend="torch"), x_block)
    plain = ek.revert(copy.deepcopy(fused))
    fused.half()  # in place, the way users do it
    plain.half()
    assert fused.fused_active(x_block.half())
    assert_blockwise_parity(plain, fused, x_block.half(), torch.float16, expect_blocks=1)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save", "pickle"])
def test_copies_and_serialised_models_stay_right(pair, how):
    eager, converted, x = pair
    with torch.no_grad():
        converted(x)  # caches filled before copying
    if how == "deepcopy":
        clone = copy.deepcopy(converted)
    elif how == "torch.save":
        buf = io.BytesIO()
        torch.save(converted, buf)
        buf.seek(0)
        clone = torch.load(buf, weights_only=False)
    else:
        clone = pickle.loads(pickle.dumps(converted))
    blocks = fused_blocks(clone)
    assert len(blocks) == 16
    for block in blocks:  # the plan reads the clone's own modules, and no re-plan was needed
        assert block.plan.dw.bn is block._bn1 and not block._changed()
    assert_converted_matches(eager, clone, x)
    # and surgery on the clone does not touch the original
    with torch.no_grad():
        clone._blocks[1]._bn1.running_var.mul_(2.0)
    assert_network_parity(eager, converted, x)


def test_training_after_surgery_uses_the_new_modules(pair):
    eager, converted, x = pair
    for model in (eager, converted):
        model._blocks[4]._bn0 = nn.BatchNorm2d(model._blocks[4]._bn0.num_features, momentum=0.5)
        model.train()
    torch.manual_seed(3)
    ref = eager(x)
    torch.manual_seed(3)
    out = converted(x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(converted._blocks[4]._bn0.running_mean, eager._blocks[4]._bn0.running_mean)


def test_a_blocks_own_method_that_replaces_children_is_seen(pair):
    """efficientnet_pytorch's ``set_swish`` (called before ONNX export or torch.func) sets each block's
    ``_swish``: the fused block takes the new child, and revert gives it back with it."""
    from efficientnet_pytorch.utils import MemoryEfficientSwish, Swish

    eager, converted, x = pair
    for model in (eager, converted):
        model.set_swish(memory_efficient=False)
    for block in fused_blocks(converted):
        assert type(block._swish) is Swish and block.plan.original._swish is block._swish
    assert_converted_matches(eager, converted, x)
    converted.set_swish(memory_efficient=True)
    assert all(type(b._swish) is MemoryEfficientSwish for b in fused_blocks(converted))
    converted.set_swish(memory_efficient=False)
    back = ek.revert(copy.deepcopy(converted))
    assert all(type(b._swish) is Swish for b in back._blocks)
