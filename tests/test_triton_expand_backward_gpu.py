"""The compiled Triton ``expand_bn_act_train_backward`` on a CUDA GPU (``pytest -m gpu``; skipped without one).

Every expand conv of EfficientNet B0 at native resolution, batch 4, against the fp64 autograd truth computed on the
GPU by the backward rule: fp16 channels_last (the training path), bf16 NCHW, fp32 channels_last; batch 128 (the
benchmark's) and run-to-run bitwise equality; every tuned candidate right; a planted defect rejected. Untuned
(``EFFNET_KERNELS_TRITON_TUNE=0``) but for the tuner's test.
"""

from __future__ import annotations

import pytest
import torch

from .test_ops_expand_backward import OP, _autograd, _inputs, _planted, _skew_mean
from .parity import assert_parity
from .test_triton_pointwise_backward_gpu import untuned  # noqa: F401  (fixture: skipped without a GPU, untuned)

pytest.importorskip("triton")

pytestmark = pytest.mark.gpu

DEV = "cuda"


def _expands() -> list[tuple]:
    """Distinct ``(K, J, H, W, activation)`` of B0's expand convs at 224 x 224."""
    from benchmarks.kernel_audit.workloads import network_workloads

    wls = network_workloads(names=("b0",), batches=(4,), dtypes=("fp16",), layouts=("nhwc",))
    return sorted({(w.c, w.cout, w.h, w.w, w.activation) for w in wls
                   if w.op == "pointwise_conv" and w.activation != "identity" and not w.pool})


def check_gpu(shape, j, dtype, layout, activation="silu"):
    args = [t.to(DEV) for t in _inputs(shape, j, dtype, layout)]
    got = OP(*args, activation, "triton")
    grad_a, x, weight, gamma, beta = args[:5]
    ref = _autograd(grad_a, x, weight, gamma, beta, activation, torch.float64)
    plain = _autograd(grad_a, x, weight, gamma, beta, activation, dtype) if dtype != torch.float32 else (None,) * 4
    for what, g, r, p in zip(("grad_x", "grad_weight", "grad_gamma", "grad_beta"), got, ref, plain):
        assert_parity(g.cpu(), r.cpu(), p.to(g.dtype).cpu() if p is not None else None, dtype, kind="backward",
                      what=f"triton {what} {tuple(shape)}->{j}")
    return got


@pytest.mark.parametrize("dtype,layout", [(torch.float16, "channels_last"), (torch.bfloat16, "nchw"),
                                          (torch.float32, "channels_last")], ids=str)
def test_b0_expands(dtype, layout):
    shapes = _expands()
    assert len(shapes) >= 5
    for k, j, h, w, act in shapes:
        check_gpu((4, k, h, w), j, dtype, layout, act)


def test_batch_128_and_determinism():
    first = check_gpu((128, 24, 56, 56), 144, torch.float16, "channels_last")
    torch.manual_seed(0)
    args = [t.to(DEV) for t in _inputs((16, 40, 28, 28), 240, torch.float16, "channels_last")]
    a, b = OP(*args, "silu", "triton"), OP(*args, "silu", "triton")
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and first[0].is_cuda


def test_every_tuned_candidate_is_right(monkeypatch):
    from effnet_kernels.triton import _tuning

    monkeypatch.setenv("EFFNET_KERNELS_TRITON_TUNE", "1")
    monkeypatch.setenv("EFFNET_KERNELS_TUNING_STORE", "off")
    _tuning.clear_cache()
    try:
        check_gpu((64, 40, 28, 28), 240, torch.float16, "channels_last")
    finally:
        _tuning.clear_cache()


def test_negative_control_a_skewed_mean_is_rejected(monkeypatch):
    _planted(monkeypatch, _skew_mean)
    with pytest.raises(AssertionError, match="triton grad"):
        check_gpu((4, 40, 28, 28), 240, torch.float16, "channels_last")
