"""The on-disk store of tuned Triton launch configs, shared by every process on a machine.

:mod:`._tuning` times launch-config candidates once per shape class; this module keeps
the winners on disk so a later process (the benchmark after ``python -m benchmarks.tune``,
the next training job) reuses them instead of compiling and timing every candidate again.

An entry is found under

* the GPU: ``torch.cuda.get_device_name`` and the compute capability,
* the Triton version (``triton.__version__``),
* the kernel version: a hash of the launcher module's source and of the
  ``effnet_kernels`` modules it takes names from (:func:`kernel_version_of`), so any edit of
  a kernel, its launcher or its candidate list makes its old entries unreachable,
* the shape class: the tuner's key, encoded as canonical JSON.

The first two name the file, ``<dir>/v1/<gpu>-sm<major><minor>-triton<version>.json``; the
other two name the entry inside it. ``<dir>`` is ``$EFFNET_KERNELS_TUNING_CACHE`` when set,
else ``$XDG_CACHE_HOME/effnet_kernels/tuning``, else ``~/.cache/effnet_kernels/tuning``.

``$EFFNET_KERNELS_TUNING_STORE`` (or :func:`configure`) sets the mode: ``rw`` (default:
read and write), ``ro`` (read only) or ``off`` (neither). Writes merge into the file under
an exclusive ``flock`` on ``<file>.lock`` (where ``fcntl`` exists) and land by
``os.replace`` of a complete temporary file, so concurrent processes never see or leave a
partial file. A file that is not valid JSON, or that was written for another format,
GPU or Triton version, is ignored with one line on stderr (and replaced by the next
write); nothing in the store can make a launch fail.

Only measured configs are written: an entry holds the timings (ms, ``do_bench`` median)
of every candidate that ran, when and with which torch it was measured.

Shipped table: ``effnet_kernels/triton/tuned_configs.json`` (read only, looked up after the
user's store, unless the mode is ``off``) holds store files measured on real GPUs, under the
same keys, so a fresh machine with the same GPU, Triton and kernel sources starts tuned. It
is empty until a GPU run measures it: ``python -m benchmarks.tune --promote
<returned>/tuning_store.json`` (:func:`promote`) copies a run's entries whose kernel version
matches the sources here into it, to be committed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import re
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any, Callable, Hashable, Optional, Sequence

import torch

FORMAT = 1
CACHE_ENV_VAR = "EFFNET_KERNELS_TUNING_CACHE"
MODE_ENV_VAR = "EFFNET_KERNELS_TUNING_STORE"
MODES = ("rw", "ro", "off")
_MODE_ALIASES = {"rw": "rw", "1": "rw", "on": "rw", "true": "rw", "ro": "ro", "read": "ro",
                 "off": "off", "0": "off", "false": "off", "": "off"}

SHIPPED_TABLE = Path(__file__).with_name("tuned_configs.json")

_lock = threading.Lock()
_override_dir: Optional[Path] = None
_override_mode: Optional[str] = None
_loaded: dict[Path, tuple[Optional[tuple[int, int]], dict[str, dict]]] = {}  # path -> (mtime_ns, size), entries
_warned: set[str] = set()
_versions: dict[str, Optional[str]] = {}
_shipped: Optional[tuple[Path, dict]] = None  # (path, {filename: entries})


def _warn(message: str) -> None:
    """One line on stderr, once per message per process."""
    if message not in _warned:
        _warned.add(message)
        print(f"effnet_kernels: {message}", file=sys.stderr)


def configure(path: Optional[os.PathLike | str] = None, mode: Optional[str] = None) -> None:
    """Override the store's directory and/or mode for this process (``None``: back to the environment).

    Raises ``ValueError`` naming ``mode`` when it is not one of :data:`MODES`.
    """
    global _override_dir, _override_mode
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    with _lock:
        _override_dir = None if path is None else Path(path)
        _override_mode = mode
        _loaded.clear()


def mode() -> str:
    """``rw``, ``ro`` or ``off``: :func:`configure`'s override, else ``$EFFNET_KERNELS_TUNING_STORE`` (default ``rw``).

    An unknown value of the variable is said once on stderr and read as ``off``.
    """
    if _override_mode is not None:
        return _override_mode
    raw = os.environ.get(MODE_ENV_VAR)
    if raw is None:
        return "rw"
    value = _MODE_ALIASES.get(raw.strip().lower())
    if value is None:
        _warn(f"{MODE_ENV_VAR}={raw!r} is not one of {', '.join(MODES)}: the tuning store is off")
        return "off"
    return value


def directory() -> Path:
    """Where the store's files live (see the module docstring)."""
    if _override_dir is not None:
        return _override_dir
    env = os.environ.get(CACHE_ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "effnet_kernels" / "tuning"


def _triton_version() -> str:
    try:
        import triton
    except Exception:
        return ""
    return str(getattr(triton, "__version__", ""))


@dataclasses.dataclass(frozen=True)
class Identity:
    """What a stored config was measured on: one file per identity."""

    gpu: str
    capability: tuple[int, int]
    triton: str

    @property
    def filename(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9.]+", "_", self.gpu).strip("_") or "gpu"
        return f"{slug}-sm{self.capability[0]}{self.capability[1]}-triton{self.triton or 'unknown'}.json"

    def header(self) -> dict[str, Any]:
        return {"format": FORMAT, "gpu": self.gpu, "capability": list(self.capability), "triton": self.triton}


def device_identity(t: torch.Tensor) -> Optional[Identity]:
    """The :class:`Identity` of ``t``'s CUDA device, ``None`` for other devices (nothing is stored for them)."""
    if t.device.type != "cuda":
        return None
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return Identity(torch.cuda.get_device_name(index), (int(major), int(minor)), _triton_version())


def encode_key(key: Hashable) -> Optional[str]:
    """The tuner's key as canonical JSON (``torch.dtype`` as its name); ``None`` if it holds other objects."""

    def enc(v: Any) -> Any:
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float):
            return v if v == v and abs(v) != float("inf") else repr(v)
        if isinstance(v, torch.dtype):
            return str(v)
        if isinstance(v, (tuple, list)):
            return [enc(x) for x in v]
        raise TypeError(type(v).__name__)

    try:
        return json.dumps(enc(key), separators=(",", ":"))
    except TypeError:
        return None


def _module_source(module: types.ModuleType) -> Optional[bytes]:
    try:
        return Path(inspect.getsourcefile(module) or "").read_bytes()
    except (OSError, TypeError):
        return None


def kernel_version_of(module_name: Optional[str]) -> Optional[str]:
    """``<module>@<16 hex digits>``: a SHA-256 over the source of ``module_name`` and of every
    ``effnet_kernels`` module it takes a name from (its kernels' helpers, launch preparation; the
    tuner itself excluded). ``None`` when the module or a source file cannot be read: such
    configs stay in memory only.
    """
    if not module_name:
        return None
    if module_name in _versions:
        return _versions[module_name]
    version = None
    deps = kernel_dependencies(module_name)
    if deps:
        h = hashlib.sha256()
        for name in deps:
            mod = sys.modules.get(name)
            src = _module_source(mod) if mod is not None else None
            if src is None:
                h = None
                break
            h.update(name.encode() + b"\0" + src + b"\0")
        version = None if h is None else f"{module_name}@{h.hexdigest()[:16]}"
    _versions[module_name] = version
    return version


def kernel_dependencies(module_name: str) -> list[str]:
    """The sorted modules whose sources :func:`kernel_version_of` hashes for ``module_name``: itself and
    every ``effnet_kernels`` module it takes a name from (not the tuner); ``[]`` when it is not imported."""
    module = sys.modules.get(module_name)
    if module is None:
        return []
    deps = {module_name}
    for value in list(vars(module).values()):
        name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
        if isinstance(name, str) and name.split(".")[0] == "effnet_kernels":
            deps.add(name)
    deps -= {__name__, __name__.replace("_tuning_store", "_tuning")}
    return sorted(deps)


def kernel_version_for(run: Callable) -> Optional[str]:
    """:func:`kernel_version_of` the module that defines ``run`` (the launcher's timing callable)."""
    return kernel_version_of(getattr(run, "__module__", None))


def entry_key(kernel_version: str, shape: str) -> str:
    """The name of an entry inside an identity's file."""
    return f"{kernel_version}|{shape}"


def _file(identity: Identity) -> Path:
    return directory() / f"v{FORMAT}" / identity.filename


def _stat(path: Path) -> Optional[tuple[int, int]]:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _read(path: Path, identity: Identity) -> dict[str, dict]:
    """The entries of ``path``; ``{}`` (with one warning) when it is unreadable, corrupt or foreign."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        _warn(f"ignoring Triton tuning store {path}: {exc}")
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        _warn(f"ignoring Triton tuning store {path}: not valid JSON ({exc})")
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        _warn(f"ignoring Triton tuning store {path}: not a tuning store file")
        return {}
    header = {k: data.get(k) for k in identity.header()}
    if header != identity.header():
        _warn(f"ignoring Triton tuning store {path}: written for {header}, this process is {identity.header()}")
        return {}
    return {k: v for k, v in data["entries"].items() if isinstance(v, dict)}


def _entries(identity: Identity) -> dict[str, dict]:
    """The file's entries, re-read when its mtime or size changed since the last read."""
    path = _file(identity)
    stamp = _stat(path)
    cached = _loaded.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    entries = _read(path, identity) if stamp is not None else {}
    _loaded[path] = (stamp, entries)
    return entries


def _shipped_entries(identity: Identity) -> dict[str, dict]:
    """The shipped table's entries for ``identity`` (read once per process; ``{}`` when absent or foreign)."""
    global _shipped
    if _shipped is None or _shipped[0] != SHIPPED_TABLE:
        files: dict = {}
        try:
            data = json.loads(SHIPPED_TABLE.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
                raise ValueError(f"not a format-{FORMAT} table")
            files = data["files"]
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            _warn(f"ignoring the shipped tuning table {SHIPPED_TABLE}: {exc}")
        _shipped = (SHIPPED_TABLE, files)
    data = _shipped[1].get(identity.filename)
    if not isinstance(data, dict) or {k: data.get(k) for k in identity.header()} != identity.header():
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def lookup(identity: Identity, key: str, make: Callable[..., Any]) -> Optional[tuple[Any, str]]:
    """``(config built by make(**fields), "store" | "shipped")`` for entry ``key``: the user's store
    first, then the shipped table; ``None`` when absent, the mode is ``off``, or the entry is malformed."""
    if mode() == "off":
        return None
    with _lock:
        found = [(src, entries.get(key)) for src, entries in
                 (("store", _entries(identity)), ("shipped", _shipped_entries(identity)))]
    for source, entry in found:
        if not isinstance(entry, dict):
            continue
        fields = entry.get("config")
        try:
            if not isinstance(fields, dict) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                       for v in fields.values()):
                raise TypeError("config fields must be ints")
            return make(**fields), source
        except TypeError as exc:
            _warn(f"ignoring tuning {source} entry {key!r} for {identity.filename}: {exc}")
    return None


def _config_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def save(identity: Identity, key: str, best: Any, timings: Sequence[tuple[float, Any]]) -> bool:
    """Merge the measured winner ``best`` of entry ``key`` (with every candidate's ``(ms, config)``)
    into the identity's file; ``False`` (said once on stderr when it failed) if nothing was written."""
    if mode() != "rw" or not timings:
        return False
    entry = {
        "config": _config_dict(best),
        "timings_ms": [[_config_dict(cfg), round(float(ms), 6)] for ms, cfg in timings],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
    }
    path = _file(identity)
    try:
        with _lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(path):
                entries = dict(_read(path, identity))
                entries[key] = entry
                _write_atomic(path, {**identity.header(), "entries": dict(sorted(entries.items()))})
            _loaded[path] = (_stat(path), entries)
    except OSError as exc:
        _warn(f"could not write the Triton tuning store {path}: {exc}")
        return False
    return True


class _file_lock:
    """An exclusive ``flock`` on ``<path>.lock`` (no-op where ``fcntl`` is missing: writes stay atomic, a
    concurrent writer's entry may then be lost, never the file)."""

    def __init__(self, path: Path) -> None:
        self.path = path.with_name(path.name + ".lock")
        self.fd: Optional[int] = None

    def __enter__(self) -> "_file_lock":
        try:
            import fcntl
        except ImportError:
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def _write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def forget_loaded() -> None:
    """Drop the in-memory copies of store files and of the shipped table (the next lookup re-reads
    them) and the warnings said."""
    global _shipped
    with _lock:
        _loaded.clear()
        _warned.clear()
        _shipped = None


def promote(store_files: Sequence[os.PathLike | str], table: os.PathLike | str = SHIPPED_TABLE,
            current: Callable[[str], Optional[str]] = kernel_version_of) -> dict[str, int]:
    """Merge measured entries of ``store_files`` into the shipped ``table`` (written atomically).

    Only entries whose kernel version is ``current(module)`` for the module it names (the sources
    here, imported) and that hold timings are kept; counts ``kept``/``stale``/``unmeasured``.
    Raises ``ValueError`` naming the file when one is not a valid store file.
    """
    import importlib

    table = Path(table)
    try:
        data = json.loads(table.read_text(encoding="utf-8")) if table.exists() else {"format": FORMAT, "files": {}}
    except ValueError as exc:
        raise ValueError(f"table {table}: not valid JSON ({exc})") from None
    if data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        raise ValueError(f"table {table}: not a format-{FORMAT} tuning table")
    counts = {"kept": 0, "stale": 0, "unmeasured": 0}
    for name in store_files:
        path = Path(name)
        try:
            src = json.loads(path.read_text(encoding="utf-8"))
            ident = Identity(str(src["gpu"]), tuple(int(v) for v in src["capability"]), str(src["triton"]))
            if src.get("format") != FORMAT or not isinstance(src.get("entries"), dict):
                raise ValueError("format")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"store_files: {path} is not a format-{FORMAT} tuning store file ({exc})") from None
        target = data["files"].setdefault(ident.filename, {**ident.header(), "entries": {}})
        for key, entry in src["entries"].items():
            module = key.split("@", 1)[0]
            try:
                importlib.import_module(module)
            except Exception:
                pass
            if not isinstance(entry, dict) or not entry.get("timings_ms"):
                counts["unmeasured"] += 1
            elif current(module) != key.split("|", 1)[0]:
                counts["stale"] += 1
            else:
                target["entries"][key] = entry
                counts["kept"] += 1
        target["entries"] = dict(sorted(target["entries"].items()))
    _write_atomic(table, data)
    return counts
