"""The CUDA extension's build machinery, on a machine without a GPU.

* pure logic of :mod:`effnet_kernels._build` (source hash, archs, ninja file, build-info
  checks), and the JIT cache's lock and reuse with a stand-in compiler (no nvcc needed);
* a real ``effnet_kernels._C`` loaded through a temporary JIT cache (the in-place build
  when CI made one, else a real sm_80 JIT build, ~1-2 minutes on 2 cores), checked:
  build_info(), no libtorch linkage, reuse on the second load, errors naming the op;
* the in-place build (``python setup.py build_ext --inplace``, CI's build step), if present;
* setup.py evaluates without importing torch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from effnet_kernels import _build

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"


@pytest.fixture
def src_copy(tmp_path) -> Path:
    dest = tmp_path / "csrc"
    shutil.copytree(CSRC, dest)
    return dest


# ------------------------------------------------------------------ pure logic
def test_source_hash_tracks_names_and_contents(src_copy):
    h0 = _build.source_hash(src_copy)
    assert h0 == _build.source_hash(CSRC), "a copy of the sources must hash the same"
    assert len(h0) == 16 and int(h0, 16) >= 0
    cu = src_copy / "se.cu"
    cu.write_text(cu.read_text() + "\n// edit\n")
    h1 = _build.source_hash(src_copy)
    assert h1 != h0
    (src_copy / "notes.txt").write_text("not a source")
    assert _build.source_hash(src_copy) == h1, "non-source files do not matter"
    cu.rename(src_copy / "se2.cu")
    assert _build.source_hash(src_copy) != h1


def test_abi_version_matches_the_header():
    header = (CSRC / "effnet_ext.h").read_text()
    assert f"constexpr int kAbiVersion = {_build.ABI_VERSION};" in header


def test_activation_codes_match_the_header():
    """effnet::Act (the kernels' template argument) numbers the functions as ops._checks.ACT_CODES."""
    import re

    from effnet_kernels.ops._checks import ACT_CODES

    header = (CSRC / "effnet_ext.h").read_text()
    enum = header[header.index("enum Act : int {"):]
    enum = enum[:enum.index("};")]
    codes = {name.lower(): int(v) for name, v in re.findall(r"k(\w+) = (\d+)", enum)}
    assert codes == {name.replace("_", ""): code for name, code in ACT_CODES.items()}


@pytest.mark.parametrize(
    "spec,expected",
    [("80;90", ("80", "90")), ("9.0 8.0", ("80", "90")), ("sm_86,compute_89", ("86", "89")), ("90;90", ("90",))],
)
def test_parse_archs(spec, expected):
    assert _build.parse_archs(spec) == expected


@pytest.mark.parametrize("spec", ["", ";", "70", "sm_x", "80;abc"])
def test_parse_archs_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match=_build.ARCHS_ENV):
        _build.parse_archs(spec)


def test_requested_archs_env_override(monkeypatch):
    monkeypatch.delenv(_build.ARCHS_ENV, raising=False)
    assert _build.requested_archs() == _build.DEFAULT_ARCHS == ("80", "86", "89", "90")
    assert _build.requested_archs(default=("75",)) == ("75",)
    monkeypatch.setenv(_build.ARCHS_ENV, "90;80")
    assert _build.requested_archs() == ("80", "90")


def test_gencode_embeds_ptx_only_for_the_newest_arch():
    flags = _build.gencode_flags(("80", "86", "90"))
    assert flags == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_86,code=sm_86",
        "-gencode=arch=compute_90,code=[sm_90,compute_90]",
    ]


@pytest.mark.parametrize("built,cap,ok", [("80;90", 80, True), ("80;90", 86, False), ("80;90", 100, True),
                                          ("80", 75, False), ("", 80, False)])
def test_archs_cover(built, cap, ok):
    assert _build.archs_cover(built, cap) is ok


def test_check_build_info_names_each_problem():
    good = {"abi_version": _build.ABI_VERSION, "source_hash": "abc"}
    assert _build.check_build_info(good, "abc") == []
    assert _build.check_build_info(good, None) == [], "no sources to compare with: only the ABI is checked"
    stale = _build.check_build_info(good, "def")
    assert len(stale) == 1 and "abc" in stale[0] and "def" in stale[0]
    abi = _build.check_build_info({"abi_version": 0, "source_hash": "abc"}, "abc")
    assert len(abi) == 1 and "ABI version 0" in abi[0]


def fake_config(directory: Path, src: Path, archs=("80",)) -> _build.BuildConfig:
    return _build.BuildConfig(
        source_dir=src, build_dir=directory / "build", output=directory / _build.ext_filename(),
        archs=tuple(archs), jobs=3, nvcc="/opt/cuda dir/bin/nvcc", ninja="ninja",
        nvcc_version="13.0.88", source_hash=_build.source_hash(src),
    )


def test_write_ninja_compiles_each_source_and_links_cudart_statically(tmp_path):
    cfg = fake_config(tmp_path / "out dir", CSRC, archs=("80", "90"))
    text = _build.write_ninja(cfg).read_text()
    sources = [p for p in _build.source_files(CSRC) if p.suffix in (".cu", ".cpp")]
    assert len(sources) >= 6
    for src in sources:
        assert f": cu {src}" in text
    assert text.count(": cu ") == len(sources)
    assert "--cudart=static" in text and "-shared" in text
    assert "-gencode=arch=compute_90,code=[sm_90,compute_90]" in text
    assert "torch" not in text.lower(), "the extension must not see libtorch headers or libraries"
    assert "nvcc = '/opt/cuda dir/bin/nvcc'" in text, "paths with spaces are shell-quoted"
    assert "out$ dir" in text, "paths with spaces are ninja-escaped"
    header = (cfg.build_dir / "effnet_build_info.h").read_text()
    assert f'#define EFFNET_SOURCE_HASH "{cfg.source_hash}"' in header
    assert '#define EFFNET_ARCHS "80;90"' in header


def test_ninja_accepts_the_generated_file(tmp_path):
    ninja = _build.find_ninja()
    if ninja is None:
        pytest.skip("ninja is not installed")
    cfg = fake_config(tmp_path, CSRC)
    _build.write_ninja(cfg)
    out = subprocess.run([ninja, "-C", str(cfg.build_dir), "-n"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "LINK" in out.stdout and out.stdout.count("NVCC") == len(
        [p for p in _build.source_files(CSRC) if p.suffix in (".cu", ".cpp")])


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv(_build.CACHE_ENV, str(tmp_path / "c"))
    assert _build.cache_root() == tmp_path / "c"
    monkeypatch.delenv(_build.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _build.cache_root() == tmp_path / "xdg" / "effnet_kernels"
    d = _build.jit_dir("0123abcd")
    assert d.parent == tmp_path / "xdg" / "effnet_kernels"
    assert d.name == f"{_build.python_tag()}-0123abcd"


# ------------------------------------------------------------------ JIT cache with a stand-in compiler
class FakeCompiler:
    """Stands in for nvcc + ninja: writes a dummy module after ``delay`` seconds, counts builds."""

    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.delay, self.fail = delay, fail
        self.builds: list[_build.BuildConfig] = []
        self.announced: list[str] = []
        self._lock = threading.Lock()

    def config(self, build_dir, output, archs=None, src=None, jobs=None):
        return fake_config(Path(output).parent, src, archs=archs)

    def build(self, cfg):
        with self._lock:
            self.builds.append(cfg)
        time.sleep(self.delay)
        if self.fail:
            raise _build.BuildError(f"building effnet_kernels._C failed; full log: {cfg.log}")
        cfg.output.write_bytes(b"module for " + ";".join(cfg.archs).encode())
        return cfg.output

    def jit(self, directory, src, archs=("80",)):
        return _build.jit_build(archs, src=src, directory=directory, builder=self.build,
                                announce=self.announced.append, config=self.config)


def test_jit_builds_once_then_reuses_the_cache(tmp_path, src_copy):
    fc = FakeCompiler()
    path = fc.jit(tmp_path, src_copy)
    assert path == tmp_path / _build.ext_filename() and path.is_file()
    assert len(fc.builds) == 1
    assert len(fc.announced) == 1 and "compiling" in fc.announced[0] and str(fc.builds[0].log) in fc.announced[0]
    record = json.loads((tmp_path / _build.RECORD_NAME).read_text())
    assert record == fc.builds[0].record()
    assert record["source_hash"] == _build.source_hash(src_copy) and record["archs"] == "80"
    assert fc.jit(tmp_path, src_copy) == path
    assert len(fc.builds) == 1 and len(fc.announced) == 1, "the second load must reuse the build"


def test_jit_rebuilds_when_stale(tmp_path, src_copy):
    fc = FakeCompiler()
    fc.jit(tmp_path, src_copy)
    # another arch than the cached build covers -> rebuild
    fc.jit(tmp_path, src_copy, archs=("90",))
    assert len(fc.builds) == 2
    # a record from other sources -> rebuild
    rec = json.loads((tmp_path / _build.RECORD_NAME).read_text())
    (tmp_path / _build.RECORD_NAME).write_text(json.dumps({**rec, "source_hash": "0" * 16}))
    fc.jit(tmp_path, src_copy, archs=("90",))
    assert len(fc.builds) == 3
    # a module without a record (an interrupted build) -> rebuild
    (tmp_path / _build.RECORD_NAME).unlink()
    fc.jit(tmp_path, src_copy, archs=("90",))
    assert len(fc.builds) == 4
    assert fc.jit(tmp_path, src_copy, archs=("90",)).read_bytes() == b"module for 90"
    assert len(fc.builds) == 4


def test_jit_failure_leaves_no_record_and_reports_the_log(tmp_path, src_copy):
    fc = FakeCompiler(fail=True)
    with pytest.raises(_build.BuildError, match="full log: .*build.log"):
        fc.jit(tmp_path, src_copy)
    assert not (tmp_path / _build.RECORD_NAME).exists()
    assert not _build.cached_build_ok(tmp_path, _build.source_hash(src_copy), ("80",))


def test_concurrent_jit_loads_build_once(tmp_path, src_copy):
    """Threads racing for the lock: one builds (slowly), the rest wait and reuse it."""
    fc = FakeCompiler(delay=0.3)
    results, errors = [], []

    def load():
        try:
            results.append(fc.jit(tmp_path, src_copy))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(fc.builds) == 1 and len(results) == 4 and len(set(results)) == 1


def test_lock_excludes_other_processes(tmp_path):
    """A second process blocks on the lock file while this one holds it."""
    lock = tmp_path / ".lock"
    code = (
        "import sys, time, pathlib; sys.path.insert(0, sys.argv[1]); from effnet_kernels import _build; "
        "print('ready', flush=True); t = time.monotonic(); "
        "ctx = _build.file_lock(pathlib.Path(sys.argv[2])); ctx.__enter__(); print(time.monotonic() - t, flush=True)"
    )
    with _build.file_lock(lock):
        proc = subprocess.Popen([sys.executable, "-c", code, str(REPO), str(lock)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        assert proc.poll() is None, "the other process got the lock while it was held"
    waited = float(proc.stdout.readline())
    proc.wait(timeout=60)
    assert waited >= 0.4


# ------------------------------------------------------------------ a real nvcc build
def _current_inplace_module() -> Path | None:
    """The in-place ``_C`` (CI's build step) if it exists and matches the sources here."""
    path = REPO / "effnet_kernels" / _build.ext_filename()
    if not path.is_file():
        return None
    from effnet_kernels import cuda

    module, problems = cuda._import_prebuilt()
    return path if module is not None and not problems else None


def _must_not_build(cfg):
    raise AssertionError("rebuilt although the cache is current")


@pytest.fixture(scope="session")
def jit_module(tmp_path_factory):
    """A real ``effnet_kernels._C`` loaded through the JIT cache of a temporary directory.

    Where CI has built the module in place (``setup.py build_ext``, the same
    ``_build.build``), it is placed in the cache as a finished JIT build and must be
    reused as is; otherwise it is JIT-built for real for sm_80 (~1-2 minutes on 2 cores).
    """
    directory = tmp_path_factory.mktemp("jit_cache")
    announced = []
    inplace = _current_inplace_module()
    if inplace is not None:
        from effnet_kernels import cuda

        info = cuda._import_prebuilt()[0].build_info()
        shutil.copy2(inplace, directory / _build.ext_filename())
        record = {k: info[k] for k in ("nvcc_version", "archs", "source_hash", "abi_version")}
        (directory / _build.RECORD_NAME).write_text(json.dumps({**record, "python": _build.python_tag()}))
        archs = tuple(info["archs"].split(";"))
        path = _build.jit_build(archs, directory=directory, builder=_must_not_build, announce=announced.append)
        assert announced == [], "reusing a cached build must print nothing"
    else:
        if _build.missing_tools():
            pytest.skip("cannot build here: " + "; ".join(_build.missing_tools()))
        archs = ("80",)
        path = _build.jit_build(archs, directory=directory, announce=announced.append)
        assert len(announced) == 1 and "compiling" in announced[0], "a JIT build prints exactly one line"
    from effnet_kernels import cuda

    module = cuda._import_file(str(path), register=False)  # leave effnet_kernels._C to the package
    return {"dir": directory, "path": path, "module": module, "archs": archs}


def test_jit_built_module_records_what_it_was_built_from(jit_module):
    info = jit_module["module"].build_info()
    assert info["source_hash"] == _build.source_hash(CSRC)
    assert info["archs"] == ";".join(jit_module["archs"])
    assert info["abi_version"] == _build.ABI_VERSION
    assert info["nvcc_version"] == _build.nvcc_version(_build.find_nvcc())
    assert info["cudart_version"] >= 12000
    assert json.loads((jit_module["dir"] / _build.RECORD_NAME).read_text())["source_hash"] == info["source_hash"]
    from effnet_kernels import cuda

    assert cuda._module_problems(jit_module["module"]) == []


def test_real_jit_build_is_reused(jit_module):
    t0 = time.monotonic()
    path = _build.jit_build(jit_module["archs"], directory=jit_module["dir"], builder=_must_not_build)
    assert path == jit_module["path"]
    assert time.monotonic() - t0 < 5.0


def test_module_links_no_libtorch_and_imports_without_torch(jit_module):
    readelf = shutil.which("readelf")
    if readelf is not None:
        dyn = subprocess.run([readelf, "-d", str(jit_module["path"])], capture_output=True, text=True).stdout
        needed = [line.split("[")[1].rstrip("]") for line in dyn.splitlines() if "(NEEDED)" in line]
        assert needed, dyn
        assert not any(s in lib for lib in needed for s in ("torch", "c10", "cudart", "python")), needed
    code = (
        "import sys, importlib.util as u; sys.modules['torch'] = None; "
        f"s = u.spec_from_file_location('effnet_kernels._C', {str(jit_module['path'])!r}); "
        "m = u.module_from_spec(s); s.loader.exec_module(m); print(m.build_info()['archs'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == ";".join(jit_module["archs"]), out.stderr


def test_kernel_errors_name_the_op(jit_module):
    """Argument errors and CUDA's own errors (no GPU here) come back as messages; Python raises naming the op."""
    from effnet_kernels import cuda

    C = jit_module["module"]
    bad_dtype = C.dwconv_bn_act(0, 0, 0, 0, 0, 0, 0, 9, True, 1, 8, 5, 5, 5, 5, 3, 1, 1, 1, 1, 1, False, False, 0, 0)
    assert bad_dtype == "dwconv_bn_act: unsupported dtype code"
    with pytest.raises(cuda.CudaExtensionError, match="dwconv_bn_act failed: dwconv_bn_act: unsupported dtype"):
        cuda.check("dwconv_bn_act", bad_dtype)
    bad_k = C.dwconv_bn_act(0, 0, 0, 0, 0, 0, 0, 0, True, 1, 8, 5, 5, 5, 5, 9, 1, 1, 1, 1, 1, False, False, 0, 0)
    assert "kernel sizes 3, 5 and 7" in bad_k
    for act in (-1, 5, 6):  # sigmoid and hard-sigmoid are se_gate's gates, not dwconv activations
        bad_act = C.dwconv_bn_act(0, 0, 0, 0, 0, 0, 0, 0, True, 1, 8, 5, 5, 5, 5, 3, 1, 1, 1, 1, act, False, False, 0, 0)
        assert bad_act == "dwconv_bn_act: unsupported activation code", act
    assert C.se_gate(0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 4, 0, 1, 5, 0, 0) == "se_gate: invalid sizes"
    assert C.se_gate(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 2, 3, 5, 0, 0) == "se_gate: unsupported activation code"
    assert C.se_gate(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 2, 2, 1, 0, 0) == "se_gate: unsupported gate code"
    assert C.se_gate(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 2, 2, 6, 0, 0) is None, "empty work launches nothing"
    assert C.se_excite(0, 0, 0, 5, True, 1, 4, 2, 2, 0, 0) == "se_excite: unsupported dtype code"
    assert C.se_excite(0, 0, 0, 0, True, 0, 4, 2, 2, 0, 0) is None, "empty work launches nothing"
    if not _has_gpu():
        cuda_err = C.se_excite(0, 0, 0, 0, True, 1, 4, 2, 2, 0, 0)
        assert isinstance(cuda_err, str) and cuda_err, "a missing GPU must surface as CUDA's message"
        with pytest.raises(cuda.CudaExtensionError, match="se_excite failed: "):
            cuda.check("se_excite", cuda_err)


def test_training_entry_points_of_the_real_module(jit_module):
    """The dict-argument training bindings of the real module: a missing field is a KeyError,
    argument errors and CUDA's own (no GPU here) come back as messages, empty work launches
    nothing, and the partials size follows the channel tile and chunking of dwconv_train.cu."""
    C = jit_module["module"]
    base = dict(x=16, weight=16, dtype=0, nhwc=True, n=2, c=40, h=7, w=9, ho=7, wo=9, k=3, stride_h=1, stride_w=1,
                pad_top=1, pad_left=1, act=1)
    with pytest.raises(KeyError):
        C.dwconv_bn_stats({k: v for k, v in base.items() if k != "ho"})
    assert C.dwconv_bn_stats({**base, "dtype": 7}) == "dwconv_bn_act_train: unsupported dtype code"
    assert "kernel sizes 3, 5 and 7" in C.dwconv_bn_act_train_backward({**base, "k": 9})
    assert C.dwconv_bn_stats({**base, "act": 5}) == "dwconv_bn_act_train: unsupported activation code"
    assert C.dwconv_bn_stats({**base, "x": 0}) == "dwconv_bn_act_train: x and weight are required"
    assert C.dwconv_bn_stats({**base, "weight": 0}) == "dwconv_bn_act_train: x and weight are required"
    # an x with H * W = 0 (every output inside the padding) has no storage: null passes the argument check
    empty_x = {**base, "x": 0, "h": 0, "ho": 1, "pad_top": 2}
    assert "partials buffer" in C.dwconv_bn_stats({**empty_x, "mean": 16, "var": 16})
    need = "the gz scratch and the grad_x and grad_weight outputs are required"
    backward = {**base, "gamma": 16, "beta": 16, "in_mean": 16, "in_var": 16, "grad_gamma": 16, "grad_beta": 16,
                "partials": 16, "partials_numel": 360, "gz": 16, "grad_weight": 16}
    assert need in C.dwconv_bn_act_train_backward(backward), "grad_x is required where x has elements"
    assert need not in (C.dwconv_bn_act_train_backward({**backward, **empty_x}) or ""), "not where H * W = 0"
    assert C.dwconv_bn_stats({**base, "n": 0}) is None, "empty work launches nothing"
    assert "partials buffer" in C.dwconv_bn_stats({**base, "mean": 16, "var": 16})
    # NHWC: 2 groups of 32 channels, 126 positions over 8 rows of >= 16 each: 1 chunk; 9 taps per row
    assert C.dwconv_train_partials_numel(base) == 1 * 9 * 40
    big = {**base, "n": 64, "h": 56, "w": 56, "ho": 56, "wo": 56, "k": 5}  # 200704 positions
    m = 64 * 56 * 56

    def chunks(want):  # chunk length ceil(m / want), then as many chunks as that length needs
        return -(-m // -(-m // want))

    # NHWC: 2 * 132 * 8 target blocks over 2 channel groups; NCHW: 40 channels, but >= 16 positions
    # per thread of 256 caps it at ceil(m / 4096) = 49
    assert C.dwconv_train_partials_numel(big) == chunks(1056) * 25 * 40 == 1051 * 25 * 40
    assert C.dwconv_train_partials_numel({**big, "nhwc": False}) == chunks(49) * 25 * 40 == 49 * 25 * 40
    gate = dict(n=2, c=4, r=2, act=1, gate_act=5)
    assert C.se_gate_backward({**gate, "r": 0}) == "se_gate_backward: invalid sizes"
    assert C.se_gate_backward({**gate, "act": 5}) == "se_gate_backward: unsupported activation code"
    assert C.se_gate_backward({**gate, "gate_act": 1}) == "se_gate_backward: unsupported gate code"
    excite = dict(dtype=0, nhwc=False, n=1, c=4, h=2, w=2)
    assert C.se_excite_backward({**excite, "dtype": 3}) == "se_excite_backward: unsupported dtype code"
    assert C.se_excite_backward({**excite, "n": 0}) is None
    if not _has_gpu():
        for err in (C.se_excite_backward(excite), C.se_gate_backward(gate),
                    C.dwconv_bn_stats({**base, "mean": 16, "var": 16, "partials": 16, "partials_numel": 360})):
            assert isinstance(err, str) and err, "a missing GPU must surface as CUDA's message"


# Itanium-mangled template arguments of the kernels' element types.
_MANGLED_TYPES = {"float": "f", "__half": "6__half", "__nv_bfloat16": "13__nv_bfloat16"}


def test_every_activation_instance_is_compiled(jit_module):
    """The module holds a kernel per (dtype, k, stride, squeeze, activation, layout) of dwconv_bn_act
    and per (dtypes, activation) / (dtype, gate) of the two se_gate kernels (names read from its fatbin)."""
    import re

    from effnet_kernels.ops._checks import ACT_CODES, ACTIVATIONS, SE_ACTIVATIONS, SE_GATES

    names = set(re.findall(rb"\.text\.(_ZN6effnet\w+)", Path(jit_module["path"]).read_bytes()))
    if not names:
        pytest.skip("the module's fatbin is compressed: kernel names are not readable here")
    names = {n.decode() for n in names}
    types = _MANGLED_TYPES.values()  # dwconv kernels have one type argument: no substitutions
    for layout in ("nhwc", "nchw"):
        kernel = f"_ZN6effnet{len(layout) + 14}dwconv_{layout}_kernelI"
        for t in types:
            for k in (3, 5, 7):
                for sw in (1, 2):
                    for sq in (0, 1):
                        for act in ACTIVATIONS:
                            name = f"{kernel}{t}Li{k}ELi{sw}ELb{sq}ELi{ACT_CODES[act]}EEEvNS_12DWConvParamsE"
                            assert name in names, f"missing instance {name}"
    # se kernels: <pooled type, weight type, act> and <weight type, gate>; a repeated type is
    # mangled as a substitution, so count the instances per function code instead
    for kernel, functions, per_code in (("se_reduce", SE_ACTIVATIONS, 9), ("se_expand", SE_GATES, 3)):
        found = [re.search(rf"{len(kernel) + 7}{kernel}_kernelI\w+?Li(\d)EEEv", n) for n in names]
        codes = sorted(int(m.group(1)) for m in found if m)
        assert codes == sorted([ACT_CODES[f] for f in functions] * per_code), (kernel, codes)
    dwconv = [n for n in names if "dwconv_n" in n]
    assert len(dwconv) == 2 * 3 * 3 * 2 * 2 * len(ACTIVATIONS), "no other dwconv instances (e.g. sigmoid) are built"


# kernels of each training source: 4 templates x k {3, 5, 7} x 3 dtypes + 2 combines; 3 + 4 + 1
_TRAIN_SOURCES = {"dwconv_train.cu": 38, "se_train.cu": 8}


@pytest.mark.parametrize("source", list(_TRAIN_SOURCES))
def test_training_kernels_compile_for_sm90_without_spills(source, tmp_path):
    """The training kernels compile with nvcc for sm_90 (the build's flags), every instance there
    is, none spills registers or uses a stack frame (``ptxas -v``); ~15-60 s per file on 2 cores."""
    import re

    nvcc = _build.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    cmd = [nvcc, "-O3", "-std=c++17", "-gencode=arch=compute_90,code=sm_90", "-Xptxas", "-v", f"-I{CSRC}",
           "-c", str(CSRC / source), "-o", str(tmp_path / "k.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_90'", log)
    assert len(entries) == _TRAIN_SOURCES[source], entries
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert len(frames) == len(entries)
    assert all(f == ("0", "0", "0") for f in frames), [(e, f) for e, f in zip(entries, frames) if f != ("0", "0", "0")]


def test_deterministic_partials_size(jit_module):
    C = jit_module["module"]
    args = dict(dtype=1, nhwc=True, n=2, c=32, ho=56, wo=56, k=3, stride_w=1)
    assert C.dwconv_partials_numel(**args, squeeze=True, deterministic=False) == 0
    assert C.dwconv_partials_numel(**args, squeeze=False, deterministic=True) == 0
    rows = C.dwconv_partials_numel(**args, squeeze=True, deterministic=True) / (2 * 32)
    # fp16 NHWC: 4 channel packs per row of threads, 64 rows, strips of 4 outputs at stride 1
    assert rows == -(-56 * 14 // 64)
    # stride 2 along W: strips of 2 outputs
    rows2 = C.dwconv_partials_numel(**{**args, "stride_w": 2}, squeeze=True, deterministic=True) / (2 * 32)
    assert rows2 == -(-56 * 28 // 64)
    nchw = C.dwconv_partials_numel(**{**args, "nhwc": False}, squeeze=True, deterministic=True)
    assert nchw == 2 * 32 * -(-56 * 14 // 256)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------ the in-place build and setup.py
def test_inplace_module_is_current():
    """CI builds ``_C`` in place (``python setup.py build_ext --inplace``); it must match the sources."""
    prebuilt = list((REPO / "effnet_kernels").glob(_build.ext_filename()))
    if not prebuilt:
        if os.environ.get("CI") and _build.find_nvcc() is not None:
            pytest.fail("CI has nvcc but effnet_kernels._C was not built in place by `pip install -e .`")
        pytest.skip("effnet_kernels._C is not built in place (run `python setup.py build_ext --inplace`)")
    from effnet_kernels import cuda

    module, problems = cuda._import_prebuilt()
    assert module is not None and problems == [], problems
    assert Path(module.__file__) == prebuilt[0]
    assert module.build_info()["source_hash"] == _build.source_hash(CSRC)


@pytest.mark.parametrize("skip", ["0", "1"])
def test_setup_py_never_imports_torch(skip):
    code = (
        "import sys, runpy; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
        "runpy.run_path('setup.py', run_name='__main__')"
    )
    env = {**os.environ, _build.SKIP_ENV: skip}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "effnet_kernels"
    if skip == "1":
        assert f"{_build.SKIP_ENV} is set" in out.stdout
    elif _build.find_nvcc() is None:
        assert "nvcc not found" in out.stdout
