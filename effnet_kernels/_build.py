"""Build the CUDA extension ``effnet_kernels._C`` with nvcc and ninja.

Two callers: ``setup.py`` (ahead of time, into the package) and
:mod:`effnet_kernels.cuda` (just in time, into a per-version cache directory under a
file lock). ``setup.py`` loads this file by path, so it imports neither torch nor the
rest of the package.

The module links only the CUDA runtime (static), so it needs no particular torch. What
it was built from is recorded twice: inside the module (``_C.build_info()``) and, for
JIT builds, in a ``build_info.json`` next to it, so a stale or foreign build is caught
before any kernel runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

#: Must equal ``effnet::kAbiVersion`` in ``csrc/effnet_ext.h``: the Python <-> C++
#: calling convention. A module reporting another number is refused.
ABI_VERSION = 5

DEFAULT_ARCHS = ("80", "86", "89", "90")
ARCHS_ENV = "EFFNET_KERNELS_CUDA_ARCHS"
SKIP_ENV = "EFFNET_KERNELS_SKIP_CUDA_BUILD"
CACHE_ENV = "EFFNET_KERNELS_CACHE_DIR"
JOBS_ENV = "MAX_JOBS"
MODULE = "effnet_kernels._C"
RECORD_NAME = "build_info.json"
SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".cpp")
#: Oldest architecture nvcc 13 still targets.
MIN_ARCH = 75


class BuildError(RuntimeError):
    """Building the extension failed; the message says why and where the log is."""


# ------------------------------------------------------------------ sources
def package_dir() -> Path:
    """The ``effnet_kernels`` package directory."""
    return Path(__file__).resolve().parent


def source_dir() -> Optional[Path]:
    """The CUDA sources: ``csrc/`` of a source checkout (or ``effnet_kernels/_csrc`` if shipped); None if absent."""
    for candidate in (package_dir() / "_csrc", package_dir().parent / "csrc"):
        if candidate.is_dir() and any(candidate.glob("*.cu")):
            return candidate
    return None


def source_files(src: Path) -> list[Path]:
    """Every file in ``src`` the build depends on, sorted by name."""
    return sorted(p for p in src.iterdir() if p.is_file() and p.suffix in SOURCE_SUFFIXES)


def source_hash(src: Path) -> str:
    """A short hash of the sources' names and contents and :data:`ABI_VERSION`."""
    h = hashlib.sha256(f"abi={ABI_VERSION}\n".encode())
    for path in source_files(src):
        h.update(path.name.encode() + b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ toolchain
def parse_archs(spec: str) -> tuple[str, ...]:
    """``"80;90"`` (also ``"8.0 9.0"``, ``"sm_80,sm_90"``) -> ``("80", "90")``, sorted, validated."""
    archs = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        a = item.lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if not a.isdigit() or int(a) < MIN_ARCH:
            raise ValueError(
                f"{ARCHS_ENV} must list CUDA architectures >= {MIN_ARCH} like '80;90', got {spec!r} "
                f"(bad entry {item!r})"
            )
        archs.append(a)
    if not archs:
        raise ValueError(f"{ARCHS_ENV} must list at least one CUDA architecture like '80;90', got {spec!r}")
    return tuple(sorted(set(archs), key=int))


def requested_archs(default: Sequence[str] = DEFAULT_ARCHS) -> tuple[str, ...]:
    """The architectures to build: ``$EFFNET_KERNELS_CUDA_ARCHS`` if set, else ``default``."""
    spec = os.environ.get(ARCHS_ENV, "").strip()
    return parse_archs(spec) if spec else tuple(default)


def find_nvcc() -> Optional[str]:
    """Path of nvcc: ``$CUDA_HOME/bin``, ``$CUDA_PATH/bin``, ``PATH``, ``/usr/local/cuda/bin``; None if absent."""
    for env in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(env)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def nvcc_version(nvcc: str) -> str:
    """``"13.0.88"`` from ``nvcc --version``."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"V(\d+\.\d+\.\d+)", out) or re.search(r"release (\d+\.\d+)", out)
    if not m:
        raise BuildError(f"cannot parse the version of {nvcc} from: {out!r}")
    return m.group(1)


def find_ninja() -> Optional[str]:
    """Path of ninja (``PATH`` or the ``ninja`` pip package); None if absent."""
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja  # type: ignore[import-not-found]
    except ImportError:
        return None
    candidate = Path(ninja.BIN_DIR) / "ninja"
    return str(candidate) if candidate.is_file() else None


def pybind11_include() -> Optional[str]:
    """pybind11's header directory; None if pybind11 is not installed."""
    try:
        import pybind11  # type: ignore[import-not-found]
    except ImportError:
        return None
    return pybind11.get_include()


def missing_tools(need_sources: bool = True) -> list[str]:
    """What is missing to build the extension here, as actionable sentences ([] = can build)."""
    problems = []
    if need_sources and source_dir() is None:
        problems.append("the CUDA sources (csrc/) are not part of this installation")
    if find_nvcc() is None:
        problems.append("nvcc was not found (install the CUDA toolkit, or set CUDA_HOME)")
    if find_ninja() is None:
        problems.append("ninja was not found (pip install ninja)")
    if pybind11_include() is None:
        problems.append("pybind11 is not installed (pip install pybind11)")
    return problems


def default_jobs() -> int:
    """Parallel compile jobs: ``$MAX_JOBS`` or the CPUs this process may use."""
    env = os.environ.get(JOBS_ENV, "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ValueError(f"{JOBS_ENV} must be a positive integer, got {env!r}")
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def ext_filename() -> str:
    """The extension's file name for this interpreter, e.g. ``_C.cpython-311-x86_64-linux-gnu.so``."""
    return "_C" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def python_tag() -> str:
    """``cpython-311`` style tag: a JIT cache directory serves one interpreter version."""
    return sys.implementation.cache_tag or f"py{sys.version_info.major}{sys.version_info.minor}"


# ------------------------------------------------------------------ build
@dataclass
class BuildConfig:
    """One build: where the sources are, what to target, where things go."""

    source_dir: Path
    build_dir: Path
    output: Path  # the final module file
    archs: tuple[str, ...] = DEFAULT_ARCHS
    jobs: int = 1
    nvcc: str = "nvcc"
    ninja: str = "ninja"
    nvcc_version: str = "unknown"
    source_hash: str = ""
    extra_cuflags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def log(self) -> Path:
        return self.build_dir / "build.log"

    def record(self) -> dict:
        """The build-info record (also compiled into the module and returned by ``_C.build_info()``)."""
        return {
            "nvcc_version": self.nvcc_version,
            "archs": ";".join(self.archs),
            "source_hash": self.source_hash,
            "abi_version": ABI_VERSION,
            "python": python_tag(),
        }


def make_config(
    build_dir: Path,
    output: Path,
    archs: Optional[Sequence[str]] = None,
    jobs: Optional[int] = None,
    src: Optional[Path] = None,
) -> BuildConfig:
    """A :class:`BuildConfig` with the toolchain found on this machine; raises :class:`BuildError` if it is missing."""
    problems = missing_tools(need_sources=src is None)
    if problems:
        raise BuildError("cannot build effnet_kernels._C: " + "; ".join(problems))
    src = src or source_dir()
    assert src is not None
    nvcc = find_nvcc()
    ninja = find_ninja()
    assert nvcc is not None and ninja is not None
    return BuildConfig(
        source_dir=Path(src),
        build_dir=Path(build_dir),
        output=Path(output),
        archs=tuple(archs) if archs else requested_archs(),
        jobs=jobs or default_jobs(),
        nvcc=nvcc,
        ninja=ninja,
        nvcc_version=nvcc_version(nvcc),
        source_hash=source_hash(Path(src)),
    )


def _ninja_path(p: Path | str) -> str:
    return str(p).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def gencode_flags(archs: Sequence[str]) -> list[str]:
    """SASS for every arch, plus PTX for the newest so later GPUs can JIT it."""
    flags = []
    for i, a in enumerate(archs):
        code = f"[sm_{a},compute_{a}]" if i == len(archs) - 1 else f"sm_{a}"
        flags.append(f"-gencode=arch=compute_{a},code={code}")
    return flags


def write_build_info_header(cfg: BuildConfig) -> Path:
    """``effnet_build_info.h`` in the build dir: the record as macros for ``build_info()``."""
    rec = cfg.record()
    text = (
        "// Generated by effnet_kernels/_build.py; do not edit.\n#pragma once\n"
        f"#define EFFNET_NVCC_VERSION {json.dumps(rec['nvcc_version'])}\n"
        f"#define EFFNET_ARCHS {json.dumps(rec['archs'])}\n"
        f"#define EFFNET_SOURCE_HASH {json.dumps(rec['source_hash'])}\n"
    )
    path = cfg.build_dir / "effnet_build_info.h"
    if not path.is_file() or path.read_text() != text:  # unchanged -> no rebuild of binding.o
        path.write_text(text)
    return path


def write_ninja(cfg: BuildConfig) -> Path:
    """Write ``build.ninja`` (one nvcc job per source, then a static-cudart link) and return its path."""
    cfg.build_dir.mkdir(parents=True, exist_ok=True)
    write_build_info_header(cfg)
    sources = [p for p in source_files(cfg.source_dir) if p.suffix in (".cu", ".cpp")]
    threads = max(1, cfg.jobs // max(1, len(sources)))
    includes = [cfg.source_dir, cfg.build_dir, pybind11_include(), sysconfig.get_paths()["include"]]
    cuflags = [
        "-O3",
        "-std=c++17",
        "-Xcompiler=-fPIC",
        "-Xcompiler=-fvisibility=hidden",
        f"--threads={threads}",
        *gencode_flags(cfg.archs),
        *(f"-I{inc}" for inc in includes),
        *cfg.extra_cuflags,
    ]
    linked = cfg.build_dir / ext_filename()
    lines = [
        "# Generated by effnet_kernels/_build.py; do not edit.",
        "ninja_required_version = 1.3",
        f"nvcc = {shlex.quote(cfg.nvcc)}",
        f"cuflags = {' '.join(shlex.quote(f) for f in cuflags)}",
        "",
        "rule cu",
        "  command = $nvcc $cuflags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = NVCC $in",
        "",
        "rule link",
        "  command = $nvcc -shared --cudart=static $in -o $out",
        "  description = LINK $out",
        "",
    ]
    objects = []
    for src in sources:
        obj = cfg.build_dir / (src.name + ".o")
        objects.append(obj)
        lines.append(f"build {_ninja_path(obj)}: cu {_ninja_path(src)}")
    lines += ["", f"build {_ninja_path(linked)}: link {' '.join(_ninja_path(o) for o in objects)}", f"default {_ninja_path(linked)}", ""]
    path = cfg.build_dir / "build.ninja"
    path.write_text("\n".join(lines))
    return path


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def build(cfg: BuildConfig) -> Path:
    """Compile and link the module, copy it to ``cfg.output`` atomically; return ``cfg.output``.

    The ninja output goes to ``cfg.log``; on failure :class:`BuildError` quotes its tail.
    """
    write_ninja(cfg)
    cmd = [cfg.ninja, "-C", str(cfg.build_dir), "-j", str(cfg.jobs)]
    with open(cfg.log, "w") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise BuildError(
            f"building effnet_kernels._C failed (ninja exit code {proc.returncode}); full log: {cfg.log}\n"
            + _tail(cfg.log)
        )
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = cfg.output.with_name(cfg.output.name + f".tmp{os.getpid()}")
    shutil.copy2(cfg.build_dir / ext_filename(), tmp)
    os.replace(tmp, cfg.output)
    return cfg.output


# ------------------------------------------------------------------ checking a build
def check_build_info(info: dict, expected_hash: Optional[str]) -> list[str]:
    """Why a module reporting ``info`` (``_C.build_info()`` or a record) must not be used ([] = fine).

    ``expected_hash`` is the hash of the sources present here, or None when there are
    none to compare with (an installed wheel): then only the ABI version is checked.
    """
    problems = []
    abi = info.get("abi_version")
    if abi != ABI_VERSION:
        problems.append(f"it was built with extension ABI version {abi}, this effnet_kernels needs {ABI_VERSION}")
    built_hash = info.get("source_hash")
    if expected_hash is not None and built_hash != expected_hash:
        problems.append(f"it was built from sources with hash {built_hash}, the sources here hash to {expected_hash}")
    return problems


def archs_cover(built_archs: str, capability: int) -> bool:
    """True if a module built for ``built_archs`` ("80;90") runs on a GPU of ``capability`` (e.g. 86).

    Exact SASS match, or PTX of the newest built arch for newer GPUs.
    """
    archs = [int(a) for a in re.split(r"[;,\s]+", built_archs) if a.isdigit()]
    return bool(archs) and (capability in archs or capability >= max(archs))


# ------------------------------------------------------------------ JIT cache
def cache_root() -> Path:
    """``$EFFNET_KERNELS_CACHE_DIR``, else ``$XDG_CACHE_HOME/effnet_kernels``, else ``~/.cache/effnet_kernels``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "effnet_kernels"


def jit_dir(src_hash: str) -> Path:
    """The cache directory of one source version for this interpreter: ``<root>/<python-tag>-<hash>``."""
    return cache_root() / f"{python_tag()}-{src_hash}"


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if needed) for the ``with`` block."""
    import fcntl  # POSIX only: imported here so that importing this module works everywhere

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def read_record(directory: Path) -> Optional[dict]:
    """The ``build_info.json`` in ``directory``, or None if missing or unreadable."""
    try:
        return json.loads((directory / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None


def cached_build_ok(directory: Path, src_hash: str, archs: Sequence[str]) -> bool:
    """True if ``directory`` holds a finished build of ``src_hash`` covering every arch in ``archs``."""
    rec = read_record(directory)
    if rec is None or not (directory / ext_filename()).is_file():
        return False
    if check_build_info(rec, src_hash):
        return False
    built = set(str(rec.get("archs", "")).split(";"))
    return set(archs) <= built


def _announce(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def jit_build(
    archs: Sequence[str],
    src: Optional[Path] = None,
    directory: Optional[Path] = None,
    builder: Callable[[BuildConfig], Path] = build,
    announce: Callable[[str], None] = _announce,
    config: Callable[..., BuildConfig] = make_config,
) -> Path:
    """Path of a module built from ``src`` for ``archs``, building it once into the JIT cache.

    Concurrent callers (threads or processes) serialise on a lock file in the cache
    directory; whoever gets it first builds, the others find the finished build. A
    build prints one line saying so and where its log is.
    """
    src = src or source_dir()
    if src is None:
        raise BuildError("cannot JIT-build effnet_kernels._C: the CUDA sources (csrc/) are not part of this installation")
    src_hash = source_hash(src)
    directory = Path(directory) if directory is not None else jit_dir(src_hash)
    with file_lock(directory / ".lock"):
        if cached_build_ok(directory, src_hash, archs):
            return directory / ext_filename()
        cfg = config(directory / "build", directory / ext_filename(), archs=archs, src=src)
        announce(
            f"effnet_kernels: compiling the CUDA extension for sm_{',sm_'.join(cfg.archs)} "
            f"(first use; takes a few minutes), log: {cfg.log}"
        )
        (directory / RECORD_NAME).unlink(missing_ok=True)
        out = builder(cfg)
        tmp = directory / (RECORD_NAME + ".tmp")
        tmp.write_text(json.dumps(cfg.record(), indent=1, sort_keys=True))
        os.replace(tmp, directory / RECORD_NAME)
        return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python effnet_kernels/_build.py [--inplace]``: build ``_C`` into the package directory."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--build-dir", default=str(package_dir().parent / "build" / "effnet_cuda"))
    parser.add_argument("--archs", default=None, help=f"e.g. '80;90' (default ${ARCHS_ENV} or {';'.join(DEFAULT_ARCHS)})")
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    cfg = make_config(
        Path(args.build_dir),
        package_dir() / ext_filename(),
        archs=parse_archs(args.archs) if args.archs else None,
        jobs=args.jobs,
    )
    print(f"building {cfg.output} for sm_{',sm_'.join(cfg.archs)} with {cfg.jobs} jobs; log: {cfg.log}")
    build(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
