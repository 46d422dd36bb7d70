"""Triton backward of the depthwise ops: ``dwconv_bn_act_train_backward`` and ``dwconv_bn_act_backward``.

Both see the BatchNorm as ``u = xhat * a + b`` with ``xhat = (z - center) * invstd`` per channel:
train mode ``(center, invstd, a, b) = (mean, 1 / sqrt(var + eps), gamma, beta)``, eval mode
``(0, 1, scale, shift)`` (then ``xhat = z``). With ``g = (grad_y + grad_pooled / (Ho Wo)) * act'(u)``
and ``M = N Ho Wo``:

* train: ``grad_beta = sum(g)``, ``grad_gamma = sum(g xhat)``,
  ``gz = gamma invstd (g - grad_beta / M - xhat grad_gamma / M)``;
* eval: ``grad_shift = sum(g)``, ``grad_scale = sum(g z)``, ``gz = scale g``;

both ``gz = k1 g + k2 xhat + k3`` with per-channel ``k``. Passes (one kernel each, no atomics:
every reduction is per-program partials summed in a fixed order by :mod:`._partials`, so the
results are bitwise reproducible):

1. ``_grad_u_kernel`` with ``REDUCE``: recompute ``z`` (the forward's tap loop,
   :func:`.dwconv_train.conv_tile`), ``u`` and ``g``; store the tile's per-channel
   ``sum(g)``, ``sum(g xhat)``. Reads ``X E + P E`` (x, grad_y), writes ``8 C`` per tile.
2. ``_grad_u_kernel`` with ``WRITE`` (train mode; in eval mode ``k`` is known up front and
   passes 1 and 2 are one launch with both flags): the same recompute, then
   ``gz`` stored as float32. Reads ``X E + P E``, writes ``4 P``.
3. ``_dwconv_input_grad_kernel``, over tiles of *input* pixels: for each of the ``k^2`` taps,
   gather ``gz`` at the output pixel that tap fed from this input pixel
   (``oh = (ih + pad_top - kh) / SH`` when it divides exactly and lands in range: stride 1 and
   2, any 4-sided padding), ``grad_x += gz * w[tap]``, and the tap's weight-gradient partial
   ``sum(gz * x)`` over the tile (each (output pixel, tap) pair reads exactly one input pixel,
   so summing over input tiles counts each once; padding contributes 0). Reads ``4 P``
   (halo re-reads from L1/L2) ``+ X E``, writes grad_x ``X E`` and ``4 k^2 C`` per tile
   (summed by :func:`._partials.sum_rows` into ``[k^2, C]``).

Bytes (``E`` bytes per element, ``X = N C H W``, ``P = N C Ho Wo``), train: ``4 X E + 2 P E + 8 P``
plus the partials (fp16, stride 1: 20 B per output element; B0's largest layer, N = 256,
C = 96, 112 x 112 -> 56 x 56 k3 s2: 617 x 4 + 154 x 2 + 308 x 2 MB ~ 3.4 GB); eval: one pass
fewer, ``3 X E + P E + 4 P + 4 P``. Partials: ``8 C`` B per tile of passes 1-2 and ``4 k^2 C`` B
per tile of pass 3, whose channels_last tiles are 32 pixels (registers: see
:data:`INPUT_GRAD_NHWC_TILE`), i.e. ``k^2 / 8`` B per input element: 1.1 B at k = 3, 3.1 B at
k = 5 (as much again as grad_x itself in fp16), 6.1 B at k = 7 (NCHW tiles of 128 pixels: a
quarter of that). A program looping over several tiles while keeping its ``[k^2, BLOCK_C]``
partial in registers would cut those bytes; not done yet.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import triton.language as tl

from .._launch import INT32_MAX, empty_in_layout
from ..ops._checks import ACT_CODES
from ._activation_grad import activation_grad
from ._jit import device_guard, device_kernel, multiple_of, needs_bf16_rtne, round_bf16_rtne
from ._partials import sum_rows
from .dwconv_train import (
    DWCONV_DO_NOT_SPECIALIZE, Geometry, channel_vector, choose_tile, conv_args, conv_constexprs, conv_tile, geometry,
    per_channel, pixel_sum, program_tile, tap_major, tile_index,
)

Tensor = torch.Tensor

# channels_last tiles (pixels, warps) x a 128-byte line of channels, read off ptxas for sm_90 at
# B0's shapes (tests/test_triton_train_compile.py): the g / gz pass with 64 pixels on 4 warps took
# 255 registers + 84 B of spills at k = 5, 32 on 4 warps 180, 32 on 8 warps 118; the input-gradient
# pass 113 with 32 pixels on 4 warps (150 on 8).
GRAD_U_NHWC_TILE = (32, 8)
INPUT_GRAD_NHWC_TILE = (32, 4)


@device_kernel(do_not_specialize=DWCONV_DO_NOT_SPECIALIZE)
def _grad_u_kernel(
    x_ptr, w_ptr, gy_ptr, gp_ptr, chan_ptr, part_ptr, gz_ptr,
    C, WC, H, W, HO, WO, TILES_W, TILES,
    sxn, sxc, sxh, sxw, pad_top, pad_left,
    sgn, sgc, sgh, sgw, szn, szc, szh, szw, inv_hw,
    K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
    ACT: tl.constexpr, HAS_GY: tl.constexpr, HAS_GP: tl.constexpr, REDUCE: tl.constexpr, WRITE: tl.constexpr,
    BF16_RTNE: tl.constexpr, VEC: tl.constexpr,
):
    """g at the BatchNorm output over one tile: its per-channel sums (REDUCE) and/or gz (WRITE, in gz's dtype).

    ``chan_ptr``: float32 ``[7, C]`` rows (center, invstd, a, b, k1, k2, k3). ``VEC`` > 1 (channels_last):
    it divides C and the pixel strides of x, grad_y and gz (dwconv_train.channel_vector).
    """
    if VEC > 1:
        C = multiple_of(C, VEC)
        sxn, sxh, sxw = multiple_of(sxn, VEC), multiple_of(sxh, VEC), multiple_of(sxw, VEC)
        sgn, sgh, sgw = multiple_of(sgn, VEC), multiple_of(sgh, VEC), multiple_of(sgw, VEC)
        szn, szh, szw = multiple_of(szn, VEC), multiple_of(szh, VEC), multiple_of(szw, VEC)
    n, tile, row = program_tile(TILES, INT64)
    oh, ow, c, c1, ok = tile_index(tile, TILES_W, HO, WO, C, CHANNELS_LAST, INT64, BLOCK_H, BLOCK_W, BLOCK_C)
    c_ok = c1 < C
    z = conv_tile(x_ptr, w_ptr, WC, n, oh, ow, c, ok, C, H, W, sxn, sxc, sxh, sxw, pad_top, pad_left, K, SH, SW)
    center = per_channel(tl.load(chan_ptr + c1, mask=c_ok, other=0.0), CHANNELS_LAST)
    invstd = per_channel(tl.load(chan_ptr + C + c1, mask=c_ok, other=0.0), CHANNELS_LAST)
    xhat = (z - center) * invstd
    g = tl.where(ok, 0.0, 0.0)
    if HAS_GY:
        g += tl.load(gy_ptr + n * sgn + c * sgc + oh * sgh + ow * sgw, mask=ok, other=0.0).to(tl.float32)
    if HAS_GP:
        g += per_channel(tl.load(gp_ptr + n * C + c1, mask=c_ok, other=0.0).to(tl.float32), CHANNELS_LAST) * inv_hw
    if ACT != 0:
        a = per_channel(tl.load(chan_ptr + 2 * C + c1, mask=c_ok, other=0.0), CHANNELS_LAST)
        b = per_channel(tl.load(chan_ptr + 3 * C + c1, mask=c_ok, other=0.0), CHANNELS_LAST)
        g = g * activation_grad(xhat * a + b, ACT)
    g = tl.where(ok, g, 0.0)
    if REDUCE:
        out = part_ptr + row * (2 * C) + c1
        tl.store(out, pixel_sum(g, CHANNELS_LAST), mask=c_ok)
        tl.store(out + C, pixel_sum(g * tl.where(ok, xhat, 0.0), CHANNELS_LAST), mask=c_ok)
    if WRITE:
        k1 = per_channel(tl.load(chan_ptr + 4 * C + c1, mask=c_ok, other=0.0), CHANNELS_LAST)
        k2 = per_channel(tl.load(chan_ptr + 5 * C + c1, mask=c_ok, other=0.0), CHANNELS_LAST)
        k3 = per_channel(tl.load(chan_ptr + 6 * C + c1, mask=c_ok, other=0.0), CHANNELS_LAST)
        out = k1 * g + k2 * xhat + k3
        if BF16_RTNE:  # round to nearest even by hand: see _jit.needs_bf16_rtne
            out = round_bf16_rtne(out)
        tl.store(gz_ptr + n * szn + c * szc + oh * szh + ow * szw, out.to(gz_ptr.dtype.element_ty), mask=ok)


@device_kernel(do_not_specialize=DWCONV_DO_NOT_SPECIALIZE)
def _dwconv_input_grad_kernel(
    gz_ptr, w_ptr, x_ptr, gx_ptr, part_ptr,
    C, WC, H, W, HO, WO, TILES_W, TILES,
    sxn, sxc, sxh, sxw, pad_top, pad_left,
    szn, szc, szh, szw, son, soc, soh, sow,
    K: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr, BF16_RTNE: tl.constexpr,
    VEC: tl.constexpr,
):
    """grad_x over a tile of input pixels, and its per-tap weight-gradient partials part[row, tap, c].

    ``VEC`` > 1 (channels_last): it divides C and the pixel strides of x, gz and grad_x
    (dwconv_train.channel_vector; C = 40 took 209 registers without it, 8 warps per SM).
    """
    if VEC > 1:
        C = multiple_of(C, VEC)
        sxn, sxh, sxw = multiple_of(sxn, VEC), multiple_of(sxh, VEC), multiple_of(sxw, VEC)
        szn, szh, szw = multiple_of(szn, VEC), multiple_of(szh, VEC), multiple_of(szw, VEC)
        son, soh, sow = multiple_of(son, VEC), multiple_of(soh, VEC), multiple_of(sow, VEC)
    n, tile, row = program_tile(TILES, INT64)
    ih, iw, c, c1, ok = tile_index(tile, TILES_W, H, W, C, CHANNELS_LAST, INT64, BLOCK_H, BLOCK_W, BLOCK_C)
    c_ok = c < C
    xv = tl.load(x_ptr + n * sxn + c * sxc + ih * sxh + iw * sxw, mask=ok, other=0.0).to(tl.float32)
    gz_n = gz_ptr + n * szn + c * szc
    gx = tl.where(ok, 0.0, 0.0)
    for kh in tl.static_range(K):
        th = ih + pad_top - kh  # = oh * SH for the output row this tap fed
        oh = th // SH
        row_ok = ok & (th >= 0) & (oh < HO)
        if SH > 1:
            row_ok = row_ok & (oh * SH == th)
        for kw in tl.static_range(K):
            tw = iw + pad_left - kw
            ow = tw // SW
            hit = row_ok & (tw >= 0) & (ow < WO)
            if SW > 1:
                hit = hit & (ow * SW == tw)
            gv = tl.load(gz_n + oh * szh + ow * szw, mask=hit, other=0.0)
            gx += gv * tl.load(w_ptr + c + (kh * K + kw) * WC, mask=c_ok, other=0.0)
            tl.store(part_ptr + (row * (K * K) + kh * K + kw) * C + c1, pixel_sum(gv * xv, CHANNELS_LAST),
                     mask=c1 < C)
    out = gx
    if BF16_RTNE:  # round to nearest even by hand: see _jit.needs_bf16_rtne
        out = round_bf16_rtne(out)
    tl.store(gx_ptr + n * son + c * soc + ih * soh + iw * sow, out.to(gx_ptr.dtype.element_ty), mask=ok)


def _grad_u(g: Geometry, w_tap: Tensor, grad_y: Optional[Tensor], grad_pooled: Optional[Tensor], chan: Tensor,
            activation: str, reduce: bool, gz: Optional[Tensor]) -> Optional[Tensor]:
    """Launch ``_grad_u_kernel``; returns the per-channel (sum g, sum g xhat) float32 ``[2, C]`` when ``reduce``."""
    tile = choose_tile(g, g.ho, g.wo, *GRAD_U_NHWC_TILE)
    part = torch.empty((1, tile.rows(g), 2 * g.c), dtype=torch.float32, device=g.x.device) if reduce else None
    has_gp = grad_pooled is not None and grad_pooled.numel() > 0
    gp = grad_pooled.contiguous() if has_gp else chan
    gy_strides = grad_y.stride() if grad_y is not None else (0, 0, 0, 0)
    gz_strides = gz.stride() if gz is not None else (0, 0, 0, 0)
    _grad_u_kernel.on(g.x)[tile.grid(g)](
        g.x, w_tap, grad_y if grad_y is not None else chan, gp, chan, part if reduce else chan,
        gz if gz is not None else chan,
        *conv_args(g, w_tap, tile), *gy_strides, *gz_strides, 1.0 / (g.ho * g.wo),
        **conv_constexprs(g, tile), ACT=ACT_CODES[activation], HAS_GY=grad_y is not None, HAS_GP=has_gp,
        REDUCE=reduce, WRITE=gz is not None, BF16_RTNE=gz is not None and needs_bf16_rtne(gz),
        VEC=channel_vector(g, grad_y, gz),
    )
    return sum_rows(part)[0].view(2, g.c) if reduce else None


def _input_grads(g: Geometry, w_tap: Tensor, gz: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_x in x's dtype and layout, grad_weight ``[C, 1, k, k]`` in weight's dtype) from float32 ``gz``."""
    tile = choose_tile(g, g.h, g.w, *INPUT_GRAD_NHWC_TILE)
    kk = g.k * g.k
    grad_x = empty_in_layout((g.n, g.c, g.h, g.w), g.layout, g.x)
    part = torch.empty((1, tile.rows(g), kk * g.c), dtype=torch.float32, device=g.x.device)
    if part.numel() > INT32_MAX:  # k^2 C per tile of 32 pixels: up to ~1.5 x as many elements as x
        g = dataclasses.replace(g, int64=True)
    _dwconv_input_grad_kernel.on(g.x)[tile.grid(g)](
        gz, w_tap, g.x, grad_x, part, *conv_args(g, w_tap, tile), *gz.stride(), *grad_x.stride(),
        **conv_constexprs(g, tile), BF16_RTNE=needs_bf16_rtne(grad_x), VEC=channel_vector(g, gz, grad_x),
    )
    grad_w = sum_rows(part)[0].view(kk, g.c).t().reshape(g.c, 1, g.k, g.k)
    return grad_x, grad_w.to(weight.dtype)


def _empty_grads(g: Geometry, weight: Tensor, *per_channel_like: Tensor) -> tuple[Tensor, ...]:
    grad_x = empty_in_layout((g.n, g.c, g.h, g.w), g.layout, g.x).zero_()
    return (grad_x, torch.zeros_like(weight, memory_format=torch.contiguous_format),
            *(torch.zeros_like(t) for t in per_channel_like))


def _chan(center: Tensor, invstd: Tensor, a: Tensor, b: Tensor, k1: Optional[Tensor] = None) -> Tensor:
    """The float32 per-channel rows ``_grad_u_kernel`` reads: (center, invstd, a, b, k1, k2, k3), k2 = k3 = 0
    and k1 given (eval mode: known up front) or 0 (train mode: :func:`_train_gz` sets the three)."""
    rows = [t.to(torch.float32) for t in (center, invstd, a, b)]
    zeros = torch.zeros_like(rows[0])
    return torch.stack(rows + [zeros if k1 is None else k1.to(torch.float32), zeros, zeros])


def _train_chan(g: Geometry, mean: Tensor, var: Tensor, eps: float, gamma: Tensor, beta: Tensor) -> Tensor:
    """The per-channel rows ``_grad_u_kernel`` reads in train mode (:func:`_chan`), from the variance."""
    return _chan(mean, torch.rsqrt(var.to(torch.float32) + eps), gamma, beta)


def _train_gz(g: Geometry, w_tap: Tensor, grad_y, grad_pooled, chan: Tensor, activation: str, sum_g_xhat: Tensor,
              sum_g: Tensor, count: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Pass 2 (train mode): ``gz = gamma invstd (g - sum_g / count - xhat sum_g_xhat / count)``, float32
    (the depthwise input gradient's input) or, for :func:`bn_act_train_backward`, x's dtype."""
    gz = empty_in_layout((g.n, g.c, g.ho, g.wo), g.layout, g.x, dtype=dtype)
    set_train_rows(chan, sum_g_xhat, sum_g, count)
    _grad_u(g, w_tap, grad_y, grad_pooled, chan, activation, False, gz)
    return gz


def set_train_rows(chan: Tensor, sum_g_xhat: Tensor, sum_g: Tensor, count: int) -> None:
    """Fill rows 4-6 of :func:`_chan`'s rows so that ``k1 g + k2 xhat + k3`` is train-mode BatchNorm's input
    gradient through statistics over ``count`` values: ``k1 = gamma invstd``, ``k2 = -k1 sum_g_xhat / count``,
    ``k3 = -k1 sum_g / count``."""
    m = max(count, 1)
    k1 = chan[2] * chan[1]
    chan[4], chan[5], chan[6] = k1, -k1 * sum_g_xhat.to(torch.float32) / m, -k1 * sum_g.to(torch.float32) / m


def _backward(grad_y, grad_pooled, x, weight, center, invstd, a, b, stride, padding, activation, train):
    """The shared three passes (two in eval mode); returns (grad_x, grad_weight, sum g xhat, sum g)."""
    g = geometry(x, weight, stride, padding, grad_y)
    if g.m == 0 or g.x.numel() == 0:
        return _empty_grads(g, weight, a, b)
    w_tap = tap_major(weight)
    with device_guard(g.x):
        if train:
            chan = _chan(center, invstd, a, b)
            sums = _grad_u(g, w_tap, grad_y, grad_pooled, chan, activation, True, None)
            gz = _train_gz(g, w_tap, grad_y, grad_pooled, chan, activation, sums[1], sums[0], g.m)
        else:
            gz = empty_in_layout((g.n, g.c, g.ho, g.wo), g.layout, g.x, dtype=torch.float32)
            chan = _chan(center, invstd, a, b, k1=a)
            sums = _grad_u(g, w_tap, grad_y, grad_pooled, chan, activation, True, gz)
        grad_x, grad_w = _input_grads(g, w_tap, gz, weight)
    return grad_x, grad_w, sums[1], sums[0]


def dwconv_bn_act_train_backward(
    grad_y: Optional[Tensor],
    grad_pooled: Optional[Tensor],
    x: Tensor,
    weight: Tensor,
    gamma: Tensor,
    beta: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    stride: Sequence[int],
    padding: Sequence[int],
    activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton implementation of ``effnet::dwconv_bn_act_train_backward`` (signature of the reference).

    Returns ``(grad_x, grad_weight, grad_gamma, grad_beta)``: grad_x in x's dtype and memory
    format, grad_weight ``[C, 1, k, k]`` in weight's dtype, the others in gamma's / beta's.
    """
    f32 = torch.float32
    invstd = torch.rsqrt(var.to(f32) + eps)
    grad_x, grad_w, grad_gamma, grad_beta = _backward(
        grad_y, grad_pooled, x, weight, mean.to(f32), invstd, gamma.to(f32), beta.to(f32), stride, padding,
        activation, True)
    return grad_x, grad_w, grad_gamma.to(gamma.dtype), grad_beta.to(beta.dtype)


def dwconv_bn_grad_sums(
    grad_y: Optional[Tensor], grad_pooled: Optional[Tensor], x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor,
    mean: Tensor, var: Tensor, eps: float, stride: Sequence[int], padding: Sequence[int], activation: str,
) -> tuple[Tensor, Tensor]:
    """Triton ``effnet::dwconv_bn_grad_sums`` (signature of the reference): pass 1 alone,
    ``(sum(g xhat), sum(g))`` per channel in gamma's / beta's dtype."""
    g = geometry(x, weight, stride, padding, grad_y)
    if g.m == 0 or g.x.numel() == 0:
        return torch.zeros_like(gamma), torch.zeros_like(beta)
    with device_guard(g.x):
        sums = _grad_u(g, tap_major(weight), grad_y, grad_pooled, _train_chan(g, mean, var, eps, gamma, beta),
                       activation, True, None)
    return sums[1].to(gamma.dtype), sums[0].to(beta.dtype)


def dwconv_bn_input_grads(
    grad_y: Optional[Tensor], grad_pooled: Optional[Tensor], x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor,
    mean: Tensor, var: Tensor, sum_g_xhat: Tensor, sum_g: Tensor, count: int, eps: float, stride: Sequence[int],
    padding: Sequence[int], activation: str,
) -> tuple[Tensor, Tensor]:
    """Triton ``effnet::dwconv_bn_input_grads`` (signature of the reference): passes 2 and 3 with the
    given sums over ``count`` values per channel; ``(grad_x, grad_weight)``."""
    g = geometry(x, weight, stride, padding, grad_y)
    if g.m == 0 or g.x.numel() == 0:
        return _empty_grads(g, weight)
    w_tap = tap_major(weight)
    with device_guard(g.x):
        chan = _train_chan(g, mean, var, eps, gamma, beta)
        gz = _train_gz(g, w_tap, grad_y, grad_pooled, chan, activation, sum_g_xhat, sum_g, count)
        return _input_grads(g, w_tap, gz, weight)


def dwconv_bn_act_backward(
    grad_y: Optional[Tensor],
    grad_mean: Optional[Tensor],
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton implementation of ``effnet::dwconv_bn_act_backward`` (eval mode; signature of the reference).

    Returns ``(grad_x, grad_weight, grad_scale, grad_shift)``.
    """
    f32 = torch.float32
    c = x.shape[1]
    zeros, ones = torch.zeros(c, dtype=f32, device=x.device), torch.ones(c, dtype=f32, device=x.device)
    grad_x, grad_w, grad_scale, grad_shift = _backward(
        grad_y, grad_mean, x, weight, zeros, ones, scale.to(f32), shift.to(f32), stride, padding, activation, False)
    return grad_x, grad_w, grad_scale.to(scale.dtype), grad_shift.to(shift.dtype)


def bn_act_train_backward(grad_y: Tensor, h: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, invstd: Tensor,
                          activation: str) -> tuple[Tensor, Tensor, Tensor]:
    """Triton ``effnet::bn_act_train_backward`` (signature of the reference): the train-mode backward's
    first two passes with a 1x1 "conv" of ones, so that z is h itself: pass 1 the per-channel sums of g and
    g xhat, pass 2 ``grad_h = gamma invstd (g - sum g / M - xhat sum g xhat / M)`` stored in h's dtype and
    layout. Reads h and grad_y twice, writes grad_h once (``2 (2 E) + E`` bytes per element: 10 B in fp16,
    against eager's activation backward and ``native_batch_norm_backward``, ~16 B, plus the BatchNorm
    output it keeps); the sums in a fixed order (no atomics)."""
    ones = torch.ones((h.shape[1], 1, 1, 1), dtype=torch.float32, device=h.device)
    g = geometry(h, ones, (1, 1), (0, 0, 0, 0), grad_y)
    if g.m == 0 or g.x.numel() == 0:
        grad_h = empty_in_layout((g.n, g.c, g.h, g.w), g.layout, g.x).zero_()
        return grad_h, torch.zeros_like(gamma), torch.zeros_like(beta)
    w_tap = tap_major(ones)
    with device_guard(g.x):
        chan = _chan(mean, invstd, gamma, beta)
        sums = _grad_u(g, w_tap, grad_y, None, chan, activation, True, None)
        grad_h = _train_gz(g, w_tap, grad_y, None, chan, activation, sums[1], sums[0], g.m, dtype=h.dtype)
    # the two sums are rows of one buffer: outputs of an op must not alias
    return grad_h, sums[1].to(gamma.dtype, copy=True), sums[0].to(beta.dtype, copy=True)
