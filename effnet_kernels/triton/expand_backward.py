"""Triton ``expand_bn_act_train_backward``: the expand step's backward from the conv's input, h never written.

For ``a = act(batch_norm(h))``, ``h = conv1x1(x, W)`` (x ``[M, K]`` pixels x K channels, W ``[J, K]``, J = the
expanded channels, typically 6K) with the batch statistics ``mean`` / ``invstd`` of h, and ``grad_a`` the
gradient at a, the gradients are (``g = grad_a act'(u)``, ``u = xhat gamma + beta``, ``xhat = (h - mean)
invstd``):

* ``grad_beta = sum g``, ``grad_gamma = sum g xhat`` (per channel j, over the M pixels);
* ``grad_h = k1 g + k2 xhat + k3`` with ``k1 = gamma invstd``, ``k2 = -k1 grad_gamma / M``, ``k3 = -k1
  grad_beta / M`` (:func:`.dwconv_backward.set_train_rows`), rounded to x's dtype (as eager's is);
* ``grad_x = grad_h W`` and ``grad_W = grad_h^T x``.

Three kernels, each recomputing the ``[BLOCK_M, BLOCK_J]`` tile of h it needs from x (:func:`_grad_at_bn`: a
GEMM over K, float32 accumulation, not rounded) and reading grad_a's tile once:

* :func:`_sums_kernel`: the two per-channel sums, one float32 partial per (split, channel) program, summed in
  a fixed order (:func:`._partials.sum_rows`);
* :func:`_dgrad_kernel`: per (sample, pixel tile, K tile), a loop over J: ``grad_h`` tile, then
  ``acc += grad_h W[j, k]``;
* :func:`_wgrad_kernel`: per (split, J tile, K tile), a loop over pixel tiles: ``acc += x^T grad_h``
  (x's tile loaded transposed through its pointers), a float32 partial per split, summed in a fixed order.

No atomics: bitwise reproducible. Bytes per element of h (fp16, ``s`` = 2 B): grad_a read three times (``3 s``)
plus x read three times and grad_x written (``4 s K / J``: ~1.3 B at J = 6K) = ~7.3 B, against the composition
of a recomputed h, ``bn_act_train_backward`` and cuDNN's backward (the ``cuda`` backend's): write h, read
grad_a and h twice, write grad_h, read grad_h twice = ``8 s`` = 16 B plus x. FLOPs: the recompute adds
``2 M K J`` per kernel (and per K tile of the dgrad and wgrad) to the backward's ``4 M K J``: K = 16-640 is
memory-bound by far (B0's 24 -> 144 expand: 2 M K J = 6912 FLOP per pixel over ~870 B per pixel moved).
(Implied by the arithmetic, not measured.)

Tiles (untuned defaults; :mod:`._tuning` times the candidates on a GPU): the recompute's K step up to 64 (16 for
float32), BLOCK_J up to 64, BLOCK_M 64 pixels, the output's K tile up to 64 (float32: 32 x 32 tiles); warps for 16
float32 elements per thread per live tile (the recompute keeps about five live: 64 x 64 on 4 warps spilled on
sm_90); the sums and the wgrad split their pixel tiles over enough programs to fill the GPU
(:func:`.pointwise_backward.pixel_splits`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._launch import as_layout, empty_in_layout, layout_of, needs_int64
from . import _tuning
from ._activation_grad import activation_grad
from ._jit import (SUM, device_function, device_guard, device_kernel, interpreted, loop_bound, needs_bf16_rtne,
                   needs_dot_upcast, next_pow2)
from ._partials import sum_rows
from .dwconv_backward import _chan, set_train_rows
from .pointwise import MIN_DOT
from .pointwise_backward import gemm_dot, pair_vectors, pixel_splits, round_like, vector_hints
from ..ops._checks import ACT_CODES

Tensor = torch.Tensor


@device_function
def _grad_at_bn(x_ptr, w_ptr, ga_ptr, chan_ptr, n, p, p_ok, j, HW, K, J, sxn, sxc, sxp, san, sac, sap,
                ACT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    """``(g, xhat)``, float32 ``[BLOCK_M, BLOCK_J]``: the gradient at the BatchNorm's output and the normalised
    conv output at sample ``n``'s pixels ``p`` (valid where ``p_ok``) and channels ``j``, h recomputed from x;
    0 where the pixel or channel is out of range."""
    j_ok = j < J
    x_rows = x_ptr + n * sxn + p[:, None] * sxp
    h = tl.full([BLOCK_M, BLOCK_J], 0.0, tl.float32)
    for k0 in range(0, loop_bound(K), BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        a = tl.load(x_rows + k[None, :] * sxc, mask=p_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + j[None, :] * K + k[:, None], mask=k_ok[:, None] & j_ok[None, :], other=0.0)  # W^T
        h = gemm_dot(a, b, h, IEEE, UPCAST)
    mean = tl.load(chan_ptr + j, mask=j_ok, other=0.0)
    invstd = tl.load(chan_ptr + J + j, mask=j_ok, other=0.0)
    gamma = tl.load(chan_ptr + 2 * J + j, mask=j_ok, other=0.0)
    beta = tl.load(chan_ptr + 3 * J + j, mask=j_ok, other=0.0)
    ok = p_ok[:, None] & j_ok[None, :]
    xhat = tl.where(ok, (h - mean[None, :]) * invstd[None, :], 0.0)
    u = xhat * gamma[None, :] + beta[None, :]
    ga = tl.load(ga_ptr + n * san + j[None, :] * sac + p[:, None] * sap, mask=ok, other=0.0).to(tl.float32)
    g = tl.where(ok, ga * activation_grad(u, ACT), 0.0)
    return g, xhat


@device_function
def _grad_h(g, xhat, p_ok, chan_ptr, j, J, x_ptr, BF16_RTNE: tl.constexpr):
    """``k1 g + k2 xhat + k3`` (train-mode BatchNorm's input gradient) rounded to x's dtype; 0 outside the valid
    pixels ``p_ok`` and channels (where k3 must not leak in)."""
    j_ok = j < J
    k1 = tl.load(chan_ptr + 4 * J + j, mask=j_ok, other=0.0)
    k2 = tl.load(chan_ptr + 5 * J + j, mask=j_ok, other=0.0)
    k3 = tl.load(chan_ptr + 6 * J + j, mask=j_ok, other=0.0)
    gh = tl.where(p_ok[:, None], g * k1[None, :] + xhat * k2[None, :] + k3[None, :], 0.0)
    return round_like(gh, x_ptr, BF16_RTNE)


@device_kernel(do_not_specialize=("HW", "TILES_M", "TILES", "CHUNK"))
def _sums_kernel(
    x_ptr, w_ptr, ga_ptr, chan_ptr, part_ptr,
    HW, K, J, TILES_M, TILES, CHUNK, J_TILES,
    sxn, sxc, sxp, san, sac, sap,
    ACT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, INT64: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, VEC_X: tl.constexpr, VEC_A: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``part[split, 0, j] = sum g``, ``part[split, 1, j] = sum g xhat`` over this split's CHUNK pixel tiles."""
    K, J, HW, sxn, sxc, sxp, san, sac, sap = vector_hints(K, J, HW, sxn, sxc, sxp, san, sac, sap, CHANNELS_LAST,
                                                           VEC_X, VEC_A)
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    j = (pid % J_TILES) * BLOCK_J + tl.arange(0, BLOCK_J)
    split = pid // J_TILES
    s_g = tl.full([BLOCK_J], 0.0, tl.float32)
    s_gx = tl.full([BLOCK_J], 0.0, tl.float32)
    for i in range(0, loop_bound(CHUNK)):
        t = split * CHUNK + i
        n = t // TILES_M
        p = (t % TILES_M) * BLOCK_M + tl.arange(0, BLOCK_M)
        g, xhat = _grad_at_bn(x_ptr, w_ptr, ga_ptr, chan_ptr, n, p, (p < HW) & (t < TILES), j, HW, K, J,
                              sxn, sxc, sxp, san, sac, sap, ACT, IEEE, UPCAST, BLOCK_M, BLOCK_J, BLOCK_K)
        s_g += tl.reduce(g, 0, SUM)
        s_gx += tl.reduce(g * xhat, 0, SUM)
    j_ok = j < J
    tl.store(part_ptr + split * 2 * J + j, s_g, mask=j_ok)
    tl.store(part_ptr + split * 2 * J + J + j, s_gx, mask=j_ok)


@device_kernel(do_not_specialize=("HW", "TILES_M"))
def _dgrad_kernel(
    x_ptr, w_ptr, ga_ptr, chan_ptr, gx_ptr,
    HW, K, J, TILES_M, K_TILES,
    sxn, sxc, sxp, san, sac, sap,
    ACT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, INT64: tl.constexpr, BF16_RTNE: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, VEC_X: tl.constexpr, VEC_A: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    """grad_x tile ``[BLOCK_M pixels of sample n, BLOCK_CI of x's channels] = sum over j of grad_h W[j, ci]``."""
    K, J, HW, sxn, sxc, sxp, san, sac, sap = vector_hints(K, J, HW, sxn, sxc, sxp, san, sac, sap, CHANNELS_LAST,
                                                           VEC_X, VEC_A)
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    ci = (pid % K_TILES) * BLOCK_CI + tl.arange(0, BLOCK_CI)  # the K tile varies fastest: x, grad_a from L2
    mt = pid // K_TILES
    n = mt // TILES_M
    p = (mt % TILES_M) * BLOCK_M + tl.arange(0, BLOCK_M)
    p_ok = p < HW
    ci_ok = ci < K
    acc = tl.full([BLOCK_M, BLOCK_CI], 0.0, tl.float32)
    for j0 in range(0, loop_bound(J), BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        g, xhat = _grad_at_bn(x_ptr, w_ptr, ga_ptr, chan_ptr, n, p, p_ok, j, HW, K, J, sxn, sxc, sxp, san, sac, sap,
                              ACT, IEEE, UPCAST, BLOCK_M, BLOCK_J, BLOCK_K)
        gh = _grad_h(g, xhat, p_ok, chan_ptr, j, J, x_ptr, BF16_RTNE)
        w = tl.load(w_ptr + j[:, None] * K + ci[None, :], mask=(j < J)[:, None] & ci_ok[None, :], other=0.0)
        acc = gemm_dot(gh, w, acc, IEEE, UPCAST)
    ok = p_ok[:, None] & ci_ok[None, :]
    tl.store(gx_ptr + n * sxn + ci[None, :] * sxc + p[:, None] * sxp, round_like(acc, x_ptr, BF16_RTNE), mask=ok)


@device_kernel(do_not_specialize=("HW", "TILES_M", "TILES", "CHUNK"))
def _wgrad_kernel(
    x_ptr, w_ptr, ga_ptr, chan_ptr, part_ptr,
    HW, K, J, TILES_M, TILES, CHUNK, J_TILES, K_TILES,
    sxn, sxc, sxp, san, sac, sap,
    ACT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, INT64: tl.constexpr, BF16_RTNE: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, VEC_X: tl.constexpr, VEC_A: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    """``part[split, j, ci] = sum over this split's CHUNK pixel tiles of grad_h[p, j] x[p, ci]``."""
    K, J, HW, sxn, sxc, sxp, san, sac, sap = vector_hints(K, J, HW, sxn, sxc, sxp, san, sac, sap, CHANNELS_LAST,
                                                           VEC_X, VEC_A)
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    ci = (pid % K_TILES) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    rest = pid // K_TILES
    j = (rest % J_TILES) * BLOCK_J + tl.arange(0, BLOCK_J)
    split = rest // J_TILES
    ci_ok = ci < K
    acc = tl.full([BLOCK_CI, BLOCK_J], 0.0, tl.float32)  # grad_W^T's tile
    for i in range(0, loop_bound(CHUNK)):
        t = split * CHUNK + i
        n = t // TILES_M
        p = (t % TILES_M) * BLOCK_M + tl.arange(0, BLOCK_M)
        p_ok = (p < HW) & (t < TILES)
        g, xhat = _grad_at_bn(x_ptr, w_ptr, ga_ptr, chan_ptr, n, p, p_ok, j, HW, K, J, sxn, sxc, sxp, san, sac, sap,
                              ACT, IEEE, UPCAST, BLOCK_M, BLOCK_J, BLOCK_K)
        gh = _grad_h(g, xhat, p_ok, chan_ptr, j, J, x_ptr, BF16_RTNE)
        # x's tile as [BLOCK_CI, BLOCK_M] (its transpose, by the pointers)
        xt = tl.load(x_ptr + n * sxn + ci[:, None] * sxc + p[None, :] * sxp, mask=ci_ok[:, None] & p_ok[None, :],
                     other=0.0)
        acc = gemm_dot(xt, gh, acc, IEEE, UPCAST)
    tl.store(part_ptr + split * J * K + j[None, :] * K + ci[:, None], acc, mask=ci_ok[:, None] & (j < J)[None, :])


@dataclass
class ExpandBackwardLaunch:
    """x and grad_a dense in x's layout, the weight ``[J, K]`` in x's dtype, the per-channel rows."""

    x: Tensor
    grad_a: Tensor
    weight: Tensor
    chan: Tensor  # float32 [7, J]: mean, invstd, gamma, beta, k1, k2, k3 (dwconv_backward._chan)
    layout: str
    n: int
    k: int
    h: int
    w: int
    j: int
    act: int
    int64: bool

    @property
    def count(self) -> int:
        return self.n * self.h * self.w


def prepare(grad_a: Tensor, x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor, invstd: Tensor,
            activation: str) -> ExpandBackwardLaunch:
    layout = layout_of(x)
    xd = as_layout(x, layout)
    ga = as_layout(grad_a, layout)
    n, k, h, w = xd.shape
    return ExpandBackwardLaunch(
        x=xd, grad_a=ga, weight=weight.to(x.dtype).contiguous(), chan=_chan(mean, invstd, gamma, beta),
        layout=layout, n=n, k=k, h=h, w=w, j=weight.shape[0], act=ACT_CODES[activation], int64=needs_int64(xd, ga),
    )


def vectors(lp: ExpandBackwardLaunch) -> tuple[int, int]:
    """``(VEC_X, VEC_A)``: elements per aligned vector along x's and grad_a's contiguous axis."""
    return pair_vectors(lp.layout, lp.x, lp.k, lp.grad_a, lp.j, lp.h * lp.w)


def _common(lp: ExpandBackwardLaunch) -> tuple[list, dict]:
    """The strides and constexprs every kernel here takes."""
    vec_x, vec_a = vectors(lp)
    sx, sa = lp.x.stride(), lp.grad_a.stride()
    strides = [sx[0], sx[1], sx[3], sa[0], sa[1], sa[3]]
    return strides, dict(ACT=lp.act, IEEE=lp.x.dtype == torch.float32, UPCAST=needs_dot_upcast(lp.x), INT64=lp.int64,
                         CHANNELS_LAST=lp.layout == "nhwc", VEC_X=vec_x, VEC_A=vec_a)


def _f32(lp: ExpandBackwardLaunch) -> bool:
    return lp.x.dtype == torch.float32


def _block_k(lp: ExpandBackwardLaunch) -> int:
    """The recompute's step over x's channels: K up to 64 (16 for float32: FMA operands in registers, 32 spilled
    12-20 B in the dgrad on sm_90)."""
    return max(MIN_DOT, min(next_pow2(lp.k), 16 if _f32(lp) else 64))


def _block_j(lp: ExpandBackwardLaunch, widest: int = 64) -> int:
    return max(MIN_DOT, min(next_pow2(lp.j), widest))


def _pixel_tile(lp: ExpandBackwardLaunch, widest: int = 64) -> int:
    return max(MIN_DOT, min(widest, next_pow2(lp.h * lp.w)))


def _warps(*tiles: int) -> int:
    """Warps for the largest float32 tile a program keeps live (``tiles``: its element counts): 8 elements per
    thread per tile, 1 to 8 warps (the recompute keeps four or five such tiles live: h, xhat, u, g, grad_a; on sm_90
    64 x 64 on 4 warps took 255 registers and spilled, 32 x 64 on 4 warps 168 and spilled 8-60 B)."""
    nw = 8
    while nw > 1 and max(tiles) < nw * 32 * 8:
        nw //= 2
    return nw


def _space(lp: ExpandBackwardLaunch, candidates: list[_tuning.Config]) -> tuple[list[_tuning.Config], _tuning.Config]:
    if interpreted(lp.x) or lp.grad_a.numel() < (1 << 20):
        return candidates[:1], candidates[0]
    return candidates, candidates[0]


def _num_stages(lp: ExpandBackwardLaunch, wgrad: bool = False) -> int:
    """Software-pipeline depth of the recompute's K loop: 3 for 16-bit channels_last, 2 on NCHW; 1 in float32 and
    for the wgrad on NCHW (nested loops with FMA operands in registers spilled 8-20 B at 2 stages on sm_90)."""
    if _f32(lp) or (wgrad and lp.layout == "nchw"):
        return 1
    return 2 if lp.layout == "nchw" else 3


# ---------------------------------------------------------------- pass 1: the per-channel sums
def _sums_candidates(lp: ExpandBackwardLaunch) -> list[_tuning.Config]:
    """``Config(BLOCK_M, BLOCK_J, warps)``: 64 pixels x J up to 64 (the first the default)."""
    out = []
    for bm, bj in ((32, 32), (32, 64)) if _f32(lp) else ((64, 64), (64, 32), (32, 64)):  # 128 x 64 spilled
        bm, bj = _pixel_tile(lp, bm), _block_j(lp, bj)
        cfg = _tuning.Config(bm, bj, _warps(bm * bj))
        if cfg not in out:
            out.append(cfg)
    return out


def _launch_sums(lp: ExpandBackwardLaunch, part_of, cfg: _tuning.Config) -> Tensor:
    bm, bj = cfg.block_a, cfg.block_b
    tiles_m = triton.cdiv(lp.h * lp.w, bm)
    j_tiles = triton.cdiv(lp.j, bj)
    tiles, splits, chunk = pixel_splits(lp.n, lp.h * lp.w, bm, j_tiles)
    part = part_of(splits)
    strides, flags = _common(lp)
    _sums_kernel.on(lp.x)[(splits * j_tiles,)](
        lp.x, lp.weight, lp.grad_a, lp.chan, part, lp.h * lp.w, lp.k, lp.j, tiles_m, tiles, chunk, j_tiles,
        *strides, **flags, BLOCK_M=bm, BLOCK_J=bj, BLOCK_K=_block_k(lp), num_warps=cfg.num_warps,
        num_stages=_num_stages(lp),
    )
    return part


def _sums(lp: ExpandBackwardLaunch) -> tuple[Tensor, Tensor]:
    """(sum g, sum g xhat), float32 ``[J]`` each."""
    def part_of(splits: int) -> Tensor:
        return torch.empty((1, splits, 2 * lp.j), dtype=torch.float32, device=lp.x.device)

    key = ("expand_sums", *_key(lp))
    cfg = _tuning.choose(key, lp.x, lambda: _space(lp, _sums_candidates(lp)), lambda c: _launch_sums(lp, part_of, c))
    total = sum_rows(_launch_sums(lp, part_of, cfg))[0]
    return total[: lp.j], total[lp.j:]


# ---------------------------------------------------------------- pass 2: grad_x
def _dgrad_candidates(lp: ExpandBackwardLaunch) -> list[_tuning.Config]:
    """``Config(BLOCK_M, BLOCK_CI, warps)``: 64 pixels x K up to 64 (the first the default)."""
    out = []
    for bm, bci in ((32, 32),) if _f32(lp) else ((64, 64), (64, 32), (32, 64)):  # float32 64 x 32 spilled 8 B
        bm, bci = _pixel_tile(lp, bm), max(MIN_DOT, min(next_pow2(lp.k), bci))
        cfg = _tuning.Config(bm, bci, _warps(bm * bci, bm * _dgrad_block_j(lp)))
        if cfg not in out:
            out.append(cfg)
    return out


def _dgrad_block_j(lp: ExpandBackwardLaunch) -> int:
    """The dgrad's step over J (its GEMM's reduction): up to 64 (16 for float32, as :func:`_block_k`)."""
    return _block_j(lp, 16 if _f32(lp) else 64)


def _launch_dgrad(lp: ExpandBackwardLaunch, grad_x: Tensor, cfg: _tuning.Config) -> None:
    bm, bci = cfg.block_a, cfg.block_b
    tiles_m = triton.cdiv(lp.h * lp.w, bm)
    k_tiles = triton.cdiv(lp.k, bci)
    strides, flags = _common(lp)
    _dgrad_kernel.on(lp.x)[(lp.n * tiles_m * k_tiles,)](
        lp.x, lp.weight, lp.grad_a, lp.chan, grad_x, lp.h * lp.w, lp.k, lp.j, tiles_m, k_tiles, *strides, **flags,
        BF16_RTNE=needs_bf16_rtne(lp.x), BLOCK_M=bm, BLOCK_J=_dgrad_block_j(lp),
        BLOCK_K=_block_k(lp), BLOCK_CI=bci, num_warps=cfg.num_warps, num_stages=_num_stages(lp),
    )


def _dgrad(lp: ExpandBackwardLaunch) -> Tensor:
    grad_x = empty_in_layout((lp.n, lp.k, lp.h, lp.w), lp.layout, lp.x)
    key = ("expand_dgrad", *_key(lp))
    cfg = _tuning.choose(key, lp.x, lambda: _space(lp, _dgrad_candidates(lp)), lambda c: _launch_dgrad(lp, grad_x, c))
    _launch_dgrad(lp, grad_x, cfg)
    return grad_x


# ---------------------------------------------------------------- pass 3: grad_W
def _wgrad_candidates(lp: ExpandBackwardLaunch) -> list[_tuning.Config]:
    """``Config(BLOCK_J, BLOCK_CI, warps)``: J up to 64 x K up to 64 (the first the default)."""
    out = []
    for bj, bci in ((32, 32),) if _f32(lp) else ((64, 64), (64, 32), (32, 64)):  # float32 64 x 16 spilled 8 B
        bj, bci = _block_j(lp, bj), max(MIN_DOT, min(next_pow2(lp.k), bci))
        cfg = _tuning.Config(bj, bci, _warps(bj * bci, _wgrad_pixel_tile(lp) * bj))
        if cfg not in out:
            out.append(cfg)
    return out


def _wgrad_pixel_tile(lp: ExpandBackwardLaunch) -> int:
    """Pixels per step of the wgrad's reduction: 64; 32 for NCHW with an odd H W (a pointer per element: 64 spilled
    360 B at 7 x 7); 16 for float32 (FMA operands in registers: 32 spilled 12-36 B on sm_90)."""
    scalar = lp.layout == "nchw" and vectors(lp)[0] == 1
    return _pixel_tile(lp, 16 if _f32(lp) else 32 if scalar else 64)


def _launch_wgrad(lp: ExpandBackwardLaunch, part_of, cfg: _tuning.Config) -> Tensor:
    bj, bci = cfg.block_a, cfg.block_b
    bm = _wgrad_pixel_tile(lp)
    tiles_m = triton.cdiv(lp.h * lp.w, bm)
    j_tiles, k_tiles = triton.cdiv(lp.j, bj), triton.cdiv(lp.k, bci)
    tiles, splits, chunk = pixel_splits(lp.n, lp.h * lp.w, bm, j_tiles * k_tiles)
    part = part_of(splits)
    strides, flags = _common(lp)
    _wgrad_kernel.on(lp.x)[(splits * j_tiles * k_tiles,)](
        lp.x, lp.weight, lp.grad_a, lp.chan, part, lp.h * lp.w, lp.k, lp.j, tiles_m, tiles, chunk, j_tiles, k_tiles,
        *strides, **flags, BF16_RTNE=needs_bf16_rtne(lp.x), BLOCK_M=bm, BLOCK_J=bj, BLOCK_K=_block_k(lp),
        BLOCK_CI=bci, num_warps=cfg.num_warps, num_stages=_num_stages(lp, wgrad=True),
    )
    return part


def _wgrad(lp: ExpandBackwardLaunch) -> Tensor:
    """grad_W, float32 ``[J, K]``."""
    def part_of(splits: int) -> Tensor:
        return torch.empty((1, splits, lp.j * lp.k), dtype=torch.float32, device=lp.x.device)

    key = ("expand_wgrad", *_key(lp))
    cfg = _tuning.choose(key, lp.x, lambda: _space(lp, _wgrad_candidates(lp)), lambda c: _launch_wgrad(lp, part_of, c))
    return sum_rows(_launch_wgrad(lp, part_of, cfg))[0].view(lp.j, lp.k)


def _key(lp: ExpandBackwardLaunch) -> tuple:
    return (lp.x.device.index, lp.layout, lp.x.dtype, lp.grad_a.dtype, lp.act, next_pow2(lp.k), next_pow2(lp.j),
            next_pow2(lp.h * lp.w), next_pow2(lp.n), lp.int64)


def expand_bn_act_train_backward(grad_a: Tensor, x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor,
                                 mean: Tensor, invstd: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Triton ``effnet::expand_bn_act_train_backward`` (signature of the reference): the three kernels above.

    Args:
        grad_a: ``[N, J, H, W]`` any float dtype (read in float32); x: ``[N, K, H, W]`` float32/float16/bfloat16;
        weight: ``[J, K]`` any float dtype (used in x's dtype); gamma, beta, mean, invstd: float32 ``[J]``.

    Returns:
        ``(grad_x in x's dtype and layout, grad_weight [J, K] in weight's dtype, grad_gamma, grad_beta)``.
    """
    from .. import reference

    if x.numel() == 0 or weight.shape[0] == 0 or x.shape[2] * x.shape[3] == 0:
        return reference.expand_bn_act_train_backward(grad_a, x, weight, gamma, beta, mean, invstd, activation)
    lp = prepare(grad_a, x, weight, gamma, beta, mean, invstd, activation)
    with device_guard(lp.x):
        sum_g, sum_g_xhat = _sums(lp)
        set_train_rows(lp.chan, sum_g_xhat, sum_g, lp.count)
        grad_x = _dgrad(lp)
        grad_w = _wgrad(lp)
    return (grad_x, grad_w.to(weight.dtype), sum_g_xhat.to(gamma.dtype, copy=True),
            sum_g.to(beta.dtype, copy=True))
