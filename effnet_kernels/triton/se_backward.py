"""Triton backward of the squeeze-and-excitation ops: ``se_excite_backward`` and ``se_gate_backward``.

``se_excite_backward(grad_out, y, gate)``: ``_se_excite_backward_kernel`` over tiles of
``BLOCK_P`` pixels x ``BLOCK_C`` channels of one sample (channels fastest for channels_last,
pixels fastest for NCHW) writes ``grad_y = grad_out * gate`` (y's dtype and memory format) and
the tile's per-channel ``sum(grad_out * y)``; :func:`._partials.sum_rows` adds the tiles of each
sample in a fixed order into ``grad_gate [N, C]``. Bytes: read grad_out and y, write grad_y
(3 x the element size per element) plus ``4 C`` per tile of partials.

``se_gate_backward``: with ``a = pooled W_r^T + b_r``, ``h = act(a)``, ``v = h W_e^T + b_e``:
``dv = grad_gate * gate'(v)``, ``grad_W_e = dv^T h``, ``grad_b_e = sum_n dv``,
``da = (dv W_e) * act'(a)``, ``grad_W_r = da^T pooled``, ``grad_b_r = sum_n da``,
``grad_pooled = da W_r``. Two small ``tl.dot`` kernels (float32, ``input_precision="ieee"``:
exact fp32 products, no TF32), each program a block of samples or of weight entries:

* ``_rows_times_kernel``: ``out [N, J] = epi(act_A(A) @ W + bias)`` for ``a``, ``dv``, ``da``
  and ``grad_pooled`` (``W`` read through strides, so ``W_r^T`` and ``W_e^T`` need no copy;
  ``epi`` multiplies by the derivative at the pre-activation);
* ``_outer_kernel``: ``out [I, J] = A^T @ act_B(B)`` and ``sum_n A`` over all samples in a fixed
  order, for the weight and bias gradients (deterministic, no atomics).

The intermediates ``a, dv, da`` are float32 ``[N, R]`` / ``[N, C]``; every input is read as
float32 and every gradient is rounded once to its tensor's dtype. Bytes (B7's largest SE,
N = 256, C = 3840, R = 160): weights 4 x 2.5 MB reads, pooled / grad_gate / dv / grad_pooled
4 x 3.9 MB, a / da 4 x 0.16 MB: ~27 MB.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._launch import as_layout, empty_in_layout, layout_of, needs_int64
from ..ops._checks import ACT_CODES
from ._activation import activate
from ._activation_grad import activation_grad
from ._jit import SUM, device_guard, device_kernel, interpreted, needs_bf16_rtne, next_pow2, round_bf16_rtne
from ._partials import sum_rows
from .dwconv_train import per_channel, pixel_sum

Tensor = torch.Tensor

MIN_DOT = 16  # tl.dot needs every tile dimension >= 16
INTERPRETER_EXCITE_TILE = (256, 32)  # (pixels, channels) in Triton's interpreter: few, large tiles


@device_kernel(do_not_specialize=("HW", "TILES"))
def _se_excite_backward_kernel(
    go_ptr, y_ptr, gate_ptr, gy_ptr, part_ptr, C, HW, TILES, sn, sc, sp,
    CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BF16_RTNE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_y = grad_out * gate over one tile; part[sample, tile, c] = sum over the tile of grad_out * y."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    n = pid // TILES
    p1 = (pid % TILES) * BLOCK_P + tl.arange(0, BLOCK_P)
    c1 = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if CHANNELS_LAST:
        p, c = p1[:, None], c1[None, :]
    else:
        p, c = p1[None, :], c1[:, None]
    ok = (p < HW) & (c < C)
    offs = n * sn + c * sc + p * sp  # grad_out, y and grad_y share one dense layout
    go = tl.load(go_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    gate = per_channel(tl.load(gate_ptr + n * C + c1, mask=c1 < C, other=0.0).to(tl.float32), CHANNELS_LAST)
    out = go * gate
    if BF16_RTNE:  # round to nearest even by hand: see _jit.needs_bf16_rtne
        out = round_bf16_rtne(out)
    tl.store(gy_ptr + offs, out.to(gy_ptr.dtype.element_ty), mask=ok)
    tl.store(part_ptr + pid * C + c1, pixel_sum(go * y, CHANNELS_LAST), mask=c1 < C)


def se_excite_backward(grad_out: Tensor, y: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """Triton implementation of ``effnet::se_excite_backward`` (signature of the reference).

    Returns ``(grad_y, grad_gate)``: grad_y in y's dtype and memory format, grad_gate ``[N, C]`` in gate's dtype.
    """
    layout = layout_of(y)
    yd = as_layout(y, layout)
    go = as_layout(grad_out, layout)
    n, c, h, w = yd.shape
    hw = h * w
    grad_y = empty_in_layout(yd.shape, layout, yd)
    if grad_y.numel() == 0:
        return grad_y, torch.zeros_like(gate)
    if interpreted(yd):
        bp, bc = INTERPRETER_EXCITE_TILE
    elif layout == "nhwc":
        bp, bc = 32, 128 // yd.element_size()
    else:
        bp, bc = 512, 4
    bc = min(bc, max(next_pow2(c), 2))
    bp = min(bp, max(next_pow2(hw), 16))
    tiles = triton.cdiv(hw, bp)
    part = torch.empty((n, tiles, c), dtype=torch.float32, device=yd.device)
    strides = (c * hw, 1, c) if layout == "nhwc" else (c * hw, hw, 1)
    with device_guard(yd):
        _se_excite_backward_kernel.on(yd)[(n * tiles, triton.cdiv(c, bc))](
            go, yd, gate.contiguous(), grad_y, part, c, hw, tiles, *strides,
            CHANNELS_LAST=layout == "nhwc", INT64=needs_int64(yd, go), BF16_RTNE=needs_bf16_rtne(grad_y),
            BLOCK_P=bp, BLOCK_C=bc, num_warps=4,
        )
        grad_gate = sum_rows(part)
    return grad_y, grad_gate.to(gate.dtype)


@device_kernel(do_not_specialize=("N",))
def _rows_times_kernel(
    a_ptr, w_ptr, bias_ptr, aux_ptr, out_ptr, N, K, J, swk, swj,
    A_ACT: tl.constexpr, HAS_BIAS: tl.constexpr, EPI: tl.constexpr, EPI_ACT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[n, j] = epi(sum over k of act_A(A[n, k]) W[k, j] + bias[j]), float32.

    A ``[N, K]`` dense; ``W[k, j]`` at ``k * swk + j * swj``; aux ``[N, J]`` dense.
    EPI 0: as is; 1: ``aux * act'(.)`` (aux the incoming gradient); 2: ``. * act'(aux)`` (aux a pre-activation).
    """
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_ok = rows < N
    rows64 = rows.to(tl.int64)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = j < J
    acc = tl.full([BLOCK_N, BLOCK_J], 0.0, tl.float32)
    k0 = 0
    while k0 < K:  # not range(): see se_gate.py on Triton's interpreter and numpy >= 2.4
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        a = tl.load(a_ptr + rows64[:, None] * K + k[None, :], mask=rows_ok[:, None] & k_ok[None, :], other=0.0)
        a = activate(a.to(tl.float32), A_ACT)
        wv = tl.load(w_ptr + k[:, None] * swk + j[None, :] * swj, mask=k_ok[:, None] & j_ok[None, :], other=0.0)
        acc = tl.dot(a, wv.to(tl.float32), acc, input_precision="ieee")
        k0 += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + j, mask=j_ok, other=0.0).to(tl.float32)[None, :]
    ok = rows_ok[:, None] & j_ok[None, :]
    offs = rows64[:, None] * J + j[None, :]
    if EPI == 1:
        acc = tl.load(aux_ptr + offs, mask=ok, other=0.0).to(tl.float32) * activation_grad(acc, EPI_ACT)
    elif EPI == 2:
        acc = acc * activation_grad(tl.load(aux_ptr + offs, mask=ok, other=0.0).to(tl.float32), EPI_ACT)
    tl.store(out_ptr + offs, acc, mask=ok)


@device_kernel(do_not_specialize=("N",))
def _outer_kernel(
    a_ptr, b_ptr, out_ptr, sum_ptr, N, I, J,
    B_ACT: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[i, j] = sum over n of A[n, i] act_B(B[n, j]); sum[i] = sum over n of A[n, i] (column block 0 stores it)."""
    i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = i < I
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = j < J
    acc = tl.full([BLOCK_I, BLOCK_J], 0.0, tl.float32)
    s = tl.full([BLOCK_I, BLOCK_N], 0.0, tl.float32)
    n0 = 0
    while n0 < N:
        nn = n0 + tl.arange(0, BLOCK_N)
        n_ok = nn < N
        nn64 = nn.to(tl.int64)
        at = tl.load(a_ptr + nn64[None, :] * I + i[:, None], mask=i_ok[:, None] & n_ok[None, :], other=0.0)
        at = at.to(tl.float32)
        bv = tl.load(b_ptr + nn64[:, None] * J + j[None, :], mask=n_ok[:, None] & j_ok[None, :], other=0.0)
        acc = tl.dot(at, activate(bv.to(tl.float32), B_ACT), acc, input_precision="ieee")
        s += at
        n0 += BLOCK_N
    tl.store(out_ptr + i[:, None] * J + j[None, :], acc, mask=i_ok[:, None] & j_ok[None, :])
    tl.store(sum_ptr + i, tl.reduce(s, 1, SUM), mask=i_ok & (tl.program_id(1) == 0))


def _block(size: int, most: int) -> int:
    return min(max(next_pow2(size), MIN_DOT), most)


def _rows_times(a: Tensor, w: Tensor, swk: int, swj: int, j: int, bias: Optional[Tensor] = None,
                a_act: str = "identity", epi: int = 0, aux: Optional[Tensor] = None,
                epi_act: str = "identity") -> Tensor:
    n, k = a.shape
    out = torch.empty((n, j), dtype=torch.float32, device=a.device)
    bn, bj = _block(n, 32), _block(j, 64)
    _rows_times_kernel.on(a)[(triton.cdiv(n, bn), triton.cdiv(j, bj))](
        a, w, bias if bias is not None else out, aux if aux is not None else out, out, n, k, j, swk, swj,
        A_ACT=ACT_CODES[a_act], HAS_BIAS=bias is not None, EPI=epi, EPI_ACT=ACT_CODES[epi_act],
        BLOCK_N=bn, BLOCK_J=bj, BLOCK_K=_block(k, 64), num_warps=4,
    )
    return out


def _outer(a: Tensor, b: Tensor, b_act: str = "identity") -> tuple[Tensor, Tensor]:
    n, i = a.shape
    j = b.shape[1]
    out = torch.empty((i, j), dtype=torch.float32, device=a.device)
    total = torch.empty(i, dtype=torch.float32, device=a.device)
    bi, bj = _block(i, 64), _block(j, 32)
    _outer_kernel.on(a)[(triton.cdiv(i, bi), triton.cdiv(j, bj))](
        a, b, out, total, n, i, j, B_ACT=ACT_CODES[b_act], BLOCK_I=bi, BLOCK_J=bj, BLOCK_N=_block(n, 32),
        num_warps=4,
    )
    return out, total


def se_gate_backward(
    grad_gate: Tensor, pooled: Tensor, w_reduce: Tensor, b_reduce: Tensor, w_expand: Tensor, b_expand: Tensor,
    activation: str, gate: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triton implementation of ``effnet::se_gate_backward`` (signature of the reference).

    Returns the gradients w.r.t. ``(pooled, w_reduce [R, C], b_reduce, w_expand [C, R], b_expand)``,
    each in its tensor's dtype.
    """
    n, c = pooled.shape
    r = w_reduce.shape[0]
    p, wr, br, we, be = (t.contiguous() for t in (pooled, w_reduce, b_reduce, w_expand, b_expand))
    gg = grad_gate.contiguous()
    if n == 0:
        return (torch.empty_like(p), torch.zeros_like(wr), torch.zeros_like(br), torch.zeros_like(we),
                torch.zeros_like(be))
    with device_guard(p):
        a = _rows_times(p, wr, 1, c, r, bias=br)  # a = pooled W_r^T + b_r
        dv = _rows_times(a, we, 1, r, c, bias=be, a_act=activation, epi=1, aux=gg, epi_act=gate)
        da = _rows_times(dv, we, r, 1, r, epi=2, aux=a, epi_act=activation)  # (dv W_e) * act'(a)
        grad_p = _rows_times(da, wr, c, 1, c)  # da W_r
        grad_we, grad_be = _outer(dv, a, activation)  # dv^T act(a), sum dv
        grad_wr, grad_br = _outer(da, p)  # da^T pooled, sum da
    return (grad_p.to(pooled.dtype), grad_wr.to(w_reduce.dtype), grad_br.to(b_reduce.dtype),
            grad_we.to(w_expand.dtype), grad_be.to(b_expand.dtype))
