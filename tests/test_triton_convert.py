"""An efficientnet_pytorch B0 converted with backend="triton" matches the unconverted model.

Runs the Triton kernels in the interpreter on CPU tensors (small input: the interpreter is
slow). The model's BatchNorm is calibrated on the test batch (its output depends on the
input, asserted), and parity is DESIGN's rule against fp64, end to end and block by block;
the negative control plants a defect in the triton backend that the block check must reject.
"""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch

import effnet_kernels as ek
from effnet_kernels import backends

from .defects import planted
from .model_checks import assert_blockwise_parity, assert_converted_matches, calibrated
from .test_triton_dwconv import triton_interpreter  # noqa: F401  (module-scoped TRITON_INTERPRET=1)

pytestmark = pytest.mark.interpreter
efficientnet_pytorch = pytest.importorskip("efficientnet_pytorch")


@pytest.fixture(scope="module")
def b0_pair():
    from efficientnet_pytorch import EfficientNet

    torch.manual_seed(2024)
    # BatchNorm calibrated on 4 images at 64x64 (16 values per channel at the last stage; at 32x32 with 2
    # values the logits reach ~1e7 and the network error is pure amplified rounding), checked on one of them:
    # the interpreter's time goes by programs launched, which one image halves against two (this was CI's
    # slowest test at batch 2). Block by block stays the precise check.
    batch = torch.randn(4, 3, 64, 64)
    eager = calibrated(EfficientNet.from_name("efficientnet-b0", image_size=64), batch)
    return eager, ek.convert(copy.deepcopy(eager), backend="triton"), batch[:1].clone()


def test_efficientnet_pytorch_b0_converted_with_triton_matches(b0_pair):
    eager, model, x = b0_pair
    assert len(ek.conversion_report(model).swapped) == 16
    calls = []
    backends._ensure_registered()
    impls = backends._REGISTRY["triton"].impls()
    counting = {op: (lambda f, name: lambda *a: calls.append(name) or f(*a))(fn, op) for op, fn in impls.items()}
    with mock.patch.dict(impls, counting):
        assert_converted_matches(eager, model, x, expect_blocks=16)
    # one network forward + one block-by-block pass: every fused op ran in Triton, twice per block:
    # the depthwise step, the gate, the projection (taking the gate on load: no se_excite) and the
    # expand conv in the 15 blocks that have one; the stem and the head once (the network forward,
    # through the fused extract_features)
    assert calls.count("dwconv_bn_act") == 32 and calls.count("se_gate") == 32 and calls.count("se_excite") == 0
    assert calls.count("pointwise_conv") == 2 * (16 + 15) + 1 and calls.count("conv_bn_act") == 1


@pytest.mark.parametrize("defect", ["pad_shift", "gate_skew", "excite_skip", "residual_shift"])
def test_negative_control_triton_block_check_rejects_defect(b0_pair, defect):
    eager, model, x = b0_pair
    names = ["_blocks.1", "_blocks.3"]  # stride-2 blocks, k3 and k5
    if defect == "residual_shift":
        names = ["_blocks.2"]  # stride 1, 24 -> 24: the residual the projection adds
    assert_blockwise_parity(eager, model, x, torch.float32, names=names)
    with planted(defect, backend="triton"), pytest.raises(AssertionError, match="break the parity rule"):
        assert_blockwise_parity(eager, model, x, torch.float32, names=names)
