"""``ops.conv_bn_act`` (a network's stem) against an independent fp64 reference.

The truth is ``F.conv2d`` on the padded input in float64 and the activation modules; "plain
PyTorch" is the same in the input's dtype. CPU runs the ``torch`` backend; on a GPU the grid
runs for every backend (``-m gpu``). Negative control: a backend that pads one pixel off.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effnet_kernels import ops

from .defects import planted
from .parity import assert_parity
from .test_ops_parity import ACT_F, ACT_MODULES, BACKEND_PARAMS, DTYPES, make_input

CL = torch.channels_last


@pytest.fixture(params=BACKEND_PARAMS)
def backend_device(request):
    return request.param


def _pad4(padding, k):
    from effnet_kernels.ops._checks import normalize_padding

    return normalize_padding(padding, k)


def truth(x, weight, bias, stride, pad4, activation):
    z = F.conv2d(F.pad(x.double(), pad4), weight.to(x.dtype).double(), bias.double() if bias is not None else None,
                 stride=stride)
    return ACT_MODULES[activation]()(z)


def plain(x, weight, bias, stride, pad4, activation):
    z = F.conv2d(F.pad(x, pad4), weight.to(x.dtype), bias.to(x.dtype) if bias is not None else None, stride=stride)
    return ACT_F[activation](z)


def run_case(backend, device, shape, cout, k, stride, padding, dtype, layout, activation, bias=True):
    n, cin, h, w = shape
    x = make_input(shape, dtype, layout, device)
    weight = (torch.randn(cout, cin, k, k, device=device) / (cin * k * k) ** 0.5).to(dtype)
    b = torch.randn(cout, device=device) if bias else None
    out = ops.conv_bn_act(x, weight, b, stride=stride, padding=padding, activation=activation, backend=backend)
    pad4 = _pad4(padding, k)
    want = truth(x, weight, b, stride, pad4, activation)
    assert out.dtype == dtype and out.shape == want.shape
    if layout == "channels_last" and cout > 1 and out.shape[2] * out.shape[3] > 1:
        assert out.is_contiguous(memory_format=CL)
    assert_parity(out.cpu(), want.cpu(), plain(x, weight, b, stride, pad4, activation).cpu(), dtype)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,stride,padding", [(3, 2, None), (3, 2, (0, 1, 0, 1)), (5, 1, 2), (1, 1, 0), (3, 1, (1, 0))])
def test_conv_grid(backend_device, k, stride, padding, dtype, layout):
    backend, device = backend_device
    run_case(backend, device, (2, 3, 9, 8), 16, k, stride, padding, dtype, layout, "silu")


@pytest.mark.parametrize("activation", ["identity", "silu", "relu", "relu6", "hardswish"])
def test_conv_activations(backend_device, activation):
    backend, device = backend_device
    for dtype in DTYPES:
        run_case(backend, device, (2, 3, 7, 7), 8, 3, 2, None, dtype, "channels_last", activation, bias=False)


@pytest.mark.parametrize("shape,cout", [((1, 1, 1, 1), 1), ((2, 5, 3, 2), 3), ((1, 3, 11, 13), 24)])
def test_conv_awkward_shapes(backend_device, shape, cout):
    backend, device = backend_device
    for dtype in DTYPES:
        run_case(backend, device, shape, cout, 3, 2, None, dtype, "channels_last", "silu")
        run_case(backend, device, shape, cout, 3, 1, (1, 1, 0, 2), dtype, "nchw", "relu")


def test_conv_empty_batch(backend_device):
    backend, device = backend_device
    x = torch.randn(0, 3, 8, 8, device=device)
    out = ops.conv_bn_act(x, torch.randn(4, 3, 3, 3, device=device), torch.randn(4, device=device), stride=2,
                          backend=backend)
    assert tuple(out.shape) == (0, 4, 4, 4)


def check_backward(backward, device, dtype, *, pad4=(1, 0, 1, 0), stride=2, activation="hardswish", bias=True,
                   layout="channels_last", weight_dtype=None, check_layout=False):
    """``backward(grad_out, x, w, b)``'s gradients of the present inputs vs the fp64 autograd truth, by the
    backward rule (3x plain's error). With ``check_layout``: x's gradient in x's memory format, the weight's
    contiguous (as the fake kernel says)."""
    x = make_input((2, 3, 7, 6), dtype, layout, device)
    w = (torch.randn(5, 3, 3, 3, device=device) / 5).to(weight_dtype or dtype)
    b = torch.randn(5, device=device) if bias else None
    present = [t for t in (x, w, b) if t is not None]
    ho = (7 + pad4[2] + pad4[3] - 3) // stride + 1
    wo = (6 + pad4[0] + pad4[1] - 3) // stride + 1
    grad_out = torch.randn(2, 5, ho, wo, device=device).to(dtype)
    got = backward(grad_out, x, w, b, (stride, stride), pad4, activation)[:len(present)]

    def grads(cast, fn):
        ins = [cast(t).detach().requires_grad_() for t in present]
        y = fn(ins[0], ins[1], ins[2] if bias else None, (stride, stride), pad4, activation)
        return torch.autograd.grad(y, ins, grad_out.to(y.dtype))

    for i, (gg, rr, pp, leaf) in enumerate(zip(got, grads(lambda t: t.double(), truth), grads(lambda t: t, plain),
                                               present)):
        assert gg.dtype == leaf.dtype and gg.shape == leaf.shape
        assert_parity(gg.cpu(), rr.cpu(), pp.cpu(), dtype, kind="backward", what=f"grad #{i}")
    if check_layout:
        from effnet_kernels.ops._checks import memory_format_of

        assert got[0].is_contiguous(memory_format=memory_format_of(x)) and got[1].is_contiguous()


def autograd_backward(backend):
    """The op's gradients through autograd (its registered backward), as ``conv_bn_act_backward``'s arguments."""
    def backward(grad_out, x, w, b, stride, pad4, activation):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
        out = ops.conv_bn_act(leaves[0], leaves[1], leaves[2] if b is not None else None, stride=stride,
                              padding=pad4, activation=activation, backend=backend)
        return torch.autograd.grad(out, leaves, grad_out)
    return backward


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv_backward(backend_device, dtype):
    backend, device = backend_device
    check_backward(autograd_backward(backend), device, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pad4,stride,activation,bias,layout", [
    ((1, 0, 1, 0), 2, "hardswish", True, "channels_last"), ((1, 1, 1, 1), 1, "silu", False, "nchw"),
    ((0, 0, 0, 0), 2, "identity", True, "strided"), ((2, 1, 0, 1), 1, "relu6", True, "nchw"),
])
def test_aten_conv_backward(dtype, pad4, stride, activation, bias, layout):
    """The cuda backend's ``conv_bn_act_backward`` (cuDNN's convolution backward in x's dtype) on the CPU's aten
    ops: symmetric padding through the conv, 4-sided by an explicit pad, by the rule."""
    from effnet_kernels import _aten_convs

    check_backward(_aten_convs.conv_bn_act_backward, "cpu", dtype, pad4=pad4, stride=stride, activation=activation,
                   bias=bias, layout=layout, check_layout=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_aten_conv_backward_float32_weight_with_half_input(dtype):
    """What a frozen stem under autocast passes: the folded weight and bias in float32, x in half precision."""
    from effnet_kernels import _aten_convs

    check_backward(_aten_convs.conv_bn_act_backward, "cpu", dtype, weight_dtype=torch.float32, check_layout=True)


@pytest.mark.parametrize("defect", ["pad_shift", "activation"])
def test_negative_control_aten_conv_backward(defect):
    """The check rejects the aten backward cutting the input gradient one pixel off, or skipping the
    activation's gradient."""
    from effnet_kernels import _aten_convs

    real = _aten_convs.conv_bn_act_backward

    def broken(grad_out, x, w, b, stride, pad4, activation):
        if defect == "activation":
            return real(grad_out, x, w, b, stride, pad4, "identity")
        gx, gw, gb = real(grad_out, x, w, b, stride, pad4, activation)
        return gx.roll(1, dims=3), gw, gb

    check_backward(real, "cpu", torch.float32, pad4=(2, 1, 0, 1), stride=1)
    with pytest.raises(AssertionError):
        check_backward(broken, "cpu", torch.float32, pad4=(2, 1, 0, 1), stride=1)


def test_conv_gradcheck_float64():
    leaves = [torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True),
              torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True),
              torch.randn(4, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(
        lambda x, w, b: ops.conv_bn_act(x, w, b, stride=2, padding=(0, 1, 0, 1), activation="silu", backend="torch"),
        leaves)


def test_conv_float64_is_tight():
    x, w, b = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64), torch.randn(4)
    out = ops.conv_bn_act(x, w, b, stride=1, activation="relu6")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, truth(x, w, b, (1, 1), (1, 1, 1, 1), "relu6"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", range(3))
def test_opcheck_conv_bn_act(case):
    t = torch.randn
    args = [
        (t(2, 3, 8, 7), t(6, 3, 3, 3), t(6), [2, 2], [1, 1, 1, 1], "silu", "torch"),
        (t(2, 3, 8, 7).half().contiguous(memory_format=CL), t(6, 3, 3, 3), None, [2, 2], [0, 1, 0, 1], "relu6", "auto"),
        (t(1, 4, 5, 5, dtype=torch.float64), t(2, 4, 5, 5, dtype=torch.float64), t(2), [1, 1], [2, 2, 2, 2], "identity",
         "torch"),
    ][case]
    torch.library.opcheck(torch.ops.effnet.conv_bn_act.default, args)
    grad_args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.dtype in (torch.float32, torch.float64)
                      else a for a in args)
    torch.library.opcheck(torch.ops.effnet.conv_bn_act.default, grad_args)
    if case == 0:
        torch.library.opcheck(torch.ops.effnet.conv_bn_act_backward.default, (t(2, 6, 4, 4),) + args)


def test_conv_compiles_fullgraph():
    x, w, b = torch.randn(2, 3, 8, 8).contiguous(memory_format=CL), torch.randn(4, 3, 3, 3), torch.randn(4)
    f = lambda x, w, b: ops.conv_bn_act(x, w, b, stride=2) + 1  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x, w, b), f(x, w, b))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(x=torch.randn(2, 3, 8)), ValueError, "x must be 4-D"),
    (dict(weight=torch.randn(4, 2, 3, 3)), ValueError, r"weight must have shape \[Cout, 3, k, k\]"),
    (dict(weight=torch.randn(4, 3, 2, 2)), ValueError, "kernel size must be odd"),
    (dict(weight=torch.randn(4, 3, 3, 1)), ValueError, "weight must have shape"),
    (dict(bias=torch.randn(5)), ValueError, "bias"),
    (dict(bias=torch.randn(4).half()), TypeError, "bias must be float32"),
    (dict(stride=3), ValueError, "stride must be 1 or 2"),
    (dict(padding=(1, 2, 3)), ValueError, "padding must have 2 or 4 entries"),
    (dict(padding=-1), ValueError, "padding must be non-negative"),
    (dict(activation="gelu"), ValueError, "activation"),
    (dict(x=torch.randn(1, 3, 1, 1), padding=0), ValueError, "smaller than the kernel"),
    (dict(weight="w"), TypeError, "weight must be a torch.Tensor"),
])
def test_conv_argument_errors(kwargs, exc, match):
    args = dict(x=torch.randn(2, 3, 8, 8), weight=torch.randn(4, 3, 3, 3), bias=torch.randn(4))
    args.update(kwargs)
    x, w, b = args.pop("x"), args.pop("weight"), args.pop("bias")
    with pytest.raises(exc, match=match):
        ops.conv_bn_act(x, w, b, **args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_negative_control_conv_check_rejects_padding_shift(backend_device, dtype):
    backend, device = backend_device
    case = (backend, device, (2, 3, 9, 8), 16, 3, 2, (0, 1, 0, 1), dtype, "channels_last", "silu")
    run_case(*case)
    with planted("conv_pad_shift", backend), pytest.raises(AssertionError):
        run_case(*case)
