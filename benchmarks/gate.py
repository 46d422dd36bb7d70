"""The correctness gate: a provider's output must match eager PyTorch before it is timed.

The reference is eager PyTorch in fp32 with TF32 off (NCHW). A provider running in
precision ``dtype`` passes when its relative error ``||out - ref|| / ||ref||`` is at most
``max(FLOOR[dtype], ERR_FACTOR * eager_err)``, where ``eager_err`` is eager PyTorch's own
error in that precision (channels_last) against the same reference. NaN or Inf never pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["FLOOR", "ERR_FACTOR", "GateResult", "rel_err", "check"]

FLOOR = {"fp32": 1e-4, "tf32": 5e-3, "fp16": 1e-2, "bf16": 5e-2}
ERR_FACTOR = 3.0


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
