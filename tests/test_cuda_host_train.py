"""The CUDA training kernels (issue #11) run on the CPU through the host shim (no GPU needed).

The same machinery as tests/test_cuda_host.py (``effnet_kernels.cuda_host``: the real csrc/
sources compiled with g++ against the SIMT shim, threads shuffled between barriers, outputs
and scratch buffers poisoned with NaN and fenced by canaries) standing in for the ``cuda``
backend, checked by DESIGN's parity rule against fp64 (fp32: relative 1e-5 forward / 1e-4
backward; fp16/bf16: 2x / 3x plain PyTorch's error in that dtype):

* ``dwconv_bn_act_train`` (batch statistics by the stats + combine kernels, then the eval
  forward kernel as the apply pass; given statistics for a recompute), every dtype x layout x
  k 3/5/7 x stride 1/2 x padding form, every activation, with and without the squeeze;
* ``dwconv_bn_act_train_backward`` (through the batch statistics), the same grid, gradients
  through y, through the squeeze, and both;
* ``se_excite_backward`` and ``se_gate_backward`` (each inner activation and gate);
* awkward shapes (C = 1, odd sizes, batch 1, H = W = 1, several channel groups and chunks),
  non-contiguous inputs, bitwise determinism across thread schedules, and negative controls
  (planted defects, a missing barrier) that the checks must reject.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import effnet_kernels as ek
from effnet_kernels import cuda_host, reference

from .defects import planted
from .parity import assert_parity
from .test_ops_parity import ACT_F, ACTIVATIONS, SE_VARIANTS, make_input

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last"]
FORWARD, REVERSE, SHUFFLED = 0, 1, 2
NO_SYNC = 1  # ekshim::Defect
EPS = 1e-3
# (stride, 4-sided padding (left, right, top, bottom)) for a kernel size k
GEOMETRIES = {
    "s1_same": lambda k: (1, (k // 2,) * 4),
    "s2_tf_same": lambda k: (2, (k // 2 - 1, k // 2, k // 2 - 1, k // 2)),
    "s1_four_sided": lambda k: (1, (2, 1, 3, 0)),
    "s21_none": lambda k: ((2, 1), (0, 0, 0, 0)),
}


@pytest.fixture(scope="module")
def host():
    """The host build standing in for the cuda backend (threads shuffled between barriers)."""
    with cuda_host.as_cuda_backend() as mods:
        mods.shim.set_schedule(SHUFFLED, 4242)
        mods.shim.set_defect(0)
        yield mods
        mods.shim.set_defect(0)


class launched:
    """Asserts that the block launched at least ``at_least`` kernels on the host shim: the op was
    served by the kernels, not by the reference that ``auto`` falls back to for a backward."""

    def __init__(self, at_least=1, device="cpu"):
        self.at_least = at_least
        self.on_shim = device == "cpu"  # on a GPU (tests/test_cuda_train_gpu.py) the real module runs

    def __enter__(self):
        self.before = cuda_host.load().shim.counters()[0] if self.on_shim else 0

    def __exit__(self, *exc):
        if exc[0] is None and self.on_shim:
            ran = cuda_host.load().shim.counters()[0] - self.before
            assert ran >= self.at_least, f"{ran} kernel launches, expected at least {self.at_least}"


def _pair(stride):
    return (stride, stride) if isinstance(stride, int) else tuple(stride)


def _params(c, k, weight_std=0.5, device="cpu"):
    weight = torch.randn(c, 1, k, k) * weight_std
    gamma = torch.rand(c) + 0.5
    beta = torch.randn(c) * 0.5
    return weight.to(device), gamma.to(device), beta.to(device)


def _cpu64(*ts):
    return [None if t is None else t.detach().cpu().double() for t in ts]


def _plain_forward(x, weight, gamma, beta, stride, pad4, activation):
    """Plain PyTorch in x's dtype: conv, batch statistics, BatchNorm and activation in that dtype."""
    dt = x.dtype
    z = F.conv2d(F.pad(x, pad4), weight.to(dt), stride=stride, groups=x.shape[1])
    mean = z.mean(dim=(0, 2, 3))
    var = ((z - mean[None, :, None, None]) ** 2).mean(dim=(0, 2, 3))
    u = (z - mean[None, :, None, None]) * torch.rsqrt(var + EPS)[None, :, None, None] * gamma.to(dt)[None, :, None, None]
    y = ACT_F[activation](u + beta.to(dt)[None, :, None, None])
    return y, y.float().mean(dim=(2, 3)), mean.float(), var.float()


def forward_case(shape, k, stride, pad4, dtype, layout, activation="silu", squeeze=True, weight_std=0.5, x=None,
                 device="cpu", offset=0.0):
    """One train forward against the fp64 reference; returns the outputs (y, pooled, mean, var).
    ``offset`` shifts x (a conv output whose batch mean is far from 0)."""
    stride = _pair(stride)
    x = make_input(shape, dtype, layout, device) if x is None else x
    if offset:
        x = (x.float() + offset).to(dtype)
    weight, gamma, beta = _params(shape[1], k, weight_std, device)
    with launched(3 if squeeze else 2, device):  # stats, combine, apply (+ the squeeze's reduction when deterministic)
        out = ek.ops.dwconv_bn_act_train(x, weight, gamma, beta, eps=EPS, stride=stride, padding=pad4,
                                         activation=activation, squeeze=squeeze, backend="cuda")
    y, pooled, mean, var = out if squeeze else (out[0], None, out[1], out[2])
    truth = reference.dwconv_bn_act_train(*_cpu64(x, weight, gamma, beta), None, None, EPS, stride, pad4, activation,
                                          True)
    plain = [t.cpu() for t in _plain_forward(x, weight, gamma, beta, stride, pad4, activation)]
    assert y.dtype == dtype and mean.dtype == torch.float32 and var.dtype == torch.float32
    fmt = torch.channels_last if layout == "channels_last" and not x.is_contiguous() else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    for name, got, want, base in (("mean", mean, truth[2], plain[2]), ("var", var, truth[3], plain[3]),
                                  ("y", y, truth[0], plain[0])):
        assert_parity(got.cpu(), want, base, dtype, what=name)
    if squeeze:
        assert pooled.dtype == torch.float32
        assert_parity(pooled.cpu(), truth[1], plain[1], dtype, what="pooled")
    return y, pooled, mean, var, (x, weight, gamma, beta)


def _plain_grads(gy, gp, x, weight, gamma, beta, stride, pad4, activation, dtype):
    """Plain PyTorch autograd in ``dtype`` through the batch statistics (the error budget)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, weight, gamma, beta)]
    xx, ww, gg, bb = leaves
    y, pooled, _, _ = _plain_forward(xx, ww, gg, bb, stride, pad4, activation)
    loss = torch.zeros((), dtype=torch.float64)
    if gy is not None:
        loss = loss + (y * gy.to(dtype)).double().sum()
    if gp is not None:
        loss = loss + (pooled * gp).double().sum()
    loss.backward()
    return [leaf.grad.cpu() for leaf in leaves]


def backward_case(shape, k, stride, pad4, dtype, layout, activation="silu", with_y=True, with_pooled=True,
                  weight_std=0.5, x=None, device="cpu"):
    """One train backward (the op, given the forward's statistics) against the fp64 reference."""
    stride = _pair(stride)
    x = make_input(shape, dtype, layout, device) if x is None else x
    n, c = shape[:2]
    weight, gamma, beta = _params(c, k, weight_std, device)
    _, _, mean, var = reference.dwconv_bn_act_train(x, weight, gamma, beta, None, None, EPS, stride, pad4, activation,
                                                    False)
    ho = (shape[2] + pad4[2] + pad4[3] - k) // stride[0] + 1
    wo = (shape[3] + pad4[0] + pad4[1] - k) // stride[1] + 1
    # incoming gradients exactly representable in dtype (both sides receive the same values)
    gy = torch.randn(n, c, ho, wo).to(device, dtype) if with_y else None
    gp = torch.randn(n, c).to(dtype).to(device, torch.float32) if with_pooled else None
    with launched(6, device):  # reduce, 2 combines, gz, input_grads (grad_x and grad_w's partials), combine
        got = torch.ops.effnet.dwconv_bn_act_train_backward.default(gy, gp, x, weight, gamma, beta, mean, var, EPS,
                                                                    list(stride), list(pad4), activation, "cuda")
    want = reference.dwconv_bn_act_train_backward(*_cpu64(gy, gp, x, weight, gamma, beta, mean, var), EPS, stride,
                                                  pad4, activation)
    base = _plain_grads(gy, gp, x, weight, gamma, beta, stride, pad4, activation, dtype)
    assert got[0].dtype == dtype and got[1].dtype == weight.dtype and got[2].dtype == torch.float32
    fmt = torch.channels_last if layout == "channels_last" and not x.is_contiguous() else torch.contiguous_format
    assert got[0].is_contiguous(memory_format=fmt)
    for name, g, w, b in zip(("x", "weight", "gamma", "beta"), got, want, base):
        assert_parity(g.cpu(), w, b, dtype, kind="backward", what=f"grad {name}")
    return got


# ------------------------------------------------------------------ dwconv_bn_act_train
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_train_forward_k_stride_padding(host, geometry, dtype, layout):
    for k in (3, 5, 7):
        stride, pad4 = GEOMETRIES[geometry](k)
        forward_case((2, 12, 9, 11), k, stride, pad4, dtype, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_train_forward_activations(host, activation, dtype, layout):
    """Each activation; gamma up to 1.5 on a unit-variance xhat covers every region of relu6 / hardswish."""
    forward_case((2, 16, 7, 9), 3, 1, (1, 1, 1, 1), dtype, layout, activation, squeeze=True)
    forward_case((1, 9, 6, 5), 5, 2, (1, 2, 2, 1), dtype, layout, activation, squeeze=False)


# (n, c, h, w), k, stride, padding: the edges a kernel gets wrong first
AWKWARD = [
    ((1, 1, 5, 4), 3, 1, (1, 1, 1, 1)),        # C = 1, batch 1
    ((2, 13, 1, 1), 3, 1, (1, 1, 1, 1)),       # H = W = 1 (M = 2)
    ((3, 5, 6, 1), 5, 2, (2, 2, 2, 2)),        # W = 1, odd sizes, stride 2
    ((1, 40, 7, 9), 7, 2, (3, 3, 3, 3)),       # NHWC: two channel groups of 32
    ((2, 3, 50, 47), 3, 1, (1, 1, 1, 1)),      # NCHW: two chunks of positions (M = 4700)
    ((2, 5, 13, 11), 5, 1, (2, 2, 2, 2)),      # NHWC: several chunks
    ((1, 4, 2, 3), 3, 1, (3, 0, 0, 4)),        # outputs entirely inside the padding
    ((2, 5, 0, 3), 3, 1, (1, 1, 2, 1)),        # H = 0: x has no elements, every output reads padding alone
    ((2, 40, 30, 30), 3, 2, (1, 1, 1, 1)),     # stride 2: 15 input chunks (the input gradients' pass) to 4 output ones
]
AWKWARD_IDS = ["x".join(map(str, c[0])) + f"-k{c[1]}s{c[2]}" for c in AWKWARD]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,k,stride,pad4", AWKWARD, ids=AWKWARD_IDS)
def test_train_forward_awkward_shapes(host, shape, k, stride, pad4, dtype, layout):
    forward_case(shape, k, stride, pad4, dtype, layout)


def test_train_forward_given_statistics_and_strided_input(host):
    """Given mean / var: no statistics pass, they come back as given and y is the same; a
    non-contiguous x view."""
    y, pooled, mean, var, (x, w, g, b) = forward_case((2, 8, 9, 7), 3, 1, (1, 1, 1, 1), torch.float32, "nchw")
    y2, pooled2, mean2, var2 = ek.ops.dwconv_bn_act_train(x, w, g, b, eps=EPS, mean=mean, var=var, padding=1,
                                                          squeeze=True, backend="cuda")
    assert mean2 is mean and var2 is var
    assert torch.equal(y2, y) and torch.equal(pooled2, pooled)
    forward_case((2, 8, 9, 7), 3, 2, (0, 1, 0, 1), torch.float16, "strided",
                 x=make_input((2, 8, 9, 7), torch.float16, "strided", "cpu"))
    # a batch mean far from 0 (x around 3): the apply pass folds scale into the weights and
    # shift = beta - mean * scale, which must not lose the rule's accuracy
    for dtype in DTYPES:
        forward_case((2, 8, 9, 7), 5, 1, (2, 2, 2, 2), dtype, "channels_last", offset=3.0)


def test_train_forward_empty_batch(host):
    y, mean, var = ek.ops.dwconv_bn_act_train(torch.randn(0, 4, 5, 5), torch.randn(4, 1, 3, 3), torch.ones(4),
                                              torch.zeros(4), backend="cuda")
    assert y.shape == (0, 4, 5, 5) and torch.equal(mean, torch.zeros(4)) and torch.equal(var, torch.zeros(4))


# ------------------------------------------------------------------ dwconv_bn_act_train_backward
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_train_backward_k_stride_padding(host, geometry, dtype, layout):
    for k in (3, 5, 7):
        stride, pad4 = GEOMETRIES[geometry](k)
        backward_case((2, 12, 9, 11), k, stride, pad4, dtype, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_train_backward_activations(host, activation, dtype, layout):
    backward_case((2, 16, 7, 9), 3, 1, (1, 1, 1, 1), dtype, layout, activation)
    backward_case((1, 9, 6, 5), 5, 2, (1, 2, 2, 1), dtype, layout, activation, with_pooled=False)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_y,with_pooled", [(True, False), (False, True)], ids=["grad_y", "grad_pooled"])
def test_train_backward_one_incoming_gradient(host, with_y, with_pooled, layout):
    backward_case((2, 10, 8, 7), 3, 2, (0, 1, 0, 1), torch.float32, layout, "hardswish", with_y, with_pooled)
    backward_case((2, 10, 8, 7), 5, 1, (2, 2, 2, 2), torch.bfloat16, layout, "silu", with_y, with_pooled)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,k,stride,pad4", AWKWARD, ids=AWKWARD_IDS)
def test_train_backward_awkward_shapes(host, shape, k, stride, pad4, dtype, layout):
    backward_case(shape, k, stride, pad4, dtype, layout)


def test_train_backward_strided_input_and_grad(host):
    """x a non-contiguous view and grad_y a channels_last tensor for an NCHW x: read in place by strides."""
    x = make_input((2, 6, 8, 9), torch.float32, "strided", "cpu")
    backward_case((2, 6, 8, 9), 3, 1, (1, 1, 1, 1), torch.float32, "strided", x=x)
    x = make_input((2, 6, 8, 9), torch.float16, "nchw", "cpu")
    w, g, b = _params(6, 3)
    _, _, mean, var = reference.dwconv_bn_act_train(x, w, g, b, None, None, EPS, (1, 1), (1, 1, 1, 1), "silu", False)
    gy = torch.randn(2, 6, 8, 9).half()
    args = (x, w, g, b, mean, var, EPS, [1, 1], [1, 1, 1, 1], "silu", "cuda")
    op = torch.ops.effnet.dwconv_bn_act_train_backward.default
    a = op(gy, None, *args)
    c = op(gy.contiguous(memory_format=torch.channels_last), None, *args)
    assert all(torch.equal(p, q) for p, q in zip(a, c))
    # an expanded grad_y (all strides 0, as y.sum().backward() hands it) reads the same as its dense copy
    ones = torch.ones((), dtype=torch.float16).expand(2, 6, 8, 9)
    assert ones.stride() == (0, 0, 0, 0)
    assert all(torch.equal(p, q) for p, q in zip(op(ones, None, *args), op(ones.contiguous(), None, *args)))


def test_train_backward_empty_batch(host):
    x = torch.randn(0, 4, 5, 5)
    got = torch.ops.effnet.dwconv_bn_act_train_backward.default(
        torch.randn(0, 4, 5, 5), None, x, torch.randn(4, 1, 3, 3), torch.ones(4), torch.zeros(4), torch.zeros(4),
        torch.ones(4), EPS, [1, 1], [1, 1, 1, 1], "silu", "cuda")
    assert got[0].shape == x.shape and not got[1].any() and not got[2].any() and not got[3].any()


# ------------------------------------------------------------------ determinism
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_train_ops_are_bitwise_reproducible(host, dtype, layout):
    """Fixed-order reductions: the same bits whatever order the threads run in (forward,
    reverse, two shuffles), several chunks and channel groups included."""
    shape, k = (2, 40, 13, 11), 5
    x = make_input(shape, dtype, layout, "cpu")
    w, g, b = _params(40, k)
    gy = torch.randn(2, 40, 13, 11).to(dtype)
    gp = torch.randn(2, 40)
    results = []
    try:
        for mode, seed in ((FORWARD, 0), (REVERSE, 0), (SHUFFLED, 1), (SHUFFLED, 2)):
            host.shim.set_schedule(mode, seed)
            y, pooled, mean, var = ek.ops.dwconv_bn_act_train(x, w, g, b, eps=EPS, padding=2, squeeze=True,
                                                              backend="cuda")
            grads = torch.ops.effnet.dwconv_bn_act_train_backward.default(
                gy, gp, x, w, g, b, mean, var, EPS, [1, 1], [2, 2, 2, 2], "silu", "cuda")
            results.append((y, pooled, mean, var, *grads))
    finally:
        host.shim.set_schedule(SHUFFLED, 4242)
    for other in results[1:]:
        assert all(torch.equal(p, q) for p, q in zip(results[0], other))


# ------------------------------------------------------------------ se_excite_backward, se_gate_backward
@pytest.mark.parametrize("layout", LAYOUTS + ["strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 16, 7, 7), (3, 13, 4, 5), (1, 1, 2, 1), (2, 40, 1, 3), (1, 3, 17, 16)], ids=str)
def test_se_excite_backward(host, shape, dtype, layout):
    y = make_input(shape, dtype, layout, "cpu")
    gate = torch.rand(shape[:2])
    grad_out = torch.randn(shape).to(dtype)
    with launched(1):
        grad_y, grad_gate = torch.ops.effnet.se_excite_backward.default(grad_out, y, gate, "cuda")
    want_y, want_gate = reference.se_excite_backward(grad_out.double(), y.double(), gate.double())
    plain_y = grad_out * gate.to(dtype)[:, :, None, None]
    plain_gate = (grad_out * y).sum(dim=(2, 3)).float()
    assert grad_y.dtype == dtype and grad_gate.dtype == torch.float32
    if layout == "channels_last":
        assert grad_y.is_contiguous(memory_format=torch.channels_last)
    assert_parity(grad_y, want_y, plain_y, dtype, kind="backward", what="grad y")
    assert_parity(grad_gate, want_gate, plain_gate, dtype, kind="backward", what="grad gate")


def se_gate_backward_case(n, c, r, dtype, activation, gate):
    pooled = torch.randn(n, c).to(dtype)
    wr, br = (torch.randn(r, c) / c**0.5).to(dtype), torch.randn(r).to(dtype)
    we, be = (torch.randn(c, r) / r**0.5).to(dtype), (torch.randn(c) * 2).to(dtype)
    gg = torch.randn(n, c)
    args = (pooled, wr, br, we, be)
    with launched(5):
        got = torch.ops.effnet.se_gate_backward.default(gg, *args, activation, gate, "cuda")
    want = reference.se_gate_backward(gg.double(), *(t.double() for t in args), activation, gate)
    leaves = [t.detach().clone().requires_grad_() for t in args]
    h = ACT_F[activation](leaves[0] @ leaves[1].t() + leaves[2])
    out = ACT_F[gate](h @ leaves[3].t() + leaves[4])
    (out.double() * gg.double()).sum().backward()
    for name, g, w, leaf, t in zip(("pooled", "w_reduce", "b_reduce", "w_expand", "b_expand"), got, want, leaves, args):
        assert g.dtype == t.dtype and g.shape == t.shape
        assert_parity(g, w, leaf.grad, dtype, kind="backward", what=f"grad {name}")
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation,gate", SE_VARIANTS)
def test_se_gate_backward(host, activation, gate, dtype):
    """N = 3 / 1 / 9, C = 1 / 37 / 300 (two thread strides), R = 1 / 5 / 40 (several warps' rows)."""
    for n, c, r in ((3, 37, 5), (1, 1, 1), (9, 300, 40)):
        se_gate_backward_case(n, c, r, dtype, activation, gate)


def test_se_backward_ops_are_bitwise_reproducible(host):
    y = make_input((2, 24, 5, 6), torch.float32, "channels_last", "cpu")
    gate, grad_out = torch.rand(2, 24), torch.randn(2, 24, 5, 6)
    gg, pooled = torch.randn(4, 24), torch.randn(4, 24)
    weights = (torch.randn(6, 24) / 5, torch.randn(6), torch.randn(24, 6) / 2, torch.randn(24))
    runs = []
    try:
        for mode in (FORWARD, REVERSE, SHUFFLED):
            host.shim.set_schedule(mode, 9)
            runs.append((*torch.ops.effnet.se_excite_backward.default(grad_out, y, gate, "cuda"),
                         *torch.ops.effnet.se_gate_backward.default(gg, pooled, *weights, "silu", "sigmoid", "cuda")))
    finally:
        host.shim.set_schedule(SHUFFLED, 4242)
    for other in runs[1:]:
        assert all(torch.equal(p, q) for p, q in zip(runs[0], other))


# ------------------------------------------------------------------ negative controls
@pytest.mark.parametrize("defect", ["pad_shift", "skip_silu", "squeeze_skew"])
def test_negative_control_train_forward_check_rejects_defect(host, defect):
    args = ((2, 13, 9, 8), 3, 2, (0, 1, 0, 1), torch.float16, "channels_last")
    forward_case(*args)
    with planted(defect, "cuda"), pytest.raises(AssertionError):
        forward_case(*args)


@pytest.mark.parametrize("case", ["train", "eval"])
@pytest.mark.parametrize("defect", ["grad_drop_squeeze", "grad_skip_act"])
def test_negative_control_backward_check_rejects_defect(host, defect, case):
    """The train-mode backward's check and the eval-mode one (eval_backward_case) reject a planted defect."""
    check = {"train": backward_case, "eval": eval_backward_case}[case]
    args = ((2, 13, 9, 8), 3, 1, (1, 1, 1, 1), torch.float32, "nchw")
    check(*args)
    with planted(defect, "cuda"), pytest.raises(AssertionError):
        check(*args)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_negative_control_missing_barrier_breaks_the_reductions(host, layout):
    """__syncthreads made a no-op: the block reductions read shared memory before it is written
    (the shim fills it with NaN) and the statistics and gradients come out wrong."""
    args = ((2, 16, 9, 8), 3, 1, (1, 1, 1, 1), torch.float32, layout)
    forward_case(*args)
    backward_case(*args)
    host.shim.set_defect(NO_SYNC)
    try:
        with pytest.raises(AssertionError):
            forward_case(*args)
        with pytest.raises(AssertionError):
            backward_case(*args)
        with pytest.raises(AssertionError):
            se_gate_backward_case(3, 37, 5, torch.float32, "silu", "sigmoid")
    finally:
        host.shim.set_defect(0)


def test_negative_control_unwritten_outputs_are_caught(host):
    """The poisoned outputs and scratch are real: with one channel group served of the two a
    C = 40 NHWC launch needs (ekshim::set_grid_cap), channels 32..39 of the partials stay NaN
    and the statistics and gradients fail the checks."""
    args = ((1, 40, 7, 9), 3, 1, (1, 1, 1, 1), torch.float32, "channels_last")
    try:
        host.shim.set_grid_cap(1, 0, 0)
        with pytest.raises(AssertionError):
            forward_case(*args)
        with pytest.raises(AssertionError):
            backward_case(*args)
    finally:
        host.shim.set_grid_cap(0, 0, 0)
    forward_case(*args)
    backward_case(*args)


# ------------------------------------------------------------------ dwconv_bn_act_backward (eval mode)
def eval_backward_case(shape, k, stride, pad4, dtype, layout, activation="silu", with_y=True, with_pooled=True,
                       device="cpu"):
    """One eval-mode backward (folded scale and shift, no statistics: what a block with frozen BatchNorm trains
    with) against the fp64 reference, plain PyTorch autograd in ``dtype`` the budget."""
    stride = _pair(stride)
    x = make_input(shape, dtype, layout, device)
    n, c = shape[:2]
    weight, scale, shift = _params(c, k, 0.5, device)
    ho = (shape[2] + pad4[2] + pad4[3] - k) // stride[0] + 1
    wo = (shape[3] + pad4[0] + pad4[1] - k) // stride[1] + 1
    gy = torch.randn(n, c, ho, wo).to(device, dtype) if with_y else None
    gp = torch.randn(n, c).to(dtype).to(device, torch.float32) if with_pooled else None
    with launched(5, device):  # the sums' reduce and combines, gz, input_grads, combine
        got = torch.ops.effnet.dwconv_bn_act_backward.default(gy, gp, x, weight, scale, shift, list(stride),
                                                              list(pad4), activation, "cuda")
    want = reference.dwconv_bn_act_backward(*_cpu64(gy, gp, x, weight, scale, shift), stride, pad4, activation)
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, weight, scale, shift)]
    xx, ww, sc, sh = leaves
    z = F.conv2d(F.pad(xx, pad4), ww, stride=stride, groups=c)
    y = ACT_F[activation](z * sc[None, :, None, None] + sh[None, :, None, None])
    loss = torch.zeros((), dtype=torch.float64)
    if gy is not None:
        loss = loss + (y * gy.to(dtype)).double().sum()
    if gp is not None:
        loss = loss + (y.float().mean(dim=(2, 3)) * gp).double().sum()
    loss.backward()
    assert got[0].dtype == dtype and got[1].dtype == weight.dtype and got[2].dtype == scale.dtype
    for name, g, w, leaf in zip(("x", "weight", "scale", "shift"), got, want, leaves):
        assert_parity(g.cpu(), w, leaf.grad.cpu(), dtype, kind="backward", what=f"grad {name}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", ["s1_same", "s2_tf_same", "s21_none"])
def test_eval_backward_k_stride_padding(host, geometry, dtype, layout):
    stride, pad4 = GEOMETRIES[geometry](5)
    eval_backward_case((2, 12, 9, 8), 5, stride, pad4, dtype, layout)


@pytest.mark.parametrize("with_y,with_pooled", [(True, False), (False, True)])
@pytest.mark.parametrize("activation", ["relu6", "hardswish", "identity"])
def test_eval_backward_activations_and_one_incoming_gradient(host, activation, with_y, with_pooled):
    eval_backward_case((2, 10, 7, 7), 3, 1, (1, 1, 1, 1), torch.float32, "channels_last", activation, with_y,
                       with_pooled)


@pytest.mark.parametrize("shape,k,stride,pad4", AWKWARD, ids=AWKWARD_IDS)
def test_eval_backward_awkward_shapes(host, shape, k, stride, pad4):
    eval_backward_case(shape, k, stride, pad4, torch.float16, "channels_last")


# ------------------------------------------------------------------ pointwise_conv_backward (cuDNN + the excite kernels)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pool", [False, True])
def test_pointwise_backward_on_the_excite_kernels(host, dtype, pool):
    """The cuda backend's 1x1-conv backward: aten's convolution backward, the gate through this backend's
    excite and excite-backward kernels (both launched), every gradient by the rule."""
    from effnet_kernels import cuda

    from .test_ops_pointwise import check_backward

    with launched(2):
        check_backward(cuda.pointwise_conv_backward, "cpu", dtype, pool=pool)


# ------------------------------------------------------------------ a converted block trains on the kernels
@pytest.mark.parametrize("name", ["expand_se_residual_drop", "k5_s2_se", "no_se_k7"])
def test_converted_block_trains_on_the_cuda_kernels(host, name):
    """A converted MBConv block in training (RecomputedMBConv: train forward, recompute with the
    given statistics, the backward ops) pinned to the cuda backend, served by the kernels through
    the host shim, judged per tensor over two SGD steps by testing.train_step_parity (fp32
    relative rule). Every training op the block needs must have run on the kernels."""
    from .test_train_fused import BLOCKS, _pair as block_pair, assert_train_parity

    eager, fused, x = block_pair(BLOCKS[name], batch=2, size=8)
    fused.backend = "cuda"
    with served_by_cuda() as served:
        assert_train_parity(eager, fused, x, steps=2)
    want = {"dwconv_bn_act_train", "dwconv_bn_act_train_backward"}
    if BLOCKS[name].get("se_ratio", 0.25) is not None:  # the projection takes the gate on load (the excite kernels)
        want |= {"se_gate", "se_gate_backward", "pointwise_conv", "pointwise_conv_backward"}
    assert want <= served, f"not served by the kernels: {want - served}"


@pytest.mark.parametrize("name", ["expand_se_residual_drop", "no_expand_se"])
def test_frozen_block_trains_on_the_cuda_kernels(host, name):
    """A converted block training with frozen BatchNorm (RecomputedFrozenMBConv: the eval ops, two of them
    recomputed in backward, their backward ops) pinned to the cuda backend, through the host shim: one step
    by DESIGN's rule against fp64, then two SGD steps; the depthwise and SE ops ran on the kernels."""
    from .test_train_frozen_bn import FROZEN_BLOCKS, assert_frozen_step, assert_train_parity, frozen_pair, frozen_run

    eager, fused, x = frozen_pair(FROZEN_BLOCKS[name], batch=2)
    fused.backend = "cuda"
    with served_by_cuda() as served:
        assert_frozen_step(eager, fused, x)
        assert_train_parity(eager, fused, x, steps=2, forward=frozen_run)
    want = {"dwconv_bn_act", "dwconv_bn_act_backward", "se_gate", "se_gate_backward", "pointwise_conv",
            "pointwise_conv_backward"}
    assert want <= served, f"not served by the kernels: {want - served}"


@contextlib.contextmanager
def served_by_cuda():
    """The names of the cuda backend's ops called inside (a set, filled as they run)."""
    from unittest import mock

    from effnet_kernels import backends

    impls = backends._REGISTRY["cuda"].impls()
    served: set[str] = set()

    def spy(op, impl):
        def wrapped(*args):
            served.add(op)
            return impl(*args)
        return wrapped

    with mock.patch.dict(impls, {op: spy(op, f) for op, f in impls.items()}):
        yield served
