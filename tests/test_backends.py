"""Backend selection: argument > use_backend() > EFFNET_KERNELS_BACKEND > auto, and the errors."""

from __future__ import annotations

import pytest
import torch

import effnet_kernels as ek
from effnet_kernels import backends


@pytest.fixture
def spy_backend(monkeypatch):
    """Replace the "triton" slot with a CPU backend that records calls and defers to the reference."""
    from effnet_kernels import reference

    calls = []

    def impl(op):
        def run(*args):
            calls.append(op)
            return reference.IMPLEMENTATIONS[op](*args)
        return run

    backends._ensure_registered()
    saved = backends._REGISTRY["triton"]
    backends.register_backend("triton", unavailable=lambda: [], unsupported=lambda op, t, args=(): [],
                              load=lambda: {op: impl(op) for op in ("dwconv_bn_act", "se_gate", "se_excite")})
    yield calls
    backends._REGISTRY["triton"] = saved


def small():
    return torch.randn(1, 4, 5, 5), torch.randn(4, 1, 3, 3), torch.rand(4) + 0.5, torch.randn(4)


def test_available_backends_reports_each_with_reasons():
    status = ek.available_backends()
    assert set(status) == {"torch", "triton", "cuda"}
    assert status["torch"].available and status["torch"].reasons == ()
    for name in ("triton", "cuda"):
        s = status[name]
        assert s.available or s.reasons, f"{name} unavailable without a reason"
    if not torch.cuda.is_available():
        assert not status["cuda"].available
        assert any("GPU" in r for r in status["cuda"].reasons)


def test_explicit_unavailable_backend_raises_with_reasons(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    with pytest.raises(ek.BackendUnavailableError, match="backend 'cuda' cannot run dwconv_bn_act.*GPU"):
        ek.ops.dwconv_bn_act(*small(), backend="cuda")
    with pytest.raises(ek.BackendUnavailableError, match="backend 'cuda' cannot run se_excite"):
        ek.ops.se_excite(torch.randn(1, 4, 2, 2), torch.rand(1, 4), backend="cuda")


def test_auto_falls_back_to_reference_on_cpu():
    y = ek.ops.dwconv_bn_act(*small(), backend="auto")
    assert y.shape == (1, 4, 5, 5)


def test_precedence_argument_context_env(spy_backend, monkeypatch):
    args = small()
    ek.ops.dwconv_bn_act(*args, backend="triton")
    assert spy_backend == ["dwconv_bn_act"]
    with ek.use_backend("triton"):
        ek.ops.dwconv_bn_act(*args)
        assert len(spy_backend) == 2
        ek.ops.dwconv_bn_act(*args, backend="torch")  # argument beats context
        assert len(spy_backend) == 2
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    ek.ops.se_excite(torch.randn(1, 4, 2, 2), torch.rand(1, 4))
    assert spy_backend[-1] == "se_excite"
    with ek.use_backend("torch"):  # context beats environment
        ek.ops.se_excite(torch.randn(1, 4, 2, 2), torch.rand(1, 4))
    assert len(spy_backend) == 3


def test_use_backend_nests_and_restores():
    assert backends.requested_backend(None) == "auto"
    with ek.use_backend("triton"):
        with ek.use_backend("torch"):
            assert backends.requested_backend(None) == "torch"
        assert backends.requested_backend(None) == "triton"
    assert backends.requested_backend(None) == "auto"
    with pytest.raises(RuntimeError), ek.use_backend("cuda"):
        raise RuntimeError("leaving by an exception restores the outer choice too")
    assert backends.requested_backend(None) == "auto"


def test_use_backend_is_local_to_each_thread():
    """A server thread's use_backend() is not seen by another thread running at the same time."""
    import threading

    inside, other_done = threading.Event(), threading.Event()
    seen = {}

    def serving():
        with ek.use_backend("triton"):
            inside.set()
            other_done.wait(10)
            seen["serving"] = backends.requested_backend(None)

    def other():
        inside.wait(10)
        seen["other"] = backends.requested_backend(None)
        with ek.use_backend("torch"):
            seen["other-inner"] = backends.requested_backend(None)
        other_done.set()

    threads = [threading.Thread(target=serving), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"serving": "triton", "other": "auto", "other-inner": "torch"}
    assert backends.requested_backend(None) == "auto"


def test_use_backend_is_local_to_each_asyncio_task():
    import asyncio

    async def task(name, started, proceed):
        with ek.use_backend(name):
            started.set()
            await proceed.wait()
            return backends.requested_backend(None)

    async def main():
        events = [(asyncio.Event(), asyncio.Event()) for _ in range(2)]
        tasks = [asyncio.create_task(task(n, *ev)) for n, ev in zip(("triton", "torch"), events)]
        for started, _ in events:
            await started.wait()  # both contexts are open at once
        outside = backends.requested_backend(None)
        for _, proceed in events:
            proceed.set()
        return outside, await asyncio.gather(*tasks)

    assert asyncio.run(main()) == ("auto", ["triton", "torch"])
    assert backends.requested_backend(None) == "auto" and backends._compiled_mirror.name is None


def test_bad_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        with ek.use_backend("gpu"):
            pass
    monkeypatch.setenv(backends.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="EFFNET_KERNELS_BACKEND must be one of"):
        ek.ops.dwconv_bn_act(*small())


def test_backward_uses_reference_when_backend_lacks_it(spy_backend):
    x, w, s, b = small()
    x.requires_grad_()
    y = ek.ops.dwconv_bn_act(x, w, s, b, backend="triton")
    y.sum().backward()
    assert spy_backend == ["dwconv_bn_act"]  # forward on the spy, backward by the reference
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_failing_probe_is_reported_not_raised():
    backends._ensure_registered()
    saved = backends._REGISTRY["cuda"]
    def boom():
        raise OSError("driver exploded")
    backends.register_backend("cuda", unavailable=boom, unsupported=lambda op, t, args=(): [], load=dict)
    try:
        status = ek.available_backends()["cuda"]
        assert not status.available and "driver exploded" in status.reasons[0]
    finally:
        backends._REGISTRY["cuda"] = saved


def test_auto_falls_through_on_argument_reasons(monkeypatch):
    """A backend can refuse a call by its arguments (e.g. a kernel size); auto then takes the next one."""
    seen = []

    def refuse_k7(op, t, args=()):
        seen.append(op)
        return ["k=7 not compiled"] if op == "dwconv_bn_act" and args[1].shape[-1] == 7 else []

    backends._ensure_registered()
    monkeypatch.setitem(backends._REGISTRY, "triton", backends._Backend(
        "triton", lambda: [], refuse_k7, lambda: {"dwconv_bn_act": lambda *a: ("spy", None)}))
    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("triton", "torch"))
    x, s, b = torch.randn(1, 4, 9, 9), torch.rand(4) + 0.5, torch.randn(4)
    y = ek.ops.dwconv_bn_act(x, torch.randn(4, 1, 7, 7), s, b)  # refused by the spy: the reference serves it
    assert isinstance(y, torch.Tensor) and y.shape == (1, 4, 9, 9)
    with pytest.raises(ek.BackendUnavailableError, match="k=7 not compiled"):
        ek.ops.dwconv_bn_act(x, torch.randn(4, 1, 7, 7), s, b, backend="triton")


def test_use_backend_inside_torch_compile_is_guarded(spy_backend):
    """Compiled code reads the calling thread's choice, fullgraph, and recompiles when it changes."""
    args = small()
    compiled = torch.compile(lambda *a: ek.ops.dwconv_bn_act(*a), backend="eager", fullgraph=True)
    compiled(*args)
    assert spy_backend == []  # auto on CPU: the reference
    with ek.use_backend("triton"):
        compiled(*args)
    assert spy_backend == ["dwconv_bn_act"]
    compiled(*args)
    assert spy_backend == ["dwconv_bn_act"]


# ---------------------------------------------------------------- float64: the torch reference's
def _fp64_calls():
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    w, s, b = torch.randn(4, 1, 3, 3, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4)
    gate_args = (torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 8), torch.randn(2), torch.randn(8, 2),
                 torch.randn(8))
    return [("dwconv_bn_act", (x, w, s, b), dict(activation="hardswish")),
            ("se_gate", gate_args, dict(activation="relu", gate="hardsigmoid")),
            ("se_excite", (x, torch.rand(1, 4, dtype=torch.float64)), {})]


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """The real triton backend on CPU tensors (Triton's interpreter)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backends._reset_caches()
    yield
    monkeypatch.undo()
    backends._reset_caches()


def test_float64_explicit_kernel_backend_raises_why(triton_on_cpu):
    for op, args, kw in _fp64_calls():
        with pytest.raises(ek.BackendUnavailableError,
                           match=f"backend 'triton' cannot run {op}.*the triton kernels take float32, float16 or "
                                 "bfloat16; got float64"):
            getattr(ek.ops, op)(*args, **kw, backend="triton")
        with pytest.raises(ek.BackendUnavailableError, match=f"backend 'cuda' cannot run {op}") as info:
            getattr(ek.ops, op)(*args, **kw, backend="cuda")
        if torch.cuda.is_available():
            assert "the cuda kernels take float32, float16 or bfloat16; got float64" in str(info.value)


def test_float64_anywhere_is_refused_by_the_kernel_hooks():
    """A float64 weight or scale counts as much as a float64 x (the kernels read float32 at most)."""
    from effnet_kernels import cuda as cuda_backend
    from effnet_kernels import triton as triton_backend

    x = torch.randn(1, 4, 5, 5)
    w64 = torch.randn(4, 1, 3, 3, dtype=torch.float64)
    for hook, name in ((triton_backend._unsupported, "triton"), (cuda_backend._unsupported, "cuda")):
        for args in ((x.double(), w64), (x, w64)):
            reasons = hook("dwconv_bn_act", args[0], args)
            assert f"the {name} kernels take float32, float16 or bfloat16; got float64" in " ".join(reasons), reasons
        assert not any("float64" in r for r in hook("dwconv_bn_act", x, (x, w64.float())))


def test_float64_auto_falls_back_to_the_reference(triton_on_cpu, monkeypatch):
    """auto tries triton first here: float64 calls go to torch (exactly the reference), float32 to triton."""
    from unittest import mock

    monkeypatch.setitem(backends.AUTO_ORDER, "cpu", ("triton", "torch"))
    impls = backends._REGISTRY["triton"].impls()
    calls = []
    spies = {op: (lambda f, name: lambda *a: calls.append(name) or f(*a))(fn, op) for op, fn in impls.items()}
    with mock.patch.dict(impls, spies):
        for op, args, kw in _fp64_calls():
            out = getattr(ek.ops, op)(*args, **kw, backend="auto")
            assert out.dtype == torch.float64
            expected = getattr(ek.ops, op)(*args, **kw, backend="torch")
            assert torch.equal(out, expected), op
        assert calls == []
        x, w, s, b = small()
        ek.ops.dwconv_bn_act(x, w, s, b, activation="relu6", backend="auto")
        assert calls == ["dwconv_bn_act"]


def test_activation_arguments_compile_without_graph_breaks():
    """The str activation / gate schema arguments trace (fullgraph, forward and backward through AOT autograd)."""
    x, w, s, b = small()
    x.requires_grad_()
    pooled_w = (torch.randn(2, 4), torch.randn(2), torch.randn(4, 2), torch.randn(4))

    def block(x, w, s, b):
        y, mean = ek.ops.dwconv_bn_act(x, w, s, b, activation="hardswish", squeeze=True)
        gate = ek.ops.se_gate(mean, *pooled_w, activation="relu", gate="hardsigmoid")
        return ek.ops.se_excite(y, gate)

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = compiled(x, w, s, b)
    torch.testing.assert_close(out, block(x, w, s, b), rtol=0, atol=0)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
