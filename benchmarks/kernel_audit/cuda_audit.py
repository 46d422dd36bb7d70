"""The CUDA extension's kernels compiled for sm_90 (``nvcc -cubin -Xptxas -v``), and their launches.

Sources and flags come from :mod:`effnet_kernels._build`: the ``.cu`` files of
``source_files()`` and the ``cuflags`` line of the ``build.ninja`` that ``write_ninja()``
writes, with its ``-gencode`` list replaced by sm_90 SASS only and ``-cubin -Xptxas=-v``
added. Each file is compiled once per content hash of the sources and flags (cached on
disk); every ``__global__`` function of the cubins is then one record (ptxas resources,
SASS statistics), keyed by its demangled name.

Launch geometry is computed in C++ (``csrc/``), so it is replicated in Python: the formulas
in :mod:`.cuda_geometry` (shared with tests/test_cuda_geometry.py), put together per
workload in :func:`launches`: whoever changes a launch in ``csrc/`` changes them too; a row
whose kernel is not found in the build says so.
"""

from __future__ import annotations

import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from effnet_kernels import _build
from effnet_kernels.ops._checks import ACT_CODES

from . import cuda_geometry as cg
from . import sass as sass_mod
from .cache import DiskCache, key_of
from .compiled import code_record
from .workloads import ELEMENT_BYTES, Workload

ARCH = "90"
CUDA_TYPES = {"fp16": "__half", "bf16": "__nv_bfloat16", "fp32": "float"}
THREADS = cg.THREADS


def compile_flags(build_dir: Path) -> list[str]:
    """nvcc flags of the extension's build (from ``_build.write_ninja``) for one sm_90 cubin with a ptxas report."""
    cfg = _build.make_config(build_dir, build_dir / _build.ext_filename(), archs=(ARCH,), jobs=1)
    ninja = _build.write_ninja(cfg).read_text()
    line = next(ln for ln in ninja.splitlines() if ln.startswith("cuflags = "))
    flags = [f for f in shlex.split(line[len("cuflags = "):]) if not f.startswith(("-gencode", "--threads"))]
    return [*flags, f"-gencode=arch=compute_{ARCH},code=sm_{ARCH}", "-cubin", "-Xptxas=-v"]


def kernel_sources(dtypes: Optional[Sequence[str]] = None, names: Optional[Sequence[str]] = None) -> list[Path]:
    """The ``.cu`` files of the extension; with ``dtypes``, per-dtype files (``*_f16.cu`` ...) of other dtypes left out;
    with ``names``, only the files of those names (``"se_train.cu"``)."""
    src = _build.source_dir()
    if src is None:
        raise FileNotFoundError("the CUDA sources (csrc/) are not part of this checkout")
    files = [p for p in _build.source_files(src) if p.suffix == ".cu"]
    if dtypes:
        tags = {"fp16": "f16", "bf16": "bf16", "fp32": "f32"}
        other = {tags[d] for d in tags if d not in dtypes}
        files = [p for p in files if p.stem.rsplit("_", 1)[-1] not in other or "_" not in p.stem]
    if names is not None:
        unknown = set(names) - {p.name for p in files}
        if unknown:
            raise FileNotFoundError(f"no kernel sources named {sorted(unknown)} in {src}")
        files = [p for p in files if p.name in names]
    return files


def _compile_file(path: Path, flags: list[str], nvcc: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / (path.stem + ".cubin")
        proc = subprocess.run([nvcc, *flags, str(path), "-o", str(cubin)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed on {path.name} (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        resources = sass_mod.parse_ptxas_log(proc.stdout + proc.stderr)
        listing = sass_mod.disassemble(cubin)
        functions = sass_mod.split_functions(listing) if listing else {}
    names = sorted(set(resources) | set(functions))
    pretty = sass_mod.demangle(names)
    out = []
    for name in names:
        rec = code_record(name, resources.get(name), functions.get(name), None, [])
        rec["demangled"] = pretty[name]
        rec["file"] = path.name
        out.append(rec)
    return out


def compile_kernels(cache: DiskCache, dtypes: Optional[Sequence[str]] = None, jobs: int = 2,
                    names: Optional[Sequence[str]] = None) -> dict[str, dict]:
    """``{demangled name: record}`` of every ``__global__`` function in the extension's ``.cu`` files
    (:func:`kernel_sources` ``dtypes`` and ``names`` choose which).

    ``jobs`` files compile at once (nvcc is single-threaded per file here).
    """
    from concurrent.futures import ThreadPoolExecutor

    src = _build.source_dir()
    nvcc = _build.find_nvcc()
    if src is None or nvcc is None:
        raise FileNotFoundError("cannot compile the CUDA kernels: " + "; ".join(_build.missing_tools()))
    with tempfile.TemporaryDirectory() as tmp:
        flags = compile_flags(Path(tmp))
        src_hash = _build.source_hash(src)
        stable_flags = [f for f in flags if not f.startswith("-I" + tmp)]  # the temporary build dir varies
        tools = (_build.nvcc_version(nvcc), sass_mod.tool_version(sass_mod.find_tool("cuobjdump")))

        def one(path: Path) -> list[dict]:
            key = key_of("cuda", tools, src_hash, path.name, stable_flags)
            return cache.get_or_make(key, lambda: {"kernels": _compile_file(path, flags, nvcc)})["kernels"]

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            per_file = list(pool.map(one, kernel_sources(dtypes, names)))
    return {rec["demangled"]: rec for recs in per_file for rec in recs}


# ------------------------------------------------------------------ launches (mirrors csrc/)

@dataclass
class CudaLaunch:
    """One CUDA kernel launch of a workload: the kernel's demangled-name prefix, geometry, bank-conflict geometry."""

    kernel: str  # demangled name up to the argument list, e.g. "void effnet::dwconv_nhwc_kernel<__half, 5, 2, true, 1>"
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    dynamic_smem: int
    config: str
    geometry: Optional[dict] = None  # for banks.cuda_conflicts
    bank_kernel: Optional[str] = None
    outputs_per_thread: Optional[float] = None
    note: str = ""
    channel_slots: Optional[int] = None  # channels (NCHW: planes) the grid covers, idle ones included


def eval_dwconv_launch(wl: Workload) -> CudaLaunch:
    """The eval forward kernel's launch with the squeeze (also the training forward's apply pass): csrc/dwconv_kernels.cuh
    ``dwconv_shape`` (:func:`.cuda_geometry.dwconv_shape`); ``launch_dwconv`` picks the kernel."""
    t = CUDA_TYPES[wl.dtype]
    sw = wl.stride
    tile_w = cg.tile_w(sw)
    act = ACT_CODES["silu"]
    nhwc = wl.layout == "nhwc"
    grid, (bx, by), smem = cg.dwconv_shape(nhwc, ELEMENT_BYTES[wl.dtype], wl.k, sw, True, wl.n, wl.c, wl.ho, wl.wo)
    if nhwc:
        v = cg.pack_width(ELEMENT_BYTES[wl.dtype])
        nvec = cg.ceil_div(wl.c, v)
        vec = (wl.c * ELEMENT_BYTES[wl.dtype]) % 16 == 0
        notes = [] if vec else ["C*s % 16 != 0: scalar (unvectorised) path"]
        last_tx = nvec - (grid[0] - 1) * bx  # threads along C with channels in the last channel block
        if last_tx < bx:
            lanes = 32 if bx >= 32 else (32 // bx) * last_tx
            notes.append(f"last channel block: {lanes} of 32 lanes per warp active")
        return CudaLaunch(f"void effnet::dwconv_nhwc_kernel<{t}, {wl.k}, {sw}, true, {act}>", grid, (bx, by, 1), smem,
                          f"block={bx}x{by} V={v} tile_w={tile_w}",
                          dict(k=wl.k, bx=bx, by=by, v=v, cb=bx * v, threads=bx * by), "dwconv_nhwc",
                          note="; ".join(notes), channel_slots=grid[0] * bx * v)
    return CudaLaunch(f"void effnet::dwconv_nchw_kernel<{t}, {wl.k}, {sw}, true, {act}>", grid, (bx, by, 1), smem,
                      f"block={bx}x{by} tile_w={tile_w}", dict(k=wl.k, bx=bx, by=by, v=1, cb=bx, threads=bx * by),
                      "dwconv_nchw", channel_slots=grid[0] * by)


def launches(wl: Workload) -> list[CudaLaunch]:
    """The CUDA launches the extension makes for ``wl`` (deterministic algorithms off, 16-byte aligned tensors);
    a training op's are :func:`.cuda_train_audit.launches`."""
    from . import cuda_train_audit

    if wl.op in cuda_train_audit.TRAIN_OPS:
        return cuda_train_audit.launches(wl)
    if wl.op == "dwconv_bn_act":
        return [eval_dwconv_launch(wl)]
    warps = THREADS // 32
    if wl.op == "se_gate":  # csrc/se.cu se_gate: pooled fp32, weights in the model's dtype
        tw = CUDA_TYPES[wl.dtype]
        tiles = cg.ceil_div(wl.n, cg.SAMPLE_TILE)
        return [
            CudaLaunch(f"void effnet::(anonymous namespace)::se_reduce_kernel<float, {tw}, {ACT_CODES['silu']}>",
                       (cg.blocks_for(tiles * wl.r, warps), 1, 1), (THREADS, 1, 1), 0,
                       f"warp per (tile of {cg.SAMPLE_TILE} samples, r)"),
            CudaLaunch(f"void effnet::(anonymous namespace)::se_expand_kernel<{tw}, {ACT_CODES['sigmoid']}>",
                       (cg.ceil_div(wl.c, THREADS), min(tiles, cg.GRID_LIMIT), 1), (THREADS, 1, 1), 0,
                       f"thread per (tile of {cg.SAMPLE_TILE} samples, c), hidden staged {cg.HIDDEN_CHUNK} at a time",
                       dict(threads=THREADS, chunks=cg.hidden_chunks(wl.r)), "se_expand"),
        ]
    if wl.op == "se_excite":  # csrc/se.cu se_excite
        v = cg.pack_width(ELEMENT_BYTES[wl.dtype])
        total = wl.n * wl.c * wl.h * wl.w
        vec = total >= v  # and y, out 16-byte aligned (assumed)
        uniform = ((wl.c if wl.layout == "nhwc" else wl.h * wl.w) % v) == 0
        return [CudaLaunch(f"void effnet::(anonymous namespace)::se_excite_kernel<{CUDA_TYPES[wl.dtype]}>",
                           (cg.blocks_for(cg.ceil_div(total, v) if vec else total, THREADS), 1, 1), (THREADS, 1, 1), 0,
                           f"{'16-byte packs' if vec else 'scalar'}, grid-stride",
                           note="" if uniform else "per-element gate indices (H*W or C not a multiple of V)")]
    if wl.op == "pointwise_conv":  # no CUDA C++ kernel: the cuda backend runs it in cuDNN + aten (_aten_convs.py)
        return []
    if wl.op == "conv_bn_act":  # the stem: the cuda backend runs it in cuDNN (effnet_kernels/_aten_convs.py)
        return []
    raise ValueError(f"unknown op {wl.op!r}")


def find_kernel(records: dict[str, dict], prefix: str) -> Optional[dict]:
    """The record whose demangled name starts with ``prefix`` + ``(`` (None when the build has no such kernel)."""
    for name, rec in records.items():
        if name.startswith(prefix + "("):
            return rec
    return None
