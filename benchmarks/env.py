"""What a benchmark row records about the machine and the code: versions, commit, run id, copy bandwidth.

Every row of ``results.csv`` and ``ops.csv`` starts with :data:`VERSION_COLUMNS`
(:func:`collect_versions`):

* ``gpu``, ``driver``, ``torch``, ``cuda``, ``cudnn``, ``triton``, ``python``: versions;
  ``nvcc``: ``nvcc --version`` of the toolkit the CUDA extension would be built with
  (empty when there is no nvcc);
* ``commit``: ``$EFFNET_COMMIT``, else ``git`` (the device copy of the tree has no ``.git``);
* ``src_hash``: a hash of the package's sources (every file under ``effnet_kernels/`` and
  ``csrc/`` but caches and build outputs), so rows from an uncommitted tree can still be
  told apart; ``cuda_ext``: the source hash the CUDA extension ``effnet_kernels._C`` was
  built from (its ``build_info()``; empty when it is not built), plus ``!stale`` when it
  does not match the sources here;
* ``triton_tune``: the Triton launch-config tuning state (``off``, or ``on budget=<s>``,
  from ``EFFNET_KERNELS_TRITON_TUNE`` / ``EFFNET_KERNELS_TRITON_TUNE_BUDGET_S``; `` store=ro|off``
  when the tuning store is not read-write) and, on a row that launched Triton kernels, where
  its shape classes' configs came from (`` classes=store:12,tuned:1,...``,
  :func:`triton_tuning_state`);
* ``run_id``: which run the row belongs to (:func:`run_id`): ``$EFFNET_RUN_ID`` when set
  (a GPU session sets one, so the invocations it resumes share it), else one generated per
  process (``python -m benchmarks.network`` makes one per invocation). Numbers from
  different runs are never divided by one another (:mod:`benchmarks.report`).
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import time
import uuid
from pathlib import Path
from typing import Mapping, Optional

import torch

__all__ = ["VERSION_COLUMNS", "collect_versions", "git_commit", "measure_copy_bandwidth", "synchronize",
           "run_id", "new_run_id", "source_hash", "cuda_extension_hash", "nvcc_version", "triton_tuning_state",
           "start_triton_usage", "triton_usage",
           "RUN_ID_ENV", "COMMIT_ENV"]

VERSION_COLUMNS = ("gpu", "driver", "torch", "cuda", "cudnn", "triton", "python", "nvcc", "commit",
                   "src_hash", "cuda_ext", "triton_tune", "run_id")
COMMIT_ENV = "EFFNET_COMMIT"
RUN_ID_ENV = "EFFNET_RUN_ID"
_REPO = Path(__file__).resolve().parent.parent
_SOURCE_DIRS = ("effnet_kernels", "csrc")
_SKIP_SUFFIXES = (".pyc", ".pyo", ".so", ".o", ".pyd", ".dll", ".dylib", ".tmp", ".log")


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


def new_run_id() -> str:
    """A fresh run id: UTC time and 6 random hex digits, e.g. ``20250101T120000Z-1a2b3c``."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


_process_run_id: Optional[str] = None


def run_id() -> str:
    """``$EFFNET_RUN_ID`` when set, else one id generated once per process."""
    global _process_run_id
    env = os.environ.get(RUN_ID_ENV, "").strip()
    if env:
        return env
    if _process_run_id is None:
        _process_run_id = new_run_id()
    return _process_run_id


def _source_files(root: Path = _REPO) -> list[Path]:
    files = []
    for top in _SOURCE_DIRS:
        base = root / top
        if not base.is_dir():
            continue
        for path in base.rglob("*"):
            rel = path.relative_to(root)
            if any(part == "__pycache__" or part.startswith(".") or part.endswith(".egg-info") or part == "build"
                   for part in rel.parts):
                continue
            if path.is_file() and not path.name.endswith(_SKIP_SUFFIXES):
                files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def source_hash(root: Path = _REPO) -> str:
    """12 hex digits of a SHA-256 over the names and contents of the package sources
    (``effnet_kernels/`` and ``csrc/`` under ``root``; caches and build outputs left out);
    empty when neither folder exists."""
    files = _source_files(root)
    if not files:
        return ""
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        try:
            h.update(path.read_bytes())
        except OSError:
            h.update(b"<unreadable>")
        h.update(b"\0")
    return h.hexdigest()[:12]


def nvcc_version() -> str:
    """The version ``nvcc --version`` reports (e.g. ``13.0.88``); empty when there is no nvcc."""
    try:
        from effnet_kernels import _build

        nvcc = _build.find_nvcc()
        return _build.nvcc_version(nvcc) if nvcc else ""
    except Exception:  # no nvcc, a broken one, or an unparsable answer: record nothing
        return ""


def cuda_extension_hash() -> str:
    """The source hash the CUDA extension was built from (``_C.build_info()``), without building it.

    The loaded module if there is one, else a prebuilt ``effnet_kernels/_C*.so``, else a
    JIT build cached for the sources here; ``""`` when none exists. ``!stale`` is appended
    when the build does not match the sources here.
    """
    try:
        from effnet_kernels import _build, cuda
    except Exception:
        return ""
    info = None
    try:
        module = getattr(cuda, "_module", None)
        if module is None:
            module, _ = cuda._import_prebuilt()
        if module is not None:
            info = module.build_info()
    except Exception:
        info = None
    expected = None
    try:
        expected = cuda._expected_hash()
        if info is None and expected is not None:
            info = _build.read_record(_build.jit_dir(expected))
    except Exception:
        pass
    if not info:
        return ""
    built = str(info.get("source_hash", ""))
    return built + ("!stale" if expected is not None and built and built != expected else "")


def triton_tuning_state(usage: Optional[Mapping[str, int]] = None) -> str:
    """What the Triton launch-config tuner does in this process, and where a row's configs came from.

    ``off`` or ``on budget=<seconds>``; then `` store=ro`` / `` store=off`` when the tuning store
    (``EFFNET_KERNELS_TUNING_STORE``) is not read-write; then, for a row whose work launched
    Triton kernels (``usage``: :func:`triton_usage`), `` classes=store:<n>,tuned:<n>,fixed:<n>,default:<n>``
    (zero counts left out): how many of its shape classes used a config read from the store
    (pre-tuned by ``python -m benchmarks.tune``), timed in this process, the launcher's only
    candidate, or the untimed default (tuning off, graph capture, budget spent).
    """
    tune_var, budget_var, default = "EFFNET_KERNELS_TRITON_TUNE", "EFFNET_KERNELS_TRITON_TUNE_BUDGET_S", 30.0
    if os.environ.get(tune_var, "1") in ("0", "", "false", "False"):
        state = "off"
    else:
        try:
            budget = float(os.environ.get(budget_var, default))
        except ValueError:
            budget = default
        if budget != budget:  # NaN
            budget = default
        state = f"on budget={budget:g}"
    try:
        from effnet_kernels.triton import _tuning_store

        mode = _tuning_store.mode()
    except Exception:  # triton or the package unimportable: nothing is stored either
        mode = "rw"
    if mode != "rw":
        state += f" store={mode}"
    if usage:
        state += " classes=" + ",".join(f"{source}:{n}" for source, n in usage.items())
    return state


def start_triton_usage() -> None:
    """Start recording the Triton shape classes launched (see :func:`triton_usage`); a no-op without Triton."""
    try:
        from effnet_kernels.triton import _tuning
    except Exception:
        return
    _tuning.start_usage_log()


def triton_usage() -> dict[str, int]:
    """Shape classes launched since :func:`start_triton_usage`, by config source; ``{}`` without Triton."""
    try:
        from effnet_kernels.triton import _tuning
    except Exception:
        return {}
    return _tuning.usage_counts()


def collect_versions(device: torch.device | str, run: Optional[str] = None) -> dict[str, str]:
    """The :data:`VERSION_COLUMNS` of a result row for ``device`` (``run``: the run id, default :func:`run_id`)."""
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
        "python": platform.python_version(),
        "nvcc": nvcc_version(),
        "commit": git_commit(),
        "src_hash": source_hash(),
        "cuda_ext": cuda_extension_hash(),
        "triton_tune": triton_tuning_state(),
        "run_id": run or run_id(),
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
