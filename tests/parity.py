"""The parity rule of DESIGN.md, shared by every parity test.

fp16/bf16: the kernel's max abs error against an fp64 reference must be at most
``factor`` (2 forward, 3 backward) times the max abs error of plain PyTorch computing
the same thing in that dtype. fp32: max abs error / max abs reference <= 1e-5 forward,
1e-4 backward.
"""

from __future__ import annotations

import torch

FP32_RTOL = {"forward": 1e-5, "backward": 1e-4}
LOWP_FACTOR = {"forward": 2.0, "backward": 3.0}
# Absolute floor so that exactly-representable results (plain error 0) do not demand 0.
ABS_FLOOR = 1e-6


def max_err(out: torch.Tensor, ref64: torch.Tensor) -> float:
    if out.numel() == 0:
        return 0.0
    return (out.double() - ref64.double()).abs().max().item()


def assert_parity(out: torch.Tensor, ref64: torch.Tensor, plain: torch.Tensor | None, dtype: torch.dtype,
                  kind: str = "forward", what: str = "output") -> None:
    """Assert ``out`` (kernel, any dtype) is as close to ``ref64`` as the rule demands."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten or overflowed elements)"
    err = max_err(out, ref64)
    if dtype == torch.float32 or plain is None:
        scale = ref64.abs().max().item() if ref64.numel() else 0.0
        bound = FP32_RTOL[kind] * max(scale, 1e-30) + (0.0 if dtype == torch.float32 else ABS_FLOOR)
        assert err <= bound, f"{what}: fp32 max abs error {err:.3g} > {bound:.3g}"
        return
    plain_err = max_err(plain, ref64)
    bound = LOWP_FACTOR[kind] * plain_err + ABS_FLOOR
    assert err <= bound, f"{what}: {dtype} error {err:.3g} > {LOWP_FACTOR[kind]} x plain PyTorch's {plain_err:.3g}"
