"""Deterministic second-stage reductions of per-program partials, shared by the training kernels.

The training kernels never reduce with atomics: every program stores its own partial result
(one row of a float32 buffer) and one of these small kernels combines the rows in a fixed
order, so the result is bitwise reproducible run to run (``torch.use_deterministic_algorithms``
holds always) and no fp32 atomic contention limits the reduction.

* :func:`sum_rows`: ``part [B, T, L] -> [B, L]``, the plain sum over ``T`` (chunks of
  ``BLOCK_T`` rows summed in a ``[BLOCK_T, BLOCK_L]`` accumulator, folded once at the end) by
  the eval squeeze's own fixed-order kernel (``dwconv._sum_tiles_kernel``, the same reduction);
* :func:`combine_moments`: per-program ``(count, mean, M2)`` of a per-channel sample ->
  the whole sample's mean and biased variance, by Chan et al.'s pairwise formula
  (``delta = mean_b - mean_a``, ``M2 = M2_a + M2_b + delta^2 n_a n_b / n``), chunk by chunk:
  no sum of squares of large-mean values, so the variance keeps its relative accuracy
  whatever the mean.

Bytes: each reads its partials once (``4 B T L``, ``12 T C``) and writes ``4 B L`` / ``8 C``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._jit import SUM, device_guard, device_kernel, next_pow2
from .dwconv import _sum_tiles_kernel

Tensor = torch.Tensor

BLOCK_T = 16  # rows per step of the fixed-order loop
MAX_BLOCK_L = 128


def sum_rows(part: Tensor) -> Tensor:
    """``part.sum(1)`` of a dense float32 ``[B, T, L]`` buffer, in a fixed order (float32 ``[B, L]``)."""
    b, t, length = part.shape
    if t == 1:
        return part[:, 0]
    out = torch.empty((b, length), dtype=torch.float32, device=part.device)
    if out.numel() == 0:
        return out.zero_()
    block_l = min(next_pow2(length), MAX_BLOCK_L)
    with device_guard(part):
        _sum_tiles_kernel.on(part)[(b, triton.cdiv(length, block_l))](
            part, out, length, t, BLOCK_T=min(next_pow2(t), BLOCK_T), BLOCK_C=block_l, num_warps=4,
        )
    return out


@device_kernel(do_not_specialize=("T",))
def _combine_moments_kernel(part_ptr, mean_ptr, var_ptr, T, C, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """mean, biased var per channel from part[t, 0:3, c] = (count, mean, M2) of program t (Chan's formula)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    n_a = tl.full([BLOCK_C], 0.0, tl.float32)
    mean_a = tl.full([BLOCK_C], 0.0, tl.float32)
    m2_a = tl.full([BLOCK_C], 0.0, tl.float32)
    t0 = 0
    while t0 < T:
        t = t0 + tl.arange(0, BLOCK_T)
        ok = (t < T)[:, None] & c_ok[None, :]
        row = part_ptr + t[:, None].to(tl.int64) * (3 * C) + c[None, :]
        cnt = tl.load(row, mask=ok, other=0.0)
        mu = tl.load(row + C, mask=ok, other=0.0)
        m2 = tl.load(row + 2 * C, mask=ok, other=0.0)
        # this chunk's moments (its rows' means are close to each other: the sums are benign) ...
        n_b = tl.reduce(cnt, 0, SUM)
        mean_b = tl.reduce(cnt * mu, 0, SUM) / tl.maximum(n_b, 1.0)
        d = mu - mean_b[None, :]
        m2_b = tl.reduce(m2 + cnt * d * d, 0, SUM)
        # ... merged into the running ones
        n = n_a + n_b
        frac = n_b / tl.maximum(n, 1.0)
        delta = mean_b - mean_a
        mean_a = mean_a + delta * frac
        m2_a = m2_a + m2_b + delta * delta * n_a * frac
        n_a = n
        t0 += BLOCK_T
    tl.store(mean_ptr + c, mean_a, mask=c_ok)
    tl.store(var_ptr + c, m2_a / tl.maximum(n_a, 1.0), mask=c_ok)


def combine_moments(part: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, biased var), float32 ``[C]``, from a dense float32 ``[T, 3, C]`` buffer of (count, mean, M2)."""
    t, _, c = part.shape
    mean = torch.empty(c, dtype=torch.float32, device=part.device)
    var = torch.empty(c, dtype=torch.float32, device=part.device)
    block_c = min(next_pow2(c), MAX_BLOCK_L)
    with device_guard(part):
        _combine_moments_kernel.on(part)[(triton.cdiv(c, block_c),)](
            part, mean, var, t, c, BLOCK_T=min(next_pow2(t), BLOCK_T), BLOCK_C=block_c, num_warps=4,
        )
    return mean, var
