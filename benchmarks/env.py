"""What a benchmark row records about the machine: versions, commit, copy bandwidth."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import torch

__all__ = ["VERSION_COLUMNS", "collect_versions", "git_commit", "measure_copy_bandwidth", "synchronize"]

VERSION_COLUMNS = ("gpu", "driver", "torch", "cuda", "cudnn", "triton", "commit")
COMMIT_ENV = "EFFNET_COMMIT"
_REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=_REPO)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def git_commit() -> str:
    """The checkout's short commit, ``+dirty`` when tracked files changed.

    ``$EFFNET_COMMIT`` wins (the GPU machine gets a copy of the tree without ``.git``);
    ``"unknown"`` when neither is available.
    """
    env = os.environ.get(COMMIT_ENV, "").strip()
    if env:
        return env
    sha = _run(["git", "rev-parse", "--short=12", "HEAD"])
    if not sha:
        return "unknown"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return sha + ("+dirty" if dirty else "")


def _driver_version() -> str:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else ""


def _triton_version() -> str:
    try:
        import triton
    except Exception:  # triton missing or broken: record that, do not fail the run
        return ""
    return str(getattr(triton, "__version__", ""))


def collect_versions(device: torch.device | str) -> dict[str, str]:
    """The :data:`VERSION_COLUMNS` of a result row for ``device``."""
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "gpu": torch.cuda.get_device_name(device) if on_cuda else "cpu",
        "driver": _driver_version() if on_cuda else "",
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "cudnn": str(cudnn) if cudnn else "",
        "triton": _triton_version(),
        "commit": git_commit(),
    }


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(device: torch.device | str, nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written.

    One ``nbytes`` buffer is copied into another ``iters`` times after a warm-up; CUDA
    events time each copy and the median is used. On the CPU the host clock times it
    (only useful for tests). Raises ``ValueError`` for ``nbytes`` < 1 or ``iters`` < 1.
    """
    if nbytes < 1:
        raise ValueError(f"nbytes must be >= 1, got {nbytes}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    device = torch.device(device)
    n = max(1, nbytes // 4)
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    return 2 * n * 4 / median / 1e9
