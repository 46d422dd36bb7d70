"""Frozen-BatchNorm training (tests/test_train_frozen_bn.py) with ``backend="triton"``, on CPU tensors in
Triton's interpreter: a converted block whose BatchNorms are all in eval mode trains through the
Triton eval kernels (and their backward) by DESIGN's rule against fp64, agrees with the torch
backend, draws the original's stochastic depth; planted defects in the Triton kernels fail the check.
Small shapes: the interpreter is slow.
"""

from __future__ import annotations

import copy

import pytest
import torch

from effnet_kernels import backends

from .defects import planted
from .test_train_frozen_bn import FROZEN_BLOCKS, assert_frozen_step, frozen_pair
from .test_triton_dwconv import triton_interpreter  # noqa: F401  (module-scoped TRITON_INTERPRET=1)
from .test_triton_train import poisoned_allocations  # noqa: F401  (unwritten outputs show as NaN)

pytest.importorskip("triton")

pytestmark = pytest.mark.interpreter

SERVED = ("dwconv_bn_act", "dwconv_bn_act_backward", "se_gate", "se_gate_backward", "pointwise_conv")


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts the calls each op's triton implementation serves."""
    backends._ensure_registered()
    impls = backends._REGISTRY["triton"].impls()
    calls = {}
    for op in SERVED:
        def counted(*args, _op=op, _impl=impls[op]):
            calls[_op] = calls.get(_op, 0) + 1
            return _impl(*args)
        monkeypatch.setitem(impls, op, counted)
    return calls


@pytest.mark.parametrize("name", ["expand_se_residual", "expand_se_residual_drop", "k5_s2_se"])
def test_frozen_block_trains_with_triton_by_the_rule(triton_calls, name):
    eager, fused, x = frozen_pair(FROZEN_BLOCKS[name], batch=4, size=6, backend="triton")
    assert fused.train_unfused_reason(x) is None
    assert_frozen_step(eager, fused, x, seed=3)
    for op in SERVED:
        assert triton_calls.get(op, 0) >= 1, (op, triton_calls)
    # the torch backend's fused block agrees (the same draws)
    torch_fused = copy.deepcopy(fused)
    torch_fused.backend = "torch"
    outs = []
    for m in (fused, torch_fused):
        torch.manual_seed(5)
        outs.append(m(x).detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5 * float(outs[1].abs().max()))


@pytest.mark.parametrize("defect", ["residual_shift", "excite_skip", "gate_skew", "grad_drop_squeeze"])
def test_negative_controls(defect):
    eager, fused, x = frozen_pair(FROZEN_BLOCKS["expand_se_residual"], batch=4, size=6, backend="triton")
    assert_frozen_step(eager, fused, x)  # clean, the same pair and seed: passes
    with planted(defect, "triton"), pytest.raises(AssertionError):
        assert_frozen_step(eager, fused, x)
