"""Derivatives of the fused ops' elementwise functions, one Triton helper for every backward kernel.

``activation_grad(u, ACT)`` is the derivative at float32 ``u`` of the function whose code
(:data:`effnet_kernels.ops._checks.ACT_CODES`) is the constexpr ``ACT``, with the conventions of
PyTorch's own backward, which :data:`effnet_kernels.reference.ACTIVATION_GRADS` writes down:
relu ``u > 0``; relu6 ``0 < u < 6``; hardswish 0 below -3, ``u / 3 + 1/2`` up to 3 (inclusive),
then 1; hardsigmoid 1/6 on the open interval (-3, 3); silu ``s (1 + u (1 - s))``; sigmoid
``s (1 - s)`` with ``s = sigmoid(u)``; identity 1. The other branches compile away
(one specialisation per activation, as :func:`._activation.activate`).
"""

from __future__ import annotations

import triton.language as tl

from ._activation import HARDSIGMOID, HARDSWISH, RELU, RELU6, SIGMOID, SILU
from ._jit import device_function


@device_function
def activation_grad(u, ACT: tl.constexpr):
    """d act(u) / du for float32 ``u`` (1 for code 0, identity)."""
    if ACT == SILU:
        s = 1.0 / (1.0 + tl.exp(-u))
        d = s * (1.0 + u * (1.0 - s))
    elif ACT == RELU:
        d = tl.where(u > 0.0, 1.0, 0.0)
    elif ACT == RELU6:
        d = tl.where((u > 0.0) & (u < 6.0), 1.0, 0.0)
    elif ACT == HARDSWISH:
        d = tl.where(u < -3.0, 0.0, tl.where(u <= 3.0, u / 3.0 + 0.5, 1.0))
    elif ACT == SIGMOID:
        s = 1.0 / (1.0 + tl.exp(-u))
        d = s * (1.0 - s)
    elif ACT == HARDSIGMOID:
        d = tl.where((u > -3.0) & (u < 3.0), 1.0 / 6.0, 0.0)
    else:
        d = tl.where(u == u, 1.0, 1.0)  # identity: ones of u's shape
    return d
