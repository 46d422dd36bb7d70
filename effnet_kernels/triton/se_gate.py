"""Triton ``se_gate``: pooled [N, C] -> gate(W_e . act(W_r . pooled + b_r) + b_e), float32.

``act`` (SiLU or ReLU) and ``gate`` (sigmoid or hard-sigmoid) are the constexprs ``ACT`` and
``GATE`` (codes of ``ops._checks.ACT_CODES``, applied by :func:`._activation.activate`).

One program per block of ``BLOCK_N`` = 16 samples, so each weight tile it loads serves
16 samples (at batch 256 the weights are read 16 times, not 256). It loops over C in
``BLOCK_C`` chunks twice, with fp32 ``tl.dot`` (``input_precision="ieee"``: exact fp32
products, no TF32):

1. hidden ``[BLOCK_N, BLOCK_R]`` += pooled chunk ``[BLOCK_N, BLOCK_C]`` @ W_r^T chunk
   ``[BLOCK_C, BLOCK_R]``; then + b_r and ``act``;
2. per chunk: gate = ``gate``(hidden @ W_e^T chunk ``[BLOCK_R, BLOCK_C]`` + b_e), stored.

``BLOCK_R`` is R rounded up to a power of two (>= 16; R <= 160 in EfficientNet B0-B7)
and ``BLOCK_C`` shrinks as R grows so that a weight tile stays ~8K elements; any C
works (B7: C = 3840). All inputs are read as float32 whatever their dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import prepare_se_gate
from ._activation import activate
from ._jit import device_guard, device_kernel, next_pow2

Tensor = torch.Tensor

BLOCK_N = 16  # samples per program; tl.dot needs >= 16 rows
_TILE_ELEMENTS = 8192


@device_kernel(do_not_specialize=("N", "R"))  # N only masks rows; R bounds the tiny weight tiles
def _se_gate_kernel(
    p_ptr, wr_ptr, br_ptr, we_ptr, be_ptr, g_ptr, N, C, R,
    ACT: tl.constexpr, GATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_ok = rows < N
    row_offs = rows.to(tl.int64)[:, None] * C
    r = tl.arange(0, BLOCK_R)
    r_ok = r < R
    hidden = tl.full([BLOCK_N, BLOCK_R], 0.0, tl.float32)
    # `while`, not `for c0 in range(0, C, BLOCK_C)`: Triton 3.6's interpreter cannot take
    # a runtime loop bound under numpy >= 2.4 (it calls int() on a 1-element array).
    c0 = 0
    while c0 < C:
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        pooled = tl.load(p_ptr + row_offs + c[None, :], mask=rows_ok[:, None] & c_ok[None, :], other=0.0)
        w = tl.load(wr_ptr + r[None, :] * C + c[:, None], mask=c_ok[:, None] & r_ok[None, :], other=0.0)
        hidden = tl.dot(pooled.to(tl.float32), w.to(tl.float32), hidden, input_precision="ieee")
        c0 += BLOCK_C
    hidden += tl.load(br_ptr + r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    hidden = tl.where(r_ok[None, :], activate(hidden, ACT), 0.0)
    c0 = 0
    while c0 < C:
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        w = tl.load(we_ptr + c[None, :] * R + r[:, None], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        v = tl.dot(hidden, w.to(tl.float32), input_precision="ieee")
        v += tl.load(be_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(g_ptr + row_offs + c[None, :], activate(v, GATE), mask=rows_ok[:, None] & c_ok[None, :])
        c0 += BLOCK_C


def se_gate(
    pooled: Tensor, w_reduce: Tensor, b_reduce: Tensor, w_expand: Tensor, b_expand: Tensor, activation: str, gate: str
) -> Tensor:
    """Triton implementation of ``effnet::se_gate`` (signature of the reference).

    Args:
        pooled: ``[N, C]`` float32/float16/bfloat16; w_reduce ``[R, C]``, b_reduce ``[R]``,
            w_expand ``[C, R]``, b_expand ``[C]`` (any of those dtypes, read as float32).
        activation: ``"silu"`` or ``"relu"``; gate: ``"sigmoid"`` or ``"hardsigmoid"``.

    Returns:
        The gate ``[N, C]`` float32.
    """
    lp = prepare_se_gate(pooled, w_reduce, b_reduce, w_expand, b_expand, activation, gate)
    if lp.n == 0 or lp.c == 0:
        return lp.gate
    block_r = max(next_pow2(lp.r), 16)
    block_c = max(min(next_pow2(lp.c), _TILE_ELEMENTS // block_r, 128), 16)
    with device_guard(lp.pooled):
        _se_gate_kernel.on(lp.pooled)[(triton.cdiv(lp.n, BLOCK_N),)](
            lp.pooled, lp.w_reduce, lp.b_reduce, lp.w_expand, lp.b_expand, lp.gate, lp.n, lp.c, lp.r,
            ACT=lp.act, GATE=lp.gate_act, BLOCK_N=BLOCK_N, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8 if block_r >= 256 else 4,
        )
    return lp.gate
