"""``python -m benchmarks.precompile``: its plan, how workers divide the compiles, its refusal without a GPU.

Nothing compiles here (no GPU): the sharded launch path is checked on the package's own
kernels launched on meta tensors (the launchers run, the launch is recorded instead of
compiled), the workload loop on the CPU with the torch backend, the CLI in a subprocess.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from benchmarks import precompile as pc  # noqa: E402
from benchmarks import providers  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
META = torch.device("meta")
NO_TUNING = {"EFFNET_KERNELS_TRITON_TUNE": "0"}  # on meta tensors the tuner would ask CUDA about graph capture


@pytest.fixture(autouse=True)
def _no_tuning(monkeypatch):
    for k, v in NO_TUNING.items():
        monkeypatch.setenv(k, v)


def _meta(*shape, dtype=torch.float16, channels_last=False):
    t = torch.empty(*shape, device=META, dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _launch_package_kernels():
    """A few of the package's Triton launchers on meta tensors: the depthwise forward (two dtypes,
    two layouts), the excite, a shape that repeats one of them, and the projection's backward GEMMs."""
    from effnet_kernels.triton.dwconv import dwconv_bn_act
    from effnet_kernels.triton.se_excite import se_excite

    for dtype in (torch.float16, torch.float32):
        for cl in (True, False):
            x = _meta(2, 32, 16, 16, dtype=dtype, channels_last=cl)
            w = _meta(32, 1, 3, 3, dtype=dtype)
            dwconv_bn_act(x, w, _meta(32, dtype=torch.float32), _meta(32, dtype=torch.float32), (1, 1), (1, 1, 1, 1),
                          "silu", True)
    se_excite(_meta(2, 32, 8, 8, channels_last=True), _meta(2, 32, dtype=torch.float32))
    se_excite(_meta(2, 32, 8, 8, channels_last=True), _meta(2, 32, dtype=torch.float32))  # a repeat


def _record(shard):
    keys = []
    with pc.sharded_warmups(shard, lambda jit, grid, args, kwargs: keys.append(pc.launch_key(jit, args, kwargs))) as c:
        _launch_package_kernels()
    return keys, c


def test_each_distinct_kernel_compiles_in_exactly_one_worker_and_nothing_launches(monkeypatch):
    from triton.runtime.jit import JITFunction

    def no_launch(*a, **k):
        raise AssertionError("a worker launched a kernel")

    monkeypatch.setattr(JITFunction, "run", no_launch)
    everything, one = _record((0, 1))
    assert len(everything) == 6 and len(set(everything)) == 5  # the repeated excite: the same key
    assert one["compiled"] == set(everything) and not one["skipped"]
    n = 3
    shares = [_record((i, n)) for i in range(n)]
    compiled = [set(keys) for keys, _ in shares]
    assert set().union(*compiled) == set(everything)
    assert sum(len(c) for c in compiled) == len(set(everything))  # disjoint: each compiles once
    for i, (keys, counts) in enumerate(shares):
        assert counts["compiled"] == set(keys) and counts["skipped"] == set(everything) - set(keys)
        assert all(pc.owner(k, n) == i for k in keys)


def test_the_key_separates_what_triton_compiles_separately():
    from effnet_kernels.triton.dwconv import dwconv_bn_act

    def key(x, k=3, stride=1):
        got = []
        with pc.sharded_warmups((0, 1), lambda jit, grid, args, kwargs: got.append(pc.launch_key(jit, args, kwargs))):
            c = x.shape[1]
            dwconv_bn_act(x, _meta(c, 1, k, k, dtype=x.dtype), _meta(c, dtype=torch.float32),
                          _meta(c, dtype=torch.float32), (stride, stride), (k // 2,) * 4, "silu", False)
        assert len(got) == 1
        return got[0]

    base = key(_meta(2, 32, 16, 16, channels_last=True))
    assert key(_meta(4, 32, 16, 16, channels_last=True)) == base  # batch: an unspecialised loop bound
    assert key(_meta(2, 32, 16, 16, dtype=torch.bfloat16, channels_last=True)) != base
    assert key(_meta(2, 32, 16, 16, channels_last=True), k=5) != base  # a constexpr
    assert key(_meta(2, 32, 16, 16, channels_last=True), stride=2) != base
    assert key(_meta(2, 32, 16, 16)) != base  # NCHW: another kernel or other strides' classes


def test_owner_is_the_same_in_every_process():
    keys, _ = _record((0, 1))
    code = ("import sys; sys.path.insert(0, %r)\n" % str(REPO)
            + "from tests.test_bench_precompile import _record; from benchmarks.precompile import owner\n"
            + "print([owner(k, 7) for k in _record((0, 1))[0]])")
    env = {**os.environ, **NO_TUNING, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str([pc.owner(k, 7) for k in keys])


def test_interpreted_launches_run_as_before_and_the_patch_is_undone():
    from effnet_kernels.triton._jit import DeviceKernel
    from effnet_kernels.triton.se_excite import se_excite

    from .environments import triton_interpreted

    original = DeviceKernel.on
    y = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    gate = torch.rand(2, 8)
    with triton_interpreted():
        with pytest.raises(RuntimeError, match="boom"):
            with pc.sharded_warmups((0, 2), lambda *a: pytest.fail("an interpreted launch was sharded")) as c:
                out = se_excite(y, gate)
                raise RuntimeError("boom")
    assert DeviceKernel.on is original
    assert not c["compiled"] and not c["skipped"]
    torch.testing.assert_close(out, y * gate[:, :, None, None])


@pytest.mark.parametrize("shard", [(2, 2), (-1, 2), (0, 0)])
def test_bad_shards_are_refused(shard):
    with pytest.raises(ValueError, match="shard"):
        with pc.sharded_warmups(shard):
            pass


def test_plan_parsing_and_errors_name_the_part():
    groups = pc.parse_plan("b0,b4:fused-triton,eager:128:train b1:fused-triton:256,1:infer,train")
    assert groups[0] == pc.Group(("b0", "b4"), ("fused-triton", "eager"), (128,), ("train",))
    assert groups[1].batches == (256, 1) and groups[1].modes == ("infer", "train")
    for bad, words in [("b0:fused-triton:128", "MODELS:PROVIDERS"), ("b0:nope:128:infer", "'nope'"),
                       ("b0:fused-triton:0:infer", "batches"), ("b0:fused-triton:128:eval", "'eval'"),
                       ("b0::128:infer", "no providers"), ("", "at least one")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            pc.parse_plan(bad)


def test_workloads_keep_plan_order_once_each():
    loads = pc.workloads(pc.parse_plan("b0,b1:fused-triton:256,1:infer b0:fused-triton:256:infer,train"),
                         ["fp16"], ["channels_last"])
    assert [(w.model, w.batch, w.mode) for w in loads] == [
        ("b0", 256, "infer"), ("b0", 1, "infer"), ("b1", 256, "infer"), ("b1", 1, "infer"), ("b0", 256, "train")]


def test_the_default_plan_covers_the_fused_triton_runs_of_the_gpu_script():
    """Every (model, batch, mode) the script's net256, net1 and train steps run on fused-triton, by their defaults."""
    text = (REPO / "scripts" / "gpu_session.sh").read_text()
    default = lambda var: re.search(r"\$\{%s:-([^}]+)\}" % var, text).group(1)  # noqa: E731
    models = default("NET_MODELS").split(",")
    assert "fused-triton" in default("NET_PROVIDERS").split(",")
    wanted = {(m, int(default("NET256_BATCHES")), "infer") for m in models} | {(m, 1, "infer") for m in models}
    for group in default("TRAIN_PLAN").strip('"').split():
        names, provs = group.split(":")
        if "fused-triton" in provs.split(","):
            wanted |= {(m, int(default("TRAIN_BATCHES")), "train") for m in names.split(",")}
    got = {(w.model, w.batch, w.mode) for w in pc.workloads(pc.parse_plan(pc.DEFAULT_PLAN), ["fp16"], ["channels_last"])
           if w.provider == "fused-triton"}
    assert wanted and wanted <= got, sorted(wanted - got)
    assert _script_plan() == pc.DEFAULT_PLAN


def _script_plan(**env) -> str:
    """The script's ``precompile_plan`` (with ``train_plan``) run alone, under ``env``."""
    text = (REPO / "scripts" / "gpu_session.sh").read_text()
    funcs = "".join(re.search(r"^%s\(\) \{\n.*?^\}\n" % name, text, re.S | re.M).group(0)
                    for name in ("train_plan", "precompile_plan"))
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NET_", "TRAIN_", "PRECOMPILE_"))}
    out = subprocess.run(["bash", "-c", funcs + "precompile_plan"], env={**clean, **env}, capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout.strip()


def test_the_script_plan_follows_the_steps_overrides():
    assert _script_plan(NET_MODELS="b0", NET256_BATCHES="64", TRAIN_PLAN="b2:eager b3:fused-triton,eager",
                        TRAIN_BATCHES="32") == "b0:fused-triton:64,1:infer b3:fused-triton:32:train"
    assert _script_plan(NET_PROVIDERS="eager,fused-cuda", TRAIN_MODELS="b1") == "b1:fused-triton:128:train"
    assert _script_plan(NET_PROVIDERS="eager", TRAIN_PLAN="b0:fused-triton+compile") == ""


def test_workloads_run_each_call_once_and_survive_failures(monkeypatch):
    """On the CPU with the torch backend: the gate's three forwards, then the training step (SGD moves the
    weights); compiling providers and ones that cannot be built are skipped; a failing workload is logged."""
    monkeypatch.setattr(providers, "BACKEND_SUBSTITUTES", {"triton": "torch"})
    calls = []
    real = pc._calls

    def spy(w, model, device, resolution):
        out = []
        for what, call in real(w, model, device, resolution):
            def run(what=what, call=call):
                if w.provider == "eager" and what.startswith("train"):
                    raise RuntimeError("planted failure")
                calls.append((w.provider, w.mode, what))
                call()
            out.append((what, run))
        return out

    monkeypatch.setattr(pc, "_calls", spy)
    moved = []
    from benchmarks import jobs

    real_step = jobs._train_step

    def step(model, *a):
        before = [p.detach().clone() for p in model.parameters()]
        inner = real_step(model, *a)

        def run(x):
            inner(x)
            moved.append(any(not torch.equal(b, p) for b, p in zip(before, model.parameters())))
        return run

    monkeypatch.setattr(jobs, "_train_step", step)
    log = []
    loads = pc.workloads(pc.parse_plan("tiny:fused-triton,eager,compile:2:infer,train"), ["fp32"], ["channels_last"])
    counts = pc.run_workloads(loads, torch.device("cpu"), log.append)
    assert counts == {"done": 3, "failed": 1, "skipped": 2}, log
    assert [c for c in calls if c[0] == "fused-triton"] == [
        ("fused-triton", "infer", "forward fp32 x2"), ("fused-triton", "infer", "forward fp32 x2"),
        ("fused-triton", "infer", "forward fp32 x2"),
        ("fused-triton", "train", "forward fp32 x2"), ("fused-triton", "train", "forward fp32 x2"),
        ("fused-triton", "train", "forward fp32 x2"), ("fused-triton", "train", "train step fp32 x2")]
    assert moved == [True]
    assert any("planted failure" in line and "eager" in line for line in log)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour: this machine has a GPU")
def test_cli_on_a_cpu_says_so_dry_run_lists_and_bad_args_are_named(capsys):
    assert pc.main(["--jobs", "2", "--plan", "b0:fused-triton:2:infer"]) == 69
    assert "no CUDA GPU is visible: nothing was compiled" in capsys.readouterr().err
    assert pc.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "b0 fused-triton batch 256 infer fp16 channels_last" and lines[-1] == "18 workloads"
    for argv, words in ((["--plan", "b0:fused-triton:x:infer"], ("--plan", "batches")),
                        (["--time-budget", "-1"], ("--time-budget",)), (["--worker", "3/2"], ("--worker",))):
        with pytest.raises(SystemExit) as exc:
            pc.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and all(w in err for w in words), err
