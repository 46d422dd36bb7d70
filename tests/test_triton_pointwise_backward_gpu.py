"""The compiled Triton ``pointwise_conv_backward`` GEMMs on a CUDA GPU (``pytest -m gpu``; skipped without one).

Every gated projection of EfficientNet B0 (and an ungated 1x1 conv) at native resolution, batch 4, against the
fp64 autograd truth computed on the GPU by the backward rule, the input's gradient poisoned first: fp16
channels_last (the training path), bf16 NCHW and fp32 channels_last; batch 128 (the benchmark's); run-to-run
bitwise equality; a planted defect rejected. Untuned (``EFFNET_KERNELS_TRITON_TUNE=0``) but for the tuner's
test, whose every candidate must give the same gradients.
"""

from __future__ import annotations


import pytest
import torch

from .test_triton_pointwise_backward import _inputs, _planted, _skew_gate, check_backward, poisoned_grad_x  # noqa: F401
from .test_triton_pointwise_backward import triton_backward

pytest.importorskip("triton")

pytestmark = pytest.mark.gpu

DEV = "cuda"
HAVE_GPU = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def untuned(monkeypatch):
    """Skipped without a GPU; one config per shape class (``EFFNET_KERNELS_TRITON_TUNE=0``)."""
    if not HAVE_GPU:
        pytest.skip("no CUDA GPU")
    monkeypatch.setenv("EFFNET_KERNELS_TRITON_TUNE", "0")


def _projections() -> list[tuple]:
    """Distinct ``(K, Cout, H, W, gate)`` of B0's projection convs at 224 x 224."""
    from benchmarks.kernel_audit.workloads import network_workloads

    wls = network_workloads(names=("b0",), batches=(4,), dtypes=("fp16",), layouts=("nhwc",))
    return sorted({(w.c, w.cout, w.h, w.w, w.gate) for w in wls
                   if w.op == "pointwise_conv" and w.activation == "identity" and not w.pool})


@pytest.mark.parametrize("dtype,layout", [(torch.float16, "channels_last"), (torch.bfloat16, "nchw"),
                                          (torch.float32, "channels_last")], ids=str)
def test_b0_projections(dtype, layout):
    shapes = _projections()
    assert len(shapes) >= 6
    for k, cout, h, w, gate in shapes:
        check_backward(triton_backward(), *_inputs((4, k, h, w), cout, dtype, layout, gate=gate, residual=False,
                                                   device=DEV), what=f"pointwise backward {k}->{cout} {h}x{w}")


def test_batch_128_and_determinism():
    args = _inputs((128, 672, 14, 14), 112, torch.float16, "channels_last", device=DEV)
    first = check_backward(triton_backward(), *args)
    second = triton_backward()(*args, "identity", False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_every_tuned_candidate_is_right(monkeypatch):
    from effnet_kernels.triton import _tuning

    monkeypatch.setenv("EFFNET_KERNELS_TRITON_TUNE", "1")
    monkeypatch.setenv("EFFNET_KERNELS_TUNING_STORE", "off")
    _tuning.clear_cache()
    try:
        check_backward(triton_backward(), *_inputs((64, 1152, 7, 7), 320, torch.float16, "channels_last",
                                                   device=DEV))
    finally:
        _tuning.clear_cache()


def test_negative_control_a_skewed_gate_is_rejected(monkeypatch):
    inputs = _inputs((4, 672, 14, 14), 112, torch.float16, "channels_last", device=DEV)
    check_backward(triton_backward(), *inputs)  # clean: passes
    _planted(monkeypatch, _skew_gate)
    with pytest.raises(AssertionError, match="pointwise backward"):
        check_backward(triton_backward(), *inputs)
