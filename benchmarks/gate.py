"""The correctness gate: a provider's output must match eager PyTorch before it is timed.

The reference is eager PyTorch in fp32 with TF32 off (NCHW), on a model whose BatchNorm
is calibrated (:mod:`benchmarks.models`), so its output depends on its input.

* **network** (:func:`check`, every provider): a provider running in precision ``dtype``
  passes when its relative error ``||out - ref|| / ||ref||`` is at most
  ``max(FLOOR[dtype], ERR_FACTOR * eager_err)``, where ``eager_err`` is eager PyTorch's own
  error in that precision (channels_last) against the same reference. NaN or Inf never pass.
* **fp32** (:func:`check_fp32`, fused providers): the provider's kernels run in fp32 (TF32
  off) on a sub-batch must match the fp32 reference to
  ``max(FP32_TIGHT, FP32_FACTOR * eager_fp32_err)``, where ``eager_fp32_err`` is eager's own
  fp32 error there (channels_last vs NCHW, or NCHW vs fp64, the larger; 1.6e-6 to 3.6e-6
  on the CPU, so the floor decides there). On the CPU a correct ``fused-torch``
  gets 1.8e-6 (tiny), 1.9e-6 (B0 at 224) and 4.7e-6 / 6.0e-6 (B7 at 600, channels_last /
  NCHW; eager channels_last itself 3.6e-6), while a 1% SE-gate skew moves the output by
  0.13 (tiny) to 1.0 (B7) and a squeeze skew of 1% by 5e-3 (tiny): ``FP32_TIGHT = 2e-5``
  leaves 3x room over the worst correct case and rejects those defects by 250x or more.
  The ``FP32_FACTOR`` term follows eager's own rounding where it is larger (e.g. a GPU whose
  cuDNN picks FFT or Winograd fp32 algorithms): a path as accurate as eager is at most ~2x
  eager's error away from eager.
* **blockwise** (fused providers): :func:`effnet_kernels.testing.blockwise_parity` in the
  job's precision (run by :mod:`benchmarks.jobs`).
* **sensitivity** (:func:`sensitive_enough`): a check is only evidence when an unrelated
  input moves the eager fp32 output by at least ``SENSITIVITY_MARGIN`` x its limit (a
  provider fed the wrong buffer then fails it with room to spare); a job whose strictest
  check is blind fails instead of being timed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["FLOOR", "ERR_FACTOR", "FP32_TIGHT", "FP32_FACTOR", "SENSITIVITY_MARGIN", "GateResult", "rel_err",
           "check", "check_fp32", "sensitive_enough"]

FLOOR = {"fp32": 1e-4, "tf32": 5e-3, "fp16": 1e-2, "bf16": 5e-2}
ERR_FACTOR = 3.0
FP32_TIGHT = 2e-5
FP32_FACTOR = 4.0
SENSITIVITY_MARGIN = 3.0


@dataclass(frozen=True)
class GateResult:
    ok: bool
    err: float
    limit: float

    @property
    def reason(self) -> str:
        """Why the output was rejected ('' when it passed)."""
        if self.ok:
            return ""
        return f"output differs from eager: rel err {self.err:.3g} > limit {self.limit:.3g}"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; ``inf`` if shapes differ or ``out`` is not finite."""
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(ref.shape):
        return math.inf
    o = out.detach().to(torch.float64)
    r = ref.detach().to(device=o.device, dtype=torch.float64)
    if not bool(torch.isfinite(o).all()):
        return math.inf
    denom = float(r.norm())
    diff = float((o - r).norm())
    return diff / denom if denom > 0 else (0.0 if diff == 0 else math.inf)


def check(out: torch.Tensor, ref: torch.Tensor, dtype: str, eager_err: float) -> GateResult:
    """Gate ``out`` (a provider's output in precision ``dtype``) against the fp32 ``ref``."""
    if dtype not in FLOOR:
        raise ValueError(f"dtype must be one of {tuple(FLOOR)}, got {dtype!r}")
    base = eager_err if math.isfinite(eager_err) else 0.0
    limit = max(FLOOR[dtype], ERR_FACTOR * base)
    err = rel_err(out, ref)
    return GateResult(err <= limit, err, limit)


def check_fp32(out: torch.Tensor, ref: torch.Tensor, eager_fp32_err: float = 0.0) -> GateResult:
    """The tight fp32 gate: ``rel_err(out, ref) <= max(FP32_TIGHT, FP32_FACTOR * eager_fp32_err)``."""
    base = eager_fp32_err if math.isfinite(eager_fp32_err) else 0.0
    limit = max(FP32_TIGHT, FP32_FACTOR * base)
    err = rel_err(out, ref)
    return GateResult(err <= limit, err, limit)


def sensitive_enough(sensitivity: float, limit: float, margin: float = SENSITIVITY_MARGIN) -> bool:
    """Whether an unrelated input moving the output by ``sensitivity`` (relative) makes a check with
    ``limit`` evidence: ``sensitivity >= margin * limit`` (NaN never is)."""
    return sensitivity >= margin * limit
