"""The launches EfficientNet B0-B7 make, and the bytes each must move.

A :class:`Workload` is one op call of a network layer (depthwise conv + BN + SiLU +
squeeze, SE gate, SE excite) at one batch, dtype and layout; identical calls of several
layers or networks are one workload with every user listed in ``used_by``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from effnet_kernels import models

DTYPES = ("fp16", "bf16", "fp32")
LAYOUTS = ("nhwc", "nchw")
BATCHES = (1, 256)
ELEMENT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class Workload:
    """One op call: ``op`` in {"dwconv_bn_act", "se_gate", "se_excite"}; sizes as the op sees them.

    dwconv_bn_act: x ``[n, c, h, w]`` -> y ``[n, c, ho, wo]`` (k x k, ``stride``, symmetric
    ``pad``) with the squeeze; se_gate: pooled ``[n, c]`` (fp32, the squeeze's output) through
    ``r`` hidden units with weights in ``dtype``; se_excite: y ``[n, c, h, w]`` times gate ``[n, c]`` (fp32).
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

    @property
    def shape_class(self) -> str:
        """``N,C,H,W,k,stride`` (se_gate: ``N,C,R``)."""
        if self.op == "se_gate":
            return f"{self.n},{self.c},R={self.r}"
        if self.op == "se_excite":
            return f"{self.n},{self.c},{self.h},{self.w}"
        return f"{self.n},{self.c},{self.h},{self.w},k{self.k},s{self.stride}"

    def compulsory_bytes(self) -> int:
        """Bytes the op cannot avoid moving through DRAM: read each input once, write each output once.

        dwconv: s·N·C·H·W (x) + s·N·C·Ho·Wo (y) + 4·C·k² (fp32 weights) + 8·C (scale, shift) + 4·N·C
        (squeeze); se_gate: 4·N·C (pooled) + 4·N·C (gate) + s_w·(2·C·R + C + R) (weights, biases);
        se_excite: 2·s·N·C·H·W + 4·N·C. s = bytes per element of ``dtype``.
        """
        s = ELEMENT_BYTES[self.dtype]
        n, c = self.n, self.c
        if self.op == "dwconv_bn_act":
            return s * n * c * (self.h * self.w + self.ho * self.wo) + 4 * c * self.k ** 2 + 8 * c + 4 * n * c
        if self.op == "se_gate":
            return 8 * n * c + s * (2 * c * self.r + c + self.r)
        if self.op == "se_excite":
            return 2 * s * n * c * self.h * self.w + 4 * n * c
        raise ValueError(f"unknown op {self.op!r}")


def network_workloads(names: Sequence[str] = models.MODEL_NAMES, batches: Iterable[int] = BATCHES,
                      dtypes: Iterable[str] = DTYPES, layouts: Iterable[str] = LAYOUTS) -> list[Workload]:
    """Every distinct op call of the MBConv blocks of ``names`` at their native resolution, deduplicated."""
    seen: dict[Workload, list[str]] = {}
    for name in names:
        for batch in batches:
            for layer in models.layer_shapes(name, batch=batch):
                for dtype in dtypes:
                    for layout in layouts:
                        n, c = batch, layer.mid_channels
                        calls = [Workload("dwconv_bn_act", n, c, layer.H, layer.W, layer.Ho, layer.Wo, layer.kernel,
                                          layer.stride, layer.padding, dtype=dtype, layout=layout)]
                        if layer.se_reduced:
                            calls.append(Workload("se_gate", n, c, r=layer.se_reduced, dtype=dtype, layout="-"))
                            calls.append(Workload("se_excite", n, c, layer.Ho, layer.Wo, layer.Ho, layer.Wo,
                                                  dtype=dtype, layout=layout))
                        for wl in calls:
                            users = seen.setdefault(wl, [])
                            if name not in users:
                                users.append(name)
    return [Workload(**{**wl.__dict__, "used_by": tuple(users)}) for wl, users in seen.items()]


def quick_workloads() -> list[Workload]:
    """A small subset for tests: B0's 144-channel k5/s2 and 672-channel k5 layers, fp16, batch 1 and 256, both layouts."""
    keep = {(144, 5, 2), (672, 5, 2)}
    return [wl for wl in network_workloads(("b0",), dtypes=("fp16",))
            if (wl.c, wl.k, wl.stride) in keep or (wl.op != "dwconv_bn_act" and wl.c in (144,))]
