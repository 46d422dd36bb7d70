"""Launch preparation shared by the kernel backends (Triton and CUDA).

A backend implementation receives validated, normalised arguments (see
:mod:`effnet_kernels.ops`) and calls one ``prepare_*`` function here to get its
inputs in a kernel-friendly layout, its outputs allocated in the memory format the
op contract promises, and the sizes it launches with. Nothing here is backend-specific.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .ops._checks import ACT_CODES, memory_format_of

Tensor = torch.Tensor

INT32_MAX = 2**31 - 1


def needs_int64(*tensors: Optional[Tensor]) -> bool:
    """True when some element offset of these tensors may not fit in int32."""
    return any(t is not None and t.numel() > 0 and _max_offset(t) > INT32_MAX for t in tensors)


def _max_offset(t: Tensor) -> int:
    return sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) + 1


def layout_of(x: Tensor) -> str:
    """``"nhwc"`` if ``x`` (4-D) keeps channels_last, else ``"nchw"``."""
    return "nhwc" if memory_format_of(x) == torch.channels_last else "nchw"


def as_layout(x: Tensor, layout: str) -> Tensor:
    """``x`` made dense in ``layout`` (a no-op when it already is)."""
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    return x.contiguous(memory_format=fmt)


def empty_in_layout(shape: Sequence[int], layout: str, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An uninitialised 4-D tensor dense in ``layout``."""
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    return torch.empty(tuple(shape), dtype=dtype or like.dtype, device=like.device, memory_format=fmt)


def fp32_contiguous(t: Tensor) -> Tensor:
    """``t`` as a dense float32 tensor (a no-op when it already is)."""
    return t.to(torch.float32).contiguous()


@dataclass
class DWConvLaunch:
    """Everything a depthwise-conv kernel needs; ``x`` and ``y`` are dense in ``layout``."""

    x: Tensor
    y: Tensor
    mean: Optional[Tensor]  # [N, C] float32, zero-filled, or None without squeeze
    weight: Tensor  # [C, k * k] float32, dense
    scale: Tensor  # [C] float32, dense
    shift: Tensor  # [C] float32, dense
    layout: str
    n: int
    c: int
    h: int
    w: int
    ho: int
    wo: int
    k: int
    stride_h: int
    stride_w: int
    pad_top: int
    pad_left: int
    act: int  # the activation's code (ops._checks.ACT_CODES): a Triton constexpr / CUDA template argument
    int64: bool

    @property
    def deterministic(self) -> bool:
        """Reduce the squeeze without atomics (``torch.use_deterministic_algorithms``)."""
        return torch.are_deterministic_algorithms_enabled()


def prepare_dwconv(
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    activation: str,
    squeeze: bool,
) -> DWConvLaunch:
    """Lay out inputs and allocate outputs for ``dwconv_bn_act`` (arguments already validated)."""
    layout = layout_of(x)
    xd = as_layout(x, layout)
    n, c, h, w = xd.shape
    k = weight.shape[-1]
    left, right, top, bottom = padding
    ho = (h + top + bottom - k) // stride[0] + 1
    wo = (w + left + right - k) // stride[1] + 1
    y = empty_in_layout((n, c, ho, wo), layout, xd)
    mean = torch.zeros((n, c), dtype=torch.float32, device=x.device) if squeeze else None
    return DWConvLaunch(
        x=xd,
        y=y,
        mean=mean,
        weight=fp32_contiguous(weight.reshape(c, k * k)),
        scale=fp32_contiguous(scale),
        shift=fp32_contiguous(shift),
        layout=layout,
        n=n, c=c, h=h, w=w, ho=ho, wo=wo, k=k,
        stride_h=stride[0], stride_w=stride[1],
        pad_top=top, pad_left=left,
        act=ACT_CODES[activation],
        int64=needs_int64(xd, y),
    )


@dataclass
class ExciteLaunch:
    """``se_excite`` inputs: ``y`` and ``out`` dense in ``layout``, ``gate`` [N, C] dense."""

    y: Tensor
    gate: Tensor
    out: Tensor
    layout: str
    int64: bool


def prepare_se_excite(y: Tensor, gate: Tensor) -> ExciteLaunch:
    """Lay out inputs and allocate the output for ``se_excite`` (arguments already validated)."""
    layout = layout_of(y)
    yd = as_layout(y, layout)
    out = empty_in_layout(yd.shape, layout, yd)
    return ExciteLaunch(y=yd, gate=gate.contiguous(), out=out, layout=layout, int64=needs_int64(yd))


@dataclass
class GateLaunch:
    """``se_gate`` inputs, dense; ``gate`` is the [N, C] float32 output."""

    pooled: Tensor
    w_reduce: Tensor  # [R, C]
    b_reduce: Tensor
    w_expand: Tensor  # [C, R]
    b_expand: Tensor
    gate: Tensor
    n: int
    c: int
    r: int
    act: int  # code of the activation between the FCs (ops._checks.ACT_CODES)
    gate_act: int  # code of the gate's nonlinearity


def prepare_se_gate(
    pooled: Tensor, w_reduce: Tensor, b_reduce: Tensor, w_expand: Tensor, b_expand: Tensor, activation: str, gate: str
) -> GateLaunch:
    """Make the SE gate's inputs dense and allocate its float32 output."""
    n, c = pooled.shape
    return GateLaunch(
        pooled=pooled.contiguous(),
        w_reduce=w_reduce.contiguous(),
        b_reduce=b_reduce.contiguous(),
        w_expand=w_expand.contiguous(),
        b_expand=b_expand.contiguous(),
        gate=torch.empty((n, c), dtype=torch.float32, device=pooled.device),
        n=n, c=c, r=w_reduce.shape[0],
        act=ACT_CODES[activation], gate_act=ACT_CODES[gate],
    )


def _same_strides(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (dense, the shape of ``like`` and dense in the same order) viewed with exactly ``like``'s strides.

    Two dense tensors of one shape and dimension order can differ only in the strides of size-1
    dimensions (C = 1 or H = W = 1 is both NCHW and channels_last), which address nothing: the
    view reads the same elements, and a kernel can use one set of offsets for both."""
    if t.stride() == like.stride():
        return t
    if t.numel() == 0:  # every layout of an empty tensor is "contiguous"
        return t.as_strided(like.shape, like.stride())
    assert all(a == b for a, b, s in zip(t.stride(), like.stride(), t.shape) if s > 1), (t.stride(), like.stride())
    return t.as_strided(like.shape, like.stride())


@dataclass
class PointwiseLaunch:
    """``pointwise_conv`` inputs dense in ``layout`` (x, residual, out), weight ``[Cout, K]`` in x's dtype."""

    x: Tensor
    weight: Tensor  # [Cout, K] in x's dtype, dense
    bias: Optional[Tensor]  # [Cout] float32 or x's dtype, dense
    gate: Optional[Tensor]  # [N, K] float32 or x's dtype, dense
    residual: Optional[Tensor]  # [N, Cout, H, W] in x's dtype, dense in ``layout``
    out: Tensor  # [N, Cout, H, W] dense in ``layout``, or [N, Cout] float32 with ``pool``
    layout: str
    n: int
    k: int
    h: int
    w: int
    cout: int
    act: int  # the activation's code (ops._checks.ACT_CODES)
    pool: bool
    int64: bool


def prepare_pointwise(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Optional[Tensor], residual: Optional[Tensor],
    activation: str, pool: bool,
) -> PointwiseLaunch:
    """Lay out inputs and allocate the output for ``pointwise_conv`` (arguments already validated).

    The weight is cast to x's dtype per call (as an autocast conv casts it; a few KB to MB, nothing cached
    that could go stale when the Parameter changes in place)."""
    layout = layout_of(x)
    xd = as_layout(x, layout)
    n, k, h, w = xd.shape
    cout = weight.shape[0]
    if pool:
        out = torch.empty((n, cout), dtype=torch.float32, device=x.device)
    else:
        out = empty_in_layout((n, cout, h, w), layout, xd)
    res = _same_strides(as_layout(residual, layout), out) if residual is not None else None
    return PointwiseLaunch(
        x=xd,
        weight=weight.to(x.dtype).contiguous(),
        bias=bias.contiguous() if bias is not None else None,
        gate=gate.contiguous() if gate is not None else None,
        residual=res,
        out=out,
        layout=layout,
        n=n, k=k, h=h, w=w, cout=cout,
        act=ACT_CODES[activation],
        pool=pool,
        int64=needs_int64(xd, out, res),
    )
