"""The Triton kernels compile for an H100 (sm_90) without a GPU, and the fast path is vectorised.

The interpreter tests check what the kernels compute; this checks that the Triton
compiler accepts them (types, constexpr branches, the int64 variants) down to a cubin
(ptxas), and reads the PTX for the property the channels_last design is for: 16-byte
loads and stores along C. Launch-time specialisation is mimicked: unit strides are
constants, and pointers, C and strides carry Triton's "divisible by 16" hint, as a
real launch gives them when C is a multiple of 16.
"""

from __future__ import annotations

import re

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402

from effnet_kernels.triton import dwconv, se_excite, se_gate  # noqa: E402
from effnet_kernels.triton._jit import SUM  # noqa: E402

if not isinstance(SUM, triton.runtime.jit.JITFunction):
    pytest.skip("triton was imported with TRITON_INTERPRET=1: its library is interpreter-only in this process",
                allow_module_level=True)

SM90 = GPUTarget("cuda", 90, 32)

DWCONV_INTS = "C H W HO WO TILES sxn sxc sxh sxw syn syc syh syw pad_top pad_left".split()
ALIGNED = {"x_ptr", "w_ptr", "scale_ptr", "shift_ptr", "y_ptr", "red_ptr", "part_ptr", "mean_ptr", "p_ptr", "g_ptr",
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
    types.update(x_ptr=f"*{dtype}", y_ptr=f"*{dtype}", w_ptr="*fp32", scale_ptr="*fp32", shift_ptr="*fp32",
                 red_ptr="*fp32", inv_hw="fp32")
    return types


def global_accesses(ptx: str, op: str) -> set[str]:
    """The distinct ``ld.global`` / ``st.global`` instruction forms in ``ptx``."""
    return set(re.findall(rf"{op}\.global[\w.:]*", ptx))


@pytest.mark.parametrize(
    "dtype,channels_last,squeeze,int64",
    [("fp16", True, 1, False), ("bf16", True, 2, True), ("fp32", True, 0, False), ("fp16", False, 2, False),
     ("bf16", False, 1, True)],
)
def test_dwconv_compiles(dtype, channels_last, squeeze, int64):
    unit = {"sxc": 1, "syc": 1} if channels_last else {"sxw": 1, "syw": 1}
    consts = dict(K=5, SH=2, SW=1, SILU=True, SQUEEZE=squeeze, CHANNELS_LAST=channels_last, INT64=int64,
                  BF16_RTNE=False, BLOCK_P=32 if channels_last else 128, BLOCK_C=64 if channels_last else 8, **unit)
    compiled = compile_sm90(dwconv._dwconv_bn_act_kernel, dwconv_types(dtype), consts)
    ptx = compiled.asm["ptx"]
    if squeeze == 1:
        assert "red.global" in ptx or "atom.global" in ptx
    if channels_last:
        assert any(".v4." in op for op in global_accesses(ptx, "ld")), "input loads along C are not 16-byte vectors"
        assert any(".v4." in op for op in global_accesses(ptx, "st")), "output stores along C are not 16-byte vectors"


def test_sum_tiles_compiles():
    compile_sm90(dwconv._sum_tiles_kernel, {"part_ptr": "*fp32", "mean_ptr": "*fp32", "C": "i32", "TILES": "i32"},
                 {"BLOCK_T": 16, "BLOCK_C": 128})


def test_se_gate_compiles():
    types = {"p_ptr": "*fp32", "wr_ptr": "*fp16", "br_ptr": "*fp32", "we_ptr": "*bf16", "be_ptr": "*fp32",
             "g_ptr": "*fp32", "N": "i32", "C": "i32", "R": "i32"}
    for block_r, block_c, warps in ((256, 32, 8), (16, 128, 4)):
        compile_sm90(se_gate._se_gate_kernel, types, {"BLOCK_N": 16, "BLOCK_R": block_r, "BLOCK_C": block_c}, warps)


@pytest.mark.parametrize("channels_last,int64", [(True, False), (False, True)])
def test_se_excite_compiles(channels_last, int64):
    types = {"y_ptr": "*fp16", "g_ptr": "*fp32", "o_ptr": "*fp16", "ROWS": "i32", "COLS": "i32", "HW": "i32",
             "COL_BLOCKS": "i32"}
    compiled = compile_sm90(se_excite._se_excite_kernel, types,
                            dict(CHANNELS_LAST=channels_last, INT64=int64, BF16_RTNE=False, BLOCK_ROWS=16,
                                 BLOCK_COLS=256))
    assert any(".v4." in op for op in global_accesses(compiled.asm["ptx"], "st"))
