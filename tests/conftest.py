"""Shared test configuration: GPU tests skip cleanly where no CUDA GPU is visible; under
pytest-xdist (`-n N`) each worker takes its share of the cores instead of all of them."""

import os

import pytest

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    # Each of N workers gets cores // N intra-op threads (torch defaults to all cores per process:
    # N workers would oversubscribe them). Set before torch is imported so that subprocesses the
    # tests start (gloo ranks, the kernel audit) inherit it too.
    _THREADS = str(max(1, (os.cpu_count() or 1) // _WORKERS))
    os.environ.setdefault("OMP_NUM_THREADS", _THREADS)
    os.environ.setdefault("MKL_NUM_THREADS", _THREADS)

import torch  # noqa: E402

if _WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs per test, but reproducible from the test's id when it fails."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
