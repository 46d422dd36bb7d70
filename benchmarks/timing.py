"""Timing that excludes warm-up, rotates inputs and reports the median with p20/p80.

On a CUDA device each iteration is bracketed by CUDA events on the current stream; on
the CPU the host clock is used (only meant for tests of the runner). Compilation,
autotuning and ``cudnn.benchmark`` searches happen in the warm-up, which is not timed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .env import synchronize

__all__ = ["Timing", "TimingConfig", "quantiles", "time_calls", "capture_graphs"]


@dataclass(frozen=True)
class Timing:
    """Per-call times in milliseconds over ``iters`` timed calls."""

    ms_p20: float
    ms_p50: float
    ms_p80: float
    iters: int


@dataclass(frozen=True)
class TimingConfig:
    """How long to warm up and how many calls to time.

    Warm-up runs at least ``warmup_iters`` calls and at least ``warmup_s`` seconds. The
    timed phase then runs enough calls to last about ``min_time_s`` seconds, clamped to
    ``[min_iters, max_iters]``.
    """

    warmup_iters: int = 3
    warmup_s: float = 0.5
    min_time_s: float = 1.0
    min_iters: int = 20
    max_iters: int = 500

    def __post_init__(self) -> None:
        for name in ("warmup_iters", "min_iters", "max_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_iters < self.min_iters:
            raise ValueError(f"max_iters ({self.max_iters}) must be >= min_iters ({self.min_iters})")
        if self.warmup_s < 0 or self.min_time_s < 0:
            raise ValueError("warmup_s and min_time_s must be >= 0")


def quantiles(samples: Sequence[float]) -> tuple[float, float, float]:
    """(p20, p50, p80) of ``samples`` with linear interpolation (one sample: that value)."""
    if not samples:
        raise ValueError("samples must not be empty")
    if len(samples) == 1:
        v = float(samples[0])
        return v, v, v
    cuts = statistics.quantiles(samples, n=10, method="inclusive")
    return cuts[1], statistics.median(samples), cuts[7]


def time_calls(
    call: Callable[[int], Any],
    n_inputs: int,
    device: torch.device | str,
    config: TimingConfig = TimingConfig(),
) -> Timing:
    """Time ``call(i)`` where ``i`` cycles through ``range(n_inputs)`` (rotated inputs).

    ``call`` must enqueue the work for input ``i`` (it may return without waiting for
    the device). Returns the per-call p20/p50/p80 in milliseconds.
    """
    if n_inputs < 1:
        raise ValueError(f"n_inputs must be >= 1, got {n_inputs}")
    device = torch.device(device)
    i = 0
    t0 = time.perf_counter()
    per_call = 0.0
    while i < config.warmup_iters or time.perf_counter() - t0 < config.warmup_s:
        s = time.perf_counter()
        call(i % n_inputs)
        synchronize(device)
        per_call = time.perf_counter() - s  # the last warm call predicts the timed ones
        i += 1
    iters = int(config.min_time_s / per_call) if per_call > 0 else config.max_iters
    iters = max(config.min_iters, min(config.max_iters, iters))
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            call(i % n_inputs)
            end.record()
            i += 1
        torch.cuda.synchronize(device)
        ms = [start.elapsed_time(end) for start, end in events]
    else:
        ms = []
        for _ in range(iters):
            s = time.perf_counter()
            call(i % n_inputs)
            ms.append((time.perf_counter() - s) * 1e3)
            i += 1
    p20, p50, p80 = quantiles(ms)
    return Timing(p20, p50, p80, iters)


def capture_graphs(fn: Callable[[torch.Tensor], Any], inputs: Sequence[torch.Tensor], warmup: int = 3) -> tuple[list[Callable[[], None]], list[Any]]:
    """One CUDA graph of ``fn(x)`` per input buffer (all in one memory pool).

    ``fn`` is warmed up on a side stream first, as capture requires. Returns the replay
    callables and the graphs' static outputs (overwritten by each replay).
    """
    if not inputs or inputs[0].device.type != "cuda":
        raise ValueError("capture_graphs needs CUDA input tensors")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            for x in inputs:
                fn(x)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    pool = torch.cuda.graph_pool_handle()
    replays, outputs = [], []
    for x in inputs:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn(x)
        replays.append(graph.replay)
        outputs.append(out)
    torch.cuda.synchronize()
    return replays, outputs
