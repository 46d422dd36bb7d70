"""Which backends exist here, why not, and which one serves a given call.

A backend is a name plus three callables, registered with :func:`register_backend`:

* ``unavailable()`` -> reasons the backend cannot run on this machine at all
  (package missing, no GPU, extension not built); ``[]`` means available.
  Evaluated once and cached.
* ``unsupported(op, tensor, args)`` -> reasons this backend cannot serve this op for
  an input like ``tensor`` (device, dtype) with these op arguments (``args``, the op's
  arguments without the backend name, e.g. to check a kernel size); ``[]`` means it can.
* ``load()`` -> a mapping ``{op_name: implementation}``, imported on first use so
  that ``import effnet_kernels`` never imports Triton or the CUDA extension.

Selection order: the ``backend=`` argument > :func:`use_backend` context >
``EFFNET_KERNELS_BACKEND`` > ``"auto"``. An explicitly requested backend that cannot
serve an input raises :class:`BackendUnavailableError` listing its reasons; ``"auto"``
tries first the backend measured fastest for the call's shape class
(:mod:`effnet_kernels.auto_table`, GPU tensors only), then walks :data:`AUTO_ORDER`, and
takes the first backend that can serve the call.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch

__all__ = [
    "BackendUnavailableError",
    "BackendStatus",
    "register_backend",
    "available_backends",
    "use_backend",
    "requested_backend",
    "resolve",
    "BACKEND_NAMES",
    "ENV_VAR",
]

ENV_VAR = "EFFNET_KERNELS_BACKEND"
BACKEND_NAMES = ("torch", "triton", "cuda")
_VALID_REQUESTS = BACKEND_NAMES + ("auto",)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve the call; the message lists why."""


@dataclass(frozen=True)
class BackendStatus:
    """Availability of one backend on this machine, as ``available_backends()`` reports it."""

    name: str
    available: bool
    reasons: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.available:
            return f"{self.name}: available"
        return f"{self.name}: not available ({'; '.join(self.reasons)})"


@dataclass
class _Backend:
    name: str
    unavailable: Callable[[], list[str]]
    unsupported: Callable[[str, torch.Tensor, tuple], list[str]]
    load: Callable[[], Mapping[str, Callable]]
    _unavailable_cache: list[str] | None = None
    _impls: Mapping[str, Callable] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reasons_unavailable(self) -> list[str]:
        if self._unavailable_cache is None:
            try:
                self._unavailable_cache = list(self.unavailable())
            except Exception as exc:  # a probe must never break the caller
                self._unavailable_cache = [f"availability probe failed: {exc!r}"]
        return self._unavailable_cache

    def impls(self) -> Mapping[str, Callable]:
        if self._impls is None:
            with self._lock:
                if self._impls is None:
                    self._impls = dict(self.load())
        return self._impls

    def reasons(self, op: str, tensor: torch.Tensor, args: tuple = ()) -> list[str]:
        reasons = self.reasons_unavailable()
        if reasons:
            return reasons
        reasons = list(self.unsupported(op, tensor, args))
        if reasons:
            return reasons
        try:
            impls = self.impls()
        except BackendUnavailableError as exc:  # load() found it cannot run after all (e.g. a failed JIT build)
            return [str(exc)]
        if op not in impls:
            return [f"backend {self.name!r} does not implement {op!r}"]
        return []


def dtype_reasons(kernels: str, supported: tuple[torch.dtype, ...], tensors: tuple) -> list[str]:
    """For a backend's ``unsupported``: why ``kernels`` ("the triton kernels") cannot take the
    dtypes of the tensors among ``tensors`` (the call's arguments; others are ignored), or ``[]``.

    Every tensor counts: a float64 x, weight or scale is the ``torch`` reference's, and
    ``auto`` falls back to it.
    """
    def name(dtype: torch.dtype) -> str:
        return str(dtype).replace("torch.", "")

    bad = sorted({name(t.dtype) for t in tensors if isinstance(t, torch.Tensor) and t.dtype not in supported})
    if not bad:
        return []
    names = [name(d) for d in supported]
    want = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
    return [f"{kernels} take {want}; got {' and '.join(bad)} (backend='torch' or 'auto' computes it)"]


_REGISTRY: dict[str, _Backend] = {}

# The order "auto" tries backends in, per device type. The Triton interpreter is a
# correctness tool, not a fast path, so CPU tensors go to the reference unless asked.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("torch",),
}


def register_backend(
    name: str,
    *,
    unavailable: Callable[[], list[str]],
    unsupported: Callable[[str, torch.Tensor, tuple], list[str]],
    load: Callable[[], Mapping[str, Callable]],
) -> None:
    """Register (or replace) a backend under ``name``; see the module docstring."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend name must be one of {BACKEND_NAMES}, got {name!r}")
    _REGISTRY[name] = _Backend(name, unavailable, unsupported, load)


def _reset_caches() -> None:
    """Forget cached availability (tests change the environment)."""
    for backend in _REGISTRY.values():
        backend._unavailable_cache = None


def available_backends() -> dict[str, BackendStatus]:
    """Each of ``torch``, ``triton``, ``cuda`` with whether it is available here and why not.

    >>> import effnet_kernels
    >>> effnet_kernels.available_backends()["torch"].available
    True
    """
    _ensure_registered()
    out = {}
    for name in BACKEND_NAMES:
        backend = _REGISTRY.get(name)
        if backend is None:
            out[name] = BackendStatus(name, False, ("not registered",))
            continue
        reasons = backend.reasons_unavailable()
        out[name] = BackendStatus(name, not reasons, tuple(reasons))
    return out


def check_backend_name(name: str, argname: str = "backend") -> str:
    """Return ``name`` if it is a valid backend request, else raise ``ValueError``."""
    if not isinstance(name, str) or name not in _VALID_REQUESTS:
        raise ValueError(f"{argname} must be one of {_VALID_REQUESTS}, got {name!r}")
    return name


# The innermost use_backend() of this thread / asyncio task (a ContextVar: a new thread
# starts with the default, an asyncio task with a copy of its creator's context).
# torch.compile cannot trace ContextVar.get (a graph break, an error under fullgraph), but
# it traces and guards threading.local attributes: code being compiled reads a per-thread
# mirror that use_backend keeps in step, so a compiled graph is guarded on the choice of
# the thread that calls it (asyncio tasks of one thread share the mirror).
_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar("effnet_kernels_backend", default=None)
_compiled_mirror = threading.local()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: ops called inside without ``backend=`` use ``name``.

    The choice is local to the current thread and asyncio task (a :mod:`contextvars`
    variable): other threads and tasks keep theirs. Contexts nest; leaving one restores the
    outer choice. In ``torch.compile``'d code the choice is per thread, and a change
    recompiles (a guard).

    >>> import effnet_kernels
    >>> with effnet_kernels.use_backend("torch"):
    ...     pass
    """
    check_backend_name(name)
    token = _requested.set(name)
    _compiled_mirror.name = name
    try:
        yield
    finally:
        _requested.reset(token)
        _compiled_mirror.name = _requested.get()  # this context's outer choice (not a stack: tasks interleave)


def _context_choice() -> str | None:
    if torch.compiler.is_compiling():
        return getattr(_compiled_mirror, "name", None)
    return _requested.get()


def requested_backend(backend: str | None) -> str:
    """The backend a call asks for: argument > ``use_backend`` > env var > ``"auto"``."""
    if backend is not None:
        return check_backend_name(backend)
    current = _context_choice()
    if current is not None:
        return current
    env = os.environ.get(ENV_VAR)
    if env:
        return check_backend_name(env, ENV_VAR)
    return "auto"


def resolve(op: str, requested: str, tensor: torch.Tensor, args: tuple = ()) -> Callable:
    """The implementation of ``op`` that serves ``tensor`` (and ``args``) under the request ``requested``."""
    _ensure_registered()
    if requested != "auto":
        backend = _REGISTRY.get(requested)
        if backend is None:
            raise BackendUnavailableError(f"backend {requested!r} is not registered")
        reasons = backend.reasons(op, tensor, args)
        if reasons:
            raise BackendUnavailableError(
                f"effnet_kernels: backend {requested!r} cannot run {op} on a "
                f"{tensor.dtype} tensor on {tensor.device}: " + "; ".join(reasons)
            )
        return backend.impls()[op]
    order = AUTO_ORDER.get(tensor.device.type, ("torch",))
    if tensor.device.type != "cpu":
        from .auto_table import preferred_backend

        measured = preferred_backend(op, args)
        if measured in order:
            order = (measured,) + tuple(n for n in order if n != measured)
    tried = []
    for name in order:
        backend = _REGISTRY.get(name)
        if backend is None:
            continue
        reasons = backend.reasons(op, tensor, args)
        if not reasons:
            return backend.impls()[op]
        tried.append(f"{name}: {'; '.join(reasons)}")
    raise BackendUnavailableError(
        f"effnet_kernels: no backend can run {op} on {tensor.device}: " + " | ".join(tried)
    )


def resolve_backward(op: str, requested: str, tensor: torch.Tensor, args: tuple = ()) -> Callable:
    """Like :func:`resolve` for a backward op, which a backend may leave unimplemented.

    The requested backend serves the backward when it implements it; otherwise the
    ``"auto"`` choice does (ultimately the ``torch`` reference).
    """
    _ensure_registered()
    backend = _REGISTRY.get(requested)
    if backend is not None and not backend.reasons(op, tensor, args):
        return backend.impls()[op]
    return resolve(op, "auto", tensor, args)


_registered = False


def _ensure_registered() -> None:
    """Import the modules that register the built-in backends (once)."""
    global _registered
    if _registered:
        return
    _registered = True
    from . import reference  # noqa: F401  (registers "torch")
    from . import triton as _triton_backend  # noqa: F401  (registers "triton")
    from . import cuda as _cuda_backend  # noqa: F401  (registers "cuda")
