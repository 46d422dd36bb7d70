"""The CUDA training kernels on a GPU (``pytest -m gpu``): the host-shim suite's checks
(tests/test_cuda_host_train.py: DESIGN's parity rule against fp64, both layouts, k 3/5/7,
strides 1/2, every activation, awkward shapes) run by the real extension on CUDA tensors, plus
bitwise reproducibility across runs and a larger batch (many chunks per channel). A separate
module: the host suite's module-scoped fixture stands the shim in for the backend."""

from __future__ import annotations

import pytest
import torch

import effnet_kernels as ek

from .test_cuda_host_train import (AWKWARD, DTYPES, EPS, GEOMETRIES, LAYOUTS, _params, backward_case,
                                   eval_backward_case, forward_case)
from .test_ops_parity import ACTIVATIONS, SE_VARIANTS, make_input

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_train_forward_and_backward(dtype, layout):
    """The train forward, its backward and the eval-mode backward (``dwconv_bn_act_backward``: frozen
    BatchNorm's training) on the kernels, by the rule."""
    for k in (3, 5, 7):
        for geometry in GEOMETRIES.values():
            stride, pad4 = geometry(k)
            forward_case((4, 40, 19, 17), k, stride, pad4, dtype, layout, device="cuda")
            backward_case((4, 40, 19, 17), k, stride, pad4, dtype, layout, device="cuda")
            eval_backward_case((4, 40, 19, 17), k, stride, pad4, dtype, layout, device="cuda")
    for activation in ACTIVATIONS:
        forward_case((2, 16, 7, 9), 3, 1, (1, 1, 1, 1), dtype, layout, activation, device="cuda")
        backward_case((2, 16, 7, 9), 3, 1, (1, 1, 1, 1), dtype, layout, activation, device="cuda")
    for shape, k, stride, pad4 in AWKWARD:
        forward_case(shape, k, stride, pad4, dtype, layout, device="cuda")
        backward_case(shape, k, stride, pad4, dtype, layout, device="cuda")
        eval_backward_case(shape, k, stride, pad4, dtype, layout, device="cuda")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gpu_train_large_batch_is_bitwise_reproducible(layout):
    """B0's stage-2 depthwise shape at batch 32 (many chunks per channel): by the rule, and the
    same bits on a second run (fixed-order reductions, no atomics)."""
    shape = (32, 96, 56, 56)
    x = make_input(shape, torch.float16, layout, "cuda")
    forward_case(shape, 3, 2, (0, 1, 0, 1), torch.float16, layout, x=x, device="cuda")
    backward_case(shape, 3, 2, (0, 1, 0, 1), torch.float16, layout, x=x, device="cuda")
    w, g, b = _params(96, 3, device="cuda")
    gy = torch.randn(32, 96, 28, 28, device="cuda").half()
    runs = []
    for _ in range(2):
        y, pooled, mean, var = ek.ops.dwconv_bn_act_train(x, w, g, b, eps=EPS, stride=2, padding=(0, 1, 0, 1),
                                                          squeeze=True, backend="cuda")
        grads = torch.ops.effnet.dwconv_bn_act_train_backward.default(
            gy, None, x, w, g, b, mean, var, EPS, [2, 2], [0, 1, 0, 1], "silu", "cuda")
        runs.append((mean, var, *grads))
    assert all(torch.equal(p, q) for p, q in zip(*runs))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation,gate", SE_VARIANTS)
def test_gpu_se_backward(activation, gate, dtype):
    from .parity import assert_parity
    from effnet_kernels import reference

    for layout in LAYOUTS:
        y = make_input((4, 40, 7, 7), dtype, layout, "cuda")
        gate_t = torch.rand(4, 40, device="cuda")
        go = torch.randn(4, 40, 7, 7, device="cuda").to(dtype)
        gy, gg = torch.ops.effnet.se_excite_backward.default(go, y, gate_t, "cuda")
        wy, wg = reference.se_excite_backward(go.cpu().double(), y.cpu().double(), gate_t.cpu().double())
        assert_parity(gy.cpu(), wy, (go * gate_t.to(dtype)[:, :, None, None]).cpu(), dtype, kind="backward")
        assert_parity(gg.cpu(), wg, (go * y).sum(dim=(2, 3)).float().cpu(), dtype, kind="backward")
    n, c, r = 8, 96, 24
    args = [torch.randn(n, c), torch.randn(r, c) / c**0.5, torch.randn(r), torch.randn(c, r) / r**0.5, torch.randn(c)]
    args = [t.to("cuda", dtype) for t in args]
    grad_gate = torch.randn(n, c, device="cuda")
    got = torch.ops.effnet.se_gate_backward.default(grad_gate, *args, activation, gate, "cuda")
    want = reference.se_gate_backward(grad_gate.cpu().double(), *(t.cpu().double() for t in args), activation, gate)
    plain = reference.se_gate_backward(grad_gate, *args, activation, gate)  # fp32 compute: a tight budget
    for g, w, p in zip(got, want, plain):
        assert_parity(g.cpu(), w, p.cpu(), dtype, kind="backward")
