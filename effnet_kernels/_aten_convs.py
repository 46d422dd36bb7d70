"""``pointwise_conv`` and ``conv_bn_act`` as aten ops in the input's dtype: the ``cuda`` backend's
implementation of the two (no CUDA C++ GEMM or dense conv is written).

``pointwise_conv``: cuDNN's 1x1 convolution with the folded BatchNorm's shift as its bias, then the activation,
the residual add (or the spatial mean) as separate aten ops, and the SE gate as the excite
op before the conv: how converted blocks ran their 1x1 convs before the fused GEMM, up to four
kernels. No CUDA C++ GEMM is written: cuDNN / cuBLAS is the one to beat, and
``backend="auto"`` takes this or the Triton GEMM per shape class as the committed auto table
says once both are measured (until then, this: :data:`effnet_kernels.backends.AUTO_ORDER`).

Rounding is eager PyTorch's (the conv's output, then each op's, in x's dtype), not the
fused kernels' single rounding: the parity rule's "plain PyTorch" itself.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .ops._checks import accumulation_dtype, memory_format_of
from .reference import ACTIVATION_FNS

Tensor = torch.Tensor


def pointwise_conv(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Optional[Tensor], residual: Optional[Tensor],
    activation: str, pool: bool, excite: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
) -> Tensor:
    """``reference.pointwise_conv``'s result computed as eager PyTorch would, in x's dtype.

    ``excite(y, gate)`` applies the gate (default: ``y * gate`` in aten; the cuda backend passes
    its own excite kernel).
    """
    if gate is not None:
        x = excite(x, gate) if excite is not None else (x * gate.to(x.dtype)[:, :, None, None])
    w = weight.to(x.dtype)[:, :, None, None]
    y = F.conv2d(x, w, bias.to(x.dtype) if bias is not None else None)
    y = ACTIVATION_FNS[activation](y)
    if pool:
        if y.shape[2] * y.shape[3] == 0:
            return y.new_zeros(y.shape[:2], dtype=accumulation_dtype(y))
        return y.mean(dim=(2, 3), dtype=accumulation_dtype(y))
    if residual is not None:
        y = y + residual
    return y.contiguous(memory_format=memory_format_of(x))


def conv_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                activation: str) -> Tensor:
    """``reference.conv_bn_act``'s result as eager PyTorch computes it: cuDNN's conv with the folded
    bias, then the activation, in x's dtype."""
    xp = F.pad(x, tuple(padding)) if any(padding) else x
    y = F.conv2d(xp, weight.to(x.dtype), bias.to(x.dtype) if bias is not None else None, stride=tuple(stride))
    return ACTIVATION_FNS[activation](y).contiguous(memory_format=memory_format_of(x))

