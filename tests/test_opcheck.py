"""``torch.library.opcheck`` on every effnet op (schema, fake kernel, autograd, AOT dispatch).

Every activation of ``dwconv_bn_act`` and (activation, gate) of ``se_gate``, in every dtype
(float64 included: its outputs, the mean and the gate, are float64).
"""

from __future__ import annotations

import pytest
import torch

import effnet_kernels  # noqa: F401  (registers the ops)
from effnet_kernels.ops._checks import ACTIVATIONS

CL = torch.channels_last
SE_VARIANTS = [("silu", "sigmoid"), ("relu", "sigmoid"), ("relu", "hardsigmoid"), ("silu", "hardsigmoid")]


def rg(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def dwconv_cases():
    """dtype x squeeze x layout, the activations taking turns (each one in NCHW and channels_last)."""
    i = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        folded = torch.float64 if dtype == torch.float64 else torch.float32
        for squeeze in (False, True):
            x = rg(2, 6, 7, 5, dtype=dtype)
            act = ACTIVATIONS[i % len(ACTIVATIONS)]
            yield (x, rg(6, 1, 3, 3, dtype=dtype), rg(6, dtype=folded).abs(), rg(6, dtype=folded), [1, 1], [1, 1, 1, 1],
                   act, squeeze, "torch")
            xc = x.detach().contiguous(memory_format=CL).requires_grad_()
            act = ACTIVATIONS[(i + 2) % len(ACTIVATIONS)]
            yield (xc, rg(6, 1, 5, 5, dtype=dtype), rg(6), rg(6), [2, 2], [1, 2, 2, 1], act, squeeze, "auto")
            i += 1


def _case_id(args):
    return f"{args[0].dtype}-{args[6]}-{'sq' if args[7] else 'nosq'}-{'cl' if args[0].is_contiguous(memory_format=CL) else 'nchw'}"


def test_the_cases_cover_every_activation_in_both_layouts():
    seen = {(a[6], a[0].is_contiguous(memory_format=CL)) for a in dwconv_cases()}
    assert seen == {(act, cl) for act in ACTIVATIONS for cl in (False, True)}


@pytest.mark.parametrize("args", list(dwconv_cases()), ids=_case_id)
def test_opcheck_dwconv_bn_act(args):
    torch.library.opcheck(torch.ops.effnet.dwconv_bn_act.default, args)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_opcheck_dwconv_bn_act_backward(activation):
    x, w, s, b = rg(2, 6, 7, 5, grad=False), rg(6, 1, 3, 3, grad=False), rg(6, grad=False), rg(6, grad=False)
    gy, gm = torch.randn(2, 6, 4, 3), torch.randn(2, 6)
    torch.library.opcheck(torch.ops.effnet.dwconv_bn_act_backward.default,
                          (gy, gm if activation == "silu" else None, x, w, s, b, [2, 2], [1, 1, 1, 1], activation, "torch"))
    if activation == "identity":
        torch.library.opcheck(torch.ops.effnet.dwconv_bn_act_backward.default,
                              (None, gm, x, w, s, b, [1, 1], [1, 1, 1, 1], activation, "torch"))


SE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


# each dtype with two (activation, gate) variants, each variant with two dtypes
@pytest.mark.parametrize("dtype,activation,gate", [(d, *SE_VARIANTS[(i + j) % 4]) for i, d in enumerate(SE_DTYPES)
                                                   for j in (0, 2)], ids=str)
def test_opcheck_se_gate(dtype, activation, gate):
    args = (rg(3, 10, dtype=dtype), rg(4, 10, dtype=dtype), rg(4, dtype=dtype), rg(10, 4, dtype=dtype),
            rg(10, dtype=dtype), activation, gate, "torch")
    torch.library.opcheck(torch.ops.effnet.se_gate.default, args)
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    grad = torch.randn(3, 10, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    torch.library.opcheck(torch.ops.effnet.se_gate_backward.default, (grad,) + plain)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_opcheck_se_excite(layout, dtype):
    y = torch.randn(2, 6, 4, 5, dtype=dtype)
    if layout == "channels_last":
        y = y.contiguous(memory_format=CL)
    y.requires_grad_()
    gate = rg(2, 6)
    torch.library.opcheck(torch.ops.effnet.se_excite.default, (y, gate, "torch"))
    g = torch.randn(2, 6, 4, 5, dtype=dtype)
    torch.library.opcheck(torch.ops.effnet.se_excite_backward.default, (g, y.detach(), gate.detach(), "torch"))
