"""Kernel objects that run compiled on CUDA tensors and interpreted on CPU tensors.

``triton.jit`` decides once, when a module is imported, whether a kernel is compiled
or interpreted (from ``TRITON_INTERPRET``). Here the choice is made per launch: CPU
tensors, or any tensor while ``TRITON_INTERPRET=1``, get the interpreter; CUDA tensors
otherwise get the compiled kernel. So CPU tests can turn the interpreter on for their
duration only, and GPU tests in the same process still run real compiled kernels.

For that, kernels must not call Triton's standard library functions that are
themselves ``@triton.jit`` functions (``tl.zeros``, ``tl.sigmoid``, ``tl.sum``, ...): they
are compiled-only or interpreted-only depending on ``TRITON_INTERPRET`` when Triton was
imported. Kernels here use builtins instead (``tl.full``, ``tl.exp``) and
:data:`SUM` with ``tl.reduce``, which the interpreter recognises and runs with numpy.
Helpers of their own that kernels call are device functions (:func:`device_function`), which work both ways.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional, Sequence

import torch
import triton
import triton.language as tl
from triton.language.standard import _sum_combine

from . import interpreter_enabled

# Combine function for ``tl.reduce(x, axis, SUM)``: the one ``tl.sum`` uses, which
# Triton's interpreter maps to numpy.sum (a custom one would run element by element).
SUM = _sum_combine


class DeviceKernel:
    """A Triton kernel function, compiled for CUDA launches and interpreted for CPU ones (built lazily).

    ``kernel.on(tensor)[grid](*args, num_warps=...)`` launches it the way
    ``triton.jit`` kernels are launched.
    """

    def __init__(self, fn: Callable, do_not_specialize: Sequence[str] = ()) -> None:
        self.fn = fn
        # Integer arguments that only bound loops or masks along a non-vectorised axis: left
        # unspecialised (no "== 1" constant, no "divisible by 16" hint), so shapes that differ
        # only in them share one compiled kernel instead of compiling (1-9 s each) per value class.
        self.do_not_specialize = tuple(do_not_specialize)
        self._compiled = None
        self._interpreted = None

    def on(self, t: torch.Tensor):
        """The variant of this kernel for a launch on ``t``: interpreted (see :func:`interpreted`) or compiled."""
        if interpreted(t):
            if self._interpreted is None:
                from triton.runtime.interpreter import InterpretedFunction

                self._interpreted = InterpretedFunction(self.fn)
            return self._interpreted
        if self._compiled is None:
            self._compiled = triton.runtime.jit.JITFunction(self.fn, do_not_specialize=list(self.do_not_specialize))
        return self._compiled


class DeviceFunction(triton.runtime.jit.JITFunction):
    """A helper that :class:`DeviceKernel` kernels call, compiled or interpreted.

    Compiled kernels inline it as any ``@triton.jit`` function (it is one); an interpreted
    kernel calls it as Python, with ``triton.language`` already patched by the interpreter
    for the kernel's run, through the interpreter's own rewrite of the function.
    """

    def __call__(self, *args, **kwargs):
        fn = self.__dict__.get("_interpreted_fn")
        if fn is None:
            from triton.runtime.interpreter import FunctionRewriter

            fn = self.__dict__["_interpreted_fn"] = FunctionRewriter(self.fn).rewrite_ast()
        return fn(*args, **kwargs)


def device_function(fn: Callable) -> DeviceFunction:
    """Decorator: ``fn`` (written as a ``@triton.jit`` helper) callable from kernels run either way."""
    return DeviceFunction(fn)


def interpreted(t: torch.Tensor) -> bool:
    """Whether kernels launched on ``t`` run in Triton's interpreter (CPU, or TRITON_INTERPRET=1)."""
    return t.device.type == "cpu" or interpreter_enabled()


def device_kernel(fn: Optional[Callable] = None, *, do_not_specialize: Sequence[str] = ()):
    """Decorator: make ``fn`` (written as a ``@triton.jit`` kernel) a :class:`DeviceKernel`.

    ``@device_kernel`` or ``@device_kernel(do_not_specialize=("H", ...))`` (as ``triton.jit``'s).
    """
    if fn is None:
        return lambda f: DeviceKernel(f, do_not_specialize)
    return DeviceKernel(fn, do_not_specialize)


def device_guard(t: torch.Tensor) -> ContextManager:
    """Make ``t``'s CUDA device current for a launch (a no-op when it already is, or on CPU)."""
    if t.device.type == "cuda" and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``max(n, 1)``."""
    return 1 << max(int(n) - 1, 0).bit_length()


def vector_width(element_size: int, *extents: int) -> int:
    """Elements per aligned 128-bit (or narrower) vector along a contiguous axis.

    The largest power of two ``v <= 16 // element_size`` dividing every one of ``extents``
    (the axis length and the strides of the other axes, in elements): then every run of
    ``v`` elements starting at a multiple of ``v`` starts ``v * element_size``-byte aligned
    when the base pointer is 16-byte aligned. Kernels take it as a constexpr ``VEC`` and
    pass those integers through :func:`multiple_of`, because Triton's launch-time
    specialisation only marks integers divisible by 16: C = 24, 40, 56 would otherwise
    give 16-bit (fp16) or 32-bit accesses although their 48/80/112-byte rows are aligned.
    """
    vec = max(16 // element_size, 1)
    while vec > 1 and any(int(e) % vec for e in extents):
        vec //= 2
    return vec


@device_function
def multiple_of(x, VEC: tl.constexpr):
    """``x``, an integer the launcher guarantees is a multiple of ``VEC``, as ``(x // VEC) * VEC``.

    The same value, but Triton's axis analysis now knows it is divisible by ``VEC``
    (``tl.multiple_of`` on a kernel argument is dropped): offsets built from it keep the
    alignment that lets masked loads and stores become ``VEC``-element vectors. A few
    scalar integer instructions per program, nothing per element.
    """
    return x // VEC * VEC


def needs_bf16_rtne(out: torch.Tensor) -> bool:
    """Whether a kernel storing bfloat16 into ``out`` must round to nearest even by hand.

    Triton 3.6's interpreter rounds float32 -> bfloat16 casts toward zero (compiled
    kernels round to nearest even), so kernels that store bfloat16 take a constexpr
    ``BF16_RTNE`` and, when set, round with integer arithmetic:
    ``(bits + 0x7FFF + ((bits >> 16) & 1)) >> 16`` (exact for finite values).
    """
    return out.dtype == torch.bfloat16 and interpreted(out)


@device_function
def round_bf16_rtne(out):
    """float32 ``out`` as bfloat16 rounded to nearest even by integer arithmetic (see :func:`needs_bf16_rtne`)."""
    bits = out.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)


class _LoopBound(DeviceFunction):
    """:func:`loop_bound`: inlined as the identity in compiled kernels, a Python int when interpreted."""

    def __call__(self, x):
        handle = getattr(x, "handle", None)
        return int(handle.data.reshape(-1)[0]) if handle is not None else int(x)


def _loop_bound(x):
    return x


#: ``for k0 in range(0, loop_bound(K), BLOCK_K)``: a runtime loop bound both ways. Compiled, it is
#: ``K`` itself, so the loop is an ``scf.for`` that Triton software-pipelines (``num_stages``; a
#: ``while`` loop is not pipelined). Interpreted, it is ``K`` as a Python int: Triton 3.6's
#: interpreter passes integer arguments as 1-element arrays, which ``range`` cannot take under
#: numpy >= 2.4 (it calls ``int()`` on them).
loop_bound = _LoopBound(_loop_bound)


def needs_dot_upcast(x: torch.Tensor) -> bool:
    """Whether a kernel's ``tl.dot`` on bfloat16 tiles of ``x`` must upcast them to float32 first.

    Triton 3.6's interpreter multiplies bfloat16 tiles as their raw 16-bit integers (garbage);
    compiled kernels run them on the tensor cores. The upcast is exact (bfloat16 products fit
    float32's mantissa), so an interpreted kernel computes what the MMA computes, up to the
    order of the float32 accumulation.
    """
    return x.dtype == torch.bfloat16 and interpreted(x)
