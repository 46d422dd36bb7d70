"""Triton launches as the backend makes them, compiled for sm_90 without a GPU.

:func:`capture` runs the real launcher (``effnet_kernels.triton``'s ``dwconv_bn_act``,
``se_gate``, ``se_excite``, ``pointwise_conv``, ``conv.conv_bn_act``) on meta tensors with
``DeviceKernel.on`` patched, so every launch is recorded (kernel, grid, arguments, constexprs,
``num_warps``) instead of run. The arguments are bound by Triton's own binder (the one ``JITFunction.run`` uses), which
gives the same signature, constexprs and ``tt.divisibility`` / ``== 1`` specialisation as a
GPU launch (meta tensors report ``data_ptr() == 0``: 16-byte aligned, as CUDA allocations
are). Tuning is off while capturing (``EFFNET_KERNELS_TRITON_TUNE=0``): the config audited
is the launcher's untuned default, recorded in each row.

:func:`compile_launch` compiles one recorded launch for ``GPUTarget("cuda", 90, 32)``,
reads ``ptxas -v`` (registers, spills) and the SASS of the cubin, and caches the result on
disk keyed by the kernel's source hash, signature, specialisation and options.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from . import sass as sass_mod
from .cache import DiskCache, key_of
from .compiled import code_record
from .workloads import Workload

TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Launch:
    """One recorded Triton launch."""

    kernel: str
    grid: tuple[int, int, int]
    num_warps: int
    constexprs: dict[str, Any]
    signature: dict[str, str]
    key: str  # cache key of the compiled variant
    source: Any  # (JITFunction, signature, constexprs, attrs, options) to compile it


def _sm90():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 90, 32)


class _Recorder:
    """Stands in for ``DeviceKernel.on(t)``: ``recorder.on(kernel)[grid](*args, **kw)`` records the launch."""

    def __init__(self) -> None:
        import triton

        self.backend = triton.compiler.make_backend(_sm90())
        self.binders: dict[Any, Any] = {}
        self.launches: list[Launch] = []

    def on(self, kernel):
        recorder = self

        class _Grid:
            def __getitem__(self, grid):
                return lambda *args, **kwargs: recorder.record(kernel, grid, args, kwargs)

        return _Grid()

    def record(self, kernel, grid, args, kwargs) -> None:
        import triton
        from triton import knobs
        from triton.runtime.jit import JITFunction, create_function_from_signature

        if kernel not in self.binders:  # as DeviceKernel.on builds it for a CUDA launch
            jf = JITFunction(kernel.fn, do_not_specialize=list(getattr(kernel, "do_not_specialize", ())))
            self.binders[kernel] = jf, create_function_from_signature(jf.signature, jf.params, self.backend)
        jf, binder = self.binders[kernel]
        kwargs = dict(kwargs, debug=knobs.runtime.debug, instrumentation_mode=knobs.compilation.instrumentation_mode)
        bound, specialization, options = binder(*args, **kwargs)
        grid = grid(bound) if callable(grid) else tuple(grid)
        grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
        opts, signature, constexprs, attrs = jf._pack_args(self.backend, kwargs, bound, specialization, options)
        consts = {jf.arg_names[path[0]]: v for path, v in constexprs.items()}
        key = key_of("triton", triton.__version__, jf.cache_key, sorted(signature.items()), sorted(map(repr, consts.items())),
                     sorted(map(repr, attrs.items())), sorted(map(repr, opts.__dict__.items())))
        self.launches.append(Launch(jf.__name__, grid, opts.num_warps, consts, signature, key,
                                    (jf, signature, constexprs, attrs, opts)))


@contextlib.contextmanager
def recording() -> Iterator[_Recorder]:
    """Within the block, Triton launches of effnet_kernels are recorded, not run; tuning is off and
    the tuning store is not read (``EFFNET_KERNELS_TUNING_STORE=off``), so the audited config is the
    launcher's untuned default."""
    from effnet_kernels.triton import _jit, _tuning, _tuning_store

    rec = _Recorder()
    saved_on = _jit.DeviceKernel.on
    saved_env = os.environ.get(_tuning.TUNE_ENV_VAR)
    saved_store = os.environ.get(_tuning_store.MODE_ENV_VAR)
    os.environ[_tuning_store.MODE_ENV_VAR] = "off"
    saved_enabled = getattr(_tuning, "tuning_enabled", None)
    _jit.DeviceKernel.on = lambda kernel, t: rec.on(kernel)
    os.environ[_tuning.TUNE_ENV_VAR] = "0"
    if saved_enabled is not None:
        _tuning.tuning_enabled = lambda *a, **k: False
    try:
        yield rec
    finally:
        _jit.DeviceKernel.on = saved_on
        if saved_enabled is not None:
            _tuning.tuning_enabled = saved_enabled
        for var, saved in ((_tuning.TUNE_ENV_VAR, saved_env), (_tuning_store.MODE_ENV_VAR, saved_store)):
            if saved is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = saved


def _meta(shape, dtype, layout: str = "nchw") -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if layout == "nhwc" and t.dim() == 4 else t


def capture(wl: Workload) -> list[Launch]:
    """The Triton launches the backend makes for ``wl`` (deterministic algorithms off: the atomic squeeze)."""
    from effnet_kernels.triton import conv, dwconv, pointwise, se_excite, se_gate

    dt = TORCH_DTYPES[wl.dtype]
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        with recording() as rec:
            if wl.op == "dwconv_bn_act":
                dwconv.dwconv_bn_act(_meta((wl.n, wl.c, wl.h, wl.w), dt, wl.layout), _meta((wl.c, 1, wl.k, wl.k), dt),
                                     _meta((wl.c,), torch.float32), _meta((wl.c,), torch.float32),
                                     (wl.stride, wl.stride), (wl.pad,) * 4, "silu", True)
            elif wl.op == "se_gate":
                se_gate.se_gate(_meta((wl.n, wl.c), torch.float32), _meta((wl.r, wl.c), dt), _meta((wl.r,), dt),
                                _meta((wl.c, wl.r), dt), _meta((wl.c,), dt), "silu", "sigmoid")
            elif wl.op == "se_excite":
                se_excite.se_excite(_meta((wl.n, wl.c, wl.h, wl.w), dt, wl.layout), _meta((wl.n, wl.c), torch.float32))
            elif wl.op == "pointwise_conv":  # the folded BN's shift as an fp32 bias, the SE gate in fp32
                shape = (wl.n, wl.cout, wl.h, wl.w)
                pointwise.pointwise_conv(_meta((wl.n, wl.c, wl.h, wl.w), dt, wl.layout), _meta((wl.cout, wl.c), dt),
                                         _meta((wl.cout,), torch.float32),
                                         _meta((wl.n, wl.c), torch.float32) if wl.gate else None,
                                         _meta(shape, dt, wl.layout) if wl.residual else None, wl.activation, wl.pool)
            elif wl.op == "conv_bn_act":  # the stem: weight in x's dtype, the folded BN's shift as an fp32 bias
                conv.conv_bn_act(_meta((wl.n, wl.c, wl.h, wl.w), dt, wl.layout), _meta((wl.cout, wl.c, wl.k, wl.k), dt),
                                 _meta((wl.cout,), torch.float32), (wl.stride, wl.stride), (wl.pad,) * 4,
                                 wl.activation)
            else:
                raise ValueError(f"unknown op {wl.op!r}")
    finally:
        torch.use_deterministic_algorithms(prev)
    return rec.launches


def compile_source(jf, signature: dict, constexprs: dict, attrs: dict, options) -> dict:
    """Compile a JITFunction for sm_90; its record: ptxas resources, SASS stats (PTX if no SASS), shared memory, warps.

    ``constexprs`` / ``attrs`` are keyed by argument paths (``(i,)``) as Triton's binder gives them.
    """
    import triton
    from triton import knobs

    src = triton.compiler.ASTSource(fn=jf, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    notes: list[str] = []
    # ptxas -v runs inside triton.compile; its log is printed only when asked, and only when
    # the kernel is really compiled (not found in Triton's own cache)
    with knobs.nvidia.scope(), knobs.compilation.scope():
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=_sm90(), options=options.__dict__)
    res = sass_mod.parse_ptxas_log(log.getvalue()).get(compiled.metadata.name)
    if res is None:
        notes.append("ptxas -v log not captured: registers/spills unknown")
    sass_text = None
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        listing = sass_mod.disassemble(cubin)
        if listing is not None:
            sass_text = next(iter(sass_mod.split_functions(listing).values()), None)
    rec = code_record(compiled.metadata.name, res, sass_text, compiled.asm.get("ptx"), notes)
    rec["dynamic_smem"] = int(compiled.metadata.shared)
    rec["num_warps"] = int(compiled.metadata.num_warps)
    return rec


def compile_function(fn, types: dict[str, str], constexprs: dict[str, Any], aligned: tuple[str, ...] = (),
                     num_warps: int = 4) -> dict:
    """Compile a plain Python function written as a Triton kernel (tests' small kernels): ``types`` of its
    runtime arguments (``"*fp32"``, ``"i32"``), ``constexprs`` by name, ``aligned`` arguments given the
    divisibility-16 hint. Returns :func:`compile_source`'s record."""
    import triton
    from triton.runtime.jit import JITFunction

    jf = JITFunction(fn)
    signature = {n: "constexpr" if n in constexprs else types[n] for n in jf.arg_names}
    consts = {(i,): constexprs[n] for i, n in enumerate(jf.arg_names) if n in constexprs}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(jf.arg_names) if n in aligned}
    options = triton.compiler.make_backend(_sm90()).parse_options({"num_warps": num_warps})
    return compile_source(jf, signature, consts, attrs, options)


def compile_launch(launch: Launch, cache: DiskCache) -> dict:
    """The compiled record of ``launch`` (from ``cache`` when it was compiled before)."""
    return cache.get_or_make(launch.key, lambda: compile_source(*launch.source))


# launch constexprs that are config, not semantics: the tiles, the channel vector width the launcher
# derived from C and the dtype (_jit.vector_width), dwconv's weight-load layout (dwconv.weight_tile) and
# the pointwise GEMM's vector widths along x, the weight and the output (pointwise.vectors)
CONFIG_CONSTEXPRS = ("VEC", "WEIGHT_TILE", "VEC_X", "VEC_W", "VEC_O")
# kernels whose launcher sets the software-pipeline depth of a K loop (num_stages): shown in their config
GEMM_KERNELS = ("_pointwise",)
# implicit-GEMM convs: one BLOCK_M x BLOCK_N output tile per program (a `while` K loop, not pipelined)
CONV_KERNELS = ("_conv_bn_act",)


def is_gemm(kernel: str) -> bool:
    return kernel.startswith(GEMM_KERNELS)


def config_of(launch: Launch) -> str:
    """The tile constexprs and warps of a launch, e.g. ``BLOCK_H=8 BLOCK_W=8 BLOCK_C=64 VEC=8 WEIGHT_TILE=False warps=4``
    (GEMM kernels also ``stages=3``)."""
    tiles = " ".join(f"{k}={v}" for k, v in launch.constexprs.items()
                     if k.startswith("BLOCK") or k in CONFIG_CONSTEXPRS)
    stages = f" stages={launch.source[4].num_stages}" if is_gemm(launch.kernel) else ""
    return f"{tiles} warps={launch.num_warps}{stages}".strip()


def outputs_per_thread(launch: Launch) -> Optional[float]:
    """Output elements one thread of the launch computes, from its tile constexprs (None if unknown)."""
    c = launch.constexprs
    threads = 32 * launch.num_warps
    if {"BLOCK_H", "BLOCK_W", "BLOCK_C"} <= c.keys() and launch.kernel.startswith("_dwconv"):
        return c["BLOCK_H"] * c["BLOCK_W"] * c["BLOCK_C"] / threads
    if "BLOCK_ROWS" in c and "BLOCK_COLS" in c:
        return c["BLOCK_ROWS"] * c["BLOCK_COLS"] / threads
    if (is_gemm(launch.kernel) and not c.get("POOL")) or launch.kernel.startswith(CONV_KERNELS):
        return c["BLOCK_M"] * c["BLOCK_N"] / threads  # one BLOCK_M x BLOCK_N output tile (the kernel loops over K)
    if "BLOCK_N" in c and "BLOCK_C" in c:
        return None  # se_gate loops over C
    return None


def channel_slots(launch: Launch) -> Optional[int]:
    """Channels the dwconv grid's channel axis covers (``grid[1] * BLOCK_C``; conv_bn_act: output channels,
    ``grid[1] * BLOCK_N``); None for other kernels."""
    if launch.kernel.startswith("_dwconv") and "BLOCK_C" in launch.constexprs:
        return launch.grid[1] * launch.constexprs["BLOCK_C"]
    if launch.kernel.startswith(CONV_KERNELS) and "BLOCK_N" in launch.constexprs:
        return launch.grid[1] * launch.constexprs["BLOCK_N"]
    return None
