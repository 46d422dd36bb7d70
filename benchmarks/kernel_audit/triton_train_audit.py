"""The Triton training launches, recorded as :mod:`.triton_audit` records the eval ones.

:func:`capture_training` runs the real training launchers (``effnet_kernels.triton``'s
``dwconv_train``, ``dwconv_backward``, ``expand_backward``, ``pointwise_backward``, ``se_backward``)
on meta tensors inside :func:`.triton_audit.recording`: every launch is bound by Triton's own binder
and recorded, not run, with tuning off (the launcher's untuned default config). Kernel names are
qualified by their module (``expand_backward._dgrad_kernel``): two modules define ``_dgrad_kernel``.
"""

from __future__ import annotations

import dataclasses

import torch

from .train_workloads import TRAIN_OPS
from .triton_audit import TORCH_DTYPES, Launch, _meta, recording
from .workloads import Workload

EPS = 1e-3


def _qualified(launch: Launch) -> Launch:
    module = launch.source[0].fn.__module__.rsplit(".", 1)[-1]
    return dataclasses.replace(launch, kernel=f"{module}.{launch.kernel}")


def capture_training(wl: Workload) -> list[Launch]:
    """The Triton launches the training launchers make for ``wl`` (one of :data:`.train_workloads.TRAIN_OPS`)."""
    from effnet_kernels.triton import dwconv_backward, dwconv_train, expand_backward, pointwise_backward, se_backward

    if wl.op not in TRAIN_OPS:
        raise ValueError(f"unknown training op {wl.op!r}; choose from {', '.join(TRAIN_OPS)}")
    dt = TORCH_DTYPES[wl.dtype]
    f32 = torch.float32
    with recording() as rec:
        if wl.op.startswith("dwconv"):
            x = _meta((wl.n, wl.c, wl.h, wl.w), dt, wl.layout)
            weight, gamma, beta = _meta((wl.c, 1, wl.k, wl.k), dt), _meta((wl.c,), f32), _meta((wl.c,), f32)
            stride, pad = (wl.stride,) * 2, (wl.pad,) * 4
            if wl.op == "dwconv_bn_act_train":
                dwconv_train.dwconv_bn_act_train(x, weight, gamma, beta, None, None, EPS, stride, pad, "silu", True)
            else:
                gy = _meta((wl.n, wl.c, wl.ho, wl.wo), dt, wl.layout)
                dwconv_backward.dwconv_bn_act_train_backward(gy, _meta((wl.n, wl.c), f32), x, weight, gamma, beta,
                                                             _meta((wl.c,), f32), _meta((wl.c,), f32), EPS, stride,
                                                             pad, "silu")
        elif wl.op == "expand_bn_act_train_backward":  # K = wl.c -> J = wl.cout
            expand_backward.expand_bn_act_train_backward(
                _meta((wl.n, wl.cout, wl.h, wl.w), dt, wl.layout), _meta((wl.n, wl.c, wl.h, wl.w), dt, wl.layout),
                _meta((wl.cout, wl.c), dt), *(_meta((wl.cout,), f32) for _ in range(4)), wl.activation)
        elif wl.op == "pointwise_conv_backward":
            def unfused(*args):
                raise AssertionError(f"{wl}: the Triton backward does not fuse this projection")

            pointwise_backward.pointwise_conv_backward_with(unfused)(
                _meta((wl.n, wl.cout, wl.h, wl.w), dt, wl.layout), _meta((wl.n, wl.c, wl.h, wl.w), dt, wl.layout),
                _meta((wl.cout, wl.c), dt), _meta((wl.cout,), f32), _meta((wl.n, wl.c), f32) if wl.gate else None,
                _meta((wl.n, wl.cout, wl.h, wl.w), dt, wl.layout) if wl.residual else None, wl.activation, False)
        elif wl.op == "se_gate_backward":
            se_backward.se_gate_backward(_meta((wl.n, wl.c), f32), _meta((wl.n, wl.c), dt), _meta((wl.r, wl.c), dt),
                                         _meta((wl.r,), dt), _meta((wl.c, wl.r), dt), _meta((wl.c,), dt), "silu",
                                         "sigmoid")
        else:  # se_excite_backward
            y = _meta((wl.n, wl.c, wl.h, wl.w), dt, wl.layout)
            se_backward.se_excite_backward(_meta((wl.n, wl.c, wl.h, wl.w), dt, wl.layout), y, _meta((wl.n, wl.c), f32))
    return [_qualified(launch) for launch in rec.launches]
