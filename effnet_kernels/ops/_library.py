"""The ``effnet`` torch.library namespace and the one dispatch path every op uses.

Each op is defined here by schema, with a CPU and a CUDA implementation that validates
its inputs, asks :mod:`effnet_kernels.backends` which implementation serves them, and
calls it. Backends only register implementations; they never see the dispatcher.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import backends

LIB = torch.library.Library("effnet", "DEF")  # noqa: TOR901 (ops are owned by Python)


def define(
    name: str,
    schema: str,
    check: Callable[..., object],
    fake: Callable,
    finish: Callable | None = None,
) -> None:
    """Define ``effnet::<name>`` with ``schema``, real CPU/CUDA kernels and a fake kernel.

    ``check`` is called with the op's arguments (minus the trailing ``backend``) by the
    real kernel before dispatch. The real kernel resolves the backend from the op's last
    argument, a backend name or ``"auto"``. ``finish``, if given, maps the
    implementation's result to the schema's (e.g. an absent optional output to an
    empty tensor).
    """
    LIB.define(name + schema)
    qualname = f"effnet::{name}"
    is_backward = name.endswith("_backward")

    def kernel(*args):
        *op_args, requested = args
        check(*op_args)
        anchor = next(a for a in op_args if isinstance(a, torch.Tensor))
        if is_backward:
            impl = backends.resolve_backward(name, requested, anchor, tuple(op_args))
        else:
            impl = backends.resolve(name, requested, anchor, tuple(op_args))
        out = impl(*op_args)
        return finish(out, *op_args) if finish is not None else out

    kernel.__name__ = f"effnet_{name}_kernel"
    for key in ("CPU", "CUDA"):
        LIB.impl(name, kernel, key)
    torch.library.register_fake(qualname, fake, lib=LIB)


def empty_4d(x: torch.Tensor, shape: tuple, fmt: torch.memory_format, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised 4-D tensor like ``x`` (device, dtype unless given) in memory format ``fmt``."""
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device, memory_format=fmt)
