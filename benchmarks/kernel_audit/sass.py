"""Reading compiled code: SASS (from ``cuobjdump -sass``), PTX as a fallback, ``ptxas -v`` logs.

Everything here is a pure function of text, so tests feed it small kernels they compile
themselves (the negative controls: a default vs relaxed atomic, a spilling kernel, a
vectorised vs scalar load).

What a :class:`CodeStats` counts is static: instructions in the code, not executed ones.
A kernel without backward branches (``loops == 0``) executes each of them at most once
per thread, so for it ``count / outputs per thread`` is per output element.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

# ------------------------------------------------------------------ tools

TOOLS = ("cuobjdump", "nvdisasm")


def find_tool(name: str) -> Optional[str]:
    """Path of ``cuobjdump`` / ``nvdisasm``: PATH, CUDA_HOME, the PyPI wheels (``nvidia-cuda-cuobjdump``,
    ``nvidia-cuda-nvdisasm``), then the copy Triton bundles; None when there is none."""
    found = shutil.which(name)
    if found:
        return found
    candidates = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            candidates.append(Path(os.environ[env]) / "bin" / name)
    candidates.append(Path("/usr/local/cuda/bin") / name)
    try:
        import nvidia  # namespace package of NVIDIA's PyPI wheels

        for root in nvidia.__path__:
            candidates += [Path(p) for p in sorted(glob.glob(os.path.join(root, "*", "bin", name)))]
    except ImportError:
        pass
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:
        pass
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def tool_version(path: Optional[str]) -> str:
    """``"13.5.37"``-like version of an NVIDIA tool, or ``"missing"``."""
    if path is None:
        return "missing"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unusable ({exc})"
    m = re.search(r"V(\d+\.\d+\.\d+)", out) or re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def disassemble(cubin: Path) -> Optional[str]:
    """SASS of a cubin: ``cuobjdump -sass``, else ``nvdisasm -c``; None when neither is there or works."""
    for tool, args, marker in (("cuobjdump", ["-sass"], "Function"), ("nvdisasm", ["-c"], ".text.")):
        path = find_tool(tool)
        if path is None:
            continue
        proc = subprocess.run([path, *args, str(cubin)], capture_output=True, text=True)
        if proc.returncode == 0 and marker in proc.stdout:
            return proc.stdout
    return None


# ------------------------------------------------------------------ SASS

# a function starts at "Function : name" (cuobjdump) or ".text.name:" (nvdisasm)
_FUNC_RE = re.compile(r"^\s*(?:Function\s*:\s*(\S+)|\.text\.(\S+):)\s*$", re.M)
_LABEL_RE = re.compile(r"^\s*(\.L_x_\d+):", re.M)
_INSTR_RE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def split_functions(sass: str) -> dict[str, str]:
    """``{mangled function name: its SASS text}`` of a ``cuobjdump -sass`` listing."""
    marks = list(_FUNC_RE.finditer(sass))
    return {(m.group(1) or m.group(2)): sass[m.end(): marks[i + 1].start() if i + 1 < len(marks) else len(sass)]
            for i, m in enumerate(marks)}


def labels(sass: str) -> dict[str, int]:
    """``{".L_x_3": address}`` of the labels in an nvdisasm listing (the address of the next instruction)."""
    out = {}
    for m in _LABEL_RE.finditer(sass):
        nxt = _INSTR_RE.search(sass, m.end())
        if nxt:
            out[m.group(1)] = int(nxt.group(1), 16)
    return out


def instructions(sass: str) -> list[tuple[int, str, str]]:
    """``[(address, opcode with modifiers, operands)]`` of one function's SASS."""
    return [(int(m.group(1), 16), m.group(3), m.group(4).strip()) for m in _INSTR_RE.finditer(sass)]


def access_bits(opcode: str) -> int:
    """Bits one lane moves with a SASS load/store: ``.128`` / ``.64`` / ``.U16`` ... (default 32)."""
    mods = opcode.split(".")[1:]
    for m in mods:
        if m in ("128", "64"):
            return int(m)
        if m in ("U16", "S16"):
            return 16
        if m in ("U8", "S8"):
            return 8
    return 32


# PTX atomics whose ordering ptxas implements with fences / L1 invalidation
_PTX_ACQUIRE = re.compile(r"^(?:atom|red)\..*\.(?:acquire|acq_rel)\b")
_PTX_RELEASE = re.compile(r"^(?:atom|red)\..*\.(?:release|acq_rel)\b")

# Memory-ordering instructions: MEMBAR (fence), FENCE, ERRBAR, CCTL (cache control:
# CCTL.IVALL invalidates the SM's L1).
_ORDERING = ("MEMBAR", "FENCE", "ERRBAR", "CCTL")
# Tensor-core matrix instructions: HMMA (mma.sync, sm_80+), HGMMA (wgmma, sm_90)
_MMA = ("HMMA", "HGMMA")


@dataclass
class CodeStats:
    """Static counts of one function's memory instructions (from SASS, or PTX when ``source == "ptx"``)."""

    source: str  # "sass" | "ptx"
    ldg: Counter = field(default_factory=Counter)  # bits per lane -> global load instructions
    stg: Counter = field(default_factory=Counter)  # bits per lane -> global store instructions
    lds: Counter = field(default_factory=Counter)  # shared loads by width
    sts: Counter = field(default_factory=Counter)  # shared stores by width
    atom: Counter = field(default_factory=Counter)  # global atomics with a return value (ATOMG...)
    red: Counter = field(default_factory=Counter)  # global reductions without return (RED...)
    ordering: Counter = field(default_factory=Counter)  # MEMBAR.* / FENCE.* / CCTL.* / ERRBAR opcodes
    local_loads: int = 0  # LDL: spill reloads or local arrays
    local_stores: int = 0  # STL
    loops: int = 0  # backward branches
    instructions: int = 0
    mma: int = 0  # tensor-core instructions (HMMA, HGMMA; PTX: mma.sync, wgmma.mma_async)

    @property
    def l1_invalidations(self) -> int:
        """``CCTL.IVALL`` and other CCTL invalidations: each discards the SM's L1 contents.

        From PTX (no SASS), an atomic with acquire semantics (``.acquire`` / ``.acq_rel``, what
        ptxas lowers to MEMBAR + ATOM + CCTL.IVALL) counts as one.
        """
        sass_iv = sum(n for op, n in self.ordering.items() if op.startswith("CCTL") and ".IV" in op)
        return sass_iv + sum(n for op, n in (self.atom + self.red).items() if _PTX_ACQUIRE.search(op))

    @property
    def membars(self) -> int:
        """Fences (``MEMBAR.*`` in SASS, ``membar`` / ``fence`` in PTX, and PTX atomics with release semantics)."""
        fences = sum(n for op, n in self.ordering.items() if op.startswith(("MEMBAR", "FENCE", "membar", "fence")))
        return fences + sum(n for op, n in (self.atom + self.red).items() if _PTX_RELEASE.search(op))

    @staticmethod
    def widths(counter: Counter) -> str:
        """``"128:54 32:200"``: instructions per width, widest first."""
        return " ".join(f"{bits}:{n}" for bits, n in sorted(counter.items(), reverse=True))


def sass_stats(sass: str) -> CodeStats:
    """Count the memory instructions, fences and loops of one function's SASS."""
    st = CodeStats(source="sass")
    targets = labels(sass)
    for addr, op, operands in instructions(sass):
        st.instructions += 1
        base = op.split(".")[0]
        if base in ("LDG", "LDGSTS"):  # LDGSTS: cp.async, a global load straight into shared memory (GEMM tiles)
            st.ldg[access_bits(op)] += 1
        elif base == "STG":
            st.stg[access_bits(op)] += 1
        elif base in ("LDS", "LDSM"):
            st.lds[access_bits(op) if base == "LDS" else 128] += 1
        elif base == "STS":
            st.sts[access_bits(op)] += 1
        elif base in _MMA:
            st.mma += 1
        elif base in ("ATOMG", "ATOM"):
            st.atom[op] += 1
        elif base in ("RED", "REDG"):
            st.red[op] += 1
        elif base == "LDL":
            st.local_loads += 1
        elif base == "STL":
            st.local_stores += 1
        elif base.startswith(_ORDERING):
            st.ordering[op] += 1
        elif base == "BRA":
            m = re.search(r"0x([0-9a-f]+)", operands)
            label = re.search(r"(\.L_x_\d+)", operands)
            target = int(m.group(1), 16) if m else targets.get(label.group(1)) if label else None
            if target is not None and target < addr:  # a branch to itself (the trap after EXIT) is no loop
                st.loops += 1
    return st


# ------------------------------------------------------------------ PTX (fallback)

_PTX_MEM_RE = re.compile(r"^\s*(?:@%p\d+\s+)?((?:ld|st)\.global[\w.:]*|(?:atom|red)\.global[\w.:]*|membar\.\w+|fence\.[\w.]+)",
                         re.M)
_PTX_BITS = {"b8": 8, "u8": 8, "s8": 8, "b16": 16, "u16": 16, "s16": 16, "f16": 16, "bf16": 16,
             "b32": 32, "u32": 32, "s32": 32, "f32": 32, "b64": 64, "u64": 64, "s64": 64, "f64": 64}


def ptx_access_bits(op: str) -> int:
    """Bits per thread of a PTX ``ld/st.global[.v2|.v4].<type>`` instruction."""
    parts = op.split(".")
    vec = 4 if "v4" in parts else 2 if "v2" in parts else 1
    bits = next((_PTX_BITS[p] for p in reversed(parts) if p in _PTX_BITS), 32)
    return vec * bits


def ptx_stats(ptx: str) -> CodeStats:
    """The PTX counterpart of :func:`sass_stats` (before ptxas: counts may differ from the SASS)."""
    st = CodeStats(source="ptx")
    for m in _PTX_MEM_RE.finditer(ptx):
        op = m.group(1)
        if op.startswith("ld."):
            st.ldg[ptx_access_bits(op)] += 1
        elif op.startswith("st."):
            st.stg[ptx_access_bits(op)] += 1
        elif op.startswith("atom."):
            st.atom[op] += 1
        elif op.startswith("red."):
            st.red[op] += 1
        else:
            st.ordering[op] += 1
    st.loops = len(re.findall(r"^\s*(?:@%p\d+\s+)?bra(?:\.uni)?\s+\$L__BB\d+_\d+;", ptx, re.M))  # upper bound
    st.mma = len(re.findall(r"^\s*(?:@%p\d+\s+)?(?:mma\.sync|wgmma\.mma_async)\b", ptx, re.M))
    for m in re.finditer(r"^\s*(?:@%p\d+\s+)?cp\.async\.\w+\.shared\.global[^;]*?,\s*(0x[0-9a-f]+|\d+)\s*(?:,[^;]*)?;",
                         ptx, re.M):  # cp.async global -> shared: a global load of that many bytes
        st.ldg[8 * int(m.group(1), 0)] += 1
    return st


# ------------------------------------------------------------------ ptxas -v

_PTXAS_FN_RE = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_SPILL_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED_RE = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


@dataclass(frozen=True)
class Resources:
    """What ``ptxas -v`` reports for one entry function."""

    regs: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    static_smem_bytes: int


def parse_ptxas_log(log: str) -> dict[str, Resources]:
    """``{mangled entry name: Resources}`` from a ``ptxas -v`` (or ``nvcc -Xptxas -v``) log."""
    out: dict[str, Resources] = {}
    for block in re.split(r"(?=ptxas info\s*: Compiling entry function)", log):
        fn = _PTXAS_FN_RE.search(block)
        used = _PTXAS_USED_RE.search(block)
        if not fn or not used:
            continue
        spill = _PTXAS_SPILL_RE.search(block)
        stack, sst, sld = (int(g) for g in spill.groups()) if spill else (0, 0, 0)
        out[fn.group(1)] = Resources(int(used.group(1)), stack, sst, sld, int(used.group(2) or 0))
    return out


def demangle(names: list[str]) -> dict[str, str]:
    """``{mangled: demangled}`` through ``c++filt`` (``cu++filt`` if that is what there is); identity without either."""
    tool = shutil.which("c++filt") or find_tool("cu++filt")
    if tool is None or not names:
        return {n: n for n in names}
    proc = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    return dict(zip(names, lines)) if proc.returncode == 0 and len(lines) == len(names) else {n: n for n in names}
