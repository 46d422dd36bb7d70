"""A small on-disk JSON cache of compile results, keyed by a hash of everything that determines them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional


def default_dir() -> Path:
    """``$EFFNET_KERNELS_CACHE_DIR/kernel_audit``, else ``~/.cache/effnet_kernels/kernel_audit``."""
    root = os.environ.get("EFFNET_KERNELS_CACHE_DIR")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "effnet_kernels") / "kernel_audit"


def key_of(*parts: Any) -> str:
    """A stable hex digest of ``parts`` (anything ``repr`` renders deterministically)."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


class DiskCache:
    """``cache.get_or_make(key, make)``: ``make()``'s JSON-able result, computed once per key."""

    def __init__(self, directory: Optional[Path]) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.hits = self.misses = 0

    def get_or_make(self, key: str, make: Callable[[], dict]) -> dict:
        path = self.directory / f"{key}.json" if self.directory is not None else None
        if path is not None and path.is_file():
            try:
                self.hits += 1
                return json.loads(path.read_text())
            except ValueError:
                self.hits -= 1
        self.misses += 1
        value = make()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(value))
            os.replace(tmp, path)
        return value
