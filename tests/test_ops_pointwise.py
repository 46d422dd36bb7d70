"""``ops.pointwise_conv`` against an independent fp64 reference, and the four-kernel MBConv.

The truth is ``F.conv2d`` / activation modules in float64 on the gated input; "plain PyTorch"
(the parity rule's yardstick) is the same computed in the input's dtype with ``F.conv2d``.
CPU runs the ``torch`` backend; on a GPU the grid runs for every backend (``-m gpu``).
Negative controls: a backend that skips the activation, drops the gate or adds the residual
one pixel off must fail these checks.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import effnet_kernels as ek
from effnet_kernels import ops

from .defects import planted
from .parity import assert_parity
from .test_ops_parity import ACT_F, ACT_MODULES, BACKEND_PARAMS, DTYPES, make_input

ACTIVATIONS = ["identity", "silu", "relu", "relu6", "hardswish"]
CL = torch.channels_last


@pytest.fixture(params=BACKEND_PARAMS)
def backend_device(request):
    return request.param


def _inputs(n, k, h, w, cout, dtype, layout, device, *, gate, bias, residual, weight_dtype=None):
    x = make_input((n, k, h, w), dtype, layout, device)
    weight = (torch.randn(cout, k, device=device) / k ** 0.5).to(weight_dtype or dtype)
    b = torch.randn(cout, device=device) if bias else None
    g = torch.rand(n, k, device=device) + 0.25 if gate else None
    r = make_input((n, cout, h, w), dtype, layout, device) if residual else None
    return x, weight, b, g, r


def truth(x, weight, bias, gate, residual, activation, pool):
    """float64: F.conv2d on x * gate, then the activation module, + residual (or the spatial mean)."""
    x64 = x.double()
    if gate is not None:
        x64 = x64 * gate.double()[:, :, None, None]
    w64 = weight.to(x.dtype).double()[:, :, None, None]
    y = ACT_MODULES[activation]()(F.conv2d(x64, w64, bias.double() if bias is not None else None))
    if pool:
        return y.mean(dim=(2, 3)) if y.shape[2] * y.shape[3] else y.new_zeros(y.shape[:2])
    return y + residual.double() if residual is not None else y


def plain(x, weight, bias, gate, residual, activation, pool):
    """What eager PyTorch computes in x's dtype (the excite op rounded, then the conv, ...)."""
    if gate is not None:
        x = (x.float() * gate.float()[:, :, None, None]).to(x.dtype)
    y = ACT_F[activation](F.conv2d(x, weight.to(x.dtype)[:, :, None, None], bias.to(x.dtype) if bias is not None else None))
    if pool:
        return y.float().mean(dim=(2, 3))
    return y + residual if residual is not None else y


def run_case(backend, device, shape, cout, dtype, layout, activation, *, gate=True, bias=True, residual=True,
             pool=False, weight_dtype=None):
    n, k, h, w = shape
    x, weight, b, g, r = _inputs(n, k, h, w, cout, dtype, layout, device, gate=gate, bias=bias,
                                 residual=residual and not pool, weight_dtype=weight_dtype)
    out = ops.pointwise_conv(x, weight, b, gate=g, residual=r, activation=activation, pool=pool, backend=backend)
    if pool:
        assert out.dtype == torch.float32 and tuple(out.shape) == (n, cout)
    else:
        assert out.dtype == dtype and tuple(out.shape) == (n, cout, h, w)
        if layout == "channels_last" and k > 1 and h * w > 1 and cout > 1:
            assert out.is_contiguous(memory_format=CL), "the output keeps x's channels_last format"
    want = truth(x, weight, b, g, r, activation, pool)
    assert_parity(out.cpu(), want.cpu(), plain(x, weight, b, g, r, activation, pool).cpu(),
                  torch.float32 if pool and dtype == torch.float32 else dtype)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("parts", ["gate+bias+residual", "bias", "gate", "residual", "none"])
def test_pointwise_grid(backend_device, parts, dtype, layout):
    backend, device = backend_device
    run_case(backend, device, (2, 24, 5, 7), 40, dtype, layout, "silu",
             gate="gate" in parts, bias="bias" in parts, residual="residual" in parts)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pointwise_activations(backend_device, activation, dtype):
    backend, device = backend_device
    run_case(backend, device, (2, 16, 4, 5), 24, dtype, "channels_last", activation, gate=False, residual=False)


@pytest.mark.parametrize("shape,cout", [((1, 1, 3, 3), 5), ((2, 7, 1, 1), 1), ((3, 17, 3, 5), 3), ((1, 40, 9, 9), 17),
                                        ((2, 3, 1, 7), 64)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pointwise_awkward_shapes(backend_device, shape, cout, dtype):
    backend, device = backend_device
    run_case(backend, device, shape, cout, dtype, "channels_last", "relu6")
    run_case(backend, device, shape, cout, dtype, "nchw", "silu", residual=False, pool=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gate", [False, True])
def test_pointwise_pool(backend_device, dtype, gate):
    """The head: conv + BN + SiLU with the global average pool in the epilogue."""
    backend, device = backend_device
    run_case(backend, device, (3, 32, 7, 7), 48, dtype, "channels_last", "silu", gate=gate, pool=True)


def test_pointwise_float32_weight_with_half_input(backend_device):
    """A float32 (folded) weight is used in x's dtype, as an autocast conv uses it."""
    backend, device = backend_device
    run_case(backend, device, (2, 16, 3, 3), 8, torch.float16, "channels_last", "silu", weight_dtype=torch.float32)


@pytest.mark.parametrize("pool", [False, True])
def test_pointwise_empty_batch(backend_device, pool):
    backend, device = backend_device
    x, w, b, g, r = _inputs(0, 8, 3, 3, 4, torch.float32, "channels_last", device, gate=True, bias=True,
                            residual=not pool)
    out = ops.pointwise_conv(x, w, b, gate=g, residual=r, activation="silu", pool=pool, backend=backend)
    assert tuple(out.shape) == ((0, 4) if pool else (0, 4, 3, 3))


def autograd_backward(backend):
    """The op's gradients through autograd (its registered backward), as ``pointwise_conv_backward``'s arguments."""
    def backward(grad_out, x, w, b, g, r, activation, pool):
        leaves = [t for t in (x, w, b, g, r) if t is not None]
        ins = [t.detach().clone().requires_grad_() for t in leaves]
        it = iter(ins)
        args = [next(it) if t is not None else None for t in (x, w, b, g, r)]
        out = ops.pointwise_conv(args[0], args[1], args[2], gate=args[3], residual=args[4], activation=activation,
                                 pool=pool, backend=backend)
        return torch.autograd.grad(out, ins, grad_out)
    return backward


def check_backward(backward, device, dtype, *, pool, activation="hardswish", gate=True, bias=True, layout="channels_last",
                   weight_dtype=None, check_layout=False):
    """``backward(grad_out, x, w, b, g, r, activation, pool)``'s gradients of the present inputs vs the fp64
    autograd truth, by the backward rule (3x plain's error); empty results for absent inputs are dropped. With
    ``check_layout``: x's gradient in x's memory format, the weight's contiguous (as the fake kernel says)."""
    x, w, b, g, r = _inputs(2, 12, 4, 3, 10, dtype, layout, device, gate=gate, bias=bias, residual=not pool,
                            weight_dtype=weight_dtype)
    n_out = (2, 10) if pool else (2, 10, 4, 3)
    grad_out = torch.randn(n_out, device=device).to(torch.float32 if pool else dtype)
    present = [t for t in (x, w, b, g, r) if t is not None]
    got = [t for t, want in zip(backward(grad_out, x, w, b, g, r, activation, pool), (x, w, b, g, r))
           if want is not None]
    assert len(got) == len(present)

    def grads(cast, fn):
        ins = [cast(t).detach().requires_grad_() if t is not None else None for t in (x, w, b, g, r)]
        y = fn(*ins, activation, pool)
        return torch.autograd.grad(y, [t for t in ins if t is not None], grad_out.to(y.dtype))

    ref = grads(lambda t: t.double(), truth)
    base = grads(lambda t: t, plain)
    for i, (gg, rr, pp, leaf) in enumerate(zip(got, ref, base, present)):
        assert gg.dtype == leaf.dtype and gg.shape == leaf.shape
        assert_parity(gg.cpu(), rr.cpu(), pp.cpu(), dtype, kind="backward", what=f"grad #{i}")
    if check_layout:
        from effnet_kernels.ops._checks import memory_format_of

        assert got[0].is_contiguous(memory_format=memory_format_of(x)) and got[1].is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pool", [False, True])
def test_pointwise_backward(backend_device, dtype, pool):
    """Every input's gradient vs the fp64 autograd truth, by the backward rule (3x plain's error)."""
    backend, device = backend_device
    check_backward(autograd_backward(backend), device, dtype, pool=pool)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize("activation,gate,bias,layout", [
    ("hardswish", True, True, "channels_last"), ("silu", False, True, "nchw"), ("identity", True, False, "nchw"),
    ("relu6", False, False, "strided"),
])
def test_aten_pointwise_backward(dtype, pool, activation, gate, bias, layout):
    """The cuda backend's ``pointwise_conv_backward`` (cuDNN's convolution backward, in x's dtype), run here on
    the CPU's aten ops: by the rule for every part, with and without gate, bias, activation."""
    from effnet_kernels import _aten_convs

    check_backward(_aten_convs.pointwise_conv_backward, "cpu", dtype, pool=pool, activation=activation, gate=gate,
                   bias=bias, layout=layout, check_layout=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_aten_pointwise_backward_float32_weight_with_half_input(dtype):
    """What a frozen block under autocast passes: the folded weight and shift in float32, x in half precision."""
    from effnet_kernels import _aten_convs

    check_backward(_aten_convs.pointwise_conv_backward, "cpu", dtype, pool=False, weight_dtype=torch.float32,
                   check_layout=True)


def test_aten_pointwise_backward_empty_batch():
    from effnet_kernels import _aten_convs, reference

    args = (torch.randn(0, 5, 3, 3), torch.randn(0, 6, 3, 3), torch.randn(5, 6), torch.randn(5), torch.rand(0, 6),
            torch.randn(0, 5, 3, 3), "silu", False)
    for got, want in zip(_aten_convs.pointwise_conv_backward(*args), reference.pointwise_conv_backward(*args)):
        assert got.shape == want.shape and got.dtype == want.dtype


@pytest.mark.parametrize("defect", ["gate", "activation", "bias"])
def test_negative_control_aten_pointwise_backward(defect, monkeypatch):
    """The check rejects the aten backward with the gate's factor dropped from the input gradient, the activation's
    gradient skipped, or the bias gradient halved."""
    from effnet_kernels import _aten_convs

    real = _aten_convs.pointwise_conv_backward

    def broken(grad_out, x, w, b, g, r, activation, pool):
        if defect == "activation":
            return real(grad_out, x, w, b, g, r, "identity", pool)
        gx, gw, gb, gg, gr = real(grad_out, x, w, b, g, r, activation, pool)
        if defect == "gate":
            gx = gx / g.to(gx.dtype)[:, :, None, None]
        else:
            gb = gb * 0.5
        return gx, gw, gb, gg, gr

    check_backward(real, "cpu", torch.float32, pool=False)
    with pytest.raises(AssertionError):
        check_backward(broken, "cpu", torch.float32, pool=False)


@pytest.mark.parametrize("pool", [False, True])
def test_pointwise_gradcheck_float64(pool):
    x, w, b, g, r = _inputs(2, 5, 3, 2, 4, torch.float64, "nchw", "cpu", gate=True, bias=True, residual=not pool)
    leaves = [t.double().requires_grad_() for t in (x, w, b, g) + ((r,) if r is not None else ())]

    def f(*ts):
        return ops.pointwise_conv(ts[0], ts[1], ts[2], gate=ts[3], residual=ts[4] if len(ts) > 4 else None,
                                  activation="silu", pool=pool, backend="torch")

    assert torch.autograd.gradcheck(f, leaves)


def test_pointwise_float64_matches_the_truth_tightly():
    x, w, b, g, r = _inputs(2, 9, 4, 4, 6, torch.float64, "channels_last", "cpu", gate=True, bias=True, residual=True)
    out = ops.pointwise_conv(x, w, b, gate=g, residual=r, activation="relu6")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, truth(x, w, b, g, r, "relu6", False), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- opcheck, compile
def _opcheck_cases():
    t = torch.randn
    yield (t(2, 6, 3, 4), t(5, 6), t(5), torch.rand(2, 6), t(2, 5, 3, 4), "silu", False, "torch")
    x = t(2, 6, 3, 4).contiguous(memory_format=CL).half()
    yield (x, t(5, 6), None, None, t(2, 5, 3, 4).half().contiguous(memory_format=CL), "relu", False, "auto")
    yield (t(2, 6, 3, 4).bfloat16(), t(5, 6).bfloat16(), t(5), torch.rand(2, 6), None, "hardswish", True, "auto")
    yield (t(2, 6, 3, 4, dtype=torch.float64), t(5, 6, dtype=torch.float64), t(5, dtype=torch.float64), None, None,
           "identity", True, "torch")


@pytest.mark.parametrize("args", list(_opcheck_cases()), ids=lambda a: f"{a[0].dtype}-{a[5]}-{'pool' if a[6] else 'map'}")
def test_opcheck_pointwise_conv(args):
    torch.library.opcheck(torch.ops.effnet.pointwise_conv.default, args)
    grad_args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.dtype.is_floating_point
                      and a.dtype in (torch.float32, torch.float64) else a for a in args)
    torch.library.opcheck(torch.ops.effnet.pointwise_conv.default, grad_args)


def test_opcheck_pointwise_conv_backward():
    t = torch.randn
    torch.library.opcheck(torch.ops.effnet.pointwise_conv_backward.default,
                          (t(2, 5, 3, 4), t(2, 6, 3, 4), t(5, 6), t(5), torch.rand(2, 6), t(2, 5, 3, 4), "silu", False,
                           "torch"))
    torch.library.opcheck(torch.ops.effnet.pointwise_conv_backward.default,
                          (t(2, 5), t(2, 6, 3, 4), t(5, 6), None, None, None, "relu", True, "torch"))


def test_pointwise_compiles_fullgraph():
    x, w, b, g, r = _inputs(2, 8, 4, 4, 6, torch.float32, "channels_last", "cpu", gate=True, bias=True, residual=True)

    def f(x, w, b, g, r):
        return ops.pointwise_conv(x, w, b, gate=g, residual=r, activation="silu") * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, b, g, r), f(x, w, b, g, r))


# ---------------------------------------------------------------- argument errors
def _good():
    return dict(x=torch.randn(2, 6, 3, 4), weight=torch.randn(5, 6), bias=torch.randn(5), gate=torch.rand(2, 6),
                residual=torch.randn(2, 5, 3, 4))


@pytest.mark.parametrize("change,exc,match", [
    (dict(x=torch.randn(2, 6, 3)), ValueError, "x must be 4-D"),
    (dict(x=torch.randn(2, 6, 3, 4).int()), TypeError, "x must have dtype"),
    (dict(weight=torch.randn(5, 7)), ValueError, r"weight must have shape \[Cout, 6\]"),
    (dict(weight=torch.randn(5, 6, 3, 3)), ValueError, "weight must be 2-D or a 1x1 conv weight"),
    (dict(weight=torch.randn(0, 6)), ValueError, "at least one output channel"),
    (dict(bias=torch.randn(4)), ValueError, "bias"),
    (dict(bias=torch.randn(5).half()), TypeError, "bias must be float32 or x's dtype"),
    (dict(gate=torch.rand(2, 5)), ValueError, r"gate must have shape \[2, 6\]"),
    (dict(gate=torch.rand(2, 6).double()), TypeError, "gate must be float32"),
    (dict(residual=torch.randn(2, 5, 3, 3)), ValueError, "residual must have the output's shape"),
    (dict(residual=torch.randn(2, 5, 3, 4).half()), TypeError, "residual must have x's dtype"),
    (dict(x="not a tensor"), TypeError, "x must be a torch.Tensor"),
])
def test_pointwise_argument_errors(change, exc, match):
    args = {**_good(), **change}
    with pytest.raises(exc, match=match):
        ops.pointwise_conv(args["x"], args["weight"], args["bias"], gate=args["gate"], residual=args["residual"])


def test_pointwise_option_errors():
    a = _good()
    with pytest.raises(ValueError, match="residual cannot be combined with pool"):
        ops.pointwise_conv(a["x"], a["weight"], residual=a["residual"], pool=True)
    with pytest.raises(ValueError, match="activation"):
        ops.pointwise_conv(a["x"], a["weight"], activation="gelu")
    with pytest.raises(TypeError, match="pool must be a bool"):
        ops.pointwise_conv(a["x"], a["weight"], pool=1)
    with pytest.raises(ValueError, match="backend"):
        ops.pointwise_conv(a["x"], a["weight"], backend="cudnn")
    with pytest.raises(ValueError, match="residual cannot be combined"):  # the raw op checks too
        torch.ops.effnet.pointwise_conv.default(a["x"], a["weight"], None, None, a["residual"], "silu", True, "torch")


# ---------------------------------------------------------------- negative controls
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("defect", ["pointwise_skip_act", "excite_skip", "residual_shift"])
def test_negative_control_pointwise_check_rejects_defect(backend_device, defect, dtype):
    backend, device = backend_device
    case = (backend, device, (2, 16, 5, 6), 24, dtype, "channels_last", "silu")
    run_case(*case)  # clean: passes
    with planted(defect, backend), pytest.raises(AssertionError):
        run_case(*case)


# ---------------------------------------------------------------- the four-kernel block
class _Ops(TorchDispatchMode):
    """Records the ops that dispatch, view-only aten ops left out."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.namespace == "aten" and func.is_view):
            self.names.append(f"{func.namespace}.{func._opname}")
        return func(*args, **(kwargs or {}))


def _calls(module, x):
    with torch.no_grad():
        module(x)  # folds and caches the BatchNorms
        with _Ops() as rec:
            out = module(x)
    return rec.names, out


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_converted_block_is_four_kernels(layout):
    """An eval MBConv with expand, SE and residual: expand, depthwise(+squeeze), gate, project."""
    block = ek.MBConv(16, 16, 3, 1, 4).eval()
    x = make_input((2, 16, 6, 6), torch.float32, layout, "cpu")
    names, _ = _calls(block, x)
    assert names == ["effnet.pointwise_conv", "effnet.dwconv_bn_act", "effnet.se_gate", "effnet.pointwise_conv"]
    no_expand = ek.MBConv(16, 24, 5, 2, 1).eval()  # no expand conv, no residual
    names, _ = _calls(no_expand, x)
    assert names == ["effnet.dwconv_bn_act", "effnet.se_gate", "effnet.pointwise_conv"]
    no_se = ek.MBConv(16, 16, 3, 1, 4, se_ratio=None).eval()
    names, _ = _calls(no_se, x)
    assert names == ["effnet.pointwise_conv", "effnet.dwconv_bn_act", "effnet.pointwise_conv"]


def test_converted_block_with_a_training_projection_bn_runs_the_gate_and_residual_itself():
    """A projection BatchNorm left in training mode inside an eval block: no folding, the block
    applies the excite and the residual apart, and still matches its eager twin."""
    from .model_checks import calibrated

    torch.manual_seed(0)
    x = torch.randn(2, 16, 6, 6)
    eager = calibrated(ek.blocks.MBConvBlock(16, 16, 3, 1, 4), x)
    fused = ek.convert(copy.deepcopy(eager), backend="torch")
    for m in (eager, fused):
        m.project_bn.train()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), eager(x), rtol=1e-5, atol=1e-5)
    names, _ = _calls(fused, x)
    assert "effnet.se_excite" in names and names.count("effnet.pointwise_conv") == 1
