"""The Triton ``expand_bn_act_train_backward`` kernels compile for an H100 / H200 (sm_90) without a GPU.

The real launcher runs on uninitialised CPU tensors while every launch is recorded (tuning on: every candidate
config launched once), then compiled to a cubin: the per-channel sums, the input gradient and the split-K weight
gradient, each recomputing the conv output from x, at B0's expand convs (16 -> 96 at 112 x 112 up to 192 -> 1152
at 7 x 7), batch 128, every dtype x layout, the 64-bit offset variant, awkward shapes. Checked as the other GEMMs'
(test_triton_pointwise_compile): no spills, >= 8 warps resident per SM, shared memory within sm_90's limit,
16-bit dots on the tensor cores, float32 on IEEE FMA (no TF32); 128-bit x / grad_a accesses on channels_last.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from .test_triton_compile import recorded_launches  # noqa: E402,F401
from .test_triton_pointwise_backward_compile import check_compiled  # noqa: E402
from .test_triton_pointwise_compile import mma_ops, vector_copies  # noqa: E402

from effnet_kernels.triton import expand_backward  # noqa: E402

KERNELS = ("_sums_kernel", "_dgrad_kernel", "_wgrad_kernel")

B0_EXPANDS = [((128, 16, 112, 112), 96), ((128, 24, 56, 56), 144), ((128, 40, 28, 28), 240),
              ((128, 80, 14, 14), 480), ((128, 112, 14, 14), 672), ((128, 192, 7, 7), 1152)]


def run_backward(shape, j, dtype, channels_last, force_int64=False, activation="silu"):
    """The real launcher on uninitialised CPU tensors (launches recorded, not run)."""
    n, k, h, w = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(shape, dtype=dtype).contiguous(memory_format=fmt)
    ga = torch.empty(n, j, h, w, dtype=dtype).contiguous(memory_format=fmt)
    stats = [torch.empty(j) for _ in range(4)]
    real = expand_backward.needs_int64
    if force_int64:
        expand_backward.needs_int64 = lambda *tensors: True
    try:
        expand_backward.expand_bn_act_train_backward(ga, x, torch.empty(j, k), *stats, activation)
    finally:
        expand_backward.needs_int64 = real


@pytest.fixture
def launches(recorded_launches, monkeypatch):  # noqa: F811
    monkeypatch.setattr(expand_backward, "interpreted", lambda t: False)
    return recorded_launches


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)  # bf16: the int64 and 128-bit tests
def test_b0_expands_compile(launches, capsys, dtype, channels_last):
    for shape, j in B0_EXPANDS:
        run_backward(shape, j, dtype, channels_last)
    compiled = check_compiled(launches, capsys, KERNELS)
    assert {line.split()[0] for line, _ in compiled} == set(KERNELS)
    for line, ptx in compiled:
        ops = mma_ops(ptx)
        if dtype == torch.float32:
            assert not ops and "tf32" not in ptx, f"{line}: float32 must not use TF32 / MMA ({ops})"
            assert "fma.rn.f32" in ptx, line
        else:
            assert ops, f"{line}: no wgmma / mma instruction for the 16-bit dot"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_channels_last_loads_are_128_bit(launches, dtype):
    """K and J multiples of 8, channels_last: x, grad_a and the weight move in 16-byte copies or ld.global.v4,
    no 16-bit loads."""
    run_backward((128, 24, 56, 56), 144, dtype, True)
    run_backward((128, 112, 14, 14), 672, dtype, True)
    for line, ptx in check_compiled(launches, kernels=KERNELS):
        copies, loads = vector_copies(ptx)
        assert copies & {"0x10", "16"} or any(".v4." in op for op in loads), f"{line}: {copies} {loads}"
        assert not any(op.endswith((".b16", ".u16")) for op in loads), f"{line}: 16-bit global loads {loads}"


def test_int64_and_every_activation_compile(launches):
    from effnet_kernels.ops._checks import ACTIVATIONS

    run_backward((2, 24, 28, 28), 144, torch.bfloat16, True, force_int64=True)
    run_backward((2, 40, 7, 7), 240, torch.float16, False, force_int64=True)
    for act in ACTIVATIONS:
        run_backward((2, 24, 8, 8), 144, torch.float16, True, activation=act)
    assert len(check_compiled(launches, kernels=KERNELS)) >= 3 * (2 + len(ACTIVATIONS))


def test_awkward_shapes_compile(launches):
    """K = 3 and J = 17 (masked tiles, scalar accesses), H = W = 1."""
    run_backward((2, 3, 5, 7), 17, torch.float16, True)
    run_backward((8, 40, 1, 1), 1, torch.bfloat16, False)
    assert len(check_compiled(launches, kernels=KERNELS)) >= 6
