"""The Triton ``pointwise_conv`` kernel on CPU tensors, in Triton's interpreter.

Parity against the fp64 torch reference by the DESIGN rule (fp16/bf16: at most 2x the error of
eager PyTorch in that dtype, i.e. ``F.conv2d`` of the ``se_excite``'d input + bias, the
activation, + residual; fp32: relative 1e-5), outputs poisoned with NaN by the launcher's
allocation so unwritten elements fail: every dtype x layout (NCHW, channels_last, a strided
view) x gate / bias / residual present or absent, awkward shapes (K or Cout = 1, not multiples
of 8 or 16, H = W = 1, odd H x W, N = 0 and 1, several M / Cout tiles and K blocks with shrunk
tiles), the pool with and without the gate, every activation over its regions, mixed weight /
bias / gate dtypes, the 64-bit offset variant, and negative controls (planted kernel defects the
check must reject).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import effnet_kernels as ek
from effnet_kernels import reference
from effnet_kernels.ops._checks import ACTIVATIONS, memory_format_of

from .parity import assert_parity
from .test_ops_parity import LAYOUTS, make_input
from .test_triton_dwconv import triton_interpreter  # noqa: F401  (fixture)

pytest.importorskip("triton")

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CL = torch.channels_last


# ----------------------------------------------------------------------------- the check


def pw_truth(x, weight, bias, gate, residual, activation, pool):
    """fp64 ground truth: the torch reference on fp64 copies, on x's device (the weight as the op uses it: in
    x's dtype)."""
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    weight = weight.reshape(weight.shape[0], -1)
    return reference.pointwise_conv(d(x), d(weight.to(x.dtype)), d(bias), d(gate), d(residual), activation, pool)


def pw_plain(x, weight, bias, gate, residual, activation, pool):
    """Eager PyTorch in x's dtype: F.conv2d of se_excite's output (+ bias), the activation, + residual (pool: mean)."""
    dt = x.dtype
    weight = weight.reshape(weight.shape[0], -1)
    xin = reference.se_excite(x, gate) if gate is not None else x
    y = F.conv2d(xin, weight.to(dt)[:, :, None, None], bias.to(dt) if bias is not None else None)
    y = reference.ACTIVATION_FNS[activation](y)
    if pool:
        return (y.mean(dim=(2, 3)) if y.shape[2] * y.shape[3] else y.new_zeros(y.shape[:2])).float()
    return y + residual if residual is not None else y


def pw_inputs(shape, cout, dtype, layout, device="cpu", gate=True, bias=True, residual=True, pool=False,
              weight_dtype=None, bias_dtype=torch.float32, gate_dtype=torch.float32, bias_std=1.0):
    """Random inputs scaled like a trained layer's: x ~ N(0, 1), weight ~ N(0, 1/K), bias ~ N(0, bias_std),
    gate in (0, 1) (a sigmoid's), residual ~ N(0, 1) in x's dtype and layout."""
    n, k, h, w = shape
    x = make_input(shape, dtype, layout, device)
    wt = (torch.randn(cout, k, device=device) / max(k, 1) ** 0.5).to(weight_dtype or dtype)
    b = (torch.randn(cout, device=device) * bias_std).to(bias_dtype) if bias else None
    g = torch.rand(n, k, device=device).to(gate_dtype) if gate else None
    r = make_input((n, cout, h, w), dtype, layout, device) if residual and not pool else None
    return x, wt, b, g, r


def check_pointwise(x, weight, bias, gate, residual, activation="silu", pool=False, backend="triton",
                    what="pointwise"):
    """Run the op on ``backend`` and assert parity, dtype, shape and memory format."""
    out = ek.ops.pointwise_conv(x, weight, bias, gate=gate, residual=residual, activation=activation, pool=pool,
                                backend=backend)
    n, cout, h, w = x.shape[0], weight.shape[0], x.shape[2], x.shape[3]
    if pool:
        assert out.dtype == torch.float32 and tuple(out.shape) == (n, cout)
    else:
        assert out.dtype == x.dtype and tuple(out.shape) == (n, cout, h, w)
        assert out.is_contiguous(memory_format=memory_format_of(x)), "output must keep x's memory format"
    assert out.device == x.device
    truth = pw_truth(x, weight, bias, gate, residual, activation, pool)
    plain = pw_plain(x, weight, bias, gate, residual, activation, pool) if x.dtype != torch.float32 else None
    assert_parity(out, truth, plain, x.dtype, what=what)
    return out


def run_case(shape, cout, dtype, layout, activation="silu", pool=False, **kw):
    return check_pointwise(*pw_inputs(shape, cout, dtype, layout, pool=pool, **kw), activation=activation, pool=pool)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """The output the launcher allocates starts as NaN: an element the kernel does not write fails the check."""
    from effnet_kernels.triton import pointwise

    real = pointwise.prepare_pointwise

    def prepare(*args):
        lp = real(*args)
        lp.out.fill_(float("nan"))
        return lp

    monkeypatch.setattr(pointwise, "prepare_pointwise", prepare)


@pytest.fixture
def small_tiles(monkeypatch):
    """16 x 16 tiles and 16-wide K blocks: small shapes span several pixel tiles, Cout tiles and K steps."""
    from effnet_kernels.triton import _tuning, pointwise

    monkeypatch.setattr(pointwise, "_candidates", lambda lp: [_tuning.Config(16, 16, 1)])
    monkeypatch.setattr(pointwise, "block_k", lambda lp, cfg: 16)


def planted_launch(monkeypatch, change):
    """A kernel defect: the launch the kernel receives, changed by ``change(lp)``."""
    from effnet_kernels.triton import pointwise

    real = pointwise.prepare_pointwise

    def prepare(*args):
        lp = real(*args)
        change(lp)
        return lp

    monkeypatch.setattr(pointwise, "prepare_pointwise", prepare)


# ----------------------------------------------------------------------------- cases

GBR = [(g, b, r) for g in (False, True) for b in (False, True) for r in (False, True)]


@pytest.mark.parametrize("gate,bias,residual", GBR, ids=lambda v: "yn"[not v])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_grid(dtype, layout, gate, bias, residual):
    """dtype x layout x each combination of gate / bias / residual (K = 40, Cout = 17, 5 x 7)."""
    run_case((2, 40, 5, 7), 17, dtype, layout, gate=gate, bias=bias, residual=residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape,cout",
    [((2, 1, 4, 5), 8), ((2, 24, 3, 3), 1), ((1, 3, 5, 3), 17), ((2, 17, 3, 5), 40), ((3, 40, 1, 1), 24),
     ((1, 16, 17, 19), 16), ((0, 8, 4, 4), 12), ((1, 144, 2, 3), 24), ((2, 24, 9, 15), 144)],
    ids=["K1", "Cout1", "K3-Cout17", "K17-Cout40", "HW1", "HW323", "N0", "K144", "Cout144-M135"],
)
def test_awkward_shapes(shape, cout, dtype):
    """Every layout, gate + bias + residual; M = 135 is not a multiple of any BLOCK_M."""
    for layout in LAYOUTS:
        run_case(shape, cout, dtype, layout)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_several_tiles_and_k_blocks(small_tiles, dtype):
    """16 x 16 tiles, BLOCK_K = 16: 5 x 7 = 35 pixels in 3 tiles (the last partial), Cout 40 in 3 tiles,
    K = 40 in 3 K steps (the last masked), both layouts and a strided view."""
    for layout in LAYOUTS:
        run_case((2, 40, 5, 7), 40, dtype, layout)
        run_case((2, 40, 5, 7), 40, dtype, layout, pool=True)


@pytest.mark.parametrize("gate", [False, True], ids=["nogate", "gate"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pool(dtype, layout, gate):
    """The head's global average pool ([N, Cout] float32, no output stored), with and without the gate."""
    run_case((3, 24, 7, 6), 40, dtype, layout, pool=True, gate=gate)


@pytest.mark.parametrize("shape", [(1, 8, 1, 1), (0, 8, 3, 3), (2, 3, 17, 19)], ids=["HW1", "N0", "HW323"])
def test_pool_awkward_shapes(shape):
    for layout in ("nchw", "channels_last"):
        run_case(shape, 17, torch.float16, layout, pool=True)


def test_pool_several_pixel_tiles(small_tiles):
    """A sample's pixels (9 x 11 = 99) in 7 tiles of 16, the last partial: the masked rows must not enter the mean
    (act(bias) is not zero there)."""
    run_case((2, 16, 9, 11), 24, torch.float32, "channels_last", pool=True, bias_std=3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations(activation, dtype):
    """Each activation over its regions (bias ~ N(0, 3): both clamps of relu6 / hardswish / hardsigmoid hit),
    fp32 in channels_last, fp16 in NCHW; and pooled."""
    layout = "channels_last" if dtype == torch.float32 else "nchw"
    run_case((2, 24, 6, 5), 40, dtype, layout, activation=activation, bias_std=3.0)
    run_case((2, 24, 6, 5), 40, dtype, layout, activation=activation, bias_std=3.0, pool=True)


@pytest.mark.parametrize(
    "dtype,weight_dtype,bias_dtype,gate_dtype",
    [(torch.float16, torch.float32, torch.float32, torch.float32),
     (torch.float16, torch.float32, torch.float16, torch.float16),
     (torch.bfloat16, torch.float32, torch.bfloat16, torch.float32),
     (torch.float16, torch.bfloat16, torch.float32, torch.float32),
     (torch.float32, torch.float16, torch.float32, torch.float32)],
    ids=["fp16-w32", "fp16-all16", "bf16-w32", "fp16-wbf16", "fp32-w16"],
)
def test_mixed_dtypes(dtype, weight_dtype, bias_dtype, gate_dtype):
    """An fp32 (or bf16) weight with fp16 / bf16 x is used in x's dtype, as an autocast conv uses it; bias and
    gate in fp32 or x's dtype."""
    for layout in ("nchw", "channels_last"):
        run_case((2, 24, 5, 4), 40, dtype, layout, weight_dtype=weight_dtype, bias_dtype=bias_dtype,
                 gate_dtype=gate_dtype)


def test_weight_4d_and_fresh_cast():
    """A [Cout, K, 1, 1] conv weight; changed in place between calls, the next call sees the new values."""
    x, w, b, g, r = pw_inputs((2, 24, 4, 4), 40, torch.float16, "channels_last", weight_dtype=torch.float32)
    w4 = w.reshape(40, 24, 1, 1)
    check_pointwise(x, w4, b, g, r)
    with torch.no_grad():
        w4.mul_(-0.5)
    check_pointwise(x, w4, b, g, r)


def test_gated_input_is_rounded_as_se_excite_stores_it():
    """With an exactly representable weight (one-hot rows) the output is the gated input itself:
    bitwise se_excite's fp16 output, not the unrounded float32 product."""
    x = make_input((2, 16, 3, 5), torch.float16, "channels_last", "cpu")
    gate = torch.rand(2, 16)
    w = torch.eye(16)
    out = ek.ops.pointwise_conv(x, w, gate=gate, backend="triton")
    assert torch.equal(out, reference.se_excite(x, gate))


@pytest.mark.parametrize("pool", [False, True])
def test_int64_offsets_variant(monkeypatch, pool):
    """The 64-bit-offset specialisation computes the same thing (forced on a small tensor)."""
    planted_launch(monkeypatch, lambda lp: setattr(lp, "int64", True))
    for layout in ("nchw", "channels_last"):
        run_case((2, 24, 5, 3), 17, torch.float16, layout, pool=pool)


def test_pool_is_deterministic():
    x, w, b, g, _ = pw_inputs((2, 40, 9, 9), 24, torch.float32, "channels_last", pool=True)
    a = ek.ops.pointwise_conv(x, w, b, gate=g, activation="silu", pool=True, backend="triton")
    assert torch.equal(a, ek.ops.pointwise_conv(x, w, b, gate=g, activation="silu", pool=True, backend="triton"))


# ----------------------------------------------------------------------------- negative controls


def _drop_gate(lp):
    lp.gate = None


def _shift_residual(lp):  # the residual read one pixel off (along W, wrapping)
    lp.residual = torch.roll(lp.residual, 1, dims=3).contiguous(memory_format=memory_format_of(lp.residual))


def _skip_act(lp):
    lp.act = 0


def _drop_bias(lp):
    lp.bias = None


@pytest.mark.parametrize("defect", [_drop_gate, _shift_residual, _skip_act, _drop_bias], ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_negative_control_planted_defects_are_rejected(monkeypatch, defect, dtype):
    """A kernel that drops the gate, reads the residual one pixel off, skips the activation or the bias fails."""
    inputs = pw_inputs((2, 24, 5, 6), 17, dtype, "channels_last")
    check_pointwise(*inputs)  # clean: passes
    planted_launch(monkeypatch, defect)
    with pytest.raises(AssertionError, match="pointwise"):
        check_pointwise(*inputs)


def test_negative_control_unwritten_elements_are_seen(monkeypatch):
    """A grid one Cout tile short leaves NaN (the poison) in the output: the check fails."""
    from effnet_kernels.triton import pointwise

    real = pointwise._launch
    inputs = pw_inputs((2, 24, 5, 6), 17, torch.float16, "nchw")
    check_pointwise(*inputs)  # clean: passes

    def short(lp, cfg):
        lp.cout -= 1  # the kernel now covers Cout - 1 channels; the last output channel stays unwritten
        real(lp, cfg)

    monkeypatch.setattr(pointwise, "_launch", short)
    with pytest.raises(AssertionError, match="non-finite"):
        check_pointwise(*inputs)


# ----------------------------------------------------------------------------- autograd, opcheck


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("pool", [False, True])
def test_backward_is_served_by_the_triton_backend(monkeypatch, dtype, pool):
    """The triton backend registers ``pointwise_conv_backward`` (with an activation or the pool, cuDNN's
    convolution backward, the gate by its own excite kernels; without, its GEMMs: test_triton_pointwise_backward), so a Triton training step on a GPU without the CUDA extension never falls to the float32
    reference: the op's autograd with ``backend="triton"`` calls it, the Triton excite kernels run, and every
    gradient is within the backward rule of the fp64 truth."""
    from effnet_kernels import _aten_convs, backends

    from .environments import count_backend_calls
    from .test_ops_pointwise import autograd_backward, check_backward

    calls = count_backend_calls(monkeypatch, "triton", ["pointwise_conv_backward"])
    # neither aten's excite backward nor the torch reference: the gate's gradients are the Triton kernel's
    monkeypatch.setattr(_aten_convs, "_aten_excite_backward", lambda *a: pytest.fail("aten's excite backward ran"))
    monkeypatch.setattr(backends._REGISTRY["torch"], "impls", lambda: pytest.fail("the torch reference served"))
    check_backward(autograd_backward("triton"), "cpu", dtype, pool=pool)
    assert calls == {"pointwise_conv_backward": 1}


@pytest.mark.parametrize("pool", [False, True])
def test_opcheck(pool):
    x, w, b, g, r = pw_inputs((2, 8, 3, 4), 12, torch.float16, "channels_last", pool=pool)
    args = (x.requires_grad_(), w.requires_grad_(), b, g, r, "silu", pool, "triton")
    torch.library.opcheck(torch.ops.effnet.pointwise_conv.default, args)
