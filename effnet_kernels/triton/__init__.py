"""The ``triton`` backend: Triton kernels for the fused ops.

Importing this package registers the backend; Triton itself is imported only when a
kernel is first needed. With ``TRITON_INTERPRET=1`` the kernels also accept CPU
tensors (Triton's interpreter), which is how CI tests them without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .. import backends

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1`` (kernels run on CPU tensors in Triton's interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _unavailable() -> list[str]:
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed (pip install triton==3.6.0)"]
    if not interpreter_enabled() and not torch.cuda.is_available():
        return ["no CUDA GPU is visible (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"]
    return []


def _unsupported(op: str, t: torch.Tensor, args: tuple = ()) -> list[str]:
    reasons = []
    if t.device.type == "cpu":
        if not interpreter_enabled():
            reasons.append("CPU tensors need TRITON_INTERPRET=1")
    elif t.device.type != "cuda":
        reasons.append(f"tensors on {t.device.type} are not supported (CUDA, or CPU with TRITON_INTERPRET=1)")
    reasons.extend(backends.dtype_reasons("the triton kernels", SUPPORTED_DTYPES, (t, *args)))
    return reasons


def _load() -> dict:
    from .conv import conv_bn_act
    from .dwconv import dwconv_bn_act
    from .pointwise import pointwise_conv
    from .se_excite import se_excite
    from .se_gate import se_gate

    impls = {"dwconv_bn_act": dwconv_bn_act, "se_gate": se_gate, "se_excite": se_excite,
             "pointwise_conv": pointwise_conv, "conv_bn_act": conv_bn_act}
    impls.update(_training_impls())
    return impls


def _training_impls() -> dict:
    """The training ops (issue #11): train-mode forward and the backward ops."""
    from .. import _aten_convs

    from .dwconv_backward import (
        bn_act_train_backward, dwconv_bn_act_backward, dwconv_bn_act_train_backward, dwconv_bn_grad_sums,
        dwconv_bn_input_grads,
    )
    from .dwconv_train import dwconv_bn_act_train, dwconv_bn_stats
    from .expand_backward import expand_bn_act_train_backward
    from .pointwise_backward import pointwise_conv_backward_with
    from .se_backward import se_excite_backward, se_gate_backward
    from .se_excite import se_excite

    return {
        "dwconv_bn_act_train": dwconv_bn_act_train,
        "dwconv_bn_act_train_backward": dwconv_bn_act_train_backward,
        "dwconv_bn_stats": dwconv_bn_stats,
        "dwconv_bn_grad_sums": dwconv_bn_grad_sums,
        "dwconv_bn_input_grads": dwconv_bn_input_grads,
        "bn_act_train_backward": bn_act_train_backward,
        "expand_bn_act_train_backward": expand_bn_act_train_backward,
        "dwconv_bn_act_backward": dwconv_bn_act_backward,
        "se_excite_backward": se_excite_backward,
        "se_gate_backward": se_gate_backward,
        # the 1x1 convs' backward: two Triton GEMMs with the gate fused where there is no activation or pool, else
        # cuDNN's with the gate by the excite kernels here; the stem's: cuDNN's
        "pointwise_conv_backward": pointwise_conv_backward_with(
            _aten_convs.pointwise_conv_backward_with(se_excite, se_excite_backward)),
        "conv_bn_act_backward": _aten_convs.conv_bn_act_backward,
    }


backends.register_backend("triton", unavailable=_unavailable, unsupported=_unsupported, load=_load)
