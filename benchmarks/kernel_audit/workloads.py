"""The launches EfficientNet B0-B7 make, and the bytes each must move.

A :class:`Workload` is one op call of a network layer (depthwise conv + BN + SiLU +
squeeze, SE gate, SE excite, the 1x1 convs, the stem's dense conv + BN + SiLU) at one batch,
dtype and layout; identical calls of several layers or networks are one workload with every
user listed in ``used_by``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from effnet_kernels import models

DTYPES = ("fp16", "bf16", "fp32")
LAYOUTS = ("nhwc", "nchw")
BATCHES = (1, 256)
ELEMENT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
#: The ops audited (``--ops`` chooses among them).
OPS = ("dwconv_bn_act", "se_gate", "se_excite", "pointwise_conv", "conv_bn_act")


@dataclass(frozen=True)
class Workload:
    """One op call: ``op`` in {"dwconv_bn_act", "se_gate", "se_excite", "pointwise_conv", "conv_bn_act"}; sizes as
    the op sees them.

    dwconv_bn_act: x ``[n, c, h, w]`` -> y ``[n, c, ho, wo]`` (k x k, ``stride``, symmetric
    ``pad``) with the squeeze; se_gate: pooled ``[n, c]`` (fp32, the squeeze's output) through
    ``r`` hidden units with weights in ``dtype``; se_excite: y ``[n, c, h, w]`` times gate ``[n, c]`` (fp32);
    pointwise_conv: x ``[n, c, h, w]`` (c = K) through a ``[cout, c]`` weight in ``dtype`` + fp32 bias, with the
    fp32 SE ``gate`` on the input, the ``residual`` added or the spatial mean taken (``pool``); conv_bn_act
    (the stem): x ``[n, c, h, w]`` (c = Cin = 3) through a dense ``[cout, c, k, k]`` weight in ``dtype``
    (``stride``, symmetric ``pad``) + fp32 bias (the folded BN) + ``activation`` -> y ``[n, cout, ho, wo]``.
    """

    op: str
    n: int
    c: int
    h: int = 1
    w: int = 1
    ho: int = 1
    wo: int = 1
    k: int = 0
    stride: int = 1
    pad: int = 0
    r: int = 0
    dtype: str = "fp16"
    layout: str = "nhwc"
    used_by: tuple[str, ...] = field(default=(), compare=False)
    # pointwise_conv only: output channels, the fused parts, the activation (bias is always there: the folded BN)
    cout: int = 0
    gate: bool = False
    residual: bool = False
    pool: bool = False
    activation: str = ""

    @property
    def shape_class(self) -> str:
        """``N,C,H,W,k,stride`` (se_gate: ``N,C,R``; the training ops as the eval op they belong to)."""
        if self.op.startswith("se_gate"):
            return f"{self.n},{self.c},R={self.r}"
        if self.op.startswith("se_excite"):
            return f"{self.n},{self.c},{self.h},{self.w}"
        if self.op.startswith(("pointwise_conv", "expand_bn_act")):
            parts = [p for p, on in (("gate", self.gate), ("res", self.residual), ("pool", self.pool)) if on]
            return ",".join([f"{self.n},{self.c}->{self.cout},{self.h},{self.w}", self.activation, *parts])
        if self.op == "conv_bn_act":
            return f"{self.n},{self.c}->{self.cout},{self.h},{self.w},k{self.k},s{self.stride},{self.activation}"
        return f"{self.n},{self.c},{self.h},{self.w},k{self.k},s{self.stride}"

    def compulsory_bytes(self) -> int:
        """Bytes the op cannot avoid moving through DRAM: read each input once, write each output once.

        dwconv: s·N·C·H·W (x) + s·N·C·Ho·Wo (y) + 4·C·k² (fp32 weights) + 8·C (scale, shift) + 4·N·C
        (squeeze); se_gate: 4·N·C (pooled) + 4·N·C (gate) + s_w·(2·C·R + C + R) (weights, biases);
        se_excite: 2·s·N·C·H·W + 4·N·C; pointwise_conv: s·N·C·H·W (x) + s·N·Cout·H·W (out; 4·N·Cout pooled)
        + s·Cout·C (weight) + 4·Cout (bias) [+ 4·N·C gate] [+ s·N·Cout·H·W residual]; conv_bn_act:
        s·N·C·H·W (x) + s·N·Cout·Ho·Wo (y) + s·Cout·C·k² (weight) + 4·Cout (bias), the kernel module's
        ``compulsory_bytes``. s = bytes per element of ``dtype``.
        """
        s = ELEMENT_BYTES[self.dtype]
        n, c = self.n, self.c
        if self.op == "dwconv_bn_act":
            return s * n * c * (self.h * self.w + self.ho * self.wo) + 4 * c * self.k ** 2 + 8 * c + 4 * n * c
        if self.op == "se_gate":
            return 8 * n * c + s * (2 * c * self.r + c + self.r)
        if self.op == "se_excite":
            return 2 * s * n * c * self.h * self.w + 4 * n * c
        if self.op == "pointwise_conv":
            m = n * self.h * self.w
            out = 4 * n * self.cout if self.pool else s * m * self.cout
            return (s * m * c + out + s * self.cout * c + 4 * self.cout + (4 * n * c if self.gate else 0)
                    + (s * m * self.cout if self.residual else 0))
        if self.op == "conv_bn_act":  # the kernel module's formula (imported here: it needs triton)
            from effnet_kernels.triton import conv as triton_conv

            return triton_conv.compulsory_bytes(n, c, self.h, self.w, self.cout, self.ho, self.wo, self.k, s)
        from . import train_workloads  # the training ops (that module builds on this one)

        if self.op in train_workloads.TRAIN_OPS:
            return train_workloads.compulsory_bytes(self)
        raise ValueError(f"unknown op {self.op!r}")


def network_workloads(names: Sequence[str] = models.MODEL_NAMES, batches: Iterable[int] = BATCHES,
                      dtypes: Iterable[str] = DTYPES, layouts: Iterable[str] = LAYOUTS) -> list[Workload]:
    """Every distinct op call of the MBConv blocks of ``names`` at their native resolution, deduplicated:
    the depthwise step, the SE gate and excite, and the 1x1 convs (pointwise_conv: each block's expand
    (bias + SiLU) and projection (bias, the SE gate on its input, the residual where the block has one),
    and the network's head (bias + SiLU + the global average pool)), and the network's stem (conv_bn_act:
    3 -> Cout dense 3x3 stride-2 conv + folded BN + SiLU on the input image)."""
    seen: dict[Workload, list[str]] = {}
    for name in names:
        for batch in batches:
            layers = models.layer_shapes(name, batch=batch)
            for dtype in dtypes:
                for layout in layouts:
                    wl = stem_workload(name, batch, dtype, layout)
                    users = seen.setdefault(wl, [])
                    if name not in users:
                        users.append(name)
            for layer in layers:
                for dtype in dtypes:
                    for layout in layouts:
                        n, c = batch, layer.mid_channels
                        calls = [Workload("dwconv_bn_act", n, c, layer.H, layer.W, layer.Ho, layer.Wo, layer.kernel,
                                          layer.stride, layer.padding, dtype=dtype, layout=layout)]
                        if layer.se_reduced:
                            calls.append(Workload("se_gate", n, c, r=layer.se_reduced, dtype=dtype, layout="-"))
                            calls.append(Workload("se_excite", n, c, layer.Ho, layer.Wo, layer.Ho, layer.Wo,
                                                  dtype=dtype, layout=layout))
                        calls += pointwise_workloads(layer, dtype, layout)
                        if layer is layers[-1]:
                            calls.append(head_workload(name, layer, dtype, layout))
                        for wl in calls:
                            users = seen.setdefault(wl, [])
                            if name not in users:
                                users.append(name)
    return [Workload(**{**wl.__dict__, "used_by": tuple(users)}) for wl, users in seen.items()]


def pointwise_workloads(layer: models.LayerShape, dtype: str, layout: str) -> list[Workload]:
    """The 1x1 convs of one MBConv block: the expand (when the block has one) and the projection."""
    n = layer.batch
    out = []
    if layer.expand_ratio != 1:
        out.append(Workload("pointwise_conv", n, layer.in_channels, layer.H, layer.W, layer.H, layer.W, k=1,
                            dtype=dtype, layout=layout, cout=layer.mid_channels, activation="silu"))
    out.append(Workload("pointwise_conv", n, layer.mid_channels, layer.Ho, layer.Wo, layer.Ho, layer.Wo, k=1,
                        dtype=dtype, layout=layout, cout=layer.out_channels, gate=bool(layer.se_reduced),
                        residual=layer.has_residual, activation="identity"))
    return out


def head_channels(name: str) -> int:
    """Output channels of EfficientNet-``name``'s head conv (1280 scaled by the width coefficient)."""
    return models.round_filters(models.HEAD_CHANNELS, models.PARAMS[name][0])


def head_workload(name: str, last: models.LayerShape, dtype: str, layout: str) -> Workload:
    """The head conv after the last block, with the global average pool fused (its output is never stored)."""
    return Workload("pointwise_conv", last.batch, last.out_channels, last.Ho, last.Wo, last.Ho, last.Wo, k=1,
                    dtype=dtype, layout=layout, cout=head_channels(name), pool=True, activation="silu")


@functools.lru_cache(maxsize=None)
def stem_conv(name: str) -> tuple[int, int, int, int, int]:
    """``(Cin, Cout, k, stride, padding)`` of EfficientNet-``name``'s stem conv, read off the model built on meta."""
    with torch.device("meta"):
        conv = models.efficientnet(name).stem.conv
    return conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0]


def stem_workload(name: str, batch: int, dtype: str, layout: str) -> Workload:
    """The stem of EfficientNet-``name`` on its ``3 x R x R`` input at the native resolution R."""
    cin, cout, k, stride, pad = stem_conv(name)
    r = models.native_resolution(name)
    ro = (r + 2 * pad - k) // stride + 1
    return Workload("conv_bn_act", batch, cin, r, r, ro, ro, k, stride, pad, dtype=dtype, layout=layout, cout=cout,
                    activation="silu")


def quick_workloads() -> list[Workload]:
    """A small subset for tests: B0's 144-channel k5/s2 and 672-channel k5 layers, fp16, batch 256, both
    layouts; of the 1x1 convs, the 24 -> 144 expand and the 144 -> 40 gated projection around the first; the stem."""
    keep = {(144, 5, 2), (672, 5, 2)}
    return [wl for wl in network_workloads(("b0",), batches=(256,), dtypes=("fp16",))
            if (wl.c, wl.k, wl.stride) in keep or (wl.op in ("se_gate", "se_excite") and wl.c in (144,))
            or (wl.op == "pointwise_conv" and (wl.c, wl.cout) in ((24, 144), (144, 40))) or wl.op == "conv_bn_act"]
