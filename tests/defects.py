"""Planted defects: the negative controls every parity suite must reject.

``planted(defect, backend)`` is a context manager under which one known bug is live:

* backend defects wrap the implementation a backend (``torch`` on the CPU; ``triton`` or
  ``cuda`` in the GPU suites) serves for one op, so a suite sees exactly what a buggy
  kernel would return:

  - ``pad_shift``: the depthwise conv pads one pixel off (a column of padding moves from
    one side to the other; the output keeps its shape),
  - ``skip_silu``: the depthwise step skips its activation (SiLU, ReLU, ReLU6, hard-swish:
    whichever the call asks for; it returns the BatchNorm output),
  - ``squeeze_skew``: the SE squeeze (spatial mean) comes out 1% high,
  - ``gate_skew``: the SE gate comes out scaled by 0.99,
  - ``excite_skip``: the excite returns its input ungated (the separate ``se_excite`` op, and the
    gate a ``pointwise_conv`` applies on load),
  - ``residual_shift``: the ``pointwise_conv`` epilogue adds the residual one pixel off (rolled
    along the width),
  - ``grad_drop_squeeze``: the depthwise backward ignores the gradient that reaches it
    through the SE squeeze (``grad_mean``);

  each planted in the eval-mode op and its train-mode twin (``dwconv_bn_act_train``,
  ``dwconv_bn_act_train_backward``) alike;

* op-level backend defects (:data:`OP_DEFECTS`: only the op suites run them; the module and
  network suites, whose models use SiLU and sigmoid, run :data:`DEFECTS`):

  - ``pointwise_skip_act``: ``pointwise_conv`` skips its activation,
  - ``conv_pad_shift``: ``conv_bn_act`` (the stem) pads one pixel off,

  - ``grad_skip_act``: the depthwise backward skips the activation's derivative,
  - ``se_act_swap``: the SE gate swaps its functions (SiLU <-> ReLU inside, sigmoid <->
    hard-sigmoid at the output), so a backend that ignores the requested ones is caught;

* module defects:

  - ``drop_residual``: fused blocks forget their residual connection,
  - ``tf_same_swap``: TensorFlow "same" padding puts the extra pixel on the left/top
    instead of the right/bottom (the classic EfficientNet porting bug).

A suite's negative-control test runs its own check under each defect and asserts that the
check fails (``pytest.raises(AssertionError)``).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator
from unittest import mock

from effnet_kernels import backends
from effnet_kernels import nn as ek_nn

__all__ = ["BACKEND_DEFECTS", "OP_DEFECTS", "MODULE_DEFECTS", "EVAL_ONLY_DEFECTS", "DEFECTS", "planted"]


def _shift_padding(padding):
    left, right, top, bottom = padding
    if right > 0:
        return (left + 1, right - 1, top, bottom)
    if left > 0:
        return (left - 1, right + 1, top, bottom)
    if bottom > 0:
        return (left, right, top + 1, bottom - 1)
    if top > 0:
        return (left, right, top - 1, bottom + 1)
    return (left + 1, right, top, bottom)  # no padding at all: pad one column too many


# Wrappers take a backend implementation's arguments:
# dwconv_bn_act(x, weight, scale, shift, stride, padding, activation, squeeze),
# dwconv_bn_act_backward(grad_y, grad_mean, x, weight, scale, shift, stride, padding, activation),
# se_gate(pooled, w_reduce, b_reduce, w_expand, b_expand, activation, gate).
def _pad_shift(impl: Callable) -> Callable:
    def dwconv(x, weight, scale, shift, stride, padding, activation, squeeze):
        return impl(x, weight, scale, shift, stride, _shift_padding(padding), activation, squeeze)

    return dwconv


def _skip_silu(impl: Callable) -> Callable:
    def dwconv(x, weight, scale, shift, stride, padding, activation, squeeze):
        return impl(x, weight, scale, shift, stride, padding, "identity", squeeze)

    return dwconv


def _squeeze_skew(impl: Callable) -> Callable:
    def dwconv(x, weight, scale, shift, stride, padding, activation, squeeze):
        y, mean = impl(x, weight, scale, shift, stride, padding, activation, squeeze)
        return y, (mean * 1.01 if mean is not None else None)

    return dwconv


def _gate_skew(impl: Callable) -> Callable:
    def se_gate(*args):
        return impl(*args) * 0.99

    return se_gate


def _excite_skip(impl: Callable) -> Callable:
    def se_excite(y, gate):
        return impl(y, gate.new_ones(gate.shape))

    return se_excite


# pointwise_conv(x, weight, bias, gate, residual, activation, pool)
def _pointwise_ungated(impl: Callable) -> Callable:
    def pointwise(x, weight, bias, gate, residual, activation, pool):
        return impl(x, weight, bias, None, residual, activation, pool)

    return pointwise


def _pointwise_residual_shift(impl: Callable) -> Callable:
    def pointwise(x, weight, bias, gate, residual, activation, pool):
        if residual is not None:
            residual = residual.roll(1, dims=3)
        return impl(x, weight, bias, gate, residual, activation, pool)

    return pointwise


def _pointwise_skip_act(impl: Callable) -> Callable:
    def pointwise(x, weight, bias, gate, residual, activation, pool):
        return impl(x, weight, bias, gate, residual, "identity", pool)

    return pointwise


# conv_bn_act(x, weight, bias, stride, padding, activation)
def _conv_pad_shift(impl: Callable) -> Callable:
    def conv(x, weight, bias, stride, padding, activation):
        return impl(x, weight, bias, stride, _shift_padding(padding), activation)

    return conv


def _grad_drop_squeeze(impl: Callable) -> Callable:
    def backward(grad_y, grad_mean, *args):
        return impl(grad_y, None, *args)

    return backward


def _grad_skip_act(impl: Callable) -> Callable:
    def backward(*args):
        return impl(*args[:-1], "identity")

    return backward


_SE_SWAP = {"silu": "relu", "relu": "silu", "sigmoid": "hardsigmoid", "hardsigmoid": "sigmoid"}


def _se_act_swap(impl: Callable) -> Callable:
    def se_gate(pooled, w_reduce, b_reduce, w_expand, b_expand, activation, gate):
        return impl(pooled, w_reduce, b_reduce, w_expand, b_expand, _SE_SWAP[activation], _SE_SWAP[gate])

    return se_gate


# the train-mode op: dwconv_bn_act_train(x, weight, gamma, beta, mean, var, eps, stride, padding,
# activation, squeeze) -> (y, pooled, mean, var)
def _pad_shift_train(impl: Callable) -> Callable:
    def dwconv(x, weight, gamma, beta, mean, var, eps, stride, padding, activation, squeeze):
        return impl(x, weight, gamma, beta, mean, var, eps, stride, _shift_padding(padding), activation, squeeze)

    return dwconv


def _skip_silu_train(impl: Callable) -> Callable:
    def dwconv(x, weight, gamma, beta, mean, var, eps, stride, padding, activation, squeeze):
        return impl(x, weight, gamma, beta, mean, var, eps, stride, padding, "identity", squeeze)

    return dwconv


def _squeeze_skew_train(impl: Callable) -> Callable:
    def dwconv(*args):
        y, pooled, mean, var = impl(*args)
        return y, (pooled * 1.01 if pooled is not None else None), mean, var

    return dwconv


# defect -> the (op, wrapper) pairs it plants: eval and train-mode twins of an op get the same bug
BACKEND_DEFECTS: dict[str, tuple[tuple[str, Callable[[Callable], Callable]], ...]] = {
    "pad_shift": (("dwconv_bn_act", _pad_shift), ("dwconv_bn_act_train", _pad_shift_train)),
    "skip_silu": (("dwconv_bn_act", _skip_silu), ("dwconv_bn_act_train", _skip_silu_train)),
    "squeeze_skew": (("dwconv_bn_act", _squeeze_skew), ("dwconv_bn_act_train", _squeeze_skew_train)),
    "gate_skew": (("se_gate", _gate_skew),),
    "excite_skip": (("se_excite", _excite_skip), ("pointwise_conv", _pointwise_ungated)),
    "residual_shift": (("pointwise_conv", _pointwise_residual_shift),),
    "grad_drop_squeeze": (("dwconv_bn_act_backward", _grad_drop_squeeze),
                          ("dwconv_bn_act_train_backward", _grad_drop_squeeze)),
}


def _swapped_tf_same_padding(h, w, kernel_size, stride):
    left, right, top, bottom = _true_tf_same_padding(h, w, kernel_size, stride)
    return (right, left, bottom, top)


_true_tf_same_padding = ek_nn.tf_same_padding


def _forward_without_residual(forward: Callable) -> Callable:
    def wrapped(self, *args, **kwargs):
        plan = self.plan
        saved, plan.residual = plan.residual, False
        try:
            return forward(self, *args, **kwargs)
        finally:
            plan.residual = saved

    return wrapped


OP_DEFECTS: dict[str, tuple[tuple[str, Callable[[Callable], Callable]], ...]] = {
    "grad_skip_act": (("dwconv_bn_act_backward", _grad_skip_act), ("dwconv_bn_act_train_backward", _grad_skip_act)),
    "se_act_swap": (("se_gate", _se_act_swap),),
    "pointwise_skip_act": (("pointwise_conv", _pointwise_skip_act),),
    "conv_pad_shift": (("conv_bn_act", _conv_pad_shift),),
}

MODULE_DEFECTS = ("drop_residual", "tf_same_swap")
#: defects only an eval-mode block can show (a training block runs its 1x1 convs through aten)
EVAL_ONLY_DEFECTS = ("residual_shift",)
DEFECTS = tuple(BACKEND_DEFECTS) + MODULE_DEFECTS


@contextlib.contextmanager
def planted(defect: str, backend: str = "torch") -> Iterator[None]:
    """Make ``defect`` live while inside: in ``backend``'s implementation of the op for backend
    defects (in the ``torch`` reference's when ``backend`` leaves that op to it, as kernel
    backends do with backward ops), in the fused module for module defects."""
    if defect in BACKEND_DEFECTS or defect in OP_DEFECTS:
        backends._ensure_registered()
        with contextlib.ExitStack() as stack:
            for op, wrap in {**BACKEND_DEFECTS, **OP_DEFECTS}[defect]:
                impls = backends._REGISTRY[backend].impls()
                if op not in impls:  # e.g. a backward the backend leaves to the reference: plant it there
                    impls = backends._REGISTRY["torch"].impls()
                stack.enter_context(mock.patch.dict(impls, {op: wrap(impls[op])}))
            yield
    elif defect == "drop_residual":
        with mock.patch.object(ek_nn.MBConv, "forward", _forward_without_residual(ek_nn.MBConv.forward)):
            yield
    elif defect == "tf_same_swap":
        with mock.patch.object(ek_nn, "tf_same_padding", _swapped_tf_same_padding):
            yield
    else:
        raise ValueError(f"defect must be one of {DEFECTS + tuple(OP_DEFECTS)}, got {defect!r}")
