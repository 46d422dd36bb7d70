"""Parity of every op (forward and backward) against independent fp64 references.

The references are built from ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.SiLU`` / ``nn.ReLU``
/ ``nn.ReLU6`` / ``nn.Hardswish`` / ``nn.Sigmoid`` / ``nn.Hardsigmoid`` / ``F.*`` in float64,
not from :mod:`effnet_kernels.reference`. CPU runs the ``torch`` backend; on a GPU the
same grid runs for every backend (``-m gpu``). Every activation of ``dwconv_bn_act`` and
every (activation, gate) of ``se_gate``, forward and backward, in every dtype; float64
through the reference (tight tolerances, ``gradcheck``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effnet_kernels as ek
from effnet_kernels.nn import fold_batchnorm

from .defects import planted
from .parity import assert_parity

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTIVATIONS = ["identity", "silu", "relu", "relu6", "hardswish"]  # ops._checks.ACTIVATIONS
NEW_ACTIVATIONS = ["relu", "relu6", "hardswish"]
# (activation, gate) of se_gate: EfficientNet, MnasNet-style ReLU + sigmoid, MobileNetV3, SiLU + hard-sigmoid
SE_VARIANTS = [("silu", "sigmoid"), ("relu", "sigmoid"), ("relu", "hardsigmoid"), ("silu", "hardsigmoid")]
# The activations as nn modules (the fp64 truth) and F functions (plain PyTorch in the input's dtype).
ACT_MODULES = {"identity": nn.Identity, "silu": nn.SiLU, "relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish,
               "sigmoid": nn.Sigmoid, "hardsigmoid": nn.Hardsigmoid}
ACT_F = {"identity": lambda t: t, "silu": F.silu, "relu": F.relu, "relu6": F.relu6, "hardswish": F.hardswish,
         "sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid}
PADDINGS = [None, 0, (1, 2), (0, 1, 0, 1), (2, 1, 3, 0)]
LAYOUTS = ["nchw", "channels_last", "strided"]

BACKEND_PARAMS = [
    pytest.param(("torch", "cpu"), id="torch-cpu"),
    pytest.param(("torch", "cuda"), id="torch-cuda", marks=pytest.mark.gpu),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=pytest.mark.gpu),
    pytest.param(("cuda", "cuda"), id="cuda-cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(params=BACKEND_PARAMS)
def backend_device(request):
    return request.param


def make_input(shape, dtype, layout, device):
    """Random input of ``shape`` in the given layout (``strided``: a non-contiguous view)."""
    n, c, h, w = shape
    if layout == "strided":
        base = torch.randn(n, 2 * c, h, w + 3, device=device).to(dtype)
        x = base[:, ::2, :, 1 : 1 + w]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last) or x.numel() == 0
        return x
    x = torch.randn(shape, device=device).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def random_bn(c, eps=1e-3):
    bn = nn.BatchNorm2d(c, eps=eps).double().eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.5)
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def dwconv_truth(x, weight, bn, stride, pad4, activation="silu"):
    """fp64 ground truth from nn modules: ZeroPad2d -> depthwise nn.Conv2d -> BatchNorm2d -> activation module."""
    c, _, k, _ = weight.shape
    conv = nn.Conv2d(c, c, k, stride=stride, groups=c, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(weight.double())
    z = conv(nn.ZeroPad2d(pad4)(x.double()))
    u = bn.to(z.device)(z)
    y = ACT_MODULES[activation]()(u)
    return y, y.mean(dim=(2, 3))


def dwconv_plain(x, weight, scale, shift, stride, pad4, activation="silu"):
    """Plain PyTorch in x's dtype (the error budget of the parity rule)."""
    z = F.conv2d(F.pad(x, pad4), weight.to(x.dtype), stride=stride, groups=x.shape[1])
    u = z * scale.to(x.dtype)[:, None, None] + shift.to(x.dtype)[:, None, None]
    y = ACT_F[activation](u)
    return y, y.float().mean(dim=(2, 3))


def pad4_of(padding, k):
    from effnet_kernels.ops._checks import normalize_padding

    return normalize_padding(padding, k)


def run_dwconv_case(backend, device, shape, k, stride, padding, dtype, layout, activation, squeeze, weight_std=0.3):
    """One forward check; ``weight_std`` 1.0 spreads the BN output over about [-8, 8] (every
    region of relu6 and hardswish), 0.3 over about [-3, 3]."""
    n, c, h, w = shape
    x = make_input(shape, dtype, layout, device)
    weight = torch.randn(c, 1, k, k, device=device) * weight_std
    bn = random_bn(c)
    scale, shift = (t.detach().to(device, torch.float32) for t in fold_batchnorm(bn))  # folded in fp32
    pad4 = pad4_of(padding, k)
    out = ek.ops.dwconv_bn_act(x, weight, scale, shift, stride=stride, padding=padding,
                               activation=activation, squeeze=squeeze, backend=backend)
    y, mean = out if squeeze else (out, None)
    y_ref, mean_ref = dwconv_truth(x.cpu(), weight.cpu(), bn, stride, pad4, activation)
    y_plain, mean_plain = dwconv_plain(x, weight, scale, shift, stride, pad4, activation)
    assert y.dtype == dtype
    assert y.device == x.device
    expect_cl = layout == "channels_last" and not x.is_contiguous()
    assert y.is_contiguous(memory_format=torch.channels_last if expect_cl else torch.contiguous_format)
    assert_parity(y.cpu(), y_ref, y_plain.cpu(), dtype, what="y")
    if squeeze:
        assert mean.dtype == torch.float32 and tuple(mean.shape) == (n, c)
        assert_parity(mean.cpu(), mean_ref, mean_plain.cpu(), dtype, what="mean")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padding", PADDINGS, ids=str)
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k", [3, 5, 7])
def test_dwconv_grid(backend_device, k, stride, padding, dtype, layout):
    backend, device = backend_device
    run_dwconv_case(backend, device, (3, 13, 9, 8), k, stride, padding, dtype, layout, "silu", squeeze=True)


@pytest.mark.parametrize("squeeze", [False, True])
@pytest.mark.parametrize("activation", ["identity", "silu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,k,stride",
    [((2, 8, 9, 9), 3, 1), ((1, 1, 5, 7), 5, 2), ((3, 13, 6, 5), 7, 1), ((2, 4, 1, 1), 3, 2),
     ((2, 4, 1, 1), 7, 1), ((1, 3, 2, 3), 3, (1, 2))],
    ids=["2x8x9x9", "C1", "C13", "1x1-s2", "1x1-k7", "stride-pair"],
)
def test_dwconv_awkward_shapes(backend_device, shape, k, stride, dtype, activation, squeeze):
    backend, device = backend_device
    for layout in LAYOUTS:
        run_dwconv_case(backend, device, shape, k, stride, None, dtype, layout, activation, squeeze)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dwconv_activations(backend_device, activation, dtype):
    """Each activation over all of its regions (BN output spread over about [-8, 8]), with the
    squeeze; the dtypes take turns at channels_last / NCHW / strided and stride 1 / 2 (TF same)."""
    backend, device = backend_device
    layout, k, stride, padding = {torch.float32: ("channels_last", 3, 1, None),
                                  torch.float16: ("nchw", 5, 2, (1, 2, 1, 2)),
                                  torch.bfloat16: ("strided", 3, 2, (0, 1, 0, 1))}[dtype]
    run_dwconv_case(backend, device, (2, 13, 9, 8), k, stride, padding, dtype, layout, activation, True,
                    weight_std=1.0)


@pytest.mark.parametrize("squeeze", [False, True])
def test_dwconv_empty_batch(backend_device, squeeze):
    backend, device = backend_device
    x = torch.randn(0, 8, 6, 6, device=device)
    w, s, b = torch.randn(8, 1, 3, 3, device=device), torch.rand(8, device=device) + 0.5, torch.randn(8, device=device)
    out = ek.ops.dwconv_bn_act(x, w, s, b, stride=2, squeeze=squeeze, backend=backend)
    y = out[0] if squeeze else out
    assert tuple(y.shape) == (0, 8, 3, 3)
    if squeeze:
        assert tuple(out[1].shape) == (0, 8) and out[1].dtype == torch.float32


def test_dwconv_padding_forms_agree(backend_device):
    """None == k//2 == (k//2, k//2) == 4-tuple of k//2: the normalisation is consistent."""
    backend, device = backend_device
    x = torch.randn(2, 6, 7, 7, device=device)
    w, s, b = torch.randn(6, 1, 5, 5, device=device), torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)
    outs = [ek.ops.dwconv_bn_act(x, w, s, b, padding=p, backend=backend) for p in (None, 2, (2, 2), (2, 2, 2, 2))]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=0, atol=0)
    # a (ph, pw) pair pads height by ph and width by pw
    y = ek.ops.dwconv_bn_act(x, w, s, b, padding=(2, 0), backend=backend)
    assert tuple(y.shape) == (2, 6, 7, 3)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("squeeze", [False, True])
def test_dwconv_backward(backend_device, dtype, squeeze, activation):
    """Gradients w.r.t. x, weight, scale, shift against fp64 autograd through nn modules.

    The BN output spreads over about [-6, 6]: every region of relu6 and hardswish.
    """
    backend, device = backend_device
    n, c, h, w, k, stride, pad4 = 2, 6, 7, 6, 3, 2, (0, 1, 0, 1)
    x = torch.randn(n, c, h, w, device=device).to(dtype)
    weight = (torch.randn(c, 1, k, k, device=device) * 0.6).to(dtype)
    scale = torch.rand(c, device=device) + 0.5
    shift = torch.randn(c, device=device) * 1.5
    ho, wo = 3, 3
    # Incoming gradients exactly representable in dtype: the fused op and plain PyTorch receive
    # them rounded to y's dtype, and that rounding alone (shared, not the kernel's) would
    # dominate the error of masked derivatives (relu, relu6).
    gy = torch.randn(n, c, ho, wo, device=device).to(dtype).float()
    gm = torch.randn(n, c, device=device).to(dtype).float()

    def loss_of(fn, xx, ww, ss, bb):
        y, mean = fn(xx, ww, ss, bb)
        loss = (y.double() * gy.double()).sum()
        if squeeze:
            loss = loss + (mean.double() * gm.double()).sum()
        return loss

    def fused(xx, ww, ss, bb):
        out = ek.ops.dwconv_bn_act(xx, ww, ss, bb, stride=stride, padding=pad4, activation=activation,
                                   squeeze=squeeze, backend=backend)
        return out if squeeze else (out, None)

    def truth(xx, ww, ss, bb):
        u = F.conv2d(F.pad(xx, pad4), ww, stride=stride, groups=c) * ss[:, None, None] + bb[:, None, None]
        y = ACT_MODULES[activation]()(u)
        return y, y.mean(dim=(2, 3))

    def plain(xx, ww, ss, bb):
        u = F.conv2d(F.pad(xx, pad4), ww, stride=stride, groups=c) * ss.to(dtype)[:, None, None] + bb.to(dtype)[:, None, None]
        y = ACT_F[activation](u)
        return y, y.float().mean(dim=(2, 3))

    def grads(fn, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in (x, weight, scale, shift)]
        if cast != torch.float64:
            leaves[2] = scale.detach().clone().requires_grad_()
            leaves[3] = shift.detach().clone().requires_grad_()
        loss_of(fn, *leaves).backward()
        return [leaf.grad for leaf in leaves]

    got = grads(fused, dtype)
    ref = grads(truth, torch.float64)
    base = grads(plain, dtype)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    for name, g, r, p in zip(("x", "weight", "scale", "shift"), got, ref, base):
        assert_parity(g.cpu(), r.cpu(), p.cpu(), dtype, kind="backward", what=f"grad {name}")


def se_truth(pooled, wr, br, we, be, activation="silu", gate="sigmoid"):
    """fp64 SE gate through 1x1 nn.Conv2d and activation modules on [N, C, 1, 1]."""
    r, c = wr.shape[:2]
    reduce, expand = nn.Conv2d(c, r, 1).double(), nn.Conv2d(r, c, 1).double()
    with torch.no_grad():
        reduce.weight.copy_(wr.double().reshape(r, c, 1, 1))
        reduce.bias.copy_(br.double())
        expand.weight.copy_(we.double().reshape(c, r, 1, 1))
        expand.bias.copy_(be.double())
    p = pooled.double()[:, :, None, None]
    return ACT_MODULES[gate]()(expand(ACT_MODULES[activation]()(reduce(p))))[:, :, 0, 0]


def se_plain(pooled, wr, br, we, be, activation="silu", gate="sigmoid"):
    """Plain PyTorch in the inputs' dtype."""
    return ACT_F[gate](F.linear(ACT_F[activation](F.linear(pooled, wr, br)), we, be))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c,r,weights4d", [(2, 16, 4, False), (1, 1, 1, True), (3, 37, 5, True), (0, 8, 2, False),
                                             (2, 1152, 48, True)])
def test_se_gate(backend_device, dtype, n, c, r, weights4d):
    backend, device = backend_device
    pooled = torch.randn(n, c, device=device).to(dtype)
    wr, br = (torch.randn(r, c, device=device) / c**0.5).to(dtype), torch.randn(r, device=device).to(dtype)
    we, be = (torch.randn(c, r, device=device) / r**0.5).to(dtype), torch.randn(c, device=device).to(dtype)
    args = (wr.reshape(r, c, 1, 1), br, we.reshape(c, r, 1, 1), be) if weights4d else (wr, br, we, be)
    gate = ek.ops.se_gate(pooled, *args, backend=backend)
    assert gate.dtype == torch.float32 and tuple(gate.shape) == (n, c)
    truth = se_truth(pooled.cpu(), wr.cpu(), br.cpu(), we.cpu(), be.cpu())
    plain = se_plain(pooled, wr, br, we, be)
    assert_parity(gate.cpu(), truth, plain.cpu(), dtype, what="gate")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation,gate", SE_VARIANTS)
@pytest.mark.parametrize("n,c,r", [(3, 37, 5), (2, 240, 10)])
def test_se_gate_variants(backend_device, activation, gate, dtype, n, c, r):
    """Each (activation, gate); b_expand spread over about [-6, 6] (both clamps of hardsigmoid)."""
    backend, device = backend_device
    pooled = torch.randn(n, c, device=device).to(dtype)
    wr, br = (torch.randn(r, c, device=device) / c**0.5).to(dtype), torch.randn(r, device=device).to(dtype)
    we, be = (torch.randn(c, r, device=device) / r**0.5).to(dtype), (torch.randn(c, device=device) * 3).to(dtype)
    out = ek.ops.se_gate(pooled, wr, br, we, be, activation=activation, gate=gate, backend=backend)
    assert out.dtype == torch.float32 and tuple(out.shape) == (n, c)
    truth = se_truth(pooled.cpu(), wr.cpu(), br.cpu(), we.cpu(), be.cpu(), activation, gate)
    plain = se_plain(pooled, wr, br, we, be, activation, gate)
    assert_parity(out.cpu(), truth, plain.cpu(), dtype, what="gate")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gate_dtype", ["fp32", "same"])
def test_se_excite(backend_device, dtype, layout, gate_dtype):
    backend, device = backend_device
    y = make_input((3, 11, 5, 4), dtype, layout, device)
    gate = torch.rand(3, 11, device=device)
    if gate_dtype == "same":
        gate = gate.to(dtype)
    out = ek.ops.se_excite(y, gate, backend=backend)
    assert out.dtype == dtype
    expect_cl = layout == "channels_last"
    assert out.is_contiguous(memory_format=torch.channels_last if expect_cl else torch.contiguous_format)
    truth = y.cpu().double() * gate.cpu().double()[:, :, None, None]
    plain = y * gate.to(dtype)[:, :, None, None]
    assert_parity(out.cpu(), truth, plain.cpu(), dtype, what="excite")


@pytest.mark.parametrize("activation,gate", SE_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_se_backward(backend_device, dtype, activation, gate):
    """Gradients of se_excite(y, se_gate(...)) against fp64 autograd."""
    backend, device = backend_device
    n, c, r = 2, 12, 3
    y = torch.randn(n, c, 4, 5, device=device).to(dtype)
    pooled = torch.randn(n, c, device=device).to(dtype)
    params = [(torch.randn(r, c, device=device) / 2).to(dtype), torch.randn(r, device=device).to(dtype),
              (torch.randn(c, r, device=device) / 2).to(dtype), (torch.randn(c, device=device) * 2).to(dtype)]
    g_out = torch.randn(n, c, 4, 5, device=device).to(dtype).float()  # representable: see test_dwconv_backward

    def run(fn, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in (y, pooled, *params)]
        out = fn(*leaves)
        (out.double() * g_out.double()).sum().backward()
        return [leaf.grad for leaf in leaves]

    def fused(yy, pp, wr, br, we, be):
        g = ek.ops.se_gate(pp, wr, br, we, be, activation=activation, gate=gate, backend=backend)
        return ek.ops.se_excite(yy, g, backend=backend)

    def eager(yy, pp, wr, br, we, be):
        return yy * se_plain(pp, wr, br, we, be, activation, gate)[:, :, None, None]

    got, ref, base = run(fused, dtype), run(eager, torch.float64), run(eager, dtype)
    for i, (g, rr, p) in enumerate(zip(got, ref, base)):
        assert g.dtype == dtype
        assert_parity(g.cpu(), rr.cpu(), p.cpu(), dtype, kind="backward", what=f"grad #{i}")


# Negative controls: each op check above must reject a backend with a planted defect
# (tests/defects.py), in every dtype; on a GPU the same controls run for triton and cuda.

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("defect", ["pad_shift", "skip_silu", "squeeze_skew"])
def test_negative_control_dwconv_check_rejects_defect(backend_device, defect, dtype):
    backend, device = backend_device
    case = (backend, device, (3, 13, 9, 8), 3, 2, (0, 1, 0, 1), dtype, "channels_last", "silu", True)
    run_dwconv_case(*case)  # clean: passes
    with planted(defect, backend), pytest.raises(AssertionError):
        run_dwconv_case(*case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", NEW_ACTIVATIONS)
def test_negative_control_activation_check_rejects_skipped_activation(backend_device, activation, dtype):
    """The activation check fails when the kernel skips the activation it was asked for."""
    backend, _ = backend_device
    with planted("skip_silu", backend), pytest.raises(AssertionError, match="y: "):
        test_dwconv_activations(backend_device, activation, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_negative_control_dwconv_backward_check_rejects_defect(backend_device, dtype):
    backend, _ = backend_device
    with planted("grad_drop_squeeze", backend), pytest.raises(AssertionError, match="grad"):
        test_dwconv_backward(backend_device, dtype, squeeze=True, activation="silu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["silu"] + NEW_ACTIVATIONS)
def test_negative_control_dwconv_backward_check_rejects_skipped_derivative(backend_device, activation, dtype):
    backend, _ = backend_device
    with planted("grad_skip_act", backend), pytest.raises(AssertionError, match="grad"):
        test_dwconv_backward(backend_device, dtype, squeeze=False, activation=activation)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_negative_control_se_checks_reject_defects(backend_device, dtype):
    backend, _ = backend_device
    with planted("gate_skew", backend), pytest.raises(AssertionError, match="gate"):
        test_se_gate(backend_device, dtype, 2, 16, 4, False)
    with planted("excite_skip", backend), pytest.raises(AssertionError, match="excite"):
        test_se_excite(backend_device, dtype, "channels_last", "fp32")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation,gate", SE_VARIANTS)
def test_negative_control_se_gate_check_rejects_ignored_functions(backend_device, activation, gate, dtype):
    """A backend that computes other functions than the (activation, gate) asked for fails the check."""
    backend, _ = backend_device
    with planted("se_act_swap", backend), pytest.raises(AssertionError, match="gate"):
        test_se_gate_variants(backend_device, activation, gate, dtype, 3, 37, 5)


# ---------------------------------------------------------------- float64 (the torch reference)
FP64_BACKENDS = [pytest.param("torch", id="torch"), pytest.param("auto", id="auto")]


@pytest.mark.parametrize("backend", FP64_BACKENDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("folded", [torch.float64, torch.float32], ids=["scale-fp64", "scale-fp32"])
def test_float64_dwconv(backend, activation, folded):
    """float64 in, float64 out (mean too), equal to the fp64 nn-module truth to ~1e-12; gradcheck."""
    x = make_input((2, 5, 7, 6), torch.float64, "channels_last", "cpu")
    weight = torch.randn(5, 1, 3, 3, dtype=torch.float64)
    scale, shift = (torch.rand(5, dtype=torch.float64) + 0.5).to(folded), torch.randn(5, dtype=folded)
    y, mean = ek.ops.dwconv_bn_act(x, weight, scale, shift, stride=2, padding=(0, 1, 0, 1), activation=activation,
                                   squeeze=True, backend=backend)
    assert y.dtype == torch.float64 and mean.dtype == torch.float64 and y.is_contiguous(memory_format=torch.channels_last)
    y_ref, mean_ref = dwconv_truth(x, weight, _bn_of(scale, shift), 2, (0, 1, 0, 1), activation)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, mean_ref, rtol=1e-12, atol=1e-12)
    if folded == torch.float64 and backend == "torch":  # backward in float64 (small: gradcheck is slow)
        leaves = [t[:1, :3, :5, :4].detach().clone().requires_grad_() for t in (x,)]
        leaves += [t[:3].detach().clone().requires_grad_() for t in (weight, scale, shift)]
        assert torch.autograd.gradcheck(
            lambda *a: ek.ops.dwconv_bn_act(*a, stride=2, padding=(0, 1, 0, 1), activation=activation, squeeze=True,
                                            backend=backend), leaves, fast_mode=True)


def _bn_of(scale, shift):
    """A float64 eval BatchNorm2d computing exactly ``z * scale + shift``."""
    bn = nn.BatchNorm2d(scale.shape[0], eps=0.0).double().eval()
    with torch.no_grad():
        bn.running_var.fill_(1.0)
        bn.running_mean.zero_()
        bn.weight.copy_(scale.double())
        bn.bias.copy_(shift.double())
    return bn


@pytest.mark.parametrize("backend", FP64_BACKENDS)
@pytest.mark.parametrize("activation,gate", SE_VARIANTS)
def test_float64_se(backend, activation, gate):
    """se_gate and se_excite in float64: the fp64 truth to ~1e-12, float64 outputs, gradcheck."""
    n, c, r = 3, 10, 4
    pooled = torch.randn(n, c, dtype=torch.float64)
    params = [torch.randn(r, c, dtype=torch.float64) / 2, torch.randn(r, dtype=torch.float64),
              torch.randn(c, r, dtype=torch.float64) / 2, torch.randn(c, dtype=torch.float64) * 2]
    g = ek.ops.se_gate(pooled, *params, activation=activation, gate=gate, backend=backend)
    assert g.dtype == torch.float64
    torch.testing.assert_close(g, se_truth(pooled, *params, activation, gate), rtol=1e-12, atol=1e-12)
    y = make_input((n, c, 3, 4), torch.float64, "nchw", "cpu")
    out = ek.ops.se_excite(y, g, backend=backend)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, y * g[:, :, None, None], rtol=0, atol=0)
    leaves = [t.detach().clone().requires_grad_() for t in (y, pooled, *params)]
    assert torch.autograd.gradcheck(
        lambda yy, pp, *w: ek.ops.se_excite(yy, ek.ops.se_gate(pp, *w, activation=activation, gate=gate,
                                                                backend=backend), backend=backend), leaves,
        fast_mode=True)
