"""``effnet::expand_bn_act_train_backward``: the expand conv + train-mode BatchNorm + activation backward from the
conv's input, as one op (issue #11).

Each backend (``torch``; ``triton`` in Triton's interpreter; the ``cuda`` backend's aten composition on the CPU's
aten) against the float64 autograd of ``act(F.batch_norm(conv1x1(x, W), training=True))`` by DESIGN's backward
rule (3x plain PyTorch's error in the same dtype, fp32 relative 1e-4), fresh random inputs with per-channel
offsets: every dtype x layout (NCHW, channels_last, a strided view), every activation, awkward shapes (one input
or output channel, one pixel, batch 1, odd sizes), several Triton tiles, pixel-tile splits and K tiles (shrunk
tiles), an empty batch, the weight in float32 with half inputs; the input gradient poisoned first; bitwise
reproducibility; argument errors; opcheck; the training block calling it; planted defects the check rejects.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effnet_kernels.ops._checks import ACTIVATIONS
from effnet_kernels.reference import ACTIVATION_FNS

from .parity import assert_parity

OP = torch.ops.effnet.expand_bn_act_train_backward.default
EPS = 1e-3
CL = torch.channels_last


def _inputs(shape, j, dtype, layout="nchw", weight_dtype=None):
    """grad_a, x, weight, gamma, beta, mean, invstd: x ~ N(0, 1) plus a per-channel offset, weight ~ N(0, 1/K), the
    statistics those of the fp64 conv output (of the weight's values in x's dtype)."""
    n, k, h, w = shape
    x = torch.randn(shape) + torch.randn(k)[None, :, None, None]
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    elif layout == "strided":
        x = torch.randn(n, k, h, w * 2)[..., ::2] + 0.5
    x = x.to(dtype)
    weight = (torch.randn(j, k) / max(k, 1) ** 0.5).to(weight_dtype or dtype)
    grad_a = torch.randn(n, j, h, w).to(dtype)
    if layout == "channels_last":
        grad_a = grad_a.contiguous(memory_format=CL)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gamma, beta = torch.randn(j, dtype=acc), torch.randn(j, dtype=acc)
    hd = F.conv2d(x.double(), weight.to(dtype).double()[:, :, None, None])
    m = n * h * w
    mean = hd.mean((0, 2, 3)) if m else torch.zeros(j, dtype=torch.float64)
    var = hd.var((0, 2, 3), unbiased=False) if m else torch.zeros(j, dtype=torch.float64)
    return grad_a, x, weight, gamma, beta, mean.to(acc), torch.rsqrt(var + EPS).to(acc)


def _autograd(grad_a, x, weight, gamma, beta, activation, dtype):
    """(grad_x, grad_weight, grad_gamma, grad_beta) of ``act(batch_norm(conv1x1(x, W)))`` (batch statistics),
    autograd in ``dtype`` (the weight's values in x's dtype, as the op uses them)."""
    xd = x.detach().to(dtype).requires_grad_()
    wd = weight.detach().to(x.dtype).to(dtype).requires_grad_()
    g = gamma.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    b = beta.detach().to(g.dtype).requires_grad_()
    h = F.conv2d(xd, wd[:, :, None, None])
    y = ACTIVATION_FNS[activation](F.batch_norm(h, None, None, g.to(dtype), b.to(dtype), True, 0.0, EPS))
    return torch.autograd.grad(y, (xd, wd, g, b), grad_a.to(dtype))


def check(backend, shape, j, dtype, activation="silu", layout="nchw", weight_dtype=None):
    """``backend``'s op (a backend name, or an implementation: a function of the op's arguments) vs fp64."""
    args = (*_inputs(shape, j, dtype, layout, weight_dtype), activation)
    got = backend(*args) if callable(backend) else OP(*args, backend)
    name = getattr(backend, "__qualname__", backend)
    grad_a, x, weight, gamma, beta = args[:5]
    ref = _autograd(grad_a, x, weight, gamma, beta, activation, torch.float64)
    plain = _autograd(grad_a, x, weight, gamma, beta, activation, dtype) if dtype in (torch.float16, torch.bfloat16) \
        else (None,) * 4
    assert got[0].dtype == x.dtype and got[0].shape == x.shape
    want_fmt = CL if layout == "channels_last" else torch.contiguous_format
    assert got[0].is_contiguous(memory_format=want_fmt), f"{name}: grad_x must keep x's memory format"
    assert got[1].dtype == weight.dtype and got[1].shape == weight.shape and got[1].is_contiguous()
    assert got[2].dtype == gamma.dtype and got[3].dtype == beta.dtype
    for what, g, r, p in zip(("grad_x", "grad_weight", "grad_gamma", "grad_beta"), got, ref, plain):
        assert_parity(g, r, p.to(g.dtype) if p is not None else None, dtype, kind="backward", what=f"{name} {what}")
    return got


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]


@pytest.fixture(autouse=True)
def _interpreter(request, monkeypatch):
    """Triton cases run in the interpreter, with the input gradient the launcher allocates poisoned (NaN)."""
    if "triton" not in request.node.name:
        yield
        return
    pytest.importorskip("triton")
    from effnet_kernels.triton import expand_backward

    from .environments import triton_interpreted

    real = expand_backward.empty_in_layout
    monkeypatch.setattr(expand_backward, "empty_in_layout", lambda *a, **k: real(*a, **k).fill_(float("nan")))
    with triton_interpreted():
        yield


@pytest.fixture
def small_tiles(monkeypatch):
    """16-wide tiles everywhere: small shapes span several pixel tiles, channel tiles, K steps and splits."""
    from effnet_kernels.triton import _tuning, expand_backward as eb

    one = lambda lp: [_tuning.Config(16, 16, 1)]  # noqa: E731
    for name in ("_sums_candidates", "_dgrad_candidates", "_wgrad_candidates"):
        monkeypatch.setattr(eb, name, one)
    for name in ("_block_k", "_wgrad_pixel_tile"):
        monkeypatch.setattr(eb, name, lambda lp: 16)
    monkeypatch.setattr(eb, "_block_j", lambda lp, widest=64: 16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_parity(backend, dtype, layout):
    check(backend, (3, 12, 5, 7), 40, dtype, "silu", layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation(backend, activation):
    check(backend, (2, 8, 4, 5), 24, torch.float16, activation, "channels_last")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["silu", "relu6", "hardswish"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_aten_composition(dtype, activation, layout):
    """The ``cuda`` backend's implementation (the conv, bn_act_train_backward's aten ops, cuDNN's conv backward)."""
    from effnet_kernels import _aten_convs, cuda

    assert cuda.IMPLEMENTATIONS["expand_bn_act_train_backward"] is _aten_convs.expand_bn_act_train_backward
    check(_aten_convs.expand_bn_act_train_backward, (3, 12, 5, 7), 40, dtype, activation, layout)


def test_float64_reference():
    check("torch", (2, 5, 3, 4), 7, torch.float64, "hardswish")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,j", [((2, 1, 3, 3), 6), ((3, 7, 2, 3), 1), ((4, 5, 1, 1), 9), ((1, 9, 3, 5), 11)],
                         ids=str)
def test_awkward_shapes(backend, shape, j):
    check(backend, shape, j, torch.float32, "relu6", "channels_last")


@pytest.mark.interpreter
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_several_tiles_and_splits_triton(small_tiles, dtype, layout):
    """J = 37 over three 16-wide tiles, K = 40 over three K steps and tiles, 40 pixels per sample over three pixel
    tiles (a short last one), 9 pixel tiles split over several programs."""
    check("triton", (3, 40, 5, 8), 37, dtype, "silu", layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_weight_with_half_input(backend):
    """What the training block passes under autocast: the weight a float32 Parameter, used in x's dtype."""
    check(backend, (2, 16, 4, 3), 24, torch.float16, "silu", "channels_last", weight_dtype=torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    grad_a, x, weight, gamma, beta, mean, invstd = _inputs((0, 6, 3, 3), 10, torch.float32)
    gx, gw, gg, gb = OP(grad_a, x, weight, gamma, beta, mean, invstd, "silu", backend)
    assert gx.shape == x.shape and gw.shape == weight.shape
    assert not gw.abs().any() and not gg.abs().any() and not gb.abs().any()


@pytest.mark.interpreter
def test_triton_is_bitwise_reproducible(small_tiles):
    args = (*_inputs((3, 40, 5, 8), 37, torch.float16, "channels_last"), "silu")
    first, second = OP(*args, "triton"), OP(*args, "triton")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_argument_errors():
    grad_a, x, weight, gamma, beta, mean, invstd = _inputs((2, 6, 3, 3), 10, torch.float32)
    with pytest.raises(ValueError, match="weight must have shape"):
        OP(grad_a, x, weight[:, :5], gamma, beta, mean, invstd, "silu", "torch")
    with pytest.raises(ValueError, match="grad_a must have shape"):
        OP(grad_a[:, :9], x, weight, gamma, beta, mean, invstd, "silu", "torch")
    with pytest.raises(ValueError, match="gamma must have shape"):
        OP(grad_a, x, weight, gamma[:9], beta, mean, invstd, "silu", "torch")
    with pytest.raises(TypeError, match="invstd must be torch.float32"):
        OP(grad_a, x, weight, gamma, beta, mean, invstd.double(), "silu", "torch")
    with pytest.raises(ValueError, match="activation"):
        OP(grad_a, x, weight, gamma, beta, mean, invstd, "gelu", "torch")
    with pytest.raises(ValueError, match="x must be 4-D"):
        OP(grad_a, x[0], weight, gamma, beta, mean, invstd, "silu", "torch")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_opcheck(backend):
    args = _inputs((2, 6, 3, 4), 10, torch.float16, "channels_last")
    torch.library.opcheck(OP, (*args, "silu", backend))


@pytest.mark.interpreter
def test_the_training_block_calls_it(monkeypatch):
    """A half-precision training step of a converted MBConv runs the expand step's backward as this one op on the
    requested backend (the triton backend serves it)."""
    import copy

    import effnet_kernels as ek
    from effnet_kernels import testing
    from effnet_kernels.models import MBConvBlock

    from .environments import count_backend_calls, triton_interpreted

    with triton_interpreted():
        calls = count_backend_calls(monkeypatch, "triton", ["expand_bn_act_train_backward"])
        torch.manual_seed(0)
        block = MBConvBlock(in_channels=8, out_channels=8, kernel_size=3, stride=1, expand_ratio=6,
                            drop_path_rate=0.0)
        x = torch.randn(2, 8, 6, 6).contiguous(memory_format=CL)
        testing.calibrate_batchnorm(block.eval(), x)
        fused = ek.convert(copy.deepcopy(block).half(), backend="triton").train()
        fused(x.half().requires_grad_()).float().sum().backward()
    assert calls == {"expand_bn_act_train_backward": 1}


# ---------------------------------------------------------------- negative controls
def _planted(monkeypatch, change):
    from effnet_kernels.triton import expand_backward as eb

    real = eb.prepare

    def prepare(*args):
        lp = real(*args)
        change(lp)
        return lp

    monkeypatch.setattr(eb, "prepare", prepare)


def _skip_activation(lp):
    lp.act = 0


def _skew_mean(lp):
    lp.chan[0] += 0.05 / lp.chan[1]  # a twentieth of a standard deviation


def _shift_pixels(lp):
    lp.grad_a = torch.roll(lp.grad_a, 1, dims=3)


@pytest.mark.interpreter
@pytest.mark.parametrize("defect", [_skip_activation, _skew_mean, _shift_pixels], ids=lambda f: f.__name__[1:])
def test_negative_control_triton_planted_defects_are_rejected(monkeypatch, defect):
    """A backward that skips the activation's derivative, normalises with a mean off by 1/20 of a standard
    deviation, or pairs grad_a with the wrong pixels fails the check."""
    _planted(monkeypatch, defect)
    with pytest.raises(AssertionError, match="triton grad"):
        check("triton", (3, 12, 5, 7), 40, torch.float16, "silu", "channels_last")


@pytest.mark.interpreter
def test_negative_control_triton_without_the_centre_term_is_rejected(monkeypatch):
    """grad_h without the ``k3 = -k1 sum g / M`` term (the gradient through the batch mean) fails the check."""
    from effnet_kernels.triton import expand_backward as eb

    real = eb.set_train_rows

    def dropped(chan, sum_g_xhat, sum_g, count):
        real(chan, sum_g_xhat, sum_g, count)
        chan[6] = 0.0

    monkeypatch.setattr(eb, "set_train_rows", dropped)
    with pytest.raises(AssertionError, match="grad_x"):
        check("triton", (3, 12, 5, 7), 40, torch.float16, "silu", "channels_last")
