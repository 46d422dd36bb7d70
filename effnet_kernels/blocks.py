"""Plain eager PyTorch EfficientNet building blocks: the unfused baseline.

These modules are what the fused kernels are compared against, and what
:class:`effnet_kernels.nn.MBConv` wraps when built standalone. Submodule names are part
of the contract (conversion code and ``state_dict`` keys rely on them).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

Tensor = torch.Tensor

__all__ = ["ConvBNAct", "SqueezeExcite", "MBConvBlock", "drop_path", "se_reduced_channels"]


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_rate(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a float in [0, 1], got {value!r}")
    return float(value)


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Per-sample stochastic depth ("row" mode, like torchvision's ``StochasticDepth``).

    In training with ``p > 0`` each sample of the batch is kept with probability
    ``keep = 1 - p`` and the kept ones are scaled by ``1 / keep``; otherwise ``x`` is
    returned unchanged. ``p == 1`` drops every sample (all zeros, no division).
    """
    if not training or p == 0.0:
        return x
    keep = 1.0 - p
    mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
    mask.bernoulli_(keep)
    if keep > 0.0:
        mask.div_(keep)
    return x * mask


class ConvBNAct(nn.Sequential):
    """``conv -> BatchNorm -> activation`` (children ``conv``, ``bn``, ``act``): a network's stem and head.

    Args:
        in_channels, out_channels: channels.
        kernel_size: odd; padding ``kernel_size // 2``.
        stride: conv stride.
        bn_eps, bn_momentum: BatchNorm settings.
        activation: the activation module (default ``nn.SiLU()``).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 bn_eps: float = 1e-3, bn_momentum: float = 0.01, activation: Optional[nn.Module] = None) -> None:
        _check_positive_int(in_channels, "in_channels")
        _check_positive_int(out_channels, "out_channels")
        if _check_positive_int(kernel_size, "kernel_size") % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum)
        self.act = activation if activation is not None else nn.SiLU()


def se_reduced_channels(in_channels: int, se_ratio: Optional[float]) -> Optional[int]:
    """Squeeze width of an MBConv block's SE: ``max(1, int(in_channels * se_ratio))``.

    Measured from the *block input* channels (not the expanded ones), as in the
    TensorFlow reference and efficientnet_pytorch. ``None`` when ``se_ratio`` is None/0.
    """
    if not se_ratio:
        return None
    return max(1, int(in_channels * se_ratio))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: ``x * sigmoid(expand(silu(reduce(mean_hw(x)))))``.

    Args:
        channels: channels of ``x`` (the block's expanded width).
        reduced: width of the bottleneck between the two 1x1 convolutions.
    """

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        _check_positive_int(channels, "channels")
        _check_positive_int(reduced, "reduced")
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, bias=True)
        self.act = nn.SiLU()
        self.conv_expand = nn.Conv2d(reduced, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.conv_expand(self.act(self.conv_reduce(s)))
        return x * torch.sigmoid(s)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck block (MBConv) with optional SE and stochastic depth.

    ``expand 1x1 -> BN -> SiLU`` (if ``expand_ratio != 1``), ``depthwise kxk -> BN -> SiLU``,
    ``SE`` (if ``se_ratio``), ``project 1x1 -> BN``, then ``+ x`` through stochastic depth
    when ``stride == 1`` and ``in_channels == out_channels``.

    Args:
        in_channels: block input channels.
        out_channels: block output channels.
        kernel_size: depthwise kernel size (odd).
        stride: depthwise stride.
        expand_ratio: expanded width is ``in_channels * expand_ratio``.
        se_ratio: SE squeeze width is ``max(1, int(in_channels * se_ratio))``; None/0: no SE.
        drop_path_rate: stochastic depth probability (training only, residual blocks only).
        bn_eps: BatchNorm epsilon (1e-3 like the TensorFlow reference).
        bn_momentum: BatchNorm momentum in PyTorch convention (0.01 = TF's 0.99).
        padding: symmetric depthwise padding; default ``kernel_size // 2``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
        se_ratio: Optional[float] = 0.25,
        drop_path_rate: float = 0.0,
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
        padding: Optional[int] = None,
    ) -> None:
        super().__init__()
        _check_positive_int(in_channels, "in_channels")
        _check_positive_int(out_channels, "out_channels")
        _check_positive_int(kernel_size, "kernel_size")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        _check_positive_int(stride, "stride")
        _check_positive_int(expand_ratio, "expand_ratio")
        if se_ratio is not None and not 0.0 <= se_ratio <= 1.0:
            raise ValueError(f"se_ratio must be None or a float in [0, 1], got {se_ratio!r}")
        if padding is None:
            padding = kernel_size // 2
        elif isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be None or a non-negative int, got {padding!r}")

        mid = in_channels * expand_ratio
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.has_residual = stride == 1 and in_channels == out_channels
        if self.has_residual and padding != kernel_size // 2:
            raise ValueError(
                f"padding must be kernel_size // 2 = {kernel_size // 2} for a residual block "
                f"(stride 1, in_channels == out_channels), got {padding}"
            )
        self.drop_path_rate = _check_rate(drop_path_rate, "drop_path_rate")

        def bn(c: int) -> nn.BatchNorm2d:
            return nn.BatchNorm2d(c, eps=bn_eps, momentum=bn_momentum)

        if expand_ratio != 1:
            self.expand_conv = nn.Conv2d(in_channels, mid, 1, bias=False)
            self.expand_bn = bn(mid)
            self.expand_act = nn.SiLU()
        self.dw_conv = nn.Conv2d(mid, mid, kernel_size, stride=stride, padding=padding, groups=mid, bias=False)
        self.dw_bn = bn(mid)
        self.dw_act = nn.SiLU()
        reduced = se_reduced_channels(in_channels, se_ratio)
        if reduced is not None:
            self.se = SqueezeExcite(mid, reduced)
        self.project_conv = nn.Conv2d(mid, out_channels, 1, bias=False)
        self.project_bn = bn(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        if hasattr(self, "expand_conv"):
            x = self.expand_act(self.expand_bn(self.expand_conv(x)))
        x = self.dw_act(self.dw_bn(self.dw_conv(x)))
        if hasattr(self, "se"):
            x = self.se(x)
        x = self.project_bn(self.project_conv(x))
        if self.has_residual:
            x = drop_path(x, self.drop_path_rate, self.training) + shortcut
        return x

    def extra_repr(self) -> str:
        return f"has_residual={self.has_residual}, drop_path_rate={self.drop_path_rate}"
