"""The Triton training kernels (issue #11, item 2) on CPU tensors, in Triton's interpreter.

Each op through its torch.library op with ``backend="triton"`` against the reference computed in
float64 by DESIGN's parity rule (``tests.parity.assert_parity``: fp16/bf16 within 2x forward /
3x backward of eager PyTorch in the same dtype, fp32 relative 1e-5 / 1e-4), fresh random inputs,
every float allocation poisoned with NaN (``torch.empty`` fills NaN while a test runs, so an
unwritten element shows), both memory formats, k 3/5/7, strides 1/2 (TF-same asymmetric
padding), every activation, awkward shapes and several tiles per sample:

* ``dwconv_bn_act_train`` (batch statistics; given statistics), including a conv output whose
  mean is about 85 standard deviations (where a naive fp32 sum of squares visibly fails);
* ``dwconv_bn_act_train_backward`` and the eval-mode ``dwconv_bn_act_backward``;
* ``se_excite_backward`` and ``se_gate_backward`` (every activation / gate);
* bitwise reproducibility under ``torch.use_deterministic_algorithms``;
* a converted ``MBConvBlock`` training with ``backend="triton"`` by the rule, and agreeing with
  the torch backend;
* negative controls: a planted pad shift, a dropped squeeze gradient, a skipped activation
  derivative make the checks fail.

Compilation for sm_90 (registers, spills) is tests/test_triton_train_compile.py (it needs
Triton imported without ``TRITON_INTERPRET``).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import effnet_kernels as ek
from effnet_kernels import backends, reference, testing
from effnet_kernels.blocks import MBConvBlock

from .defects import planted
from .environments import count_backend_calls
from .parity import assert_parity
from .test_triton_dwconv import triton_interpreter  # noqa: F401  (module-scoped TRITON_INTERPRET=1)

pytest.importorskip("triton")

pytestmark = pytest.mark.interpreter

CL = torch.channels_last
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTIVATIONS = ["identity", "silu", "relu", "relu6", "hardswish"]
# (k, stride, padding (left, right, top, bottom)): symmetric, TF-same stride 2 (extra pixel right/bottom), k7
CONVS = [(3, 1, (1, 1, 1, 1)), (5, 2, (1, 2, 1, 2)), (7, 1, (3, 3, 3, 3)), (3, 2, (0, 1, 0, 1))]
EPS = 1e-3
OPS = torch.ops.effnet


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    """Every floating ``torch.empty`` made while a test runs (kernel outputs, gz, partials) starts as NaN."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


@pytest.fixture
def small_tiles(monkeypatch):
    """Several tiles per sample and channel blocks per program row (the partials' second stage)."""
    from effnet_kernels.triton import dwconv, dwconv_train, se_backward
    from effnet_kernels.triton import _tuning

    monkeypatch.setattr(dwconv_train, "INTERPRETER_TILE", (16, 2))
    monkeypatch.setattr(se_backward, "INTERPRETER_EXCITE_TILE", (16, 2))
    monkeypatch.setattr(dwconv, "INTERPRETER_CONFIG", _tuning.Config(block_a=16, block_b=8))


def _input(shape, dtype, channels_last, offset=0.0):
    x = (torch.randn(shape) + offset).to(dtype)
    return x.contiguous(memory_format=CL) if channels_last else x


def _params(c, k, dtype, weight_std=0.5):
    w = (torch.randn(c, 1, k, k) * weight_std).to(dtype)
    return w, torch.rand(c) + 0.5, torch.randn(c) * 0.5


def _out_hw(h, w, k, stride, pad):
    return (h + pad[2] + pad[3] - k) // stride + 1, (w + pad[0] + pad[1] - k) // stride + 1


def _eager(x, w, gamma, beta, stride, pad, activation):
    """Plain PyTorch train-mode chain in x's dtype: (y, pooled)."""
    z = F.conv2d(F.pad(x, pad), w.to(x.dtype), stride=stride, groups=x.shape[1])
    y = reference.ACTIVATION_FNS[activation](F.batch_norm(z, None, None, gamma, beta, training=True, eps=EPS))
    return y, y.float().mean((2, 3))


def _f64(*ts):
    return [t.double() if t is not None else None for t in ts]


# ---------------------------------------------------------------- dwconv_bn_act_train
def check_train_forward(shape, k, stride, pad, dtype, channels_last, activation, squeeze=True, offset=0.0,
                        weight_std=0.5):
    n, c, h, w = shape
    x = _input(shape, dtype, channels_last, offset)
    wt, gamma, beta = _params(c, k, dtype, weight_std)
    y, pooled, mean, var = OPS.dwconv_bn_act_train(x, wt, gamma, beta, None, None, EPS, [stride] * 2, list(pad),
                                                   activation, squeeze, "triton")
    y64, p64, m64, v64 = reference.dwconv_bn_act_train(*_f64(x, wt, gamma, beta), None, None, EPS, (stride,) * 2,
                                                       pad, activation, squeeze)
    y_plain, p_plain = _eager(x, wt, gamma, beta, stride, pad, activation)
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    assert mean.dtype == var.dtype == torch.float32
    assert_parity(y, y64, y_plain, dtype, what="y")
    if squeeze:
        assert_parity(pooled, p64, p_plain, dtype, what="pooled")
    # the statistics: fp32 relative rule (they are float32 whatever x's dtype is)
    assert_parity(mean, m64, None, torch.float32, what="mean")
    assert_parity(var, v64, None, torch.float32, what="var")
    # given statistics: the same y (and the statistics returned as given)
    y2, _, mean2, var2 = OPS.dwconv_bn_act_train(x, wt, gamma, beta, mean, var, EPS, [stride] * 2, list(pad),
                                                 activation, squeeze, "triton")
    assert mean2 is mean and var2 is var and torch.equal(y2, y)
    return y, y64


@pytest.mark.parametrize("conv", CONVS, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_train_forward(dtype, channels_last, conv):
    k, stride, pad = conv
    activation = ACTIVATIONS[(CONVS.index(conv) + DTYPES.index(dtype)) % len(ACTIVATIONS)]
    check_train_forward((2, 6, 9, 8), k, stride, pad, dtype, channels_last, activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_train_forward_activations(dtype, activation):
    """The BN output spreads over about [-6, 6] (gamma up to 1.5 x xhat): every region of relu6 / hardswish."""
    check_train_forward((3, 5, 7, 6), 3, 1, (1, 1, 1, 1), dtype, True, activation, weight_std=1.0)


AWKWARD = [((1, 1, 5, 7), 5, 1, (2, 2, 2, 2)), ((4, 3, 1, 1), 3, 1, (1, 1, 1, 1)), ((1, 13, 9, 11), 3, 2, (0, 1, 0, 1)),
           ((2, 9, 6, 5), 7, 2, (2, 3, 3, 2)), ((3, 1, 2, 3), 3, 1, (1, 1, 1, 1))]


@pytest.mark.parametrize("shape,k,stride,pad", AWKWARD, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_train_forward_awkward_shapes(shape, k, stride, pad, channels_last):
    """C = 1, C not a multiple of 8, H = W = 1 with M > 1, batch 1, odd sizes, stride 2 asymmetric padding."""
    check_train_forward(shape, k, stride, pad, torch.float16, channels_last, "silu")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_train_forward_several_tiles(small_tiles, channels_last):
    check_train_forward((2, 5, 11, 9), 5, 2, (1, 2, 1, 2), torch.float32, channels_last, "silu")


def test_train_statistics_of_a_large_mean():
    """z has mean > 30 (about 85) std: Chan's combination keeps var to fp32 relative accuracy, where the naive
    ``E[z^2] - mean^2`` in fp32 (shown here) breaks the fp32 rule by orders of magnitude."""
    x = torch.randn(4, 8, 12, 12) + 30.0
    w = torch.rand(8, 1, 3, 3) + 0.5
    gamma, beta = torch.rand(8) + 0.5, torch.randn(8)
    _, _, mean, var = OPS.dwconv_bn_act_train(x, w, gamma, beta, None, None, EPS, [1, 1], [0, 0, 0, 0], "silu",
                                              False, "triton")
    z64 = F.conv2d(x.double(), w.double(), groups=8)  # no padding: no border values far from the mean
    v64 = z64.var((0, 2, 3), unbiased=False)
    assert (z64.mean((0, 2, 3)) / v64.sqrt()).min() > 30
    assert ((var.double() - v64).abs() / v64).max() <= 1e-5
    z32 = z64.float()
    naive = (z32 * z32).mean((0, 2, 3)) - z32.mean((0, 2, 3)) ** 2
    assert ((naive.double() - v64).abs() / v64).max() > 1e-4, "the check would not see naive sums"
    # and the folded apply is accurate enough there (fp32 rule on y)
    check_train_forward((4, 8, 12, 12), 3, 1, (0, 0, 0, 0), torch.float32, True, "silu", offset=30.0)


def test_train_ops_on_a_strided_view_and_an_empty_batch():
    """A non-contiguous x (a channel-strided, column-cropped view) gives the reference's answers; N = 0
    gives empty outputs and zero statistics / gradients, as the reference."""
    base = torch.randn(2, 10, 7, 9)
    x = base[:, ::2, :, 1:8]
    wt, gamma, beta = _params(5, 3, torch.float32)
    args = (EPS, [2, 1], [0, 1, 1, 1], "relu6")
    y, pooled, mean, var = OPS.dwconv_bn_act_train(x, wt, gamma, beta, None, None, *args, True, "triton")
    ref = reference.dwconv_bn_act_train(*_f64(x, wt, gamma, beta), None, None, *args, True)
    for got, want in zip((y, pooled, mean, var), ref):
        assert_parity(got, want, None, torch.float32)
    gy = torch.randn(y.shape)
    got = OPS.dwconv_bn_act_train_backward(gy.transpose(2, 3).contiguous().transpose(2, 3), None, x, wt, gamma, beta,
                                           mean, var, *args, "triton")
    want = reference.dwconv_bn_act_train_backward(gy.double(), None, *_f64(x, wt, gamma, beta, mean, var), *args)
    for g, w in zip(got, want):
        assert_parity(g, w, None, torch.float32, kind="backward")
    empty = torch.randn(0, 5, 6, 6)
    y, pooled, mean, var = OPS.dwconv_bn_act_train(empty, wt, gamma, beta, None, None, *args, True, "triton")
    assert y.shape == (0, 5, 3, 5) and pooled.shape == (0, 5) and torch.equal(mean, torch.zeros(5))
    assert torch.equal(var, torch.zeros(5))
    gx, gw, gg, gb = OPS.dwconv_bn_act_train_backward(torch.randn(0, 5, 3, 5), None, empty, wt, gamma, beta, mean,
                                                      var, *args, "triton")
    assert gx.shape == empty.shape and not gw.abs().sum() and not gg.abs().sum() and not gb.abs().sum()
    gy_e, gg_e = OPS.se_excite_backward(torch.randn(0, 5, 3, 3), torch.randn(0, 5, 3, 3), torch.rand(0, 5), "triton")
    assert gy_e.shape == (0, 5, 3, 3) and gg_e.shape == (0, 5)


# ---------------------------------------------------------------- dwconv_bn_act_train_backward
def _train_grads(fn, x, wt, gamma, beta, gy, gp, stride, pad, activation):
    leaves = [t.detach().clone().requires_grad_() for t in (x, wt, gamma, beta)]
    y, pooled = fn(*leaves, stride, pad, activation)
    loss = (y.double() * gy.double()).sum()
    if gp is not None:
        loss = loss + (pooled.double() * gp.double()).sum()
    loss.backward()
    return [t.grad for t in leaves]


def _truth(x, wt, gamma, beta, stride, pad, activation):
    y, pooled, _, _ = reference.dwconv_bn_act_train(x, wt, gamma, beta, None, None, EPS, (stride,) * 2, pad,
                                                    activation, True)
    return y, pooled


def check_train_backward(shape, k, stride, pad, dtype, channels_last, activation, squeeze=True, with_gy=True,
                         weight_std=0.5):
    n, c, h, w = shape
    x = _input(shape, dtype, channels_last)
    wt, gamma, beta = _params(c, k, dtype, weight_std)
    ho, wo = _out_hw(h, w, k, stride, pad)
    # incoming gradients representable in dtype (see tests/test_ops_parity.py test_dwconv_backward)
    gy = torch.randn(n, c, ho, wo).to(dtype) if with_gy else torch.zeros(n, c, ho, wo, dtype=dtype)
    gp = torch.randn(n, c).to(dtype).float() if squeeze else None
    _, _, mean, var = reference.dwconv_bn_act_train(x, wt, gamma, beta, None, None, EPS, (stride,) * 2, pad,
                                                    activation, False)
    got = OPS.dwconv_bn_act_train_backward(gy if with_gy else None, gp, x, wt, gamma, beta, mean, var, EPS,
                                           [stride] * 2, list(pad), activation, "triton")
    ref = _train_grads(_truth, *_f64(x, wt, gamma, beta), gy, gp, stride, pad, activation)
    plain = _train_grads(_eager, x, wt, gamma, beta, gy, gp, stride, pad, activation)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == torch.float32
    assert got[0].is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    for name, g, r, p in zip(("x", "weight", "gamma", "beta"), got, ref, plain):
        assert_parity(g, r, p, dtype, kind="backward", what=f"grad {name}")
    return got


@pytest.mark.parametrize("conv", CONVS, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_train_backward(dtype, channels_last, conv):
    k, stride, pad = conv
    activation = ACTIVATIONS[(CONVS.index(conv) + 2 * DTYPES.index(dtype) + 1) % len(ACTIVATIONS)]
    check_train_backward((2, 6, 9, 8), k, stride, pad, dtype, channels_last, activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_train_backward_activations(dtype, activation):
    check_train_backward((3, 5, 7, 6), 3, 2, (0, 1, 0, 1), dtype, dtype == torch.float16, activation,
                         weight_std=1.0)


@pytest.mark.parametrize("shape,k,stride,pad", AWKWARD, ids=str)
def test_train_backward_awkward_shapes(shape, k, stride, pad):
    check_train_backward(shape, k, stride, pad, torch.bfloat16, shape[1] % 2 == 1, "hardswish")


@pytest.mark.parametrize("squeeze,with_gy", [(True, False), (False, True)], ids=["squeeze_only", "grad_y_only"])
def test_train_backward_one_incoming_gradient(squeeze, with_gy):
    check_train_backward((2, 5, 8, 7), 5, 1, (2, 2, 2, 2), torch.float32, True, "silu", squeeze, with_gy)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_train_backward_several_tiles(small_tiles, channels_last):
    check_train_backward((2, 5, 11, 9), 5, 2, (1, 2, 1, 2), torch.float32, channels_last, "silu")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_64_bit_offset_variants(monkeypatch, channels_last):
    """The INT64 specialisation (tensors past 2^31 elements, or the weight-gradient partials past it) computes
    the same: forward, backward and the excite's backward with 64-bit offsets forced."""
    from effnet_kernels.triton import dwconv_train, se_backward

    monkeypatch.setattr(dwconv_train, "needs_int64", lambda *tensors: True)
    monkeypatch.setattr(se_backward, "needs_int64", lambda *tensors: True)
    check_train_forward((2, 5, 7, 6), 3, 2, (0, 1, 0, 1), torch.float16, channels_last, "silu")
    check_train_backward((2, 5, 7, 6), 5, 1, (2, 2, 2, 2), torch.float32, channels_last, "hardswish")
    y = _input((2, 5, 3, 4), torch.float32, channels_last)
    go, gate = torch.randn(2, 5, 3, 4), torch.rand(2, 5)
    got = OPS.se_excite_backward(go, y, gate, "triton")
    for g, r in zip(got, reference.se_excite_backward(*_f64(go, y, gate))):
        assert_parity(g, r, None, torch.float32, kind="backward")


# ---------------------------------------------------------------- dwconv_bn_act_backward (eval mode)
def _eval_chain(x, wt, scale, shift, stride, pad, activation):
    """dwconv -> affine -> activation in x's dtype (scale / shift cast to it): (y, pooled)."""
    z = F.conv2d(F.pad(x, pad), wt.to(x.dtype), stride=stride, groups=x.shape[1])
    y = reference.ACTIVATION_FNS[activation](z * scale.to(x.dtype)[:, None, None] + shift.to(x.dtype)[:, None, None])
    return y, (y.mean((2, 3)) if y.dtype == torch.float64 else y.float().mean((2, 3)))


@pytest.mark.parametrize("conv", CONVS[:2], ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_eval_backward(dtype, channels_last, conv):
    k, stride, pad = conv
    check_eval_backward(k, stride, pad, dtype, channels_last,
                        ACTIVATIONS[(CONVS.index(conv) + DTYPES.index(dtype)) % len(ACTIVATIONS)])


def check_eval_backward(k, stride, pad, dtype, channels_last, activation):
    n, c, h, w = 2, 6, 9, 8
    x = _input((n, c, h, w), dtype, channels_last)
    wt, scale, shift = _params(c, k, dtype)
    ho, wo = _out_hw(h, w, k, stride, pad)
    gy, gp = torch.randn(n, c, ho, wo).to(dtype), torch.randn(n, c).to(dtype).float()
    got = OPS.dwconv_bn_act_backward(gy, gp, x, wt, scale, shift, [stride] * 2, list(pad), activation, "triton")
    ref = _train_grads(_eval_chain, *_f64(x, wt, scale, shift), gy, gp, stride, pad, activation)
    plain = _train_grads(_eval_chain, x, wt, scale, shift, gy, gp, stride, pad, activation)
    assert got[0].is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    for name, g, r, p in zip(("x", "weight", "scale", "shift"), got, ref, plain):
        assert_parity(g, r, p, dtype, kind="backward", what=f"grad {name}")


# ---------------------------------------------------------------- SE backward
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 11, 5, 4), (1, 1, 1, 1), (2, 40, 7, 7)], ids=str)
def test_se_excite_backward(shape, dtype, channels_last, small_tiles):
    y = _input(shape, dtype, channels_last)
    go = torch.randn(shape).to(dtype)  # NCHW whatever y's layout
    gate = torch.rand(shape[:2])
    got = OPS.se_excite_backward(go, y, gate, "triton")
    ref = reference.se_excite_backward(*_f64(go, y, gate))
    plain = (go * gate.to(dtype)[:, :, None, None], (go * y).float().sum((2, 3)))
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert got[0].is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    assert_parity(got[0], ref[0], plain[0], dtype, kind="backward", what="grad y")
    assert_parity(got[1], ref[1], plain[1], dtype, kind="backward", what="grad gate")


SE_VARIANTS = [("silu", "sigmoid"), ("relu", "sigmoid"), ("relu", "hardsigmoid"), ("silu", "hardsigmoid")]


def _se_plain(p, wr, br, we, be, activation, gate):
    return reference.ACTIVATION_FNS[gate](F.linear(reference.ACTIVATION_FNS[activation](F.linear(p, wr, br)), we, be))


@pytest.mark.parametrize("activation,gate", SE_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c,r", [(2, 12, 3), (37, 70, 5), (1, 1, 1)], ids=str)
def test_se_gate_backward(n, c, r, dtype, activation, gate):
    """b_expand spread over about [-6, 6]: both clamps of hardsigmoid."""
    p = torch.randn(n, c).to(dtype)
    params = [(torch.randn(r, c) / 2).to(dtype), torch.randn(r).to(dtype), (torch.randn(c, r) / 2).to(dtype),
              (torch.randn(c) * 2).to(dtype)]
    gg = torch.randn(n, c).to(dtype).float()
    got = OPS.se_gate_backward(gg, p, *params, activation, gate, "triton")

    def grads(cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in (p, *params)]
        (_se_plain(*leaves, activation, gate).double() * gg.double()).sum().backward()
        return [t.grad for t in leaves]

    ref, plain = grads(torch.float64), grads(dtype)
    for i, (g, rr, pl, t) in enumerate(zip(got, ref, plain, (p, *params))):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_parity(g, rr, pl, dtype, kind="backward", what=f"grad #{i}")


# ---------------------------------------------------------------- determinism
def test_bitwise_reproducible_under_deterministic_algorithms(small_tiles):
    x = _input((2, 4, 8, 7), torch.float32, True)
    wt, gamma, beta = _params(4, 5, torch.float32)
    gy, gp = torch.randn(2, 4, 4, 7), torch.randn(2, 4)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            y, pooled, mean, var = OPS.dwconv_bn_act_train(x, wt, gamma, beta, None, None, EPS, [2, 1], [2, 2, 1, 2],
                                                           "silu", True, "triton")
            grads = OPS.dwconv_bn_act_train_backward(gy, gp, x, wt, gamma, beta, mean, var, EPS, [2, 1],
                                                     [2, 2, 1, 2], "silu", "triton")
            se = OPS.se_excite_backward(y, y, torch.rand(2, 4), "triton")[1:]
            runs.append((y, pooled, mean, var, *grads, *se))
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- a converted block
BLOCK = dict(in_channels=8, out_channels=8, kernel_size=3, stride=1, expand_ratio=6, drop_path_rate=0.0)


def _block_pair(cfg, batch=4, size=8, fmt=torch.contiguous_format):
    block = MBConvBlock(**cfg)
    x = torch.randn(batch, cfg["in_channels"], size, size).contiguous(memory_format=fmt)
    testing.calibrate_batchnorm(block.eval(), x)
    return block.train(), x


# what a training block with SE runs: the depthwise train op and its backward, the projection taking the gate
# on load (forward and recompute) and its backward (the gate's gradient by the Triton excite kernels), the gate's
TRAINING_OPS = ("dwconv_bn_act_train", "dwconv_bn_act_train_backward", "pointwise_conv", "pointwise_conv_backward",
                "se_gate_backward")


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts the calls each training op's triton implementation serves."""
    return count_backend_calls(monkeypatch, "triton", TRAINING_OPS)


@pytest.mark.parametrize("cfg,fmt", [(BLOCK, torch.contiguous_format),
                                     (dict(BLOCK, kernel_size=5, stride=2, out_channels=12), CL)],
                         ids=["k3_residual_nchw", "k5_s2_nhwc"])
def test_converted_block_trains_with_triton_by_the_rule(triton_calls, cfg, fmt):
    eager, x = _block_pair(cfg, fmt=fmt)
    fused = ek.convert(copy.deepcopy(eager), backend="triton").train()
    ref_fused = ek.convert(copy.deepcopy(eager), backend="torch").train()
    # the torch backend's fused block and the triton one agree (one step, fp32 against each other) ...
    xs = [x.clone().requires_grad_() for _ in range(2)]
    models = (copy.deepcopy(fused), ref_fused)
    outs = [m(t) for m, t in zip(models, xs)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
    for o in outs:
        o.square().sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=name)
    # ... and the triton one trains by the rule against fp64, eager PyTorch the error budget
    results = testing.train_step_parity(eager, fused, x, steps=2, lr=0.01)
    bad = testing.failures(results)
    assert not bad, "\n".join(map(str, bad[:12]))
    for op in TRAINING_OPS:
        assert triton_calls.get(op, 0) >= 3, (op, triton_calls)


# ---------------------------------------------------------------- negative controls
def test_negative_control_pad_shift_fails_the_forward_check():
    torch.manual_seed(0)
    check_train_forward((2, 6, 9, 8), 5, 2, (1, 2, 1, 2), torch.float32, True, "silu")  # clean: passes
    torch.manual_seed(0)
    with planted("pad_shift", "triton"), pytest.raises(AssertionError):
        check_train_forward((2, 6, 9, 8), 5, 2, (1, 2, 1, 2), torch.float32, True, "silu")


def test_negative_control_dropped_squeeze_gradient_fails_the_backward_check():
    torch.manual_seed(0)
    check_train_backward((2, 6, 9, 8), 3, 1, (1, 1, 1, 1), torch.float16, False, "silu")  # clean: passes
    torch.manual_seed(0)
    with planted("grad_drop_squeeze", "triton"), pytest.raises(AssertionError):
        check_train_backward((2, 6, 9, 8), 3, 1, (1, 1, 1, 1), torch.float16, False, "silu")


def test_negative_control_dropped_squeeze_gradient_fails_the_eval_backward_check():
    torch.manual_seed(0)
    check_eval_backward(3, 2, (0, 1, 0, 1), torch.float32, True, "silu")  # clean: passes
    torch.manual_seed(0)
    with planted("grad_drop_squeeze", "triton"), pytest.raises(AssertionError):
        check_eval_backward(3, 2, (0, 1, 0, 1), torch.float32, True, "silu")


def test_negative_control_skipped_derivative_fails_the_backward_check():
    torch.manual_seed(0)
    check_train_backward((2, 6, 9, 8), 3, 1, (1, 1, 1, 1), torch.float32, True, "relu6")  # clean: passes
    torch.manual_seed(0)
    with planted("grad_skip_act", "triton"), pytest.raises(AssertionError):
        check_train_backward((2, 6, 9, 8), 3, 1, (1, 1, 1, 1), torch.float32, True, "relu6")


def test_negative_control_skewed_squeeze_fails_the_block_check():
    eager, x = _block_pair(BLOCK)
    fused = ek.convert(copy.deepcopy(eager), backend="triton").train()
    assert not testing.failures(testing.train_step_parity(copy.deepcopy(eager), copy.deepcopy(fused), x, steps=1,
                                                          lr=0.01))  # clean: passes
    with planted("squeeze_skew", "triton"):
        bad = testing.failures(testing.train_step_parity(eager, fused, x, steps=1, lr=0.01))
    assert bad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_channel_vector_hint_at_an_unspecialised_channel_count(dtype):
    """C = 40 channels_last (B3's first block): the statistics, gradient and input-gradient kernels take
    ``VEC`` = 8 (40 is not a multiple of 16, which is all Triton's specialisation sees); forward and
    backward by the rule against fp64. A poisoned-output check runs in check_train_forward."""
    from effnet_kernels.triton import dwconv_train

    x = _input((2, 40, 5, 6), dtype, True)
    g = dwconv_train.geometry(x, torch.empty(40, 1, 3, 3, dtype=dtype), (1, 1), (1, 1, 1, 1))
    assert dwconv_train.channel_vector(g) == 8
    assert dwconv_train.channel_vector(dataclasses.replace(g, int64=True)) == 1
    check_train_forward((2, 40, 5, 6), 3, 1, (1, 1, 1, 1), dtype, True, "silu")
    check_train_backward((2, 40, 5, 6), 3, 1, (1, 1, 1, 1), dtype, True, "silu")
