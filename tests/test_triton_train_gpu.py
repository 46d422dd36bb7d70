"""The compiled Triton training kernels on a CUDA GPU (``pytest -m gpu``; skipped without one).

Every B0 depthwise shape class (fp16 / bf16, channels_last and NCHW, batch 8) through
``dwconv_bn_act_train`` and ``dwconv_bn_act_train_backward`` with ``backend="triton"``, and the
B0 SE sizes through ``se_gate_backward`` / ``se_excite_backward``, against fp64 references computed
on the GPU by the parity rule; a bitwise reproducibility check. Not yet run on a GPU (written
without one): tests/test_triton_train.py checks the same logic in Triton's interpreter and
tests/test_triton_train_compile.py that every kernel compiles for sm_90 without spills.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effnet_kernels import reference

from .parity import assert_parity

pytest.importorskip("triton")

pytestmark = pytest.mark.gpu

DEV = "cuda"
CL = torch.channels_last
EPS = 1e-3
OPS = torch.ops.effnet


def _b0_depthwise():
    from effnet_kernels.models import depthwise_shapes

    return depthwise_shapes(("b0",))


def _f64(*ts):
    return [t.double() if t is not None else None for t in ts]


def _eager(x, w, gamma, beta, stride, pad):
    z = F.conv2d(F.pad(x, pad), w.to(x.dtype), stride=stride, groups=x.shape[1])
    y = F.silu(F.batch_norm(z, None, None, gamma, beta, training=True, eps=EPS))
    return y, y.float().mean((2, 3))


def _truth(x, w, gamma, beta, stride, pad):
    y, pooled, _, _ = reference.dwconv_bn_act_train(x, w, gamma, beta, None, None, EPS, (stride,) * 2, pad, "silu",
                                                    True)
    return y, pooled


def _grads(fn, x, w, gamma, beta, gy, gp, stride, pad):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, gamma, beta)]
    y, pooled = fn(*leaves, stride, pad)
    ((y.double() * gy.double()).sum() + (pooled.double() * gp.double()).sum()).backward()
    return [t.grad for t in leaves]


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", _b0_depthwise(), ids=str)
def test_b0_train_forward_and_backward(shape, dtype, channels_last):
    c, h, w, k, stride = shape
    n, pad = 8, (k // 2,) * 4
    x = torch.randn(n, c, h, w, device=DEV).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    wt = (torch.randn(c, 1, k, k, device=DEV) * 0.5).to(dtype)
    gamma, beta = torch.rand(c, device=DEV) + 0.5, torch.randn(c, device=DEV) * 0.5
    y, pooled, mean, var = OPS.dwconv_bn_act_train(x, wt, gamma, beta, None, None, EPS, [stride] * 2, list(pad),
                                                   "silu", True, "triton")
    y64, p64 = _truth(*_f64(x, wt, gamma, beta), stride, pad)
    plain = _eager(x, wt, gamma, beta, stride, pad)
    assert_parity(y, y64, plain[0], dtype, what="y")
    assert_parity(pooled, p64, plain[1], dtype, what="pooled")
    gy = torch.randn(y.shape, device=DEV).to(dtype)
    gp = torch.randn(n, c, device=DEV).to(dtype).float()
    got = OPS.dwconv_bn_act_train_backward(gy, gp, x, wt, gamma, beta, mean, var, EPS, [stride] * 2, list(pad),
                                           "silu", "triton")
    ref = _grads(_truth, *_f64(x, wt, gamma, beta), gy, gp, stride, pad)
    base = _grads(_eager, x, wt, gamma, beta, gy, gp, stride, pad)
    for name, g, r, p in zip(("x", "weight", "gamma", "beta"), got, ref, base):
        assert_parity(g, r, p, dtype, kind="backward", what=f"grad {name}")


def test_b0_se_backward():
    from effnet_kernels.models import layer_shapes

    for c, r in sorted({(s.mid_channels, s.se_reduced) for s in layer_shapes("b0") if s.se_reduced}):
        p = torch.randn(32, c, device=DEV).half()
        params = [(torch.randn(r, c, device=DEV) / c**0.5).half(), torch.randn(r, device=DEV).half(),
                  (torch.randn(c, r, device=DEV) / r**0.5).half(), torch.randn(c, device=DEV).half()]
        gg = torch.randn(32, c, device=DEV)
        got = OPS.se_gate_backward(gg, p, *params, "silu", "sigmoid", "triton")

        def grads(cast):
            leaves = [t.detach().to(cast).requires_grad_() for t in (p, *params)]
            wr, br, we, be = leaves[1:]
            gate = torch.sigmoid(F.linear(F.silu(F.linear(leaves[0], wr, br)), we, be))
            (gate.double() * gg.double()).sum().backward()
            return [t.grad for t in leaves]

        for g, wv, plain in zip(got, grads(torch.float64), grads(torch.float16)):
            assert_parity(g, wv, plain, torch.float16, kind="backward")
        y = torch.randn(32, c, 7, 7, device=DEV).half().contiguous(memory_format=CL)
        go = torch.randn_like(y)
        gate = torch.rand(32, c, device=DEV)
        got = OPS.se_excite_backward(go, y, gate, "triton")
        want = reference.se_excite_backward(*_f64(go, y, gate))
        assert_parity(got[0], want[0], go * gate.half()[:, :, None, None], torch.float16, kind="backward")
        assert_parity(got[1], want[1], None, torch.float32, kind="backward")


def test_bitwise_reproducible_on_the_gpu():
    x = torch.randn(32, 144, 56, 56, device=DEV).half().contiguous(memory_format=CL)
    wt = torch.randn(144, 1, 3, 3, device=DEV).half()
    gamma, beta = torch.rand(144, device=DEV) + 0.5, torch.randn(144, device=DEV)
    gy = torch.randn(32, 144, 28, 28, device=DEV).half().contiguous(memory_format=CL)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            y, pooled, mean, var = OPS.dwconv_bn_act_train(x, wt, gamma, beta, None, None, EPS, [2, 2],
                                                           [0, 1, 0, 1], "silu", True, "triton")
            grads = OPS.dwconv_bn_act_train_backward(gy, pooled, x, wt, gamma, beta, mean, var, EPS, [2, 2],
                                                     [0, 1, 0, 1], "silu", "triton")
            runs.append((y, pooled, mean, var, *grads))
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
