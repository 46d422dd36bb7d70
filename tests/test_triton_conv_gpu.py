"""The compiled Triton ``conv_bn_act`` (the stem) on a CUDA GPU (``pytest -m gpu``; skipped without one).

Every EfficientNet B0-B7 stem (3 -> 32..64 channels, 3 x 3, stride 2, native resolution) and
MobileNetV3's (3 -> 16, hard-swish) at batch 2, against the fp64 ``F.conv2d`` truth computed on
the GPU, by the DESIGN rule (plain = cuDNN in the input's dtype), outputs poisoned with NaN
first: fp16 / bf16 / fp32 x NCHW / channels_last, TF "same" padding (timm / efficientnet_pytorch)
and symmetric padding 1 (torchvision); every config of the tuning space; the tuner; a
negative control. Untuned (``EFFNET_KERNELS_TRITON_TUNE=0``) except the tuner's own test.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from effnet_kernels import models, ops

from .defects import planted
from .parity import assert_parity
from .test_ops_conv_bn_act import plain, truth

pytest.importorskip("triton")

pytestmark = pytest.mark.gpu

DEV = "cuda"
CL = torch.channels_last
DTYPES = [torch.float16, torch.bfloat16, torch.float32]

#: (model, Cout, resolution) of the B0-B7 stems and MobileNetV3's
STEMS = [(m, models.round_filters(models.STEM_CHANNELS, models.PARAMS[m][0]), models.native_resolution(m))
         for m in models.MODEL_NAMES] + [("mobilenet_v3", 16, 224)]


@pytest.fixture(autouse=True)
def _compiled_kernels(monkeypatch):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set: these tests are for the compiled kernels")
    from effnet_kernels.triton import _tuning, conv

    monkeypatch.setenv(_tuning.TUNE_ENV_VAR, "0")
    real = conv.prepare_conv

    def poisoned(*args):
        lp = real(*args)
        lp.y.fill_(float("nan"))
        return lp

    monkeypatch.setattr(conv, "prepare_conv", poisoned)


def tf_same(size: int, k: int = 3, stride: int = 2) -> tuple[int, int]:
    total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def stem_case(n, cout, res, dtype, layout, padding, activation="silu", bias=True):
    x = torch.randn(n, 3, res, res, device=DEV).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    w = (torch.randn(cout, 3, 3, 3, device=DEV) / 27 ** 0.5).to(dtype)
    b = torch.randn(cout, device=DEV) if bias else None
    pad4 = padding if padding is not None else (1, 1, 1, 1)
    out = ops.conv_bn_act(x, w, b, stride=2, padding=pad4, activation=activation, backend="triton")
    want = truth(x, w, b, (2, 2), pad4, activation)
    assert out.dtype == dtype and out.shape == want.shape
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=CL)
    else:
        assert out.is_contiguous()
    assert_parity(out, want, plain(x, w, b, (2, 2), pad4, activation), dtype, what=f"stem {cout} @ {res}")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("model,cout,res", STEMS, ids=[s[0] for s in STEMS])
def test_stems_batch_2(model, cout, res, dtype, layout):
    activation = "hardswish" if model == "mobilenet_v3" else "silu"
    lo, hi = tf_same(res)
    stem_case(2, cout, res, dtype, layout, (lo, hi, lo, hi), activation)
    # torchvision's symmetric padding 1; without bias (another compiled variant) only at B0 / MobileNetV3
    stem_case(2, cout, res, dtype, layout, None, activation, bias=model not in ("b0", "mobilenet_v3"))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_every_candidate_config(monkeypatch, layout):
    """Each config of B0's stem space at batch 32 (none shrunk), run at batch 2 and at 7 x 7 (masked tiles)."""
    from effnet_kernels.triton import _tuning, conv

    lp = conv.prepare_conv(torch.empty(32, 3, 224, 224, device=DEV), torch.empty(32, 3, 3, 3, device=DEV), None,
                           (2, 2), (0, 1, 0, 1), "silu")
    for cfg in conv._candidates(lp):
        monkeypatch.setattr(_tuning, "choose", lambda *args, cfg=cfg: cfg)
        for dtype in (torch.float16, torch.float32):
            stem_case(2, 32, 224, dtype, layout, (0, 1, 0, 1))
            stem_case(3, 32, 13, dtype, layout, (0, 1, 0, 1))


def test_large_batch_b0():
    stem_case(64, 32, 224, torch.float16, "channels_last", (0, 1, 0, 1))


def test_tuner_picks_a_candidate(monkeypatch):
    from effnet_kernels.triton import _tuning, conv

    monkeypatch.setenv(_tuning.TUNE_ENV_VAR, "1")
    _tuning.clear_cache()
    try:
        stem_case(64, 32, 224, torch.bfloat16, "channels_last", (0, 1, 0, 1))
        x = torch.empty(64, 3, 224, 224, device=DEV, dtype=torch.bfloat16).contiguous(memory_format=CL)
        lp = conv.prepare_conv(x, torch.empty(32, 3, 3, 3, device=DEV), None, (2, 2), (0, 1, 0, 1), "silu")
        chosen = _tuning._cache.get(conv._tune_key(lp))
        assert chosen is None or chosen in conv._candidates(lp)
    finally:
        _tuning.clear_cache()


def test_general_shapes():
    """Not the stem: Cin 16 / 64, k 1 / 5 / 7, stride 1 and (1, 2), Cout 7 / 96."""
    for dtype in DTYPES:
        for layout in ("nchw", "channels_last"):
            x = torch.randn(2, 16, 33, 31, device=DEV).to(dtype)
            if layout == "channels_last":
                x = x.contiguous(memory_format=CL)
            for cout, k, stride, pad4 in ((7, 5, (1, 2), (1, 3, 2, 2)), (96, 1, (1, 1), (0, 0, 0, 0)),
                                          (33, 7, (2, 2), (3, 3, 3, 3))):
                w = (torch.randn(cout, 16, k, k, device=DEV) / (16 * k * k) ** 0.5).to(dtype)
                b = torch.randn(cout, device=DEV)
                out = ops.conv_bn_act(x, w, b, stride=stride, padding=pad4, activation="relu6", backend="triton")
                assert_parity(out, truth(x, w, b, stride, pad4, "relu6"), plain(x, w, b, stride, pad4, "relu6"), dtype)


def test_negative_control_padding_shift():
    case = (2, 32, 224, torch.float16, "channels_last", (0, 1, 0, 1))
    stem_case(*case)
    with planted("conv_pad_shift", "triton"), pytest.raises(AssertionError):
        stem_case(*case)


def test_fp32_weight_with_fp16_x():
    x = torch.randn(2, 3, 224, 224, device=DEV).half().contiguous(memory_format=CL)
    w = torch.randn(32, 3, 3, 3, device=DEV) / 27 ** 0.5
    b = torch.randn(32, device=DEV)
    out = ops.conv_bn_act(x, w, b, stride=2, padding=(0, 1, 0, 1), backend="triton")
    assert_parity(out, truth(x, w, b, (2, 2), (0, 1, 0, 1), "silu"), plain(x, w, b, (2, 2), (0, 1, 0, 1), "silu"),
                  torch.float16)
    torch.testing.assert_close(out, F.silu(F.conv2d(F.pad(x, (0, 1, 0, 1)), w.half(), b.half(), stride=2)),
                               rtol=2e-2, atol=2e-2)
