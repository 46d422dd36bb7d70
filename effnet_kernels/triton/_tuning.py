"""A small, bounded launch-config tuner keyed by shape class.

Why not ``triton.autotune``: the fused squeeze either accumulates with atomics into its
output or writes per-tile partial sums whose count depends on the tile size, so a config
can only be timed by a launcher that knows how to reset and size those buffers. This
module times the candidates the launcher proposes, through a callable the launcher
provides, once per shape class, and remembers the winner for the process and, through
:mod:`._tuning_store`, on disk for later processes (keyed by GPU, compute capability,
Triton version, kernel version and shape class; ``EFFNET_KERNELS_TUNING_STORE=off`` turns
the store off, ``EFFNET_KERNELS_TUNING_CACHE`` moves it). Where a config comes from
(:data:`SOURCES`) is kept per shape class; :func:`start_usage_log` / :func:`usage_counts`
tell which sources the classes a piece of work launched came from (benchmark provenance).

No timing happens (a stored config, else a heuristic default is used instead) in Triton's
interpreter, while a CUDA graph is being captured, or when ``EFFNET_KERNELS_TRITON_TUNE=0``.

First-call cost is bounded per process: tuning a shape class compiles every candidate
(1-9 s each on the host CPU) before timing it, so once the seconds spent tuning pass
``EFFNET_KERNELS_TRITON_TUNE_BUDGET_S`` (default 30; ``inf`` for no limit) new shape
classes get the default config (said once on stderr). Configs read from the store cost
nothing against it: ``python -m benchmarks.tune`` fills the store in a step of its own.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence

import torch

from . import _tuning_store as _store
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


#: Where a shape class's config came from: ``store`` (tuned by an earlier process, read from disk),
#: ``shipped`` (measured on a GPU like this one, from the package's table), ``tuned`` (timed in this process), ``fixed`` (the launcher offered one candidate: not timed by
#: design), ``default`` (could not be timed: tuning off, interpreter, graph capture, budget spent).
SOURCES = ("store", "shipped", "tuned", "fixed", "default")

_cache: dict[Hashable, Config] = {}
_sources: dict[Hashable, str] = {}
_compile_only = False  # see set_compile_only
_store_misses: set[Hashable] = set()  # keys the store had no usable entry for in this process
_usage: Optional[dict[Hashable, str]] = None
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


def _persist_key(key: Hashable, t: torch.Tensor, run: Callable, kernel_version: Optional[str]):
    """(identity, entry key) under which ``key``'s config is stored, or ``None`` (not persisted: not a
    CUDA tensor, store off, a key that is not plain data, or no known kernel version)."""
    if _store.mode() == "off" or interpreted(t):
        return None
    version = kernel_version or _store.kernel_version_for(run)
    shape = _store.encode_key(key)
    if version is None or shape is None:
        return None
    try:
        identity = _store.device_identity(t)
    except Exception:  # no usable CUDA runtime: nothing to key on
        return None
    return None if identity is None else (identity, _store.entry_key(version, shape))


def _note(key: Hashable, source: str) -> None:
    _sources[key] = source
    if _usage is not None:
        _usage[key] = source


def choose(
    key: Hashable,
    t: torch.Tensor,
    space: Callable[[], tuple[Sequence[Config], Config]],
    run: Callable[[Config], None],
    kernel_version: Optional[str] = None,
) -> Config:
    """The config to launch with for shape class ``key``.

    ``space()`` returns ``(candidates, default)``; it is only called on a cache miss.
    On a miss, a config stored on disk for this GPU, Triton version, kernel version and
    ``key`` is used if it is still one of the candidates (no timing). Otherwise, the first
    time a key is seen on a GPU (with tuning enabled) every candidate is run through
    ``run(config)`` and timed with ``triton.testing.do_bench`` (a few ms each); the fastest
    is cached and stored. Otherwise ``default`` is returned (and not cached, so a later
    call outside graph capture still tunes).

    ``kernel_version`` names the kernel's code for the store (optional): by default it is
    the hash of the source of the module that defines ``run`` and of the ``effnet_kernels``
    modules it uses (:func:`._tuning_store.kernel_version_of`).
    """
    hit = _cache.get(key)
    if hit is not None:
        if _usage is not None:
            _usage[key] = _sources.get(key, "memory")
        return hit
    candidates, default = space()
    persist = _persist_key(key, t, run, kernel_version) if key not in _store_misses else None
    if persist is not None:
        found = _store.lookup(*persist, Config)
        if found is not None and found[0] in candidates:
            _cache[key] = found[0]
            _note(key, found[1])
            return found[0]
        _store_misses.add(key)  # an untimed default is asked for at every launch: read the store once
    if not tuning_enabled(t) or not _budget_left():
        _note(key, "default")
        return default
    if len(candidates) == 1:
        _cache[key] = candidates[0]
        _note(key, "fixed")
        return candidates[0]
    if _compile_only:
        for cfg in candidates:  # compiled (into Triton's on-disk cache) and run once, not timed
            try:
                run(cfg)
            except Exception:
                continue
        _note(key, "default")
        return default
    from triton.testing import do_bench

    global _spent_s
    with _lock:
        hit = _cache.get(key)
        if hit is not None:
            if _usage is not None:
                _usage[key] = _sources.get(key, "memory")
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
        _note(key, "tuned" if timings else "default")
        persist = persist or _persist_key(key, t, run, kernel_version)  # None if the store was read before
        if persist is not None and timings:
            _store.save(*persist, best, timings)
        return best


def set_compile_only(enabled: bool) -> None:
    """In this process, run every candidate of a new shape class once instead of timing them, and keep
    nothing: Triton compiles them into its on-disk cache, so a process that times them later loads
    instead of compiling (``python -m benchmarks.tune --jobs`` compiles in parallel workers this way)."""
    global _compile_only
    _compile_only = bool(enabled)


def source_of(key: Hashable) -> Optional[str]:
    """Where this process got ``key``'s config from (one of :data:`SOURCES`), ``None`` if not asked yet."""
    return _sources.get(key)


def start_usage_log() -> None:
    """Start (or restart) recording which shape classes are launched, and their config sources."""
    global _usage
    _usage = {}


def usage_counts(stop: bool = True) -> dict[str, int]:
    """Shape classes launched since :func:`start_usage_log`, counted by source (:data:`SOURCES`
    order, zero counts left out); ``{}`` when not recording. ``stop`` ends the recording."""
    global _usage
    used = _usage or {}
    if stop:
        _usage = None
    counts = {s: 0 for s in SOURCES}
    for source in used.values():
        counts[source] = counts.get(source, 0) + 1
    return {s: n for s, n in counts.items() if n}


def clear_cache() -> None:
    """Forget every tuned choice and the time spent tuning (tests and benchmarks that compare configs).

    The store on disk is left alone (its in-memory copy is dropped: the next miss re-reads it);
    ``EFFNET_KERNELS_TUNING_STORE=off`` or :func:`._tuning_store.configure` keep it out.
    """
    global _spent_s, _budget_note_shown
    _store.forget_loaded()
    with _lock:
        _cache.clear()
        _sources.clear()
        _store_misses.clear()
        _spent_s = 0.0
        _budget_note_shown = False
