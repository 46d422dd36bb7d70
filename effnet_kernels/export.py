"""Export a converted model without reverting it: ``torch.export``, ONNX, ``torch.jit.trace``.

A converted model's fused blocks call the ``torch.ops.effnet`` ops. ``torch.export.export``
keeps them in the graph (the program runs them, with the fused kernels, wherever
``effnet_kernels`` is imported); :func:`decompositions` maps each op to the standard aten ops
that compute it (the ``torch`` backend's arithmetic), so
``program.run_decompositions(decompositions())`` gives a program of aten ops only, which any
consumer of exported programs — ONNX among them — understands. :func:`export_program` and
:func:`export_onnx` do these steps. ``torch.jit.trace`` of a converted model needs nothing:
it records the ops like any other.

``effnet_kernels.revert(model)`` stays for those who want the original classes back.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from . import reference

Tensor = torch.Tensor

__all__ = ["decompositions", "export_program", "export_onnx"]


def _dwconv_bn_act(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, stride: Sequence[int],
                   padding: Sequence[int], activation: str, squeeze: bool, backend: str) -> tuple[Tensor, Tensor]:
    y, mean = reference.dwconv_bn_act(x, weight, scale, shift, stride, padding, activation, squeeze)
    return y, (mean if mean is not None else x.new_empty((0,), dtype=torch.float32))


def _se_gate(pooled: Tensor, w_reduce: Tensor, b_reduce: Tensor, w_expand: Tensor, b_expand: Tensor,
             activation: str, gate: str, backend: str) -> Tensor:
    return reference.se_gate(pooled, w_reduce, b_reduce, w_expand, b_expand, activation, gate)


def _se_excite(y: Tensor, gate: Tensor, backend: str) -> Tensor:
    return reference.se_excite(y, gate)


def _pointwise_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Optional[Tensor],
                    residual: Optional[Tensor], activation: str, pool: bool, backend: str) -> Tensor:
    return reference.pointwise_conv(x, weight, bias, gate, residual, activation, pool)


def _conv_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                 activation: str, backend: str) -> Tensor:
    return reference.conv_bn_act(x, weight, bias, stride, padding, activation)


def decompositions() -> dict[Any, Callable[..., Any]]:
    """``{torch.ops.effnet.<op>.default: fn}``: each forward op as aten ops, for
    ``ExportedProgram.run_decompositions`` (the backend argument is ignored)."""
    ops = torch.ops.effnet
    return {
        ops.dwconv_bn_act.default: _dwconv_bn_act,
        ops.se_gate.default: _se_gate,
        ops.se_excite.default: _se_excite,
        ops.pointwise_conv.default: _pointwise_conv,
        ops.conv_bn_act.default: _conv_bn_act,
    }


def _as_tuple(args: Union[Tensor, Sequence[Any]], name: str) -> tuple:
    if isinstance(args, Tensor):
        return (args,)
    if isinstance(args, (tuple, list)):
        return tuple(args)
    raise TypeError(f"{name} must be a Tensor or a tuple of example inputs, got {type(args).__name__}")


def export_program(model: nn.Module, args: Union[Tensor, Sequence[Any]], *, decompose: bool = True,
           **export_kwargs: Any) -> torch.export.ExportedProgram:
    """``torch.export.export(model, args)``, with the effnet ops decomposed to aten ops (``decompose``).

    Args:
        model: a (converted) model; exported as it is, in its current train/eval mode.
        args: an example input tensor or a tuple of them.
        decompose: replace the ``torch.ops.effnet`` ops by the aten ops that compute them
            (default). With False the program keeps the fused ops: smaller, and it runs the
            kernels, but only where ``effnet_kernels`` is imported.
        export_kwargs: passed to ``torch.export.export`` (``dynamic_shapes``, ``strict``, ...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    program = torch.export.export(model, _as_tuple(args, "args"), **export_kwargs)
    return program.run_decompositions(decompositions()) if decompose else program


def export_onnx(model: Union[nn.Module, torch.export.ExportedProgram], args: Union[Tensor, Sequence[Any]],
                path: Union[str, os.PathLike], *, opset_version: Optional[int] = None,
                input_names: Optional[Sequence[str]] = None, output_names: Optional[Sequence[str]] = None,
                ) -> torch.export.ExportedProgram:
    """Write ``model`` as ONNX to ``path`` (via :func:`export_program`: aten ops only); returns the exported program.

    Needs the ``onnx`` and ``onnxscript`` packages (``torch.onnx``'s exporter). ``model`` may
    also be an ExportedProgram; its effnet ops are decomposed first.
    """
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it; say so plainly)
    except ImportError as exc:
        raise ImportError("export_onnx needs the onnx and onnxscript packages: pip install onnx onnxscript") from exc
    if isinstance(model, torch.export.ExportedProgram):
        program = model.run_decompositions(decompositions())
    else:
        program = export_program(model, args)
    kwargs: dict[str, Any] = {}
    if opset_version is not None:
        kwargs["opset_version"] = opset_version
    if input_names is not None:
        kwargs["input_names"] = list(input_names)
    if output_names is not None:
        kwargs["output_names"] = list(output_names)
    onnx_program = torch.onnx.export(program, _as_tuple(args, "args"), dynamo=True, **kwargs)
    onnx_program.save(os.fspath(path))
    return program
