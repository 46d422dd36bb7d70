"""The Triton ``pointwise_conv_backward`` GEMMs compile for an H100 / H200 (sm_90) without a GPU.

The real launcher runs on uninitialised CPU tensors while every launch is recorded
(``test_triton_compile.recorded_launches``: tuning on, so every candidate config is launched once),
then compiled to a cubin: the dgrad (gate fused) and the split-K wgrad at B0's gated projections
(1152 -> 320 at 7 x 7, 672 -> 112 at 14 x 14, 96 -> 24 at 56 x 56) and an ungated one, batch 128, every
dtype x layout, and the 64-bit offset variant. Checked as the forward GEMM's (test_triton_pointwise_compile):
no spills, registers that leave at least 8 warps resident per SM, shared memory within sm_90's limit,
16-bit dots on the tensor cores, float32 on IEEE FMA (no TF32).
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("triton")

from .test_triton_compile import recorded_launches  # noqa: E402,F401
from .test_triton_pointwise_compile import mma_ops, ptxas_usage, resident_warps, H100_MAX_SHARED  # noqa: E402

from effnet_kernels.triton import pointwise_backward  # noqa: E402

MIN_WARPS_PER_SM = 8
GEMMS = ("_dgrad_kernel", "_wgrad_kernel")

B0_PROJECTIONS = [  # (y shape at batch 128, Cout, gate)
    ((128, 1152, 7, 7), 320, True),
    ((128, 672, 14, 14), 112, True),
    ((128, 96, 56, 56), 24, True),
    ((128, 240, 28, 28), 40, False),
]


def run_backward(shape, cout, dtype, channels_last, gate, force_int64=False):
    """The real launcher on uninitialised CPU tensors (launches recorded, not run)."""
    n, k, h, w = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt)
    go = torch.empty(n, cout, h, w, dtype=dtype).contiguous(memory_format=fmt)
    real = pointwise_backward.needs_int64
    if force_int64:
        pointwise_backward.needs_int64 = lambda *tensors: True
    try:
        pointwise_backward.pointwise_conv_backward_with(None)(
            go, x, torch.empty(cout, k), None, torch.empty(n, k) if gate else None, None, "identity", False)
    finally:
        pointwise_backward.needs_int64 = real


@pytest.fixture
def launches(recorded_launches, monkeypatch):  # noqa: F811
    monkeypatch.setattr(pointwise_backward, "interpreted", lambda t: False)
    return recorded_launches


def check_compiled(rec, capsys=None, kernels=GEMMS) -> list[tuple[str, str]]:
    """Compile every recorded launch of ``kernels``; assert the resource invariants; (line, ptx) per launch."""
    out = []
    for what, compiled in rec.compile_all(only=kernels):  # not the fixed-order partial sums (audited with the squeeze)
        name = what.split()[0]
        ptx = compiled.asm["ptx"]
        regs, spills = ptxas_usage(ptx)
        warps, shared = compiled.metadata.num_warps, compiled.metadata.shared
        resident = resident_warps(regs, warps, shared)
        consts = what.split("} {", 1)[1].split("}")[0]
        line = f"{name} {consts} warps={warps}: {regs} regs, {spills} B spilled, {shared} B shared, {resident} warps/SM"
        assert spills == 0, line
        assert shared <= H100_MAX_SHARED, line
        assert resident >= MIN_WARPS_PER_SM, line
        out.append((line, ptx))
    if capsys is not None:
        with capsys.disabled():
            print("\n" + "\n".join(line for line, _ in out))
    return out


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)  # bf16: the int64 and 128-bit tests
def test_b0_projections_compile(launches, capsys, dtype, channels_last):
    """Every candidate of both GEMMs at B0's projections: no spills, >= 8 warps/SM; 16-bit dots on the tensor
    cores, float32 on IEEE FMA."""
    for shape, cout, gate in B0_PROJECTIONS:
        run_backward(shape, cout, dtype, channels_last, gate)
    compiled = check_compiled(launches, capsys)
    assert {line.split()[0] for line, _ in compiled} == set(GEMMS)
    assert len(compiled) >= 2 * len(B0_PROJECTIONS)
    for line, ptx in compiled:
        ops = mma_ops(ptx)
        if dtype == torch.float32:
            assert not ops and "tf32" not in ptx, f"{line}: float32 must not use TF32 / MMA ({ops})"
            assert "fma.rn.f32" in ptx, line
        else:
            assert ops, f"{line}: no wgmma / mma instruction for the 16-bit dot"


def test_int64_variants_compile(launches):
    run_backward((2, 672, 14, 14), 112, torch.bfloat16, True, True, force_int64=True)
    run_backward((2, 96, 28, 28), 24, torch.float16, False, False, force_int64=True)
    assert len(check_compiled(launches)) >= 4


def test_awkward_shapes_compile(launches):
    """K = 3 and Cout = 17 (masked tiles, scalar accesses), H = W = 1."""
    run_backward((2, 3, 5, 7), 17, torch.float16, True, True)
    run_backward((8, 40, 1, 1), 1, torch.bfloat16, False, True)
    assert len(check_compiled(launches)) >= 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_channels_last_accesses_are_128_bit(launches, dtype):
    """K and Cout multiples of 8, channels_last: g, y and the weight move in 16-byte copies (cp.async 0x10, or
    ld.global.v4 where the gate's multiply makes a load a register load), no 16-bit loads or 2-byte copies (the
    float32 gate's ``[BLOCK_K]`` row may come in 4-byte copies: one element per thread at BLOCK_K = 128 on 4
    warps); grad_y's stores and the float32 partials' are st.global.v4 (the gate partial's row may be 32-bit)."""
    from .test_triton_pointwise_compile import vector_copies

    run_backward((128, 1152, 7, 7), 320, dtype, True, True)
    run_backward((128, 240, 28, 28), 40, dtype, True, False)
    for line, ptx in check_compiled(launches):
        copies, loads = vector_copies(ptx)
        wide = copies & {"0x10", "16"} or any(".v4." in op for op in loads)
        assert wide and copies <= {"0x10", "16", "0x4", "4"}, f"{line}: {copies} {loads}"
        assert not any(op.endswith((".b16", ".u16")) for op in loads), f"{line}: 16-bit global loads {loads}"
        stores = set(re.findall(r"\bst\.global[\w.:]*", ptx))
        assert any(".v4." in op for op in stores), f"{line}: stores {stores}"
        if line.startswith("_wgrad") or "'HAS_GATE': False" in line:
            assert all(".v4." in op for op in stores), f"{line}: stores {stores}"


def test_negative_control_unaligned_nchw_is_seen(launches):
    """The vector check can fail: NCHW at 7 x 7 (49 pixels per plane) loads and stores 16-bit scalars."""
    from .test_triton_pointwise_compile import vector_copies

    run_backward((128, 1152, 7, 7), 320, torch.float16, False, False)
    seen = False
    for line, ptx in check_compiled(launches):
        copies, loads = vector_copies(ptx)
        stores = set(re.findall(r"\bst\.global[\w.:]*", ptx))
        seen |= not all(".v4." in op for op in stores) or any(op.endswith((".b16", ".u16")) for op in loads) \
            or bool(copies - {"0x10", "16"})
    assert seen
