"""The compiled Triton ``pointwise_conv`` on a CUDA GPU (``pytest -m gpu``; skipped without one).

Every expand, projection and head 1x1 conv of EfficientNet B0-B7 at native resolution and batch 2
against the fp64 torch reference computed on the GPU (the DESIGN rule, outputs poisoned first):
fp16 channels_last (the fast path), bf16 NCHW and fp32 channels_last; large batch; the tuner (every
candidate timed, the winner correct); offsets past 2^31 elements; a planted defect rejected.

Untuned (``EFFNET_KERNELS_TRITON_TUNE=0``: one config per shape class) except the tuner's own test:
compiles (1-9 s of host CPU each) are the cost in a short GPU session; shapes that differ only in
H x W share a compiled variant (the pixel counts are not specialised).
"""

from __future__ import annotations

import os

import pytest
import torch

import effnet_kernels as ek

from .parity import assert_parity
from .test_triton_pointwise import check_pointwise, poisoned_outputs, pw_inputs, pw_truth  # noqa: F401 (fixture)

pytest.importorskip("triton")

pytestmark = pytest.mark.gpu

DEV = "cuda"
HAVE_GPU = torch.cuda.is_available()


def _pointwise_shapes() -> list[tuple]:
    """Distinct ``(K, Cout, H, W, gate, residual, pool, activation)`` of B0-B7's 1x1 convs (native resolution)."""
    from benchmarks.kernel_audit.workloads import network_workloads

    wls = network_workloads(batches=(2,), dtypes=("fp16",), layouts=("nhwc",))
    return sorted({(w.c, w.cout, w.h, w.w, w.gate, w.residual, w.pool, w.activation)
                   for w in wls if w.op == "pointwise_conv"})


# Building B0-B7 on the meta device takes seconds: only where these tests can run.
PW_SHAPES = _pointwise_shapes() if HAVE_GPU else []


def _id(s) -> str:
    k, cout, h, w, gate, res, pool, act = s
    return f"{k}-{cout}-{h}x{w}" + "".join(t for t, on in (("-gate", gate), ("-res", res), ("-pool", pool)) if on)


@pytest.fixture(autouse=True)
def _compiled_kernels(monkeypatch):
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set: these tests are for the compiled kernels")
    from effnet_kernels.triton import _tuning

    monkeypatch.setenv(_tuning.TUNE_ENV_VAR, "0")


def run_shape(shape, dtype, layout, n=2):
    k, cout, h, w, gate, res, pool, act = shape
    inputs = pw_inputs((n, k, h, w), cout, dtype, layout, device=DEV, gate=gate, residual=res, pool=pool)
    check_pointwise(*inputs, activation=act, pool=pool, what=f"pointwise {_id(shape)} {dtype} {layout}")


@pytest.mark.parametrize("dtype,layout", [(torch.float16, "channels_last"), (torch.bfloat16, "nchw"),
                                          (torch.float32, "channels_last")], ids=["fp16-nhwc", "bf16-nchw", "fp32-nhwc"])
@pytest.mark.parametrize("shape", PW_SHAPES, ids=_id)
def test_b0_b7_pointwise_shapes(shape, dtype, layout):
    run_shape(shape, dtype, layout)


@pytest.mark.parametrize("layout", ["channels_last", "nchw", "strided"])
def test_b0_large_batch(layout):
    """Batch 128: B0's 24 -> 144 expand at 56 x 56, a gated residual projection, and the pooled head."""
    for shape in ((24, 144, 56, 56, False, False, False, "silu"), (672, 112, 14, 14, True, True, False, "identity"),
                  (320, 1280, 7, 7, False, False, True, "silu")):
        run_shape(shape, torch.float16, layout, n=128)


def test_tuned_configs_are_correct(monkeypatch):
    """With tuning on, every candidate of a large expand and a pooled head is timed; the winner computes right."""
    from effnet_kernels.triton import _tuning, _tuning_store

    monkeypatch.setenv(_tuning.TUNE_ENV_VAR, "1")
    monkeypatch.setenv(_tuning_store.MODE_ENV_VAR, "off")
    monkeypatch.setenv(_tuning.BUDGET_ENV_VAR, "inf")
    _tuning.clear_cache()
    try:
        run_shape((24, 144, 56, 56, False, False, False, "silu"), torch.float16, "channels_last", n=128)
        run_shape((320, 1280, 7, 7, False, False, True, "silu"), torch.bfloat16, "channels_last", n=128)
        assert sorted(_tuning._sources.values()) == ["tuned", "tuned"], _tuning._sources
    finally:
        _tuning.clear_cache()


def test_int64_offsets():
    """x of 2.2e9 elements (past 2^31): the 64-bit variant; the last sample's last rows against fp64."""
    n, k, cout, h, w = 3, 32, 8, 4800, 4800
    torch.cuda.empty_cache()
    x = torch.empty(n, k, h, w, device=DEV, dtype=torch.float16).normal_().contiguous(memory_format=torch.channels_last)
    assert x.numel() > 2**31
    wt = (torch.randn(cout, k, device=DEV) / k**0.5).half()
    b = torch.randn(cout, device=DEV)
    g = torch.rand(n, k, device=DEV)
    out = ek.ops.pointwise_conv(x, wt, b, gate=g, activation="silu", backend="triton")
    tail = slice(h - 16, h)
    xs = x[-1:, :, tail]
    truth = pw_truth(xs, wt, b, g[-1:], None, "silu", False)
    from .test_triton_pointwise import pw_plain

    assert_parity(out[-1:, :, tail], truth, pw_plain(xs, wt, b, g[-1:], None, "silu", False), torch.float16,
                  what="int64 tail")
    del x, out
    torch.cuda.empty_cache()


def test_negative_control_dropped_gate_is_rejected(monkeypatch):
    from effnet_kernels.triton import pointwise

    real = pointwise.prepare_pointwise

    def drop_gate(*args):
        lp = real(*args)
        lp.gate = None
        return lp

    inputs = pw_inputs((2, 1152, 7, 7), 320, torch.float16, "channels_last", device=DEV, residual=False)
    monkeypatch.setattr(pointwise, "prepare_pointwise", drop_gate)
    with pytest.raises(AssertionError, match="pointwise"):
        check_pointwise(*inputs, activation="identity")
