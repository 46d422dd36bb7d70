"""The elementwise functions of the fused ops, one Triton helper for every kernel.

``activate(u, ACT)`` applies the function whose code (``effnet_kernels.ops._checks.ACT_CODES``)
is the constexpr ``ACT``; the other branches are removed at compile time, so each
activation is its own specialisation of the kernel that calls it (no copied kernels).
Definitions are PyTorch's, in float32: ``hardswish(u) = u * relu6(u + 3) / 6``,
``hardsigmoid(u) = relu6(u + 3) / 6``. The clamps are written with ``tl.where`` so that a NaN
stays NaN, as in PyTorch.
"""

from __future__ import annotations

import triton.language as tl

from ..ops._checks import ACT_CODES
from ._jit import device_function

SILU = tl.constexpr(ACT_CODES["silu"])
RELU = tl.constexpr(ACT_CODES["relu"])
RELU6 = tl.constexpr(ACT_CODES["relu6"])
HARDSWISH = tl.constexpr(ACT_CODES["hardswish"])
SIGMOID = tl.constexpr(ACT_CODES["sigmoid"])
HARDSIGMOID = tl.constexpr(ACT_CODES["hardsigmoid"])


@device_function
def relu6(u):
    """min(max(u, 0), 6), NaN-preserving."""
    return tl.where(u < 0.0, 0.0, tl.where(u > 6.0, 6.0, u))


@device_function
def activate(u, ACT: tl.constexpr):
    """The function with code ``ACT`` of float32 ``u`` (identity for code 0)."""
    if ACT == SILU:
        u = u / (1.0 + tl.exp(-u))
    elif ACT == RELU:
        u = tl.where(u < 0.0, 0.0, u)
    elif ACT == RELU6:
        u = relu6(u)
    elif ACT == HARDSWISH:
        u = u * relu6(u + 3.0) / 6.0
    elif ACT == SIGMOID:
        u = 1.0 / (1.0 + tl.exp(-u))
    elif ACT == HARDSIGMOID:
        u = relu6(u + 3.0) / 6.0
    return u
