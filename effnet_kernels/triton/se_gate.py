"""Triton ``se_gate``: pooled [N, C] -> gate(W_e . act(W_r . pooled + b_r) + b_e), float32.

``act`` (SiLU or ReLU) and ``gate`` (sigmoid or hard-sigmoid) are the constexprs ``ACT`` and
``GATE`` (codes of ``ops._checks.ACT_CODES``, applied by :func:`._activation.activate`).

Two small block-tiled GEMM kernels with fused epilogues, so that the grid grows with N, R
and C instead of one program per 16 samples doing both products over the whole of C:

1. reduce: ``hidden [N, R] = act(pooled @ W_r^T + b_r)``, one program per
   ``BLOCK_N x BLOCK_R`` tile, looping over C in ``BLOCK_C`` chunks;
2. expand: ``gate [N, C] = gate(hidden @ W_e^T + b_e)``, one program per ``BLOCK_N x BLOCK_C``
   tile, looping over R in chunks of 16 (R is masked per chunk, never padded to a power
   of two as a whole; 32-wide chunks spilled 16 B at N = 1 on sm_90).

Products are ``tl.dot`` in float32 with ``input_precision="ieee"`` (exact fp32 products, as
the fp32 parity rule needs; no TF32). Each program's tile is at most 32 x 64 fp32 plus one
operand chunk, so no configuration spills (every B0-B7 SE size compiles with 0 spill bytes
for sm_90, tests/test_triton_compile.py). All inputs are read as float32 whatever their dtype.

Work per call (B7's largest SE: N = 256, C = 3840, R = 160): FLOPs 2 x 2NCR = 0.63 G;
bytes: weights 2 x 4CR = 4.9 MB (read once per N tile: 8 x with BLOCK_N = 32, mostly from
L2), pooled + gate 8NC = 7.9 MB, hidden 8NR = 0.3 MB: ~13 MB through HBM, which at an
H200's ~4.8 TB/s implies ~3 us (implied, not measured); at N = 1 the bytes are the weights
(4.9 MB, ~1 us implied) and the time is launch latency plus the C loop of the reduce (60 chunks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import prepare_se_gate
from ._activation import activate
from ._jit import device_guard, device_kernel, next_pow2

Tensor = torch.Tensor

MIN_DOT = 16  # tl.dot needs every tile dimension >= 16
MAX_BLOCK_N = 32
BLOCK_R = 32  # hidden units per reduce program / per expand chunk
BLOCK_C_REDUCE = 64  # channels per chunk of the reduce loop
BLOCK_C_EXPAND = 64  # channels per expand program


@device_kernel(do_not_specialize=("N", "R"))  # N only masks rows; R bounds the tiny weight tiles
def _se_reduce_kernel(
    p_ptr, wr_ptr, br_ptr, h_ptr, N, C, R,
    ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """hidden[rows, r] = act(sum over c of pooled[rows, c] * w_reduce[r, c] + b_reduce[r])."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_ok = rows < N
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < R
    row_offs = rows.to(tl.int64)[:, None] * C
    acc = tl.full([BLOCK_N, BLOCK_R], 0.0, tl.float32)
    # `while`, not `for c0 in range(0, C, BLOCK_C)`: Triton 3.6's interpreter cannot take
    # a runtime loop bound under numpy >= 2.4 (it calls int() on a 1-element array).
    c0 = 0
    while c0 < C:
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        pooled = tl.load(p_ptr + row_offs + c[None, :], mask=rows_ok[:, None] & c_ok[None, :], other=0.0)
        w = tl.load(wr_ptr + r[None, :] * C + c[:, None], mask=c_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(pooled.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        c0 += BLOCK_C
    acc += tl.load(br_ptr + r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * R + r[None, :], activate(acc, ACT),
             mask=rows_ok[:, None] & r_ok[None, :])


@device_kernel(do_not_specialize=("N", "R"))
def _se_expand_kernel(
    h_ptr, we_ptr, be_ptr, g_ptr, N, C, R,
    GATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """gate[rows, c] = gate(sum over r of hidden[rows, r] * w_expand[c, r] + b_expand[c])."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_ok = rows < N
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc = tl.full([BLOCK_N, BLOCK_C], 0.0, tl.float32)
    r0 = 0
    while r0 < R:
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < R
        h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * R + r[None, :], mask=rows_ok[:, None] & r_ok[None, :],
                    other=0.0)
        w = tl.load(we_ptr + c[None, :] * R + r[:, None], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
        acc = tl.dot(h, w.to(tl.float32), acc, input_precision="ieee")
        r0 += BLOCK_R
    acc += tl.load(be_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(g_ptr + rows.to(tl.int64)[:, None] * C + c[None, :], activate(acc, GATE),
             mask=rows_ok[:, None] & c_ok[None, :])


def block_n(n: int) -> int:
    """Samples per program: 16 (the smallest tl.dot tile) up to 32 for large batches."""
    return min(max(next_pow2(n), MIN_DOT), MAX_BLOCK_N)


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
    bn = block_n(lp.n)
    br = min(max(next_pow2(lp.r), MIN_DOT), BLOCK_R)
    bc = min(max(next_pow2(lp.c), MIN_DOT), BLOCK_C_EXPAND)
    hidden = torch.empty((lp.n, lp.r), dtype=torch.float32, device=lp.pooled.device)
    with device_guard(lp.pooled):
        _se_reduce_kernel.on(lp.pooled)[(triton.cdiv(lp.n, bn), triton.cdiv(lp.r, br))](
            lp.pooled, lp.w_reduce, lp.b_reduce, hidden, lp.n, lp.c, lp.r,
            ACT=lp.act, BLOCK_N=bn, BLOCK_R=br, BLOCK_C=min(bc, BLOCK_C_REDUCE), num_warps=4,
        )
        _se_expand_kernel.on(lp.pooled)[(triton.cdiv(lp.n, bn), triton.cdiv(lp.c, bc))](
            hidden, lp.w_expand, lp.b_expand, lp.gate, lp.n, lp.c, lp.r,
            GATE=lp.gate_act, BLOCK_N=bn, BLOCK_R=MIN_DOT, BLOCK_C=bc, num_warps=4,
        )
    return lp.gate
