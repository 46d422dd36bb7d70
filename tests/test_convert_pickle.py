"""A converted ``ek.models`` network survives pickling and ``torch.save``: the same outputs in eval and
in training (drop path included), and every block's drop path bound to the copy's own block."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import effnet_kernels as ek

from .model_checks import calibrated


def _round_trip(model: torch.nn.Module, how: str) -> torch.nn.Module:
    if how == "pickle":
        return pickle.loads(pickle.dumps(model))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _train_output(model: torch.nn.Module, x: torch.Tensor, seed: int = 3) -> torch.Tensor:
    model.train()
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def converted_b0():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    return ek.convert(calibrated(ek.models.efficientnet("b0"), x), backend="torch"), x


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_converted_network_round_trips(converted_b0, how):
    model, x = converted_b0
    model.eval()
    with torch.no_grad():
        want = model(x)  # folds cached before the copy
    clone = _round_trip(model, how)
    with torch.no_grad():
        torch.testing.assert_close(clone.eval()(x), want, rtol=0, atol=0)
    blocks = [m for m in clone.modules() if isinstance(m, ek.MBConv)]
    assert len(blocks) == 16
    drops = [b for b in blocks if b.plan.residual]
    assert drops and all(b.plan.drop.args[0] is b.plan.original for b in drops)  # the clone's own block
    torch.testing.assert_close(_train_output(clone, x), _train_output(copy.deepcopy(model), x), rtol=0, atol=0)
    model.eval()


def test_the_clones_drop_path_reads_the_clones_block(converted_b0):
    """Late binding survives the copy: changing the clone's drop rate changes the clone only."""
    model, x = converted_b0
    clone = _round_trip(model, "pickle")
    before = _train_output(model, x)
    for block in clone.modules():
        if isinstance(block, ek.MBConv) and block.plan.residual:
            block.plan.original.drop_path_rate = 0.9
    assert not torch.allclose(_train_output(clone, x), before)
    torch.testing.assert_close(_train_output(model, x), before, rtol=0, atol=0)
    model.eval()
