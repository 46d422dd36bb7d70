"""Contexts tests run code in: the Triton interpreter, a gloo process group of spawned workers, backend
implementations wrapped to count their calls, the environment of a pytest run a test starts."""

from __future__ import annotations

import contextlib
import gc
import os
from typing import Iterator, Sequence

import torch.distributed as dist

from effnet_kernels import backends


def child_pytest_env(**extra: str) -> dict[str, str]:
    """This process's environment for a pytest session a test starts as a subprocess, with ``extra``
    set: without pytest-xdist's worker variables, which would make the child take itself for an
    xdist worker (pytest-benchmark then disables its benchmarks)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    env.pop("PYTEST_CURRENT_TEST", None)
    return {**env, **extra}


@contextlib.contextmanager
def triton_interpreted() -> Iterator[None]:
    """``TRITON_INTERPRET=1`` inside the block (lets the triton backend take CPU tensors), restored after.

    The kernels choose compiled vs interpreted per launch (see ``effnet_kernels.triton._jit``),
    so the variable can be set late: triton itself may have been imported in compiled mode,
    which GPU tests and torch.compile's own Triton kernels need.
    """
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    backends._reset_caches()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
        backends._reset_caches()


@contextlib.contextmanager
def gloo_group(rank: int, world: int, init_file: str) -> Iterator[None]:
    """A spawned worker's membership of a ``world``-process gloo group (file rendezvous at ``init_file``).

    On leaving without an error, nothing may hold the group past its destruction (a DDP reducer
    still referencing it when the interpreter exits aborts the process, about 1 run in 15 before
    this) and neither rank may tear down while the other still talks to it: collect, then meet at
    a barrier. The group is destroyed either way.
    """
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def count_backend_calls(monkeypatch, backend: str, ops: Sequence[str]) -> dict[str, int]:
    """Wrap ``backend``'s implementations of ``ops`` (``monkeypatch``: undone after the test) to count the calls
    each serves; returns the counts, op name -> calls, filled in as they happen."""
    backends._ensure_registered()
    impls = backends._REGISTRY[backend].impls()
    calls: dict[str, int] = {}
    for op in ops:
        def counted(*args, _op=op, _impl=impls[op]):
            calls[_op] = calls.get(_op, 0) + 1
            return _impl(*args)
        monkeypatch.setitem(impls, op, counted)
    return calls
