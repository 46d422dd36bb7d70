"""EfficientNet B0-B7 in plain eager PyTorch, built by compound scaling of B0's block args.

The structure (channel rounding, repeats, SE widths, BN eps 1e-3 / momentum 0.01,
stochastic depth schedule) follows the TensorFlow reference as efficientnet_pytorch
implements it, so parameter counts match ``EfficientNet.from_name('efficientnet-bN')``.
Depthwise padding is symmetric ``k // 2`` (like torchvision), not TF "same".

:func:`layer_shapes` lists every MBConv block's channels and spatial sizes at a given
resolution; GPU parity tests and microbenchmarks iterate over it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Optional

import torch
from torch import nn

from .blocks import ConvBNAct, MBConvBlock

Tensor = torch.Tensor

__all__ = [
    "BLOCK_ARGS",
    "PARAMS",
    "MODEL_NAMES",
    "BlockArgs",
    "BlockConfig",
    "EfficientNet",
    "LayerShape",
    "block_configs",
    "depthwise_shapes",
    "efficientnet",
    "init_weights",
    "layer_shapes",
    "native_resolution",
    "round_filters",
    "round_repeats",
]

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # PyTorch convention; TF's 0.99
DROP_PATH_RATE = 0.2  # efficientnet_pytorch's drop_connect_rate
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


class BlockArgs(NamedTuple):
    """One B0 stage: ``repeats`` MBConv blocks; only the first has ``stride`` and ``in_channels``."""

    kernel: int
    repeats: int
    in_channels: int
    out_channels: int
    expand_ratio: int
    stride: int
    se_ratio: float


#: The seven stages of EfficientNet-B0.
BLOCK_ARGS: tuple[BlockArgs, ...] = (
    BlockArgs(3, 1, 32, 16, 1, 1, 0.25),
    BlockArgs(3, 2, 16, 24, 6, 2, 0.25),
    BlockArgs(5, 2, 24, 40, 6, 2, 0.25),
    BlockArgs(3, 3, 40, 80, 6, 2, 0.25),
    BlockArgs(5, 3, 80, 112, 6, 1, 0.25),
    BlockArgs(5, 4, 112, 192, 6, 2, 0.25),
    BlockArgs(3, 1, 192, 320, 6, 1, 0.25),
)

#: name -> (width coefficient, depth coefficient, native resolution, dropout rate)
PARAMS: dict[str, tuple[float, float, int, float]] = {
    "b0": (1.0, 1.0, 224, 0.2),
    "b1": (1.0, 1.1, 240, 0.2),
    "b2": (1.1, 1.2, 260, 0.3),
    "b3": (1.2, 1.4, 300, 0.3),
    "b4": (1.4, 1.8, 380, 0.4),
    "b5": (1.6, 2.2, 456, 0.4),
    "b6": (1.8, 2.6, 528, 0.5),
    "b7": (2.0, 3.1, 600, 0.5),
}

MODEL_NAMES: tuple[str, ...] = tuple(PARAMS)


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """Scale ``channels`` by ``width`` and round to a multiple of ``divisor`` (never below 90%)."""
    scaled = channels * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    """Scale a stage's block count by ``depth``, rounding up."""
    return int(math.ceil(depth * repeats))


def _check_name(name: object) -> str:
    if name not in PARAMS:
        raise ValueError(f"name must be one of {', '.join(MODEL_NAMES)}, got {name!r}")
    return name  # type: ignore[return-value]


def native_resolution(name: str) -> int:
    """The input size (square) EfficientNet-``name`` was designed for, e.g. 224 for ``"b0"``."""
    return PARAMS[_check_name(name)][2]


class BlockConfig(NamedTuple):
    """Constructor arguments of one MBConv block of a scaled network."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    expand_ratio: int
    se_ratio: float
    drop_path_rate: float


def block_configs(name: str) -> list[BlockConfig]:
    """The MBConv blocks of EfficientNet-``name``, in order, after width and depth scaling.

    Stochastic depth grows linearly with the block index: ``0.2 * i / num_blocks``
    (efficientnet_pytorch's ``drop_connect_rate`` schedule).
    """
    width, depth, _, _ = PARAMS[_check_name(name)]
    plain = []
    for stage in BLOCK_ARGS:
        cin = round_filters(stage.in_channels, width)
        cout = round_filters(stage.out_channels, width)
        for r in range(round_repeats(stage.repeats, depth)):
            first = r == 0
            plain.append((cin if first else cout, cout, stage.kernel, stage.stride if first else 1,
                          stage.expand_ratio, stage.se_ratio))
    n = len(plain)
    return [BlockConfig(*args, drop_path_rate=DROP_PATH_RATE * i / n) for i, args in enumerate(plain)]


class EfficientNet(nn.Module):
    """EfficientNet: stem, MBConv blocks, head, global average pool, dropout, classifier.

    Children ``stem`` and ``head`` (:class:`~effnet_kernels.blocks.ConvBNAct`: conv, BN, SiLU),
    ``blocks``, ``pool``, ``dropout``, ``classifier``.

    Build it with :func:`efficientnet`. Attributes ``name`` (``"b0"``..``"b7"``) and
    ``resolution`` (native input size) describe the variant.
    """

    def __init__(self, name: str, num_classes: int = 1000) -> None:
        super().__init__()
        width, _, resolution, dropout = PARAMS[_check_name(name)]
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.name = name
        self.resolution = resolution

        self.stem = ConvBNAct(3, round_filters(STEM_CHANNELS, width), 3, stride=2, bn_eps=BN_EPS, bn_momentum=BN_MOMENTUM)

        configs = block_configs(name)
        self.blocks = nn.Sequential(
            *(MBConvBlock(**cfg._asdict(), bn_eps=BN_EPS, bn_momentum=BN_MOMENTUM) for cfg in configs)
        )

        head = round_filters(HEAD_CHANNELS, width)
        self.head = ConvBNAct(configs[-1].out_channels, head, 1, bn_eps=BN_EPS, bn_momentum=BN_MOMENTUM)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head, num_classes)
        init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """Stem, blocks and head: the [N, head_channels, H/32, W/32] feature map."""
        return self.head(self.blocks(self.stem(x)))

    def forward(self, x: Tensor) -> Tensor:
        pooled_head = getattr(self.head, "forward_pooled", None)  # a converted head: conv + BN + SiLU + pool in one op
        if pooled_head is not None and _is_global_avg_pool(self.pool):
            x = pooled_head(self.blocks(self.stem(x)))
        else:
            x = self.pool(self.forward_features(x)).flatten(1)
        return self.classifier(self.dropout(x))


def _is_global_avg_pool(pool: nn.Module) -> bool:
    """``nn.AdaptiveAvgPool2d(1)`` (what a converted head may compute with its conv)."""
    return type(pool) is nn.AdaptiveAvgPool2d and pool.output_size in (1, (1, 1))


def init_weights(model: nn.Module) -> None:
    """torchvision's EfficientNet initialisation, in place.

    Convs: kaiming normal (fan_out), zero bias; BatchNorm: ones / zeros;
    Linear: uniform(+-1/sqrt(out_features)), zero bias. Meta tensors are skipped
    (nothing to initialise, and random fills on meta are slow).
    """
    for m in model.modules():
        if getattr(m, "weight", None) is not None and m.weight.is_meta:
            continue
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.out_features)
            nn.init.uniform_(m.weight, -bound, bound)
            nn.init.zeros_(m.bias)


def efficientnet(name: str, num_classes: int = 1000) -> EfficientNet:
    """Build EfficientNet-``name`` (``"b0"``..``"b7"``), randomly initialised, in training mode."""
    return EfficientNet(name, num_classes=num_classes)


@dataclass(frozen=True)
class LayerShape:
    """One MBConv block of a network at a given input size.

    ``H, W`` are the block's input spatial size, ``Ho, Wo`` its output (the depthwise
    conv's output); ``mid_channels`` is the expanded width the depthwise conv runs on;
    ``se_reduced`` the SE squeeze width (None without SE); ``padding`` the symmetric
    depthwise padding.
    """

    index: int
    batch: int
    in_channels: int
    out_channels: int
    mid_channels: int
    kernel: int
    stride: int
    padding: int
    expand_ratio: int
    se_reduced: Optional[int]
    has_residual: bool
    H: int
    W: int
    Ho: int
    Wo: int

    @property
    def depthwise(self) -> tuple[int, int, int, int, int]:
        """The depthwise layer's shape class ``(C, H, W, k, stride)``."""
        return (self.mid_channels, self.H, self.W, self.kernel, self.stride)


def _conv_out(size: int, conv: nn.Conv2d, dim: int) -> int:
    k, s, p = conv.kernel_size[dim], conv.stride[dim], conv.padding[dim]
    return (size + 2 * p - k) // s + 1


def layer_shapes(name: str, batch: int = 1, resolution: Optional[int] = None) -> list[LayerShape]:
    """Every MBConv block of EfficientNet-``name`` at ``resolution`` (default: native).

    Read off the model itself, built on the meta device (no memory, no init cost), so
    it cannot drift from what :func:`efficientnet` builds.
    """
    _check_name(name)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch must be a non-negative int, got {batch!r}")
    if resolution is None:
        resolution = native_resolution(name)
    elif isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be None or a positive int, got {resolution!r}")
    with torch.device("meta"):
        model = EfficientNet(name)
    h = _conv_out(resolution, model.stem.conv, 0)
    w = _conv_out(resolution, model.stem.conv, 1)
    shapes = []
    for i, block in enumerate(model.blocks):
        dw = block.dw_conv
        ho, wo = _conv_out(h, dw, 0), _conv_out(w, dw, 1)
        se = getattr(block, "se", None)
        shapes.append(LayerShape(
            index=i,
            batch=batch,
            in_channels=block.in_channels,
            out_channels=block.out_channels,
            mid_channels=dw.in_channels,
            kernel=dw.kernel_size[0],
            stride=dw.stride[0],
            padding=dw.padding[0],
            expand_ratio=dw.in_channels // block.in_channels,
            se_reduced=se.conv_reduce.out_channels if se is not None else None,
            has_residual=block.has_residual,
            H=h, W=w, Ho=ho, Wo=wo,
        ))
        h, w = ho, wo
    return shapes


def depthwise_shapes(names: Iterable[str] = MODEL_NAMES) -> list[tuple[int, int, int, int, int]]:
    """Sorted distinct depthwise shape classes ``(C, H, W, k, stride)`` over ``names`` at native size."""
    return sorted({s.depthwise for name in names for s in layer_shapes(name)})
