"""The Triton kernels compile for an H100 (sm_90) without a GPU, and the fast path is vectorised.

The interpreter tests check what the kernels compute; this checks that the Triton
compiler accepts them (types, constexpr branches, the int64 variants) down to a cubin
(ptxas), and reads the PTX for the property the channels_last design is for: 16-byte
loads and stores along C. Launch-time specialisation is mimicked: unit strides are
constants, and pointers, C and strides carry Triton's "divisible by 16" hint, as a
real launch gives them when C is a multiple of 16.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402

from effnet_kernels.triton import dwconv, se_excite, se_gate  # noqa: E402
from effnet_kernels.ops._checks import ACT_CODES  # noqa: E402
from effnet_kernels.triton._jit import SUM, device_kernel  # noqa: E402
import triton.language as tl  # noqa: E402

if not isinstance(SUM, triton.runtime.jit.JITFunction):
    pytest.skip("triton was imported with TRITON_INTERPRET=1: its library is interpreter-only in this process",
                allow_module_level=True)

SM90 = GPUTarget("cuda", 90, 32)

DWCONV_INTS = "C WC H W HO WO TILES_W TILES sxn sxc sxh sxw syn syc syh syw pad_top pad_left".split()
ALIGNED = {"x_ptr", "w_ptr", "shift_ptr", "WC", "y_ptr", "red_ptr", "part_ptr", "mean_ptr", "p_ptr", "g_ptr",
           "o_ptr", "C", "sxn", "sxc", "sxh", "sxw", "syn", "syc", "syh", "syw", "COLS"}


def compile_sm90(kernel, types: dict, constexprs: dict, num_warps: int = 4):
    """Compile a :class:`~effnet_kernels.triton._jit.DeviceKernel` for sm_90; return the CompiledKernel."""
    try:
        backend = triton.compiler.make_backend(SM90)
    except Exception as exc:  # pragma: no cover - a triton build without the NVIDIA backend
        pytest.skip(f"no NVIDIA backend in this triton build: {exc}")
    fn = triton.runtime.jit.JITFunction(kernel.fn)
    signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name in ALIGNED and name not in constexprs}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=SM90, options=backend.parse_options({"num_warps": num_warps}).__dict__)


def dwconv_types(dtype: str) -> dict:
    types = {name: "i32" for name in DWCONV_INTS}
    types.update(x_ptr=f"*{dtype}", y_ptr=f"*{dtype}", w_ptr="*fp32", shift_ptr="*fp32",
                 red_ptr="*fp32", inv_hw="fp32")
    return types


def global_accesses(ptx: str, op: str) -> set[str]:
    """The distinct ``ld.global`` / ``st.global`` instruction forms in ``ptx``."""
    return set(re.findall(rf"{op}\.global[\w.:]*", ptx))


@pytest.mark.parametrize(
    "dtype,channels_last,squeeze,int64,activation",
    [("fp16", True, 1, False, "silu"), ("bf16", True, 2, True, "relu"), ("fp32", True, 0, False, "relu6"),
     ("fp16", False, 2, False, "hardswish"), ("bf16", False, 1, True, "identity")],
)
def test_dwconv_compiles(dtype, channels_last, squeeze, int64, activation):
    """Each activation's constexpr variant (one per layout/dtype/squeeze case); only SiLU keeps an exp."""
    unit = {"sxc": 1, "syc": 1} if channels_last else {"sxw": 1, "syw": 1}
    consts = dict(K=5, SH=2, SW=1, ACT=ACT_CODES[activation], SQUEEZE=squeeze, CHANNELS_LAST=channels_last,
                  INT64=int64, BF16_RTNE=False, BLOCK_H=4 if channels_last else 2, BLOCK_W=8 if channels_last else 64,
                  BLOCK_C=64 if channels_last else 8, VEC=(16 // {"fp32": 4}.get(dtype, 2)) if channels_last else 1,
                  WEIGHT_TILE=False, **unit)
    compiled = compile_sm90(dwconv._dwconv_bn_act_kernel, dwconv_types(dtype), consts)
    ptx = compiled.asm["ptx"]
    assert ("ex2.approx" in ptx) == (activation == "silu"), "the other activations' branches must compile away"
    if squeeze == 1:
        assert "red.global" in ptx or "atom.global" in ptx
    if channels_last:
        assert any(".v4." in op for op in global_accesses(ptx, "ld")), "input loads along C are not 16-byte vectors"
        assert any(".v4." in op for op in global_accesses(ptx, "st")), "output stores along C are not 16-byte vectors"


def test_sum_tiles_compiles():
    compile_sm90(dwconv._sum_tiles_kernel, {"part_ptr": "*fp32", "mean_ptr": "*fp32", "C": "i32", "TILES": "i32"},
                 {"BLOCK_T": 16, "BLOCK_C": 128})


def test_se_gate_compiles():
    """Both GEMM kernels: SiLU / ReLU in the reduce, sigmoid / hard-sigmoid in the expand (only SiLU and
    sigmoid keep an exp)."""
    types = {"p_ptr": "*fp32", "wr_ptr": "*fp16", "br_ptr": "*fp32", "h_ptr": "*fp32", "we_ptr": "*bf16",
             "be_ptr": "*fp32", "g_ptr": "*fp32", "N": "i32", "C": "i32", "R": "i32"}
    for kernel, code in ((se_gate._se_reduce_kernel, "ACT"), (se_gate._se_expand_kernel, "GATE")):
        for fn in (("silu", "sigmoid") if code == "ACT" else ("sigmoid", "hardsigmoid")):
            compiled = compile_sm90(kernel, types, {code: ACT_CODES[fn], "BLOCK_N": 32, "BLOCK_R": 16, "BLOCK_C": 64})
            assert ("ex2.approx" in compiled.asm["ptx"]) == (fn in ("silu", "sigmoid"))


@pytest.mark.parametrize("channels_last,int64", [(True, False), (False, True)])
def test_se_excite_compiles(channels_last, int64):
    types = {"y_ptr": "*fp16", "g_ptr": "*fp32", "o_ptr": "*fp16", "ROWS": "i32", "COLS": "i32", "HW": "i32",
             "COL_BLOCKS": "i32"}
    compiled = compile_sm90(se_excite._se_excite_kernel, types,
                            dict(CHANNELS_LAST=channels_last, INT64=int64, BF16_RTNE=False, BLOCK_ROWS=16,
                                 BLOCK_COLS=256, VEC=8))
    assert any(".v4." in op for op in global_accesses(compiled.asm["ptx"], "st"))


def test_bf16_rounding_by_hand_compiles():
    """_jit.round_bf16_rtne (the interpreter's bf16 rounding, shared by the kernels) also compiles:
    with BF16_RTNE set the store is the integer-rounded 16-bit value, not a float conversion."""
    types = {"y_ptr": "*bf16", "g_ptr": "*fp32", "o_ptr": "*bf16", "ROWS": "i32", "COLS": "i32", "HW": "i32",
             "COL_BLOCKS": "i32"}
    consts = dict(CHANNELS_LAST=True, INT64=False, BLOCK_ROWS=16, BLOCK_COLS=256, VEC=8)
    by_hand = compile_sm90(se_excite._se_excite_kernel, types, dict(consts, BF16_RTNE=True)).asm["ptx"]
    native = compile_sm90(se_excite._se_excite_kernel, types, dict(consts, BF16_RTNE=False)).asm["ptx"]
    assert "cvt.rn.bf16" in native and "cvt.rn.bf16" not in by_hand


# --------------------------------------------------------------------------------------
# Launches exactly as a GPU run makes them: the real launchers (tuner included) run on CPU
# tensors while every kernel launch is bound by Triton's own binder (the one
# JITFunction.run uses: same specialisation of ints and pointers, same constexprs, same
# cache key) and recorded instead of run; each distinct launch is then compiled for sm_90.
# --------------------------------------------------------------------------------------

H100_MAX_SHARED = 232448  # bytes of shared memory one block may opt into on sm_90


class LaunchRecorder:
    def __init__(self):
        from triton.runtime.jit import create_function_from_signature

        self._make_binder = create_function_from_signature
        self.backend = triton.compiler.make_backend(SM90)
        self.kernels = {}  # DeviceKernel -> (JITFunction, binder)
        self.launches = {}  # (kernel name, cache key) -> (JITFunction, signature, constexprs, attrs, options)
        self.grids = []

    def on(self, kernel):
        def at(grid):
            return lambda *args, **kwargs: self.record(kernel, grid, args, kwargs)

        return type("Launcher", (), {"__getitem__": lambda _, grid: at(grid)})()

    def record(self, kernel, grid, args, kwargs):
        from triton import knobs
        from triton.runtime.jit import compute_cache_key

        if kernel not in self.kernels:  # built as DeviceKernel.on builds it for a CUDA launch
            jf = triton.runtime.jit.JITFunction(kernel.fn, do_not_specialize=list(kernel.do_not_specialize))
            self.kernels[kernel] = jf, self._make_binder(jf.signature, jf.params, self.backend)
        jf, binder = self.kernels[kernel]
        kwargs = dict(kwargs, debug=knobs.runtime.debug, instrumentation_mode=knobs.compilation.instrumentation_mode)
        bound, specialization, options = binder(*args, **kwargs)
        grid = grid(bound) if callable(grid) else tuple(grid)
        assert all(isinstance(g, int) and g >= 1 for g in grid) and grid[0] < 2**31, grid
        assert all(g < 65536 for g in grid[1:]), f"grid {grid}: axes 1 and 2 are limited to 65535"
        self.grids.append((jf.__name__, grid))
        key = (jf.__name__, compute_cache_key({}, specialization, options))
        if key not in self.launches:
            options, signature, constexprs, attrs = jf._pack_args(self.backend, kwargs, bound, specialization, options)
            self.launches[key] = jf, signature, constexprs, attrs, options

    def compile_all(self, only=None):
        """Compile every distinct launch (of the kernels named in ``only``, if given) for sm_90; yields
        (what, CompiledKernel)."""
        for (name, _), (jf, signature, constexprs, attrs, options) in self.launches.items():
            if only is not None and name not in only:
                continue
            src = triton.compiler.ASTSource(fn=jf, signature=signature, constexprs=constexprs, attrs=attrs)
            consts = {jf.arg_names[path[0]]: v for path, v in constexprs.items()}
            yield f"{name} {signature} {consts} num_warps={options.num_warps}", triton.compile(
                src, target=SM90, options=options.__dict__)


@pytest.fixture
def recorded_launches(monkeypatch):
    """Make the Triton launchers act as on a GPU (tuning on, every candidate run once) and record their launches."""
    import triton.testing

    from effnet_kernels.triton import _jit, _tuning

    rec = LaunchRecorder()
    monkeypatch.setattr(_jit.DeviceKernel, "on", lambda kernel, t: rec.on(kernel))
    monkeypatch.setattr(_jit, "interpreted", lambda t: False)
    monkeypatch.setattr(dwconv, "interpreted", lambda t: False)
    monkeypatch.setattr(_tuning, "tuning_enabled", lambda t: True)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), fn(), 1.0)[-1])
    _tuning.clear_cache()
    yield rec
    _tuning.clear_cache()


def cpu_input(shape, dtype, channels_last):
    x = torch.empty(shape, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def run_dwconv(shape, k, stride, dtype, channels_last, squeeze, deterministic=False, force_int64=False,
               activation="silu"):
    """The real Triton dwconv launcher on an uninitialised CPU tensor (launches are recorded, not run)."""
    from effnet_kernels import _launch

    c = shape[1]
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    real = _launch.needs_int64
    if force_int64:
        _launch.needs_int64 = lambda *tensors: True
    try:
        dwconv.dwconv_bn_act(cpu_input(shape, dtype, channels_last), torch.empty(c, 1, k, k), torch.empty(c),
                             torch.empty(c), (stride, stride), (k // 2,) * 4, activation, squeeze)
    finally:
        _launch.needs_int64 = real
        torch.use_deterministic_algorithms(prev)


def check_compiled(rec, expect):
    assert len(rec.launches) == expect, f"{len(rec.launches)} distinct launches, expected {expect}"
    for what, compiled in rec.compile_all():
        assert compiled.metadata.shared <= H100_MAX_SHARED, f"{what}: {compiled.metadata.shared} B of shared memory"
        assert compiled.metadata.num_warps * 32 <= 1024, what



@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_every_candidate_config_compiles(recorded_launches, channels_last):
    """The whole tuning space (C = 72, 13 x 13: no candidate is clamped), atomic squeeze, as the tuner launches it."""
    run_dwconv((64, 72, 13, 13), 3, 1, torch.float16, channels_last, squeeze=True)  # a batch that fills the GPU
    check_compiled(recorded_launches, 5 if channels_last else 4)


def test_tiny_shape_classes_are_not_tuned(recorded_launches):
    """Below dwconv.TUNE_MIN_ELEMENTS a launch is latency-bound: one config, one compile, cached."""
    from effnet_kernels.triton import _tuning

    run_dwconv((2, 72, 13, 13), 3, 1, torch.float16, True, squeeze=True)
    assert len(recorded_launches.launches) == 1 and len(recorded_launches.grids) == 1
    assert len(_tuning._cache) == 1
    run_dwconv((64, 72, 13, 13), 3, 1, torch.float16, True, squeeze=True)
    # the 5 candidates at batch 64, plus the batch-2 tile (shrunk to fill the GPU) unless it is one of them
    assert len(recorded_launches.launches) in (5, 6) and len(_tuning._cache) == 2


@pytest.mark.parametrize(
    "dtype,channels_last,mode,k,stride,activation",
    [(torch.float16, True, "none", 5, 2, "relu6"), (torch.float16, True, "det", 7, 1, "silu"),
     (torch.float16, False, "det", 3, 2, "hardswish"), (torch.bfloat16, True, "atomic", 3, 1, "hardswish"),
     (torch.bfloat16, False, "none", 7, 2, "relu"), (torch.float32, True, "det", 5, 1, "identity"),
     (torch.float32, False, "atomic", 5, 2, "relu6")],
    ids=str,
)
def test_dwconv_variants_compile(recorded_launches, monkeypatch, dtype, channels_last, mode, k, stride, activation):
    """dtype x layout x squeeze mode (two-stage: both kernels) x k x stride x activation, untuned default config."""
    from effnet_kernels.triton import _tuning

    monkeypatch.setattr(_tuning, "tuning_enabled", lambda t: False)
    run_dwconv((2, 144, 40, 40), k, stride, dtype, channels_last, mode != "none", deterministic=mode == "det",
               activation=activation)
    check_compiled(recorded_launches, 2 if mode == "det" else 1)


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_int64_variants_compile(recorded_launches, monkeypatch, channels_last):
    from effnet_kernels.triton import _tuning

    monkeypatch.setattr(_tuning, "tuning_enabled", lambda t: False)
    run_dwconv((2, 144, 40, 40), 3, 1, torch.bfloat16, channels_last, True, force_int64=True)
    run_dwconv((2, 144, 40, 40), 5, 2, torch.float16, channels_last, True, deterministic=True, force_int64=True)
    y = cpu_input((2, 40, 7, 7), torch.float16, channels_last)
    from effnet_kernels import _launch

    monkeypatch.setattr(_launch, "needs_int64", lambda *tensors: True)
    se_excite.se_excite(y, torch.empty(2, 40))
    check_compiled(recorded_launches, 4)


def test_real_launch_keeps_the_fast_path_vectorised(recorded_launches, monkeypatch):
    """With launch-time specialisation as Triton does it (C = 144), channels_last loads and stores are 16 bytes."""
    from effnet_kernels.triton import _tuning

    monkeypatch.setattr(_tuning, "tuning_enabled", lambda t: False)
    run_dwconv((2, 144, 28, 28), 3, 1, torch.float16, True, True)
    ((_, compiled),) = list(recorded_launches.compile_all())
    ptx = compiled.asm["ptx"]
    assert any(".v4." in op for op in global_accesses(ptx, "ld")), "input loads along C are not 16-byte vectors"
    assert any(".v4." in op for op in global_accesses(ptx, "st")), "output stores along C are not 16-byte vectors"


def test_each_activation_is_its_own_specialisation(recorded_launches, monkeypatch):
    """The activation is a constexpr: one launch (cache key) per activation, none shared (nothing compiled here)."""
    from effnet_kernels.ops._checks import ACTIVATIONS
    from effnet_kernels.triton import _tuning

    monkeypatch.setattr(_tuning, "tuning_enabled", lambda t: False)
    for activation in ACTIVATIONS + ACTIVATIONS:
        run_dwconv((2, 96, 14, 14), 3, 1, torch.float16, True, squeeze=False, activation=activation)
    assert len(recorded_launches.launches) == len(ACTIVATIONS)


def test_spatial_sizes_share_one_compiled_kernel(recorded_launches, monkeypatch):
    """H, W, Ho, Wo, tiles and padding do not multiply compiles (each costs 1-9 s of a GPU session)."""
    from effnet_kernels.triton import _tuning

    monkeypatch.setattr(_tuning, "tuning_enabled", lambda t: False)
    for hw in (112, 56, 57, 28, 14, 7):  # at a batch that fills the GPU (small grids get smaller tiles)
        run_dwconv((256, 96, hw, hw), 3, 1, torch.float16, True, squeeze=False)
    assert len(recorded_launches.launches) == 1


def test_se_kernels_compile(recorded_launches):
    """se_gate for N not a multiple of 16, R not a power of two, C up to 3840; se_excite per layout and dtype."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for n, c, r in ((37, 3840, 160), (5, 1152, 48), (3, 40, 10)):
            se_gate.se_gate(torch.empty(n, c, dtype=dtype), torch.empty(r, c), torch.empty(r), torch.empty(c, r),
                            torch.empty(c), "silu", "sigmoid")
    for dtype in (torch.float16, torch.bfloat16):
        for channels_last in (True, False):
            se_excite.se_excite(cpu_input((2, 144, 14, 14), dtype, channels_last), torch.empty(2, 144))
    check_compiled(recorded_launches, 12 + 4)  # se_gate: reduce + expand per (dtype, C and N class)


def test_awkward_shapes_compile(recorded_launches, monkeypatch):
    """Sizes of 1 become compile-time constants in Triton's specialisation (C = 1, N = 1, R = 1, 1 x 1
    planes): the runtime-bounded ``while`` loops and masks must still compile."""
    from effnet_kernels.triton import _tuning

    monkeypatch.setattr(_tuning, "tuning_enabled", lambda t: False)
    for shape, k in (((1, 1, 5, 7), 5), ((2, 4, 1, 1), 3), ((1, 1, 40, 40), 3)):
        for deterministic in (False, True):
            run_dwconv(shape, k, 1, torch.float32, False, True, deterministic=deterministic)
    se_gate.se_gate(torch.empty(1, 1), torch.empty(1, 1), torch.empty(1), torch.empty(1, 1), torch.empty(1),
                    "relu", "hardsigmoid")
    se_gate.se_gate(torch.empty(17, 7), torch.empty(3, 7), torch.empty(3), torch.empty(7, 3), torch.empty(7),
                    "silu", "sigmoid")
    for channels_last in (False, True):
        se_excite.se_excite(cpu_input((2, 5, 1, 1), torch.float16, channels_last), torch.empty(2, 5))
    for what, compiled in recorded_launches.compile_all():
        assert compiled.metadata.shared <= H100_MAX_SHARED, what
    assert len(recorded_launches.launches) >= 6


# --------------------------------------------------------------------------------------
# Properties of the compiled code (issue 10), each with a check shown to fail on the code
# it replaced: relaxed squeeze atomics (no fence, no L1 invalidation), 128-bit weight and
# activation accesses on channels_last, no spills and bounded registers at every B0-B7 size.
# --------------------------------------------------------------------------------------

# 128 registers x 128 threads: 4 CTAs (16 warps) resident per SM, enough in-flight 128-bit
# loads to cover latency on a memory-bound kernel; the NCHW k=5 kernel this replaced took 230.
MAX_REGISTERS = 128


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers, spill bytes stored + loaded) that ptxas reports for ``ptx`` on sm_90a."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as src:
        src.write(ptx)
        src.flush()
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", src.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    return regs, sum(int(b) for b in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))


ATOMIC_OPS = r"\b(?:atom|red)\.global[\w.]*"


def atomics_are_relaxed(ptx: str) -> bool:
    """Every global atomic/reduction is ``.relaxed`` and nothing orders memory (no fence, membar, acq/rel)."""
    ops = re.findall(ATOMIC_OPS, ptx)
    return bool(ops) and all(".relaxed" in op for op in ops) and not re.search(
        r"\bfence\.|\bmembar\.|\.acq_rel\b|\.release\b|\.acquire\b", ptx)


@device_kernel
def _atomic_probe(p_ptr, v_ptr, RELAXED: tl.constexpr):
    i = tl.arange(0, 128)
    if RELAXED:
        tl.atomic_add(p_ptr + i, tl.load(v_ptr + i), sem="relaxed")
    else:
        tl.atomic_add(p_ptr + i, tl.load(v_ptr + i))  # the default (acq_rel): MEMBAR + ATOMG + CCTL.IVALL


def test_negative_control_default_atomic_semantics_are_seen():
    """The check rejects Triton's default atomic (as the squeeze used it) and accepts the relaxed one."""
    types = {"p_ptr": "*fp32", "v_ptr": "*fp32"}
    assert not atomics_are_relaxed(compile_sm90(_atomic_probe, types, {"RELAXED": False}).asm["ptx"])
    assert atomics_are_relaxed(compile_sm90(_atomic_probe, types, {"RELAXED": True}).asm["ptx"])


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_every_squeeze_atomic_is_relaxed(recorded_launches, monkeypatch, channels_last):
    """Every atomic-squeeze variant (dtype x k x stride, several tiles per sample) compiles to a relaxed
    atomic (``atom.global.gpu.relaxed``, whose unused result ptxas turns into a plain ``REDG``; the
    default ``acq_rel`` one became ``MEMBAR.ALL.GPU; ATOMG; CCTL.IVALL``, read with cuobjdump -sass)."""
    from effnet_kernels.triton import _tuning

    monkeypatch.setattr(_tuning, "tuning_enabled", lambda t: False)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for k, stride in ((3, 1), (5, 2), (7, 1)):
            run_dwconv((256, 144, 28, 28), k, stride, dtype, channels_last, squeeze=True)
    for what, compiled in recorded_launches.compile_all():
        ptx = compiled.asm["ptx"]
        assert atomics_are_relaxed(ptx), f"{what}: {sorted(set(re.findall(ATOMIC_OPS, ptx)))}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_channels_last_loads_are_all_128_bit(recorded_launches, monkeypatch, dtype):
    """C a multiple of 16 (every expanded EfficientNet width): weights, shift and activations are all
    ``ld.global.v4`` (the ``[C, k*k]`` weights this replaced were 72-200 scalar loads per thread)."""
    from effnet_kernels.triton import _tuning

    monkeypatch.setattr(_tuning, "tuning_enabled", lambda t: False)
    for k in (3, 5, 7):
        run_dwconv((256, 240, 28, 28), k, 1, dtype, True, squeeze=True)
    for what, compiled in recorded_launches.compile_all():
        loads = re.findall(r"\bld\.global[\w.:]*", compiled.asm["ptx"])
        assert loads and all(".v4." in op for op in loads), f"{what}: {sorted(set(loads))}"


def test_b0_dwconv_no_spills_bounded_registers(recorded_launches, monkeypatch):
    """Every variant B0 compiles at batch 256 (both layouts): no spills, <= MAX_REGISTERS, compiled here.
    B0-B7 at batch 1 and 256, every dtype, is the committed kernel audit's sweep (no spills, >= 16 warps/SM
    on every row: tests/test_kernel_audit.py, whose staleness check makes a kernel change recompile it)."""
    from effnet_kernels import models
    from effnet_kernels.triton import _tuning

    monkeypatch.setattr(_tuning, "tuning_enabled", lambda t: False)
    for channels_last in (True, False):
        for c, h, w, k, stride in models.depthwise_shapes(("b0",)):
            run_dwconv((256, c, h, w), k, stride, torch.float16, channels_last, squeeze=True)
    for what, compiled in recorded_launches.compile_all():
        regs, spills = ptxas_usage(compiled.asm["ptx"])
        assert spills == 0 and regs <= MAX_REGISTERS, f"{what}: {regs} registers, {spills} B spilled"


def test_b0_b7_se_gate_no_spills(recorded_launches):
    """Both se_gate kernels at every B0-B7 SE size (C, R) and batch 1 / 256: 0 spill bytes (the single
    kernel this replaced spilled ~1.7 KB per thread at B7), registers <= MAX_REGISTERS."""
    from effnet_kernels import models

    pairs = sorted({(s.mid_channels, s.se_reduced) for m in models.MODEL_NAMES for s in models.layer_shapes(m)
                    if s.se_reduced})
    for n in (1, 256):
        for c, r in pairs:
            se_gate.se_gate(torch.empty(n, c), torch.empty(r, c), torch.empty(r), torch.empty(c, r), torch.empty(c),
                            "silu", "sigmoid")
    for what, compiled in recorded_launches.compile_all():
        regs, spills = ptxas_usage(compiled.asm["ptx"])
        assert spills == 0 and regs <= MAX_REGISTERS, f"{what}: {regs} registers, {spills} B spilled"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_se_excite_nchw_is_128_bit_at_any_plane_size(recorded_launches, dtype):
    """NCHW with H*W not a multiple of the vector width (7 x 7, 14 x 14, 15 x 15): y loads and out
    stores are all 16-byte vectors (the row-per-plane kernel is scalar there)."""
    for hw in (7, 14, 15):
        se_excite.se_excite(cpu_input((256, 1152, hw, hw), dtype, False), torch.empty(256, 1152))
    for what, compiled in recorded_launches.compile_all():
        ptx = compiled.asm["ptx"]
        assert any(".v4." in op for op in global_accesses(ptx, "ld")), what
        stores = re.findall(r"\bst\.global[\w.:]*", ptx)
        assert stores and all(".v4." in op for op in stores), f"{what}: {sorted(set(stores))}"


def all_global_accesses(ptx: str, op: str) -> list[str]:
    """Every ``ld.global`` / ``st.global`` instruction form in ``ptx``, repeats kept."""
    return re.findall(rf"\b{op}\.global[\w.:]*", ptx)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("c", [24, 40, 56])
def test_channels_last_is_128_bit_when_c_is_not_a_multiple_of_16(recorded_launches, monkeypatch, c, dtype):
    """C = 24/40/56 (B1-B6 widths; 48/80/112-byte fp16 pixels, 16-byte aligned, which Triton's divisibility-16
    specialisation of C does not see): with the launchers' VEC every global load and store of dwconv (input,
    weights, shift, output) and se_excite (input, gate, output) is a 16-byte vector. Before VEC the C = 24 fp16
    dwconv compiled to LDG 16:144 32:10 / STG 16:16 and se_excite to LDG 32:32 16:32 / STG 16:32 (SASS widths
    in bits), and this test failed on their ``ld.global.b16`` / ``ld.global.b32`` forms."""
    from effnet_kernels.triton import _tuning

    monkeypatch.setattr(_tuning, "tuning_enabled", lambda t: False)
    run_dwconv((256, c, 56, 56), 3, 1, dtype, True, squeeze=True)  # several tiles per sample: atomic squeeze
    se_excite.se_excite(cpu_input((256, c, 56, 56), dtype, True), torch.empty(256, c))
    check_compiled(recorded_launches, 2)
    for what, compiled in recorded_launches.compile_all():
        ptx = compiled.asm["ptx"]
        for op in ("ld", "st"):
            forms = all_global_accesses(ptx, op)
            assert forms and all(".v4." in f for f in forms), f"{what}: {op} {sorted(set(forms))}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_small_tiles_load_weights_as_128_bit(recorded_launches, monkeypatch, dtype):
    """Batch-1 tiles of one channel vector per thread (8 pixels x 64 fp16 channels on 2 warps, 8 x 32 on 1):
    the ``[1, BLOCK_C]`` weight and shift rows have as many elements as threads, so Triton gave them a layout
    of one scalar each (LDG 128:25 32:26 at k5) plus a shuffle; with WEIGHT_TILE every load is 16 bytes."""
    from effnet_kernels.triton import _tuning

    monkeypatch.setattr(_tuning, "tuning_enabled", lambda t: False)
    run_dwconv((1, 144, 56, 56), 5, 2, dtype, True, squeeze=True)
    run_dwconv((1, 1152, 7, 7), 3, 1, dtype, True, squeeze=True)
    check_compiled(recorded_launches, 2)
    for what, compiled in recorded_launches.compile_all():
        loads = all_global_accesses(compiled.asm["ptx"], "ld")
        assert loads and all(".v4." in f for f in loads), f"{what}: {sorted(set(loads))}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_occupancy_classes_fit_in_128_registers(recorded_launches, monkeypatch, dtype):
    """The channels_last classes the audit found at 8-12 warps per SM (over 128 registers at 128 threads):
    C = 24/40/56 k3 s1 (146-223 registers with scalar accesses) and the 64-bit-offset B7 class
    [256, 192, 264, 264] k3 s2 (bf16: 151 registers with the 64-pixel default tile; int64 forced here on a
    smaller tensor, the same compiled variant): <= MAX_REGISTERS (16 warps per SM), no spills."""
    from effnet_kernels.triton import _tuning

    monkeypatch.setattr(_tuning, "tuning_enabled", lambda t: False)
    for c in (24, 40, 56):
        run_dwconv((256, c, 56, 56), 3, 1, dtype, True, squeeze=True)
    run_dwconv((64, 192, 56, 56), 3, 2, dtype, True, squeeze=True, force_int64=True)
    check_compiled(recorded_launches, 2 if dtype == torch.float32 else 3)  # C = 40, 56 share a tile (fp32: all three)
    for what, compiled in recorded_launches.compile_all():
        regs, spills = ptxas_usage(compiled.asm["ptx"])
        assert spills == 0 and regs <= MAX_REGISTERS, f"{what}: {regs} registers, {spills} B spilled"
