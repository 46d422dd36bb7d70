"""The training launches of EfficientNet B0-B7's MBConv blocks, and the bytes each must move.

One :class:`~.workloads.Workload` per distinct call of the Triton training launchers a converted
block's training step makes beside the eval kernels (whose launches the eval audit covers: the
forward's 1x1 GEMMs and the depthwise apply pass): the depthwise step's train-mode forward (batch
statistics) and its backward through them, the expand conv's BatchNorm + activation backward from
the conv's input, the projection's backward GEMMs (the SE gate on its input), and the SE gate's and
excite's backward. By default at the training target (issue #11): batch 128, fp16 and bf16, NHWC
(channels_last).
"""

from __future__ import annotations

from typing import Iterable, Sequence

from effnet_kernels import models

from .workloads import ELEMENT_BYTES, Workload

#: The training ops audited (``python -m benchmarks.kernel_audit --train``).
TRAIN_OPS = ("dwconv_bn_act_train", "dwconv_bn_act_train_backward", "expand_bn_act_train_backward",
             "pointwise_conv_backward", "se_gate_backward", "se_excite_backward")
TRAIN_BATCHES = (128,)
TRAIN_DTYPES = ("fp16", "bf16")
TRAIN_LAYOUTS = ("nhwc",)


def training_workloads(names: Sequence[str] = models.MODEL_NAMES, batches: Iterable[int] = TRAIN_BATCHES,
                       dtypes: Iterable[str] = TRAIN_DTYPES, layouts: Iterable[str] = TRAIN_LAYOUTS) -> list[Workload]:
    """Every distinct training call of the MBConv blocks of ``names`` at their native resolution, deduplicated
    (``used_by`` lists the networks)."""
    seen: dict[Workload, list[str]] = {}
    for name in names:
        for batch in batches:
            for layer in models.layer_shapes(name, batch=batch):
                for dtype in dtypes:
                    for layout in layouts:
                        for wl in block_training_calls(layer, dtype, layout):
                            users = seen.setdefault(wl, [])
                            if name not in users:
                                users.append(name)
    return [Workload(**{**wl.__dict__, "used_by": tuple(users)}) for wl, users in seen.items()]


def quick_training_workloads() -> list[Workload]:
    """A small subset for tests: B0's first 144-channel block (24 -> 144 expand, k3 stride 1, SE, residual)
    at batch 8, fp16: every training op once."""
    layer = next(s for s in models.layer_shapes("b0", batch=8) if s.mid_channels == 144 and s.stride == 1)
    return [Workload(**{**wl.__dict__, "used_by": ("b0",)}) for wl in block_training_calls(layer, "fp16", "nhwc")]


def block_training_calls(layer: models.LayerShape, dtype: str, layout: str) -> list[Workload]:
    """The training launcher calls of one block: depthwise forward and backward, the expand's backward
    (a block with an expand conv), the projection's backward GEMMs, the SE gate's and excite's backward."""
    n, c = layer.batch, layer.mid_channels
    dw = dict(n=n, c=c, h=layer.H, w=layer.W, ho=layer.Ho, wo=layer.Wo, k=layer.kernel, stride=layer.stride,
              pad=layer.padding, dtype=dtype, layout=layout)
    calls = [Workload("dwconv_bn_act_train", **dw), Workload("dwconv_bn_act_train_backward", **dw)]
    if layer.expand_ratio != 1:
        calls.append(Workload("expand_bn_act_train_backward", n, layer.in_channels, layer.H, layer.W, layer.H,
                              layer.W, k=1, dtype=dtype, layout=layout, cout=c, activation="silu"))
    calls.append(Workload("pointwise_conv_backward", n, c, layer.Ho, layer.Wo, layer.Ho, layer.Wo, k=1, dtype=dtype,
                          layout=layout, cout=layer.out_channels, gate=bool(layer.se_reduced),
                          residual=layer.has_residual, activation="identity"))
    if layer.se_reduced:
        calls.append(Workload("se_gate_backward", n, c, r=layer.se_reduced, dtype=dtype, layout="-"))
        calls.append(Workload("se_excite_backward", n, c, layer.Ho, layer.Wo, layer.Ho, layer.Wo, dtype=dtype,
                              layout=layout))
    return calls


def compulsory_bytes(wl: Workload) -> int:
    """Bytes a training op cannot avoid moving through DRAM: each input read once, each output written once
    (s = bytes per element of the dtype; per-channel fp32 vectors as 4 bytes each).

    dwconv_bn_act_train: x + y + squeeze + the weights as the eval op (the two-pass design reads x twice:
    its statistics pass, then the apply pass), + 8·C (mean, var); dwconv_bn_act_train_backward: grad_y
    (s·N·C·Ho·Wo) + grad_pooled (4·N·C) + x (recomputed through: s·N·C·H·W) + grad_x (s·N·C·H·W) + the
    weight and its gradient (8·C·k²) + the per-channel vectors and their gradients (24·C);
    expand_bn_act_train_backward (x ``[N, K, H, W]``, K = C, J = Cout): x + grad_a (s·N·J·H·W) + grad_x +
    the weight and its gradient (2·s·J·K) + 24·J; pointwise_conv_backward (the projection: grad_out
    ``[N, Cout, H, W]``, x ``[N, C, H, W]``): grad_out + x + grad_x + the weight and its gradient
    (2·s·Cout·C) + the bias gradient (4·Cout) [+ the gate and its gradient, 8·N·C]; se_gate_backward:
    the gate's gradient and the pooled input (8·N·C) + the pooled gradient (4·N·C) + the weights and
    their gradients (2·s·(2·C·R + C + R)); se_excite_backward: grad_out, y and grad_y (3·s·N·C·H·W) +
    the gate and its gradient (8·N·C).
    """
    s = ELEMENT_BYTES[wl.dtype]
    n, c = wl.n, wl.c
    if wl.op == "dwconv_bn_act_train":
        return s * n * c * (wl.h * wl.w + wl.ho * wl.wo) + 4 * c * wl.k ** 2 + 8 * c + 4 * n * c + 8 * c
    if wl.op == "dwconv_bn_act_train_backward":
        return s * n * c * (wl.ho * wl.wo + 2 * wl.h * wl.w) + 4 * n * c + 8 * c * wl.k ** 2 + 24 * c
    if wl.op == "expand_bn_act_train_backward":
        m = n * wl.h * wl.w
        return s * m * (2 * c + wl.cout) + 2 * s * wl.cout * c + 24 * wl.cout
    if wl.op == "pointwise_conv_backward":
        m = n * wl.h * wl.w
        return s * m * (2 * c + wl.cout) + 2 * s * wl.cout * c + 4 * wl.cout + (8 * n * c if wl.gate else 0)
    if wl.op == "se_gate_backward":
        return 12 * n * c + 2 * s * (2 * c * wl.r + c + wl.r)
    if wl.op == "se_excite_backward":
        return 3 * s * n * c * wl.h * wl.w + 8 * n * c
    raise ValueError(f"unknown training op {wl.op!r}; choose from {', '.join(TRAIN_OPS)}")
