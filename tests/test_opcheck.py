"""``torch.library.opcheck`` on every effnet op (schema, fake kernel, autograd, AOT dispatch)."""

from __future__ import annotations

import pytest
import torch

import effnet_kernels  # noqa: F401  (registers the ops)

CL = torch.channels_last


def rg(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def dwconv_cases():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for squeeze in (False, True):
            x = rg(2, 6, 7, 5, dtype=dtype)
            yield (x, rg(6, 1, 3, 3, dtype=dtype), rg(6) .abs(), rg(6), [1, 1], [1, 1, 1, 1], True, squeeze, "torch")
            xc = x.detach().contiguous(memory_format=CL).requires_grad_()
            yield (xc, rg(6, 1, 5, 5, dtype=dtype), rg(6), rg(6), [2, 2], [1, 2, 2, 1], False, squeeze, "auto")


@pytest.mark.parametrize("args", list(dwconv_cases()))
def test_opcheck_dwconv_bn_act(args):
    torch.library.opcheck(torch.ops.effnet.dwconv_bn_act.default, args)


@pytest.mark.parametrize("with_mean", [False, True])
def test_opcheck_dwconv_bn_act_backward(with_mean):
    x, w, s, b = rg(2, 6, 7, 5, grad=False), rg(6, 1, 3, 3, grad=False), rg(6, grad=False), rg(6, grad=False)
    gy = torch.randn(2, 6, 4, 3)
    gm = torch.randn(2, 6) if with_mean else None
    torch.library.opcheck(torch.ops.effnet.dwconv_bn_act_backward.default,
                          (gy, gm, x, w, s, b, [2, 2], [1, 1, 1, 1], True, "torch"))
    torch.library.opcheck(torch.ops.effnet.dwconv_bn_act_backward.default,
                          (None, torch.randn(2, 6), x, w, s, b, [1, 1], [1, 1, 1, 1], False, "torch"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_opcheck_se_gate(dtype):
    args = (rg(3, 10, dtype=dtype), rg(4, 10, dtype=dtype), rg(4, dtype=dtype), rg(10, 4, dtype=dtype),
            rg(10, dtype=dtype), "torch")
    torch.library.opcheck(torch.ops.effnet.se_gate.default, args)
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.effnet.se_gate_backward.default, (torch.randn(3, 10),) + plain)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck_se_excite(layout, dtype):
    y = torch.randn(2, 6, 4, 5, dtype=dtype)
    if layout == "channels_last":
        y = y.contiguous(memory_format=CL)
    y.requires_grad_()
    gate = rg(2, 6)
    torch.library.opcheck(torch.ops.effnet.se_excite.default, (y, gate, "torch"))
    g = torch.randn(2, 6, 4, 5, dtype=dtype)
    torch.library.opcheck(torch.ops.effnet.se_excite_backward.default, (g, y.detach(), gate.detach(), "torch"))
