"""The Triton ``se_gate`` and ``se_excite`` kernels on CPU tensors, in Triton's interpreter.

Parity against fp64 nn-module / broadcast references (``test_ops_parity``) for every
dtype and layout, awkward shapes, EfficientNet-sized C and R (the block loops), the
64-bit offset variant, and ``opcheck``.
"""

from __future__ import annotations

import pytest
import torch

import effnet_kernels as ek

from .parity import assert_parity
from .defects import planted
from .test_ops_parity import LAYOUTS, SE_VARIANTS, make_input, se_plain, se_truth
from .test_triton_dwconv import poisoned_outputs, triton_interpreter  # noqa: F401  (fixtures)

pytest.importorskip("triton")

pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CL = torch.channels_last


def se_params(c: int, r: int, dtype: torch.dtype):
    """Random SE weights scaled like a trained layer's, in ``dtype``."""
    wr, br = (torch.randn(r, c) / c**0.5).to(dtype), torch.randn(r).to(dtype)
    we, be = (torch.randn(c, r) / r**0.5).to(dtype), torch.randn(c).to(dtype)
    return wr, br, we, be


def check_gate(n: int, c: int, r: int, dtype: torch.dtype, weights4d: bool = False, activation: str = "silu",
               gate: str = "sigmoid", bias_std: float = 1.0) -> None:
    pooled = torch.randn(n, c).to(dtype)
    wr, br, we, be = se_params(c, r, dtype)
    be = (be.float() * bias_std).to(dtype)
    args = (wr.reshape(r, c, 1, 1), br, we.reshape(c, r, 1, 1), be) if weights4d else (wr, br, we, be)
    out = ek.ops.se_gate(pooled, *args, activation=activation, gate=gate, backend="triton")
    assert out.dtype == torch.float32 and tuple(out.shape) == (n, c)
    plain = se_plain(pooled, wr, br, we, be, activation, gate)
    assert_parity(out, se_truth(pooled, wr, br, we, be, activation, gate), plain, dtype, what="gate")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c,r,weights4d", [(2, 16, 4, False), (1, 1, 1, True), (3, 37, 5, True), (0, 8, 2, False),
                                             (2, 300, 7, False), (37, 24, 20, False)])
def test_se_gate(dtype, n, c, r, weights4d):
    check_gate(n, c, r, dtype, weights4d)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation,gate", SE_VARIANTS[1:])
def test_se_gate_variants(activation, gate, dtype):
    """The ReLU inner activation and the hard-sigmoid gate (constexprs ACT, GATE); b_expand over
    about [-6, 6] so both clamps of hardsigmoid are hit; C spans two blocks of the C loop."""
    check_gate(19, 300, 7, dtype, activation=activation, gate=gate, bias_std=3.0)


def test_negative_control_se_gate_variants_reject_swapped_functions():
    torch.manual_seed(0)
    check_gate(3, 37, 5, torch.float32, activation="relu", gate="hardsigmoid", bias_std=3.0)  # clean: passes
    torch.manual_seed(0)
    with planted("se_act_swap", "triton"), pytest.raises(AssertionError, match="gate"):
        check_gate(3, 37, 5, torch.float32, activation="relu", gate="hardsigmoid", bias_std=3.0)


@pytest.mark.parametrize("n,c,r", [(1, 1152, 48), (2, 1152, 48), (1, 3840, 160)], ids=["B0-N1", "B0-N2", "B7"])
def test_se_gate_efficientnet_widths(n, c, r):
    """B0's widest SE (C = 1152, R = 48) and B7's (C = 3840, R = 160): loops over C blocks."""
    check_gate(n, c, r, torch.float32)


def test_se_gate_mixed_dtypes():
    """fp16 pooled with fp32 weights (AMP): everything is read as fp32."""
    pooled = torch.randn(3, 24).half()
    wr, br, we, be = se_params(24, 6, torch.float32)
    gate = ek.ops.se_gate(pooled, wr, br, we, be, activation="relu", gate="hardsigmoid", backend="triton")
    assert_parity(gate, se_truth(pooled, wr, br, we, be, "relu", "hardsigmoid"), None, torch.float32, what="gate")


def check_excite(y: torch.Tensor, gate: torch.Tensor) -> None:
    out = ek.ops.se_excite(y, gate, backend="triton")
    assert out.dtype == y.dtype and out.shape == y.shape
    assert out.is_contiguous(memory_format=ek.ops._checks.memory_format_of(y))
    truth = y.double() * gate.double()[:, :, None, None]
    plain = y * gate.to(y.dtype)[:, :, None, None]
    assert_parity(out, truth, plain, y.dtype, what="excite")
    # one fp32 product rounded once (to nearest even, as on the GPU): bitwise torch's result
    assert torch.equal(out, (y.float() * gate.float()[:, :, None, None]).to(y.dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gate_dtype", ["fp32", "same"])
def test_se_excite(dtype, layout, gate_dtype):
    y = make_input((3, 11, 5, 4), dtype, layout, "cpu")
    gate = torch.rand(3, 11)
    check_excite(y, gate if gate_dtype == "fp32" else gate.to(dtype))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 1, 3, 3), (2, 5, 1, 1), (0, 4, 3, 3), (2, 300, 3, 2), (1, 3, 17, 19)],
                         ids=["C1", "1x1", "N0", "C300", "HW323"])
def test_se_excite_awkward_shapes(shape, layout):
    y = make_input(shape, torch.bfloat16, layout, "cpu")
    check_excite(y, torch.rand(shape[:2]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [24, 40, 56, 12, 13])
def test_se_excite_channel_vector_widths(poisoned_outputs, c, dtype):
    """channels_last rows of C = 24/40/56 (16-byte rows Triton's specialisation does not see: the
    kernel's VEC), 12 (8-byte vectors in fp16) and 13 (none), outputs poisoned first; and a strided view."""
    for layout in ("channels_last", "strided"):
        check_excite(make_input((2, c, 5, 3), dtype, layout, "cpu"), torch.rand(2, c))


def test_se_excite_b0_width():
    """B0's widest excite (C = 1152 at 7 x 7), both layouts: several column blocks."""
    for layout in ("nchw", "channels_last"):
        check_excite(make_input((2, 1152, 7, 7), torch.float16, layout, "cpu"), torch.rand(2, 1152))


def test_se_excite_int64_offsets_variant(monkeypatch):
    """The 64-bit-offset specialisation computes the same thing (forced on a small tensor)."""
    from effnet_kernels.triton import se_excite

    real = se_excite.prepare_se_excite

    def forced(*args):
        lp = real(*args)
        lp.int64 = True
        return lp

    monkeypatch.setattr(se_excite, "prepare_se_excite", forced)
    for layout in ("nchw", "channels_last"):
        check_excite(make_input((2, 6, 3, 5), torch.float16, layout, "cpu"), torch.rand(2, 6))


@pytest.mark.parametrize("dtype,activation,gate", [(torch.float32, "silu", "sigmoid"),
                                                  (torch.bfloat16, "relu", "hardsigmoid")], ids=str)
def test_opcheck_se_gate(dtype, activation, gate):
    args = (torch.randn(3, 10, dtype=dtype, requires_grad=True), *[t.requires_grad_() for t in se_params(10, 4, dtype)],
            activation, gate, "triton")
    torch.library.opcheck(torch.ops.effnet.se_gate.default, args)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_opcheck_se_excite(layout):
    y = torch.randn(2, 6, 4, 5, dtype=torch.float16)
    if layout == "channels_last":
        y = y.contiguous(memory_format=CL)
    torch.library.opcheck(torch.ops.effnet.se_excite.default,
                          (y.requires_grad_(), torch.rand(2, 6, requires_grad=True), "triton"))
