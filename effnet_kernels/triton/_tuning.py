"""A small, bounded launch-config tuner keyed by shape class.

Why not ``triton.autotune``: the fused squeeze either accumulates with atomics into its
output or writes per-tile partial sums whose count depends on the tile size, so a config
can only be timed by a launcher that knows how to reset and size those buffers. This
module times the candidates the launcher proposes, through a callable the launcher
provides, once per shape class, and remembers the winner for the process.

No timing happens (a heuristic default is used instead) in Triton's interpreter, while
a CUDA graph is being captured, or when ``EFFNET_KERNELS_TRITON_TUNE=0``.

First-call cost is bounded per process: tuning a shape class compiles every candidate
(1-9 s each on the host CPU) before timing it, so once the seconds spent tuning pass
``EFFNET_KERNELS_TRITON_TUNE_BUDGET_S`` (default 30; ``inf`` for no limit) new shape
classes get the default config (said once on stderr).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch

from ._jit import interpreted

TUNE_ENV_VAR = "EFFNET_KERNELS_TRITON_TUNE"
BUDGET_ENV_VAR = "EFFNET_KERNELS_TRITON_TUNE_BUDGET_S"
DEFAULT_BUDGET_S = 30.0


@dataclass(frozen=True)
class Config:
    """Tile sizes and warps of one launch; the meaning of ``block_a``/``block_b`` is the kernel's."""

    block_a: int
    block_b: int
    num_warps: int = 4


_cache: dict[Hashable, Config] = {}
_lock = threading.Lock()
_spent_s = 0.0  # seconds spent tuning in this process (compiles included)
_budget_note_shown = False


def tuning_budget_s() -> float:
    """Seconds this process may spend tuning (``EFFNET_KERNELS_TRITON_TUNE_BUDGET_S``, default 30)."""
    try:
        budget = float(os.environ.get(BUDGET_ENV_VAR, DEFAULT_BUDGET_S))
    except ValueError:
        return DEFAULT_BUDGET_S
    return DEFAULT_BUDGET_S if math.isnan(budget) else budget


def _budget_left() -> bool:
    global _budget_note_shown
    if _spent_s < tuning_budget_s():
        return True
    if not _budget_note_shown:
        _budget_note_shown = True
        print(f"effnet_kernels: Triton tuning budget used up ({_spent_s:.0f} s >= {BUDGET_ENV_VAR}="
              f"{tuning_budget_s():g}); new shape classes run their default config", file=sys.stderr)
    return False


def tuning_enabled(t: torch.Tensor) -> bool:
    """Whether configs for a launch on ``t`` may be timed now."""
    if interpreted(t):
        return False
    if os.environ.get(TUNE_ENV_VAR, "1") in ("0", "", "false", "False"):
        return False
    return not torch.cuda.is_current_stream_capturing()


def choose(
    key: Hashable,
    t: torch.Tensor,
    space: Callable[[], tuple[Sequence[Config], Config]],
    run: Callable[[Config], None],
) -> Config:
    """The config to launch with for shape class ``key``.

    ``space()`` returns ``(candidates, default)``; it is only called on a cache miss.
    The first time a key is seen on a GPU (with tuning enabled) every candidate is run
    through ``run(config)`` and timed with ``triton.testing.do_bench`` (a few ms each);
    the fastest is cached. Otherwise ``default`` is returned (and not cached, so a later
    call outside graph capture still tunes).
    """
    hit = _cache.get(key)
    if hit is not None:
        return hit
    candidates, default = space()
    if not tuning_enabled(t) or not _budget_left():
        return default
    if len(candidates) == 1:
        _cache[key] = candidates[0]
        return candidates[0]
    from triton.testing import do_bench

    global _spent_s
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        timings = []
        try:
            for cfg in candidates:
                try:
                    timings.append((do_bench(lambda: run(cfg), warmup=3, rep=15, return_mode="median"), cfg))
                except Exception:  # a config that cannot compile (e.g. out of resources) just loses
                    continue
        finally:
            _spent_s += time.perf_counter() - t0
        best = min(timings, key=lambda tc: tc[0])[1] if timings else default
        _cache[key] = best
        return best


def clear_cache() -> None:
    """Forget every tuned choice and the time spent tuning (tests and benchmarks that compare configs)."""
    global _spent_s, _budget_note_shown
    with _lock:
        _cache.clear()
        _spent_s = 0.0
        _budget_note_shown = False
