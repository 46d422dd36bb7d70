"""The compiled Triton kernels on a CUDA GPU (``pytest -m gpu``; skipped without one).

Every depthwise / SE layer shape of EfficientNet B0-B7 at native resolution against
fp64 references computed on the GPU, every config of the tuning space, large batch, the
deterministic squeeze, offsets past 2^31 elements, and the tuner.

Compiles are the cost here (1-9 s of host CPU each, and the GPU session is short): the
parity tests run untuned (``EFFNET_KERNELS_TRITON_TUNE=0``, one config per shape class:
~60 compiles for the module); only the tuner's own test tunes.
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

import effnet_kernels as ek

from .defects import planted
from .parity import assert_parity
from .test_ops_parity import se_truth

pytest.importorskip("triton")

pytestmark = pytest.mark.gpu

DEV = "cuda"
CL = torch.channels_last
HAVE_GPU = torch.cuda.is_available()


def _model_shapes():
    from effnet_kernels.models import MODEL_NAMES, depthwise_shapes, layer_shapes

    dw = depthwise_shapes()
    layers = [s for name in MODEL_NAMES for s in layer_shapes(name)]
    se = sorted({(s.mid_channels, s.se_reduced) for s in layers if s.se_reduced})
    excite = sorted({(s.mid_channels, s.Ho, s.Wo) for s in layers})
    return dw, se, excite


# Building B0-B7 on the meta device takes seconds: only where these tests can run.
DW_SHAPES, SE_SHAPES, EXCITE_SHAPES = _model_shapes() if HAVE_GPU else ([], [], [])
B0_DW = [(32, 112, 112, 3, 1), (96, 112, 112, 3, 2), (144, 56, 56, 5, 2), (240, 28, 28, 3, 2),
         (480, 14, 14, 5, 1), (672, 14, 14, 5, 2), (1152, 7, 7, 3, 1)]


@pytest.fixture(autouse=True)
def _compiled_kernels(monkeypatch):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set: these tests are for the compiled kernels")
    from effnet_kernels.triton import _tuning

    monkeypatch.setenv(_tuning.TUNE_ENV_VAR, "0")  # untuned: one compile per shape class, not five


def tf_same(size: int, k: int, stride: int) -> tuple[int, int]:
    """TF "same" padding (before, after) of one dimension."""
    total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
    return total // 2, total - total // 2


def fp64_dwconv(x, w, scale, shift, stride, pad4):
    """fp64 depthwise conv + affine + SiLU and its spatial mean, on x's device."""
    z = F.conv2d(F.pad(x.double(), pad4), w.double(), stride=stride, groups=x.shape[1])
    y = F.silu(z * scale.double()[:, None, None] + shift.double()[:, None, None])
    return y, y.mean(dim=(2, 3))


def plain_dwconv(x, w, scale, shift, stride, pad4):
    """The same chain in plain PyTorch in x's dtype (the parity rule's error budget)."""
    z = F.conv2d(F.pad(x, pad4), w.to(x.dtype), stride=stride, groups=x.shape[1])
    y = F.silu(z * scale.to(x.dtype)[:, None, None] + shift.to(x.dtype)[:, None, None])
    return y, y.float().mean(dim=(2, 3))


def check_dwconv(n, c, h, w, k, stride, dtype, layout, pad4=None):
    pad4 = pad4 or (*tf_same(w, k, stride), *tf_same(h, k, stride))
    x = torch.randn(n, c, h, w, device=DEV).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    weight = torch.randn(c, 1, k, k, device=DEV) * 0.3
    scale, shift = torch.rand(c, device=DEV) + 0.5, torch.randn(c, device=DEV) * 0.5
    y, mean = ek.ops.dwconv_bn_act(x, weight, scale, shift, stride=stride, padding=pad4, squeeze=True,
                                   backend="triton")
    assert y.is_contiguous(memory_format=CL if layout == "channels_last" and c > 1 else torch.contiguous_format)
    y_ref, m_ref = fp64_dwconv(x, weight, scale, shift, stride, pad4)
    y_plain, m_plain = plain_dwconv(x, weight, scale, shift, stride, pad4)
    assert_parity(y, y_ref, y_plain, dtype, what="y")
    assert_parity(mean, m_ref, m_plain, dtype, what="mean")


@pytest.mark.parametrize("shape", DW_SHAPES, ids=lambda s: "C{}-{}x{}-k{}-s{}".format(*s))
def test_dwconv_efficientnet_layers(shape):
    """Every depthwise layer of B0-B7 at native resolution, fp16 channels_last, TF-same padding."""
    c, h, w, k, stride = shape
    check_dwconv(2, c, h, w, k, stride, torch.float16, "channels_last")


# k3 s1 over many tiles, k5 s2, and one tile per sample (the squeeze stored, not added)
B0_SUBSET = [B0_DW[0], B0_DW[2], B0_DW[6]]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", B0_SUBSET, ids=lambda s: "C{}-{}x{}-k{}-s{}".format(*s))
def test_dwconv_b0_layers_dtypes_layouts(shape, dtype, layout):
    c, h, w, k, stride = shape
    check_dwconv(2, c, h, w, k, stride, dtype, layout)


def test_dwconv_nchw_fp16_b0():
    for c, h, w, k, stride in B0_DW:
        check_dwconv(2, c, h, w, k, stride, torch.float16, "nchw")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_dwconv_every_candidate_config(monkeypatch, layout):
    """Each config the tuner may pick, compiled and run: C = 136 and 30 x 30 output pixels are
    multiples of no tile size (masks on both axes, several tiles: the atomic squeeze)."""
    from effnet_kernels._launch import prepare_dwconv
    from effnet_kernels.triton import _tuning, dwconv

    x = torch.empty(1, 136, 30, 30, device=DEV)
    x = x if layout == "nchw" else x.contiguous(memory_format=CL)
    c_vec = torch.empty(136, device=DEV)
    lp = prepare_dwconv(x, torch.empty(136, 1, 3, 3, device=DEV), c_vec, c_vec, (1, 1), (1, 1, 1, 1), "silu", True)
    candidates = dwconv._candidates(lp)
    assert len(candidates) == (5 if layout == "channels_last" else 4)
    for cfg in candidates:
        monkeypatch.setattr(_tuning, "choose", lambda *args, cfg=cfg: cfg)
        check_dwconv(3, 136, 30, 30, 3, 1, torch.float16, layout)


@pytest.mark.parametrize("shape", [(144, 56, 56, 3, 1), (672, 14, 14, 5, 2)])
def test_dwconv_large_batch(shape):
    c, h, w, k, stride = shape
    check_dwconv(256, c, h, w, k, stride, torch.float16, "channels_last")


def test_dwconv_deterministic_squeeze_bitwise():
    x = torch.randn(16, 144, 56, 56, device=DEV, dtype=torch.float16).contiguous(memory_format=CL)
    w = torch.randn(144, 1, 3, 3, device=DEV)
    s, b = torch.rand(144, device=DEV) + 0.5, torch.randn(144, device=DEV)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [ek.ops.dwconv_bn_act(x, w, s, b, squeeze=True, backend="triton")[1] for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(prev)
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    _, m_fast = ek.ops.dwconv_bn_act(x, w, s, b, squeeze=True, backend="triton")
    _, m_ref = fp64_dwconv(x, w, s, b, 1, (1, 1, 1, 1))
    assert_parity(runs[0], m_ref, None, torch.float32, what="deterministic mean")
    assert_parity(m_fast, m_ref, None, torch.float32, what="atomic mean")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_dwconv_offsets_past_int32(layout):
    """x and y of 2^31+ elements: the int64 specialisation; checked on the last rows."""
    n, c, h, w = 1, 16, 11600, 11600  # 2.15e9 elements, 4.3 GB in fp16
    x = torch.randn(n, c, h, w, device=DEV, dtype=torch.float16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    weight = torch.randn(c, 1, 3, 3, device=DEV) * 0.3
    s, b = torch.rand(c, device=DEV) + 0.5, torch.randn(c, device=DEV)
    y, mean = ek.ops.dwconv_bn_act(x, weight, s, b, squeeze=True, backend="triton")
    rows = 20
    crop = x[:, :, h - rows:, :]
    y_ref, _ = fp64_dwconv(crop, weight, s, b, 1, (1, 1, 0, 1))
    y_plain, _ = plain_dwconv(crop, weight, s, b, 1, (1, 1, 0, 1))
    assert_parity(y[:, :, h - rows + 1:, :], y_ref, y_plain, torch.float16, what="y tail")
    torch.testing.assert_close(mean, y.float().mean(dim=(2, 3)), atol=1e-3, rtol=1e-3)
    del x, y
    g = torch.rand(n, c, device=DEV)
    big = torch.randn(n, c, h, w, device=DEV, dtype=torch.float16)
    if layout == "channels_last":
        big = big.contiguous(memory_format=CL)
    out = ek.ops.se_excite(big, g, backend="triton")
    tail = big[:, :, -4:, :]
    assert_parity(out[:, :, -4:, :], tail.double() * g.double()[:, :, None, None],
                  tail * g.half()[:, :, None, None], torch.float16, what="excite tail")


@pytest.mark.parametrize("cr", SE_SHAPES, ids=lambda cr: f"C{cr[0]}-R{cr[1]}")
def test_se_gate_efficientnet_layers(cr):
    check_se_gate(*cr, torch.float32)


@pytest.mark.parametrize("cr", [(96, 4), (1152, 48), (3840, 160)], ids=lambda cr: f"C{cr[0]}-R{cr[1]}")
def test_se_gate_fp16_pooled(cr):
    check_se_gate(*cr, torch.float16)


def check_se_gate(c, r, dtype):
    pooled = torch.randn(37, c, device=DEV).to(dtype)  # 3 blocks of 16 samples
    wr, br = torch.randn(r, c, device=DEV) / c**0.5, torch.randn(r, device=DEV)
    we, be = torch.randn(c, r, device=DEV) / r**0.5, torch.randn(c, device=DEV)
    gate = ek.ops.se_gate(pooled, wr, br, we, be, backend="triton")
    truth = se_truth(pooled.cpu(), wr.cpu(), br.cpu(), we.cpu(), be.cpu())
    assert_parity(gate.cpu(), truth, None, torch.float32, what="gate")


def test_se_excite_efficientnet_layers():
    for c, h, w in EXCITE_SHAPES:
        for layout in ("nchw", "channels_last"):
            y = torch.randn(2, c, h, w, device=DEV, dtype=torch.float16)
            if layout == "channels_last":
                y = y.contiguous(memory_format=CL)
            g = torch.rand(2, c, device=DEV)
            out = ek.ops.se_excite(y, g, backend="triton")
            assert out.is_contiguous(memory_format=CL if layout == "channels_last" else torch.contiguous_format)
            assert_parity(out, y.double() * g.double()[:, :, None, None], y * g.half()[:, :, None, None],
                          torch.float16, what=f"excite C{c} {h}x{w} {layout}")


def test_tuner_times_a_new_shape_class_once(monkeypatch):
    """The tuned first call (every candidate compiled and timed) returns the right y and mean: its
    trial launches' atomics go to a scratch mean, not the caller's."""
    from effnet_kernels.triton import _tuning

    monkeypatch.setenv(_tuning.TUNE_ENV_VAR, "1")
    monkeypatch.setenv(_tuning.BUDGET_ENV_VAR, "inf")
    _tuning.clear_cache()
    x = torch.randn(8, 240, 28, 28, device=DEV, dtype=torch.float16).contiguous(memory_format=CL)
    w = torch.randn(240, 1, 3, 3, device=DEV) * 0.3
    s, b = torch.rand(240, device=DEV) + 0.5, torch.randn(240, device=DEV)
    pad = (1, 1, 1, 1)  # k = 3: the cheapest compiles (k = 5 takes 2-3x longer per candidate)
    t0 = time.perf_counter()
    y1, m1 = ek.ops.dwconv_bn_act(x, w, s, b, padding=pad, squeeze=True, backend="triton")
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    assert len(_tuning._cache) == 1
    t0 = time.perf_counter()
    y2, m2 = ek.ops.dwconv_bn_act(x, w, s, b, padding=pad, squeeze=True, backend="triton")
    torch.cuda.synchronize()
    second = time.perf_counter() - t0
    assert len(_tuning._cache) == 1
    print(f"first call (tuning + compiling) {first:.2f} s, second {second * 1e3:.2f} ms, "
          f"chose {next(iter(_tuning._cache.values()))}, {_tuning._spent_s:.1f} s tuning")
    assert first < 60 and second < first
    y_ref, m_ref = fp64_dwconv(x, w, s, b, 1, pad)
    y_plain, m_plain = plain_dwconv(x, w, s, b, 1, pad)
    for y, m in ((y1, m1), (y2, m2)):
        assert_parity(y, y_ref, y_plain, torch.float16, what="y")
        assert_parity(m, m_ref, m_plain, torch.float16, what="mean")
    _tuning.clear_cache()


# Negative controls: the checks above must reject a triton backend with a planted defect.
@pytest.mark.parametrize("defect", ["pad_shift", "skip_silu", "squeeze_skew"])
def test_negative_control_layer_check_rejects_defect(defect):
    c, h, w, k, stride = B0_DW[2]  # k5 s2 with asymmetric TF padding
    check_dwconv(2, c, h, w, k, stride, torch.float16, "channels_last")
    with planted(defect, "triton"), pytest.raises(AssertionError):
        check_dwconv(2, c, h, w, k, stride, torch.float16, "channels_last")


def test_negative_control_se_gate_check_rejects_defect():
    with planted("gate_skew", "triton"), pytest.raises(AssertionError, match="gate"):
        check_se_gate(1152, 48, torch.float32)


# --- issue 10: what changed in the kernels, checked where they really run ---------------------

@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", B0_DW, ids=lambda s: "C{}-{}x{}-k{}-s{}".format(*s))
def test_dwconv_batch1_small_tiles(shape, layout):
    """Batch 1: the tiles shrink so the grid fills the SMs (different constexprs than at batch 2+)."""
    c, h, w, k, stride = shape
    check_dwconv(1, c, h, w, k, stride, torch.float16, layout)


def test_dwconv_weight_cache_follows_in_place_edits():
    """The tap-major folded weight (cached per fold) is rebuilt after in-place edits of weight or scale."""
    from effnet_kernels.triton import _weights

    _weights.clear_cache()
    x = torch.randn(4, 144, 28, 28, device=DEV, dtype=torch.float16).contiguous(memory_format=CL)
    w = torch.randn(144, 1, 5, 5, device=DEV) * 0.3
    scale, shift = torch.rand(144, device=DEV) + 0.5, torch.randn(144, device=DEV)
    for edit in (lambda: None, lambda: w.mul_(-1.5), lambda: scale.add_(0.25), lambda: None):
        with torch.no_grad():
            edit()
        y = ek.ops.dwconv_bn_act(x, w, scale, shift, padding=(2, 2, 2, 2), backend="triton")
        y_ref, _ = fp64_dwconv(x, w, scale, shift, 1, (2, 2, 2, 2))
        y_plain, _ = plain_dwconv(x, w, scale, shift, 1, (2, 2, 2, 2))
        assert_parity(y, y_ref, y_plain, torch.float16, what="y after edit")
    assert len(_weights._cache) == 1  # each in-place edit replaced the pair's entry


def test_dwconv_under_cuda_graph_capture():
    """A fold first seen during capture is computed inside the graph, not cached (it is empty until replay)."""
    from effnet_kernels.triton import _weights

    x = torch.randn(2, 96, 14, 14, device=DEV, dtype=torch.float16).contiguous(memory_format=CL)
    w, scale, shift = torch.randn(96, 1, 3, 3, device=DEV), torch.rand(96, device=DEV) + 0.5, torch.randn(96, device=DEV)
    ek.ops.dwconv_bn_act(x, w * 1.0, scale, shift, backend="triton")  # warm-up compile outside capture
    _weights.clear_cache()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = ek.ops.dwconv_bn_act(x, w, scale, shift, backend="triton")
    assert len(_weights._cache) == 0
    graph.replay()
    torch.cuda.synchronize()
    y_ref, _ = fp64_dwconv(x, w, scale, shift, 1, (1, 1, 1, 1))
    y_plain, _ = plain_dwconv(x, w, scale, shift, 1, (1, 1, 1, 1))
    assert_parity(y, y_ref, y_plain, torch.float16, what="y replayed")


@pytest.mark.parametrize("n", [1, 256])
@pytest.mark.parametrize("cr", [(96, 4), (1152, 48), (3840, 160)], ids=lambda cr: f"C{cr[0]}-R{cr[1]}")
def test_se_gate_batch_1_and_256(cr, n):
    """Both se_gate kernels at the batch sizes whose tiles differ (BLOCK_N 16 and 32, many programs)."""
    c, r = cr
    pooled = torch.randn(n, c, device=DEV)
    wr, br = torch.randn(r, c, device=DEV) / c**0.5, torch.randn(r, device=DEV)
    we, be = torch.randn(c, r, device=DEV) / r**0.5, torch.randn(c, device=DEV)
    gate = ek.ops.se_gate(pooled, wr, br, we, be, backend="triton")
    truth = se_truth(pooled.cpu(), wr.cpu(), br.cpu(), we.cpu(), be.cpu())
    assert_parity(gate.cpu(), truth, None, torch.float32, what="gate")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_se_excite_nchw_flat_kernel_planes(dtype):
    """The flat NCHW kernel at plane sizes that are no multiple of the vector width, bitwise torch's product."""
    for hw in (7, 14, 15, 57):
        y = torch.randn(3, 40, hw, hw, device=DEV).to(dtype)
        g = torch.rand(3, 40, device=DEV)
        out = ek.ops.se_excite(y, g, backend="triton")
        assert torch.equal(out, (y.float() * g[:, :, None, None]).to(dtype)), f"{hw}x{hw}"
