"""The ``cuda`` backend's availability reasons and errors, without a GPU.

Each situation a user can be in (no GPU, no nvcc, a stale or foreign module, a module
that does not import, a GPU it was not built for, a failed JIT build) must give one
clear reason through ``available_backends()`` / ``BackendUnavailableError``, never a
crash. The module lookup is redirected with monkeypatch; nothing here needs nvcc.
"""

from __future__ import annotations

import json
import types

import pytest
import torch

import effnet_kernels as ek
from effnet_kernels import _build, backends
from effnet_kernels import cuda as cuda_backend
from effnet_kernels._folded_weights import FoldedWeightCache


@pytest.fixture(autouse=True)
def fresh_state():
    cuda_backend.reset()
    backends._reset_caches()
    yield
    cuda_backend.reset()
    backends._reset_caches()


def fake_module(**overrides):
    info = {"nvcc_version": "13.0.88", "archs": "80;90", "source_hash": cuda_backend._expected_hash(),
            "abi_version": _build.ABI_VERSION, "cudart_version": 13000, **overrides}
    return types.SimpleNamespace(__file__="/site/effnet_kernels/_C.so", build_info=lambda: dict(info))


@pytest.fixture
def prebuilt(monkeypatch):
    """Pretend an in-package ``_C`` exists; returns a setter for what importing it gives."""
    monkeypatch.setattr(cuda_backend, "_prebuilt_path", lambda: "/site/effnet_kernels/_C.so")

    def install(module=None, error=None):
        def imp():
            if error is not None:
                raise error
            return module

        monkeypatch.setattr(cuda_backend, "_import_extension", imp)

    return install


@pytest.fixture
def no_prebuilt(monkeypatch, tmp_path):
    """No in-package ``_C`` and an empty JIT cache."""
    monkeypatch.setattr(cuda_backend, "_prebuilt_path", lambda: None)
    monkeypatch.setenv(_build.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(_build.ARCHS_ENV, raising=False)


def small_inputs(device="cpu"):
    return (torch.randn(1, 4, 5, 5, device=device), torch.randn(4, 1, 3, 3, device=device),
            torch.rand(4, device=device) + 0.5, torch.randn(4, device=device))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_no_gpu_every_op_raises_and_available_backends_says_why():
    status = ek.available_backends()["cuda"]
    assert not status.available
    assert any("no CUDA GPU is visible" in r for r in status.reasons), status.reasons
    with pytest.raises(ek.BackendUnavailableError, match="backend 'cuda' cannot run dwconv_bn_act.*no CUDA GPU"):
        ek.ops.dwconv_bn_act(*small_inputs(), backend="cuda")
    with pytest.raises(ek.BackendUnavailableError, match="backend 'cuda' cannot run se_gate.*no CUDA GPU"):
        ek.ops.se_gate(torch.randn(2, 8), torch.randn(2, 8), torch.randn(2), torch.randn(8, 2), torch.randn(8),
                       backend="cuda")
    with pytest.raises(ek.BackendUnavailableError, match="backend 'cuda' cannot run se_excite.*no CUDA GPU"):
        ek.ops.se_excite(torch.randn(1, 4, 2, 2), torch.rand(1, 4), backend="cuda")
    # "auto" on CPU tensors still works (the reference serves them)
    assert ek.ops.dwconv_bn_act(*small_inputs(), backend="auto").shape == (1, 4, 5, 5)


def test_unsupported_device_and_dtype():
    assert cuda_backend._unsupported("se_excite", torch.empty(2)) == ["tensors must be on a CUDA device, got cpu"]
    reasons = cuda_backend._unsupported("se_excite", torch.empty(2, dtype=torch.float64))
    assert any("the cuda kernels take float32, float16 or bfloat16; got float64" in r for r in reasons)


def test_unsupported_kernel_size_is_a_reason_so_auto_falls_back():
    x, w9, w5 = torch.empty(1, 4, 9, 9), torch.empty(4, 1, 9, 9), torch.empty(4, 1, 5, 5)
    reasons = cuda_backend._unsupported("dwconv_bn_act", x, (x, w9))
    assert any("kernel size 9 is not compiled" in r for r in reasons)
    assert not any("kernel size" in r for r in cuda_backend._unsupported("dwconv_bn_act", x, (x, w5)))


def test_current_prebuilt_module_has_no_problems(prebuilt):
    prebuilt(fake_module())
    module, problems = cuda_backend._import_prebuilt()
    assert problems == [] and module.build_info()["archs"] == "80;90"
    assert cuda_backend.extension_problems() == []


def test_stale_module_gives_one_clear_message(prebuilt):
    prebuilt(fake_module(source_hash="0123456789abcdef"))
    problems = cuda_backend.extension_problems()
    assert len(problems) == 1
    msg = problems[0]
    assert "/site/effnet_kernels/_C.so is stale" in msg
    assert "0123456789abcdef" in msg and cuda_backend._expected_hash() in msg
    assert "python setup.py build_ext --inplace" in msg and "delete it" in msg


def test_other_abi_version_is_refused(prebuilt):
    prebuilt(fake_module(abi_version=_build.ABI_VERSION + 1))
    (msg,) = cuda_backend.extension_problems()
    assert f"ABI version {_build.ABI_VERSION + 1}" in msg and "stale" in msg


def test_module_without_build_info_is_refused(prebuilt):
    prebuilt(types.SimpleNamespace(__file__="/x/_C.so"))
    (msg,) = cuda_backend.extension_problems()
    assert "no usable build_info()" in msg


def test_import_error_is_a_reason_not_a_crash(prebuilt):
    prebuilt(error=ImportError("/site/_C.so: undefined symbol: _ZN3c104impl3cow"))
    (msg,) = cuda_backend.extension_problems()
    assert "failed to import" in msg and "undefined symbol" in msg
    with pytest.raises(ek.BackendUnavailableError, match="failed to import"):
        cuda_backend.extension()


def test_gpu_the_module_was_not_built_for(prebuilt, monkeypatch):
    prebuilt(fake_module(archs="80;90"))
    monkeypatch.setattr(cuda_backend, "_gpu_capabilities", lambda: [86])
    (msg,) = cuda_backend.extension_problems()
    assert "built for sm_80,sm_90, this GPU is sm_86" in msg and f'{_build.ARCHS_ENV}="86"' in msg
    monkeypatch.setattr(cuda_backend, "_gpu_capabilities", lambda: [100])  # PTX of sm_90 serves it
    assert cuda_backend.extension_problems() == []


def test_gpu_older_than_supported(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_gpu_capabilities", lambda: [70])
    reasons = cuda_backend._unavailable()
    assert any("compute capability >= 7.5, this one is sm_70" in r for r in reasons), reasons


def test_not_built_and_no_nvcc(no_prebuilt, monkeypatch):
    monkeypatch.setattr(_build, "find_nvcc", lambda: None)
    (msg,) = cuda_backend.extension_problems()
    assert "not built and cannot be JIT-built" in msg and "nvcc was not found" in msg
    with pytest.raises(ek.BackendUnavailableError, match="nvcc was not found"):
        cuda_backend.extension()


def test_not_built_but_buildable_is_available(no_prebuilt, monkeypatch):
    monkeypatch.setattr(_build, "missing_tools", lambda need_sources=True: [])
    assert cuda_backend.extension_problems() == []


def test_finished_jit_build_counts_without_nvcc(no_prebuilt, monkeypatch):
    monkeypatch.setattr(_build, "find_nvcc", lambda: None)
    monkeypatch.setattr(cuda_backend, "_gpu_capabilities", lambda: [90])
    src_hash = cuda_backend._expected_hash()
    directory = _build.jit_dir(src_hash)
    directory.mkdir(parents=True)
    (directory / _build.ext_filename()).write_bytes(b"stand-in")
    record = {"nvcc_version": "13.0.88", "archs": "90", "source_hash": src_hash, "abi_version": _build.ABI_VERSION}
    (directory / _build.RECORD_NAME).write_text(json.dumps(record))
    assert cuda_backend.extension_problems() == []
    monkeypatch.setattr(cuda_backend, "_gpu_capabilities", lambda: [80])  # cached build lacks sm_80
    assert "nvcc was not found" in cuda_backend.extension_problems()[0]


def test_jit_archs_follow_the_gpus_unless_overridden(monkeypatch):
    monkeypatch.delenv(_build.ARCHS_ENV, raising=False)
    monkeypatch.setattr(cuda_backend, "_gpu_capabilities", lambda: [80, 90])
    assert cuda_backend._jit_archs() == ("80", "90")
    monkeypatch.setattr(cuda_backend, "_gpu_capabilities", lambda: [])
    assert cuda_backend._jit_archs() == _build.DEFAULT_ARCHS
    monkeypatch.setenv(_build.ARCHS_ENV, "89")
    assert cuda_backend._jit_archs() == ("89",)


def test_failed_build_is_remembered_not_retried(no_prebuilt, monkeypatch):
    calls = []

    def failing_build():
        calls.append(1)
        raise _build.BuildError("building effnet_kernels._C failed (ninja exit code 1); full log: /c/build.log")

    monkeypatch.setattr(cuda_backend, "_find_or_build", failing_build)
    for _ in range(3):
        with pytest.raises(ek.BackendUnavailableError, match="ninja exit code 1.*build.log"):
            cuda_backend.extension()
    assert len(calls) == 1
    cuda_backend.reset()
    with pytest.raises(ek.BackendUnavailableError):
        cuda_backend.extension()
    assert len(calls) == 2


def test_load_failure_becomes_the_backends_reason(monkeypatch):
    """A backend whose load() raises BackendUnavailableError reports it as its reason (registry)."""
    backends._ensure_registered()
    saved = backends._REGISTRY["cuda"]

    def load():
        raise ek.BackendUnavailableError("effnet_kernels cuda backend: building failed; full log: /c/build.log")

    backends.register_backend("cuda", unavailable=lambda: [], unsupported=lambda op, t, args=(): [], load=load)
    try:
        with pytest.raises(ek.BackendUnavailableError, match="cannot run se_excite.*building failed; full log"):
            ek.ops.se_excite(torch.randn(1, 4, 2, 2), torch.rand(1, 4), backend="cuda")
    finally:
        backends._REGISTRY["cuda"] = saved


def test_kernel_size_outside_the_instances_is_refused(monkeypatch):
    """k = 9 names the backends that serve it, before anything is loaded or launched."""
    monkeypatch.setattr(cuda_backend, "extension", lambda: pytest.fail("must not load the extension"))
    x, _, s, b = small_inputs()
    with pytest.raises(ek.BackendUnavailableError, match=r"kernel sizes \(3, 5, 7\), got 9; use backend='torch'"):
        cuda_backend.dwconv_bn_act(x, torch.randn(4, 1, 9, 9), s, b, (1, 1), (4, 4, 4, 4), "silu", False)


def _parameter_names(fn) -> list[str]:
    """The argument names of a pybind11 function, from its signature line."""
    import re

    head = fn.__doc__.splitlines()[0]
    return re.findall(r"(\w+):", head[head.index("(") + 1:head.rindex(")")])


@pytest.mark.parametrize("activation", ["identity", "relu6", "hardswish"])
def test_activation_codes_reach_the_extension_by_name(monkeypatch, activation):
    """cuda.py passes each function's code in the binding's ``act`` / ``gate_act`` slots (no GPU: calls recorded)."""
    module, problems = cuda_backend._import_prebuilt()
    if module is None or problems:
        pytest.skip(f"effnet_kernels._C is not built in place here: {problems}")
    from effnet_kernels.ops._checks import ACT_CODES

    calls = {}

    class Recorder:
        def dwconv_partials_numel(self, *args):
            return 0

        def __getattr__(self, op):
            names = _parameter_names(getattr(module, op))
            return lambda *args: calls.__setitem__(op, dict(zip(names, args)))

    monkeypatch.setattr(cuda_backend, "extension", Recorder)
    monkeypatch.setattr(cuda_backend, "_stream", lambda t: 0)  # CPU tensors stand in for CUDA ones
    x, w, s, b = small_inputs()
    cuda_backend.dwconv_bn_act(x, w, s, b, (1, 1), (1, 1, 1, 1), activation, True)
    assert len(calls["dwconv_bn_act"]) == len(_parameter_names(module.dwconv_bn_act))
    assert calls["dwconv_bn_act"]["act"] == ACT_CODES[activation] and calls["dwconv_bn_act"]["squeeze"] is True
    se_act, gate = ("relu", "hardsigmoid") if activation != "identity" else ("silu", "sigmoid")
    cuda_backend.se_gate(torch.randn(2, 8), torch.randn(2, 8), torch.randn(2), torch.randn(8, 2), torch.randn(8),
                         se_act, gate)
    assert calls["se_gate"]["act"] == ACT_CODES[se_act] and calls["se_gate"]["gate_act"] == ACT_CODES[gate]
    assert calls["se_gate"]["n"] == 2 and calls["se_gate"]["r"] == 2


# ------------------------------------------------------------------ the folded tap-major weight cache
def test_fold_tap_major_is_the_scaled_transposed_weight():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(13, 1, 5, 5, generator=g)
    s = torch.rand(13, generator=g) + 0.5
    out = cuda_backend.fold_tap_major(w, s)
    assert out.shape == (25, 13) and out.is_contiguous() and out.dtype == torch.float32
    for c in (0, 7, 12):
        for tap in (0, 12, 24):
            assert out[tap, c] == w[c, 0, tap // 5, tap % 5] * s[c]
    assert not torch.equal(out, w.reshape(13, 25).t()), "the scale is folded in"


def test_prepared_weights_are_reused_and_never_stale():
    cache = FoldedWeightCache(cuda_backend.fold_tap_major)
    g = torch.Generator().manual_seed(6)
    w, s = torch.randn(8, 1, 3, 3, generator=g), torch.rand(8, generator=g) + 0.5
    first = cache.get(w, s)
    assert cache.get(w, s) is first, "same live tensors, same versions: one fold"
    with torch.no_grad():
        w.mul_(2)  # in place (as load_state_dict / an optimizer step): the version moves
    again = cache.get(w, s)
    assert again is not first
    torch.testing.assert_close(again, cuda_backend.fold_tap_major(w, s), rtol=0, atol=0)
    torch.testing.assert_close(again, 2 * first, rtol=0, atol=0)
    assert len(cache) == 1, "the new version replaces the old fold"
    s.add_(1.0)
    torch.testing.assert_close(cache.get(w, s), cuda_backend.fold_tap_major(w, s), rtol=0, atol=0)


def test_prepared_weights_die_with_their_sources_and_stay_bounded():
    import gc

    cache = FoldedWeightCache(cuda_backend.fold_tap_major, limit=3)
    s = torch.rand(4) + 0.5
    w = torch.randn(4, 1, 3, 3)
    cache.get(w, s)
    assert len(cache) == 1
    del w
    gc.collect()
    assert len(cache) == 0, "a freed source drops its entry (its memory may be reused at version 0)"
    keep = [torch.randn(4, 1, 3, 3) for _ in range(5)]
    for w in keep:
        cache.get(w, s)
    assert len(cache) == 3
