"""pytest plugin: stop starting tests once a wall-clock deadline has passed.

``scripts/gpu_session.sh`` runs the GPU test suite under ``timeout``. A run killed by
that timeout writes neither its JUnit XML nor its failure summary, so everything it
learnt is lost. With this plugin (``-p benchmarks.pytest_deadline``) and
``EFFNET_PYTEST_DEADLINE=<unix time>``, every test that would start after the deadline
is skipped instead ("not run: session deadline ..."), so pytest finishes on its own,
in time, and reports what did run. Works under pytest-xdist too (the deadline is an
absolute time, the same for every worker). Without the variable it does nothing.

``EFFNET_PYTEST_NO_CUDA_BUILD=<reason>`` (set by the GPU session when its build step left
no usable extension): the CUDA extension is not JIT-built again in every test process.
Any attempt fails at once with ``<reason>``, so the cuda-backend tests fail quickly instead
of each spending minutes repeating the build that already failed.
"""

from __future__ import annotations

import os
import time

import pytest

DEADLINE_ENV = "EFFNET_PYTEST_DEADLINE"
NO_BUILD_ENV = "EFFNET_PYTEST_NO_CUDA_BUILD"
SKIP_REASON = "not run: session deadline passed"


def deadline() -> float | None:
    """The deadline (seconds since the epoch) from ``$EFFNET_PYTEST_DEADLINE``, or ``None``."""
    text = os.environ.get(DEADLINE_ENV, "").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def pytest_configure(config) -> None:
    reason = os.environ.get(NO_BUILD_ENV, "").strip()
    if not reason:
        return
    from effnet_kernels import _build

    def no_jit_build(*args, **kwargs):
        raise _build.BuildError(f"not JIT-building effnet_kernels._C in this test run ({NO_BUILD_ENV}): {reason}")

    _build.jit_build = no_jit_build


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    limit = deadline()
    if limit is not None and time.time() > limit:
        pytest.skip(f"{SKIP_REASON} ({DEADLINE_ENV})")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    limit = deadline()
    if limit is None:
        return
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if SKIP_REASON in str(getattr(r, "longrepr", ""))]
    if skipped:
        terminalreporter.write_line(f"{len(skipped)} tests not run: the session deadline ({DEADLINE_ENV}) passed", red=True)
