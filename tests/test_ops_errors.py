"""Every bad input to a public op raises TypeError/ValueError naming the argument."""

from __future__ import annotations

import pytest
import torch

import effnet_kernels as ek


def good_dwconv(c=8, k=3):
    return dict(x=torch.randn(2, c, 6, 6), weight=torch.randn(c, 1, k, k), scale=torch.rand(c) + 0.5,
                shift=torch.randn(c))


def call_dwconv(**over):
    args = good_dwconv()
    kw = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    return ek.ops.dwconv_bn_act(args["x"], args["weight"], args["scale"], args["shift"], **kw)


@pytest.mark.parametrize(
    "override,exc,needle",
    [
        (dict(x=torch.randn(8, 6, 6)), ValueError, "x must be 4-D"),
        (dict(x=torch.randint(0, 5, (2, 8, 6, 6))), TypeError, "x must have dtype"),
        (dict(x=torch.randn(2, 8, 6, 6, dtype=torch.complex64)), TypeError,
         "x must have dtype float32, float16, bfloat16 or float64, got torch.complex64"),
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
        (dict(weight=torch.randn(8, 1, 3)), ValueError, "weight must be 4-D"),
        (dict(weight=torch.randn(8, 2, 3, 3)), ValueError, "weight must have shape [C, 1, k, k]"),
        (dict(weight=torch.randn(7, 1, 3, 3)), ValueError, "weight must have shape [C, 1, k, k]"),
        (dict(weight=torch.randn(8, 1, 3, 5)), ValueError, "weight must have shape [C, 1, k, k]"),
        (dict(weight=torch.randn(8, 1, 4, 4)), ValueError, "kernel size must be odd"),
        (dict(weight=torch.randint(0, 3, (8, 1, 3, 3))), TypeError, "weight must have dtype"),
        (dict(scale=torch.rand(7)), ValueError, "scale must have shape [8]"),
        (dict(shift=torch.rand(8, 1)), ValueError, "shift must be 1-D"),
        (dict(scale=torch.rand(8).half()), TypeError, "scale and shift must be float32"),
        (dict(shift=torch.rand(8).double()), TypeError, "float64 too when x is float64"),
        (dict(stride=3), ValueError, "stride must be 1 or 2"),
        (dict(stride=0), ValueError, "stride must be 1 or 2"),
        (dict(stride=(1, 2, 1)), TypeError, "stride must be an int or a pair"),
        (dict(stride=1.0), TypeError, "stride must be an int or a pair"),
        (dict(padding=-1), ValueError, "padding must be non-negative"),
        (dict(padding=(1, 1, 1)), ValueError, "padding must have 2 or 4 entries"),
        (dict(padding=(1, -1, 1, 1)), ValueError, "padding must be non-negative"),
        (dict(padding="same"), TypeError, "padding must contain ints"),
        (dict(padding=1.5), TypeError, "padding must be None, an int"),
        (dict(activation="gelu"), ValueError,
         "activation must be one of ('identity', 'silu', 'relu', 'relu6', 'hardswish'), got 'gelu'"),
        (dict(activation=None), ValueError, "activation must be one of"),
        (dict(squeeze=1), TypeError, "squeeze must be a bool"),
        (dict(backend="tpu"), ValueError, "backend must be one of"),
        (dict(x=torch.randn(2, 8, 1, 1), padding=0), ValueError, "smaller than the kernel"),
    ],
)
def test_dwconv_bad_input(override, exc, needle):
    with pytest.raises(exc) as info:
        call_dwconv(**override)
    assert needle in str(info.value)


def test_dwconv_device_mismatch_is_named():
    # meta tensors stand in for "another device" on a CPU-only machine
    args = good_dwconv()
    with pytest.raises(ValueError, match="weight must be on cpu like x, got meta"):
        ek.ops.dwconv_bn_act(args["x"], args["weight"].to("meta"), args["scale"], args["shift"])
    with pytest.raises(ValueError, match="shift must be on cpu like x"):
        ek.ops.dwconv_bn_act(args["x"], args["weight"], args["scale"], args["shift"].to("meta"))


def test_direct_op_call_is_validated():
    """Calling torch.ops.effnet.* directly (bypassing the Python wrapper) cannot crash a kernel."""
    a = good_dwconv()
    with pytest.raises(ValueError, match="stride must be a pair of 1s and 2s"):
        torch.ops.effnet.dwconv_bn_act.default(a["x"], a["weight"], a["scale"], a["shift"], [3, 3], [1, 1, 1, 1],
                                               "silu", False, "torch")
    with pytest.raises(ValueError, match="padding must be 4 non-negative"):
        torch.ops.effnet.dwconv_bn_act.default(a["x"], a["weight"], a["scale"], a["shift"], [1, 1], [1, -1, 1, 1],
                                               "silu", False, "torch")
    with pytest.raises(ValueError, match="activation must be one of"):
        torch.ops.effnet.dwconv_bn_act.default(a["x"], a["weight"], a["scale"], a["shift"], [1, 1], [1, 1, 1, 1],
                                               "swish", False, "torch")
    with pytest.raises(ValueError, match="activation must be one of"):
        torch.ops.effnet.dwconv_bn_act_backward.default(None, None, a["x"], a["weight"], a["scale"], a["shift"],
                                                        [1, 1], [1, 1, 1, 1], "Relu", "torch")
    g = good_gate()
    with pytest.raises(ValueError, match="gate must be one of"):
        torch.ops.effnet.se_gate.default(*g, "silu", "tanh", "torch")
    with pytest.raises(ValueError, match="activation must be one of"):
        torch.ops.effnet.se_gate_backward.default(torch.randn(2, 8), *g, "relu6", "sigmoid", "torch")


def good_gate(n=2, c=8, r=2):
    return [torch.randn(n, c), torch.randn(r, c), torch.randn(r), torch.randn(c, r), torch.randn(c)]


@pytest.mark.parametrize(
    "index,value,exc,needle",
    [
        (0, torch.randn(2, 8, 1), ValueError, "pooled must be 2-D"),
        (0, torch.randint(0, 2, (2, 8)), TypeError, "pooled must have dtype"),
        (1, torch.randn(2, 7), ValueError, "w_reduce must have shape [R, 8]"),
        (1, torch.randn(2, 8, 3, 3), ValueError, "w_reduce must be 2-D or a 1x1 conv weight"),
        (1, torch.randn(2, 8, 1), ValueError, "w_reduce must be 2-D or 4-D"),
        (2, torch.randn(3), ValueError, "b_reduce must have shape [2]"),
        (3, torch.randn(8, 3), ValueError, "w_expand must have shape [8, 2]"),
        (4, torch.randn(7), ValueError, "b_expand must have shape [8]"),
        (4, torch.randn(8).to("meta"), ValueError, "b_expand must be on cpu like pooled"),
    ],
)
def test_se_gate_bad_input(index, value, exc, needle):
    args = good_gate()
    args[index] = value
    with pytest.raises(exc) as info:
        ek.ops.se_gate(*args)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(activation="relu6"), "activation must be one of ('silu', 'relu'), got 'relu6'"),
        (dict(activation="hardswish"), "activation must be one of ('silu', 'relu'), got 'hardswish'"),
        (dict(gate="hardswish"), "gate must be one of ('sigmoid', 'hardsigmoid'), got 'hardswish'"),
        (dict(gate=0), "gate must be one of ('sigmoid', 'hardsigmoid'), got 0"),
    ],
)
def test_se_gate_bad_functions(kw, needle):
    with pytest.raises(ValueError) as info:
        ek.ops.se_gate(*good_gate(), **kw)
    assert needle in str(info.value)


def test_the_function_names_are_exported():
    from effnet_kernels.ops import _checks

    assert _checks.ACTIVATIONS == ("identity", "silu", "relu", "relu6", "hardswish")
    assert _checks.SE_ACTIVATIONS == ("silu", "relu") and _checks.SE_GATES == ("sigmoid", "hardsigmoid")
    assert set(_checks.ACT_CODES) == set(_checks.ACTIVATIONS + _checks.SE_ACTIVATIONS + _checks.SE_GATES)
    assert len(set(_checks.ACT_CODES.values())) == len(_checks.ACT_CODES)


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool], ids=str)
def test_non_float_dtypes_keep_raising_type_error(dtype):
    """float64 is served (by the torch reference); integer, complex and bool inputs are not."""
    for op, args in (("dwconv_bn_act", [torch.zeros(2, 8, 6, 6, dtype=dtype), *list(good_dwconv().values())[1:]]),
                     ("se_gate", [torch.zeros(2, 8, dtype=dtype), *good_gate()[1:]]),
                     ("se_excite", [torch.zeros(2, 8, 3, 3, dtype=dtype), torch.rand(2, 8)])):
        with pytest.raises(TypeError, match="must have dtype float32, float16, bfloat16 or float64"):
            getattr(ek.ops, op)(*args)


@pytest.mark.parametrize(
    "y,gate,exc,needle",
    [
        (torch.randn(2, 8, 4), torch.rand(2, 8), ValueError, "y must be 4-D"),
        (torch.randn(2, 8, 4, 4), torch.rand(2, 7), ValueError, "gate must have shape [2, 8]"),
        (torch.randn(2, 8, 4, 4), torch.rand(2, 8, 1, 1), ValueError, "gate must be 2-D"),
        (torch.randn(2, 8, 4, 4).to(torch.complex64), torch.rand(2, 8), TypeError, "y must have dtype"),
        (torch.randn(2, 8, 4, 4), torch.randint(0, 2, (2, 8)), TypeError, "gate must have dtype"),
        (torch.randn(2, 8, 4, 4), torch.rand(2, 8, device="meta"), ValueError, "gate must be on cpu like y"),
    ],
)
def test_se_excite_bad_input(y, gate, exc, needle):
    with pytest.raises(exc) as info:
        ek.ops.se_excite(y, gate)
    assert needle in str(info.value)


def test_non_tensor_arguments_are_named():
    with pytest.raises(TypeError, match="w_expand must be a torch.Tensor, got list"):
        ek.ops.se_gate(torch.randn(2, 8), torch.randn(2, 8), torch.randn(2), [0.0], torch.randn(8))
    with pytest.raises(TypeError, match="gate must be a torch.Tensor, got NoneType"):
        ek.ops.se_excite(torch.randn(2, 8, 3, 3), None)
