"""The fused ops as typed Python functions (each backed by a ``torch.ops.effnet`` op).

* :func:`dwconv_bn_act` — depthwise conv + folded BatchNorm + activation (+ SE squeeze);
  activations: ``_checks.ACTIVATIONS``
* :func:`dwconv_bn_act_train` — the same with train-mode BatchNorm (batch statistics, returned)
* :func:`se_gate` — pooled [N, C] -> SE gate [N, C] (float32); ``_checks.SE_ACTIVATIONS``
  inside, ``_checks.SE_GATES`` at the output
* :func:`se_excite` — y * gate broadcast over H x W
* :func:`pointwise_conv` — 1x1 conv as a GEMM: SE gate on load, bias + activation + residual
  (or the global average pool) in the epilogue
* :func:`conv_bn_act` — dense k x k conv + folded BatchNorm + activation (a network's stem)

Backward-only ops (pieces of the training blocks' hand-chained backward, ``torch.ops.effnet`` only):
the ``*_backward`` twins of the above, ``dwconv_bn_stats`` / ``dwconv_bn_grad_sums`` /
``dwconv_bn_input_grads`` (SyncBatchNorm), ``bn_act_train_backward`` (train-mode BatchNorm + activation).
"""

from . import bn_act  # noqa: F401  (defines effnet::bn_act_train_backward, a backward-only op)
from .conv import conv_bn_act
from .dwconv import dwconv_bn_act
from .dwconv_train import dwconv_bn_act_train
from .pointwise import pointwise_conv
from .se import se_excite, se_gate

__all__ = ["dwconv_bn_act", "dwconv_bn_act_train", "se_gate", "se_excite", "pointwise_conv", "conv_bn_act"]
