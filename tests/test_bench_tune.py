"""``python -m benchmarks.tune``: its plan, its refusals where nothing can be measured, its time budget.

Nothing here measures anything: the CPU has no GPU, so the command must say so and write
nothing; the loop's logic is tested with a fake tuner and a fake clock. The plan is checked
against the launches a converted network makes (recorded on the meta device and under CPU
autocast), and ``tune_case`` launches each op's Triton kernel in the interpreter.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

import effnet_kernels as ek  # noqa: E402
from benchmarks import op_cases, tune  # noqa: E402
from effnet_kernels import models  # noqa: E402
from effnet_kernels.models import depthwise_shapes  # noqa: E402
from effnet_kernels.triton import _tuning, _tuning_store  # noqa: E402

from .environments import triton_interpreted  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def run_cli(args, tmp_path, **env):
    full = {**os.environ, "PYTHONPATH": str(REPO), _tuning_store.CACHE_ENV_VAR: str(tmp_path / "store"), **env}
    full.pop(_tuning_store.MODE_ENV_VAR, None)
    return subprocess.run([sys.executable, "-m", "benchmarks.tune", *args], cwd=REPO, env=full, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour: this machine has a GPU")
def test_on_a_cpu_it_says_there_is_no_gpu_and_writes_nothing(tmp_path):
    out = run_cli(["--models", "b0", "--batches", "2"], tmp_path)
    assert out.returncode == tune.EXIT_NO_GPU == 69
    assert "no CUDA GPU" in out.stderr and "nothing was written" in out.stderr
    assert not (tmp_path / "store").exists()


def test_the_plan_covers_every_depthwise_class_at_every_batch_headline_first(tmp_path):
    out = run_cli(["--models", "b0,b3", "--batches", "256,1", "--dry-run"], tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert str(tmp_path / "store") in lines[-1] and not (tmp_path / "store").exists()
    cases = tune.plan(["b0", "b3"], [256, 1], ["fp16"], ["channels_last"])
    assert [tune.label(tc) for tc in cases] == lines[:-1]
    per_op = Counter(c.op for c, _, _ in cases)
    assert lines[-1].startswith(f"{len(cases)} shapes (dwconv {per_op['dwconv']}, pointwise {per_op['pointwise']}, "
                                f"conv {per_op['conv']}); store: ")
    for batch in (256, 1):
        shapes = {(c.c, c.h, c.w, c.k, c.stride) for c, _, _ in cases if c.n == batch and c.op == "dwconv"}
        assert shapes == set(depthwise_shapes(["b0", "b3"]))
    batches = [c.n for c, _, _ in cases]
    assert batches == sorted(batches, reverse=True), "batch 256 (the headline) first"
    assert cases[0][0].model == "b0"
    one = tune.plan(["b0"], [8], ["fp16"], ["channels_last"])
    both = tune.plan(["b0"], [8], ["fp16", "bf16"], ["channels_last", "nchw"])
    assert len(both) == 4 * len(one) and {(d, l) for _, d, l in both} == {
        ("fp16", "channels_last"), ("fp16", "nchw"), ("bf16", "channels_last"), ("bf16", "nchw")}


def test_labels_name_the_op_and_the_variant():
    labels = [tune.label(tc) for tc in tune.plan(["b0"], [256], ["fp16"], ["channels_last"])]
    assert "conv b0 256x3x224x224/o32/k3s2/silu fp16 channels_last" in labels
    assert "pointwise b0 256x16x112x112/o96/silu fp16 channels_last" in labels  # block 1's expand
    assert "pointwise b0 256x144x56x56/o24/gate/res fp16 channels_last" in labels  # block 2's projection
    assert "pointwise b0 256x320x7x7/o1280/silu/pool fp16 channels_last" in labels  # the head
    assert "dwconv b0 256x96x112x112/k3s2 fp16 channels_last" in labels
    assert len(set(labels)) == len(labels)


# --- the plan is what a converted network launches --------------------------------------------------

TUNED_EFFNET_OPS = {"dwconv_bn_act", "pointwise_conv", "conv_bn_act"}


class _Launches(TorchDispatchMode):
    """Counts the ``effnet::`` ops that dispatch by launch signature: the op, x's dtype, layout and
    shape and every argument that selects a kernel specialisation or shape class."""

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "effnet":
            named = {a.name: v for a, v in zip(func._schema.arguments, args)}
            named.update(kwargs or {})
            self.calls[_signature(func._opname, named)] += 1
        return func(*args, **(kwargs or {}))


def _signature(op: str, a: dict) -> tuple:
    x = a["x"] if "x" in a else next(v for v in a.values() if isinstance(v, torch.Tensor))
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    head = (op, x.dtype, "channels_last" if cl else "nchw", tuple(x.shape))
    if op == "dwconv_bn_act":
        return head + (tuple(a["weight"].shape), tuple(a["stride"]), tuple(a["padding"]), a["activation"], a["squeeze"])
    if op == "pointwise_conv":
        return head + (tuple(a["weight"].shape), a["bias"] is not None, a["gate"] is not None,
                       a["residual"] is not None, a["activation"], a["pool"])
    if op == "conv_bn_act":
        return head + (tuple(a["weight"].shape), a["bias"] is not None, tuple(a["stride"]), tuple(a["padding"]),
                       a["activation"])
    return head  # se_gate, se_excite: not tuned (test_tune_case_launches_one_tuned_class_per_case...)


def _network_launches(names, batch, dtype, resolution=None, autocast=False) -> Counter:
    """The launch signatures of one eval forward of each converted network (the second: the first folds).

    Meta device, the model in ``dtype``; with ``autocast``, a CPU fp32 model under ``torch.autocast``
    in ``dtype`` (how the network benchmark runs fp16 / bf16)."""
    total: Counter = Counter()
    for name in names:
        device = "cpu" if autocast else "meta"
        with torch.device(device):
            model = models.efficientnet(name)
        model = model.to(dtype=torch.float32 if autocast else dtype, memory_format=torch.channels_last).eval()
        fused = ek.convert(copy.deepcopy(model)).eval()
        r = resolution or model.resolution
        x = torch.randn(batch, 3, r, r, device=device, dtype=model.classifier.weight.dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=autocast):
            fused(x)
            with _Launches() as rec:
                fused(x)
        total += rec.calls
    return total


def _case_launches(cases) -> Counter:
    """The launch signatures of ``cases`` called as ``tune_case`` calls them (the torch backend, on meta)."""
    meta = torch.device("meta")
    with _Launches() as rec:
        for case, dtype, layout in cases:
            inputs = op_cases.make_inputs(case, op_cases.DTYPES[dtype], tune.LAYOUTS[layout], meta, None)
            op_cases.make_call(case, "torch", inputs)()
    return rec.calls


def assert_plan_is_what_runs(cases, launched: Counter) -> None:
    """``cases`` launch exactly the distinct tuned-op signatures of ``launched``, each once."""
    planned = _case_launches(cases)
    tuned = {sig for sig in launched if sig[0] in TUNED_EFFNET_OPS}
    missing, extra = tuned - set(planned), set(planned) - tuned
    assert not missing and not extra, f"missing from the plan: {sorted(map(str, missing))}; " \
        f"planned but not launched: {sorted(map(str, extra))}"
    assert sum(planned.values()) == len(cases), "a signature is planned twice"


@pytest.mark.parametrize("names,batch,dtype,resolution,autocast", [
    (("b0",), 256, "fp16", None, False),  # the headline: meta, native resolution
    (("b0", "b1"), 256, "fp16", None, False),  # b1 adds only what b0 does not launch
    (("b0",), 2, "bf16", 64, True),  # what the benchmark runs: an fp32 model under autocast, on the CPU
], ids=["b0-256-meta", "b0b1-256-meta", "b0-2-autocast"])
def test_the_plan_is_exactly_the_tuned_launches_of_the_converted_networks(names, batch, dtype, resolution, autocast):
    launched = _network_launches(names, batch, op_cases.DTYPES[dtype], resolution, autocast)
    assert {sig[0] for sig in launched} == TUNED_EFFNET_OPS | {"se_gate"}, "four-kernel blocks, fused stem and head"
    cases = tune.plan(list(names), [batch], [dtype], ["channels_last"], resolution)
    assert_plan_is_what_runs(cases, launched)
    if len(names) == 1:  # and every launch of the forward, repeats included, is a case of forward_cases
        per_forward = tune.forward_cases(names[0], batch, tune.OPS, resolution)
        assert _case_launches([(c, dtype, "channels_last") for c in per_forward]) == \
            Counter({sig: n for sig, n in launched.items() if sig[0] in TUNED_EFFNET_OPS})


def _without(cases, drop):
    """``cases`` less the first one ``drop`` picks."""
    i = next(i for i, tc in enumerate(cases) if drop(tc[0]))
    return cases[:i] + cases[i + 1:]


@functools.lru_cache(maxsize=None)
def _b0_headline_launches() -> Counter:
    return _network_launches(["b0"], 256, torch.float16)


@pytest.mark.parametrize("defect", ["no head", "no gated residual projection", "no stem", "residual dropped",
                                    "ungated projection", "extra batch"])
def test_negative_control_a_plan_missing_a_variant_fails_the_check(defect):
    launched = _b0_headline_launches()
    cases = tune.plan(["b0"], [256], ["fp16"], ["channels_last"])
    assert_plan_is_what_runs(cases, launched)  # clean: passes
    if defect == "no head":
        bad = _without(cases, lambda c: c.pool)
    elif defect == "no gated residual projection":
        bad = _without(cases, lambda c: c.gate and c.residual)
    elif defect == "no stem":
        bad = _without(cases, lambda c: c.op == "conv")
    elif defect == "residual dropped":  # the variant replaced by its sibling without the residual
        bad = [(dataclasses.replace(c, residual=False) if c.residual and c.c == 144 else c, d, l) for c, d, l in cases]
    elif defect == "ungated projection":
        bad = [(dataclasses.replace(c, gate=False) if c.gate else c, d, l) for c, d, l in cases]
    else:
        bad = cases + [(dataclasses.replace(cases[0][0], n=8), "fp16", "channels_last")]
    with pytest.raises(AssertionError):
        assert_plan_is_what_runs(bad, launched)


def test_tuning_order_batches_layouts_models_then_bytes_per_forward():
    cases = tune.plan(["b0", "b1"], [256, 1], ["fp16"], ["channels_last", "nchw"])
    groups = [key for key, _ in itertools.groupby(cases, lambda tc: (tc[0].n, tc[1], tc[2], tc[0].model))]
    assert groups == [(n, "fp16", layout, m) for n in (256, 1) for layout in ("channels_last", "nchw")
                      for m in ("b0", "b1")]
    for (n, _, layout, name), group in itertools.groupby(cases, lambda tc: (tc[0].n, tc[1], tc[2], tc[0].model)):
        launches = Counter(tune.forward_cases(name, n))
        weights = [launches[c] * c.min_bytes(2) for c, _, _ in group]
        assert weights == sorted(weights, reverse=True), (n, layout, name)
    b0 = [c for c, _, layout in cases if c.n == 256 and layout == "channels_last" and c.model == "b0"]
    assert b0[0].h == 112 and b0[-1].pool, "the 112 x 112 layers first, the head (7 x 7, one launch) last"
    head = op_cases.layer_cases("b0", 256, ["pointwise"])[-1]
    assert head.pool and Counter(tune.forward_cases("b0", 256))[head] == 1


def test_ops_chooses_the_ops_and_refuses_others(tmp_path):
    out = run_cli(["--models", "b0", "--batches", "256", "--ops", "conv,pointwise", "--dry-run"], tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    cases = tune.plan(["b0"], [256], ["fp16"], ["channels_last"], ops=["conv", "pointwise"])
    assert lines[:-1] == [tune.label(tc) for tc in cases]
    assert {line.split()[0] for line in lines[:-1]} == {"conv", "pointwise"}
    assert lines[-1].startswith(f"{len(cases)} shapes (pointwise {len(cases) - 1}, conv 1); ")
    every = tune.plan(["b0"], [256], ["fp16"], ["channels_last"])
    assert [tc for tc in every if tc[0].op != "dwconv"] == cases, "the order does not depend on the other ops"
    out = run_cli(["--ops", "se", "--dry-run"], tmp_path)
    assert out.returncode == 2 and "--ops" in out.stderr and "'se'" in out.stderr
    with pytest.raises(ValueError, match="ops must be among"):
        tune.plan(["b0"], [1], ["fp16"], ["channels_last"], ops=["se"])


def test_bad_arguments_are_named(tmp_path):
    for args, name in ((["--jobs", "-1"], "--jobs"), (["--time-budget", "-3"], "--time-budget"),
                       (["--models", "b9"], "--models"), (["--batches", "0"], "--batches"),
                       (["--ops", "stem"], "--ops")):
        out = run_cli(args + ["--dry-run"], tmp_path)
        assert out.returncode == 2 and name in out.stderr, (args, out.stderr)


def test_refusals_when_nothing_would_be_kept(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(_tuning.TUNE_ENV_VAR, raising=False)
    monkeypatch.delenv(_tuning_store.MODE_ENV_VAR, raising=False)
    cuda = torch.device("cuda")
    assert tune.refusal(cuda) == (0, "")
    assert tune.refusal(torch.device("cpu"))[0] == tune.EXIT_NO_GPU
    monkeypatch.setenv(_tuning_store.MODE_ENV_VAR, "ro")
    code, reason = tune.refusal(cuda)
    assert code == tune.EXIT_NOT_KEPT and "'ro'" in reason
    monkeypatch.setenv(_tuning_store.MODE_ENV_VAR, "rw")
    monkeypatch.setenv(_tuning.TUNE_ENV_VAR, "0")
    assert tune.refusal(cuda)[0] == tune.EXIT_NOT_KEPT
    monkeypatch.delenv(_tuning.TUNE_ENV_VAR)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tune.refusal(cuda)[0] == tune.EXIT_NO_GPU


def test_the_loop_stops_at_its_time_budget_and_survives_a_failing_shape(monkeypatch):
    """Fake tuner, fake clock: each shape takes 10 s."""
    now = [0.0]
    monkeypatch.setattr(tune.time, "perf_counter", lambda: now[0])
    cases = tune.plan(["b0"], [4], ["fp16"], ["channels_last"])[:6]
    seen, log = [], []

    def tune_one(tc):
        seen.append(tc)
        now[0] += 10.0
        if len(seen) == 2:
            raise RuntimeError("out of resources\nmore")
        return "tuned" if len(seen) % 2 else "store"

    counts = tune.run_plan(cases, tune_one, 25.0, log.append)
    assert seen == cases[:3], "starts no shape after 25 s"
    assert counts == {"tuned": 2, "failed": 1, "not run": 3}
    assert "failed: out of resources" in log[1] and "3 shapes not tuned" in log[-1]
    now[0] = 0.0
    assert tune.run_plan(cases, lambda tc: "fixed", 0.0, log.append) == {"fixed": 6}, "0 = no limit"


def test_compile_only_runs_every_candidate_once_and_keeps_nothing(monkeypatch, tmp_path):
    import triton.testing

    from effnet_kernels.triton._tuning import Config

    def no_timing(*a, **k):
        raise AssertionError("compile-only must not time")

    monkeypatch.setattr(triton.testing, "do_bench", no_timing)
    monkeypatch.setattr(_tuning, "tuning_enabled", lambda t: True)
    monkeypatch.setattr(_tuning, "interpreted", lambda t: False)
    monkeypatch.setattr(_tuning_store, "device_identity", lambda t: _tuning_store.Identity("G", (9, 0), "3.6.0"))
    monkeypatch.setenv(_tuning_store.CACHE_ENV_VAR, str(tmp_path))
    _tuning.clear_cache()
    ran = []
    a, b = Config(16, 16), Config(32, 32)
    _tuning.set_compile_only(True)
    try:
        assert _tuning.choose("k", torch.empty(1), lambda: ([a, b], b), ran.append, kernel_version="v") == b
    finally:
        _tuning.set_compile_only(False)
    assert ran == [a, b] and "k" not in _tuning._cache and not list(tmp_path.rglob("*.json"))
    _tuning.clear_cache()


# --- provenance: the triton_tune column says where a row's configs came from --------------------------

def test_tuning_state_names_the_store_mode_and_the_config_sources(monkeypatch):
    from benchmarks import env

    monkeypatch.delenv(_tuning.TUNE_ENV_VAR, raising=False)
    monkeypatch.delenv(_tuning.BUDGET_ENV_VAR, raising=False)
    monkeypatch.delenv(_tuning_store.MODE_ENV_VAR, raising=False)
    assert env.triton_tuning_state() == "on budget=30" == env.triton_tuning_state({})
    assert env.triton_tuning_state({"store": 12, "default": 1}) == "on budget=30 classes=store:12,default:1"
    monkeypatch.setenv(_tuning_store.MODE_ENV_VAR, "ro")
    monkeypatch.setenv(_tuning.TUNE_ENV_VAR, "0")
    assert env.triton_tuning_state({"store": 3}) == "off store=ro classes=store:3"


def test_an_op_benchmark_row_records_the_classes_its_triton_launches_used(tmp_path, monkeypatch):
    """A real (interpreted) Triton launch through ``benchmarks.ops``: the interpreter never times, so
    its one shape class is ``default``; the eager row launched no Triton kernel."""
    from benchmarks import ops
    from benchmarks.records import read_rows
    from effnet_kernels import backends

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(_tuning.TUNE_ENV_VAR, raising=False)
    monkeypatch.delenv(_tuning.BUDGET_ENV_VAR, raising=False)
    monkeypatch.delenv(_tuning_store.MODE_ENV_VAR, raising=False)
    backends._reset_caches()  # availability is cached: recompute it with the interpreter on
    _tuning.clear_cache()
    out = tmp_path / "ops.csv"
    argv = ["--models", "b0", "--batch", "1", "--resolution", "16", "--limit", "1", "--ops", "dwconv",
            "--providers", "eager,triton", "--device", "cpu", "--dtypes", "fp32", "--copy-mb", "1",
            "--warmup-s", "0", "--min-time-s", "0", "--min-iters", "1", "--max-iters", "1", "--out", str(out),
            "--quiet"]
    assert ops.main(argv) == 0
    rows = {r["provider"]: r for r in read_rows(out)}
    assert rows["triton"]["status"] == "ok", rows["triton"]["status"]
    assert rows["triton"]["triton_tune"] == "on budget=30 classes=default:1"
    assert rows["eager"]["triton_tune"] == "on budget=30"
    _tuning.clear_cache()
    monkeypatch.undo()
    backends._reset_caches()


def test_network_rows_record_each_jobs_config_sources(tmp_path, monkeypatch):
    from benchmarks import models, network
    from benchmarks.records import read_rows

    from .test_bench_records import TinyNet, cpu_network_argv

    usages = iter([{"store": 5, "fixed": 2}, {}])
    monkeypatch.setattr(network, "triton_usage", lambda: next(usages))
    monkeypatch.setitem(models._BUILDERS, "net", lambda: (TinyNet(), 8))
    monkeypatch.delenv(_tuning.TUNE_ENV_VAR, raising=False)
    monkeypatch.delenv(_tuning.BUDGET_ENV_VAR, raising=False)
    monkeypatch.delenv(_tuning_store.MODE_ENV_VAR, raising=False)
    out = tmp_path / "r.csv"
    assert network.main(cpu_network_argv(out, "eager,eager-folded")) == 0
    tunes = [r["triton_tune"] for r in read_rows(out)]
    assert tunes == ["on budget=30 classes=store:5,fixed:2", "on budget=30"]


def test_compile_workers_run_at_once_failures_are_logged_and_stragglers_stopped(tmp_path):
    """Fake workers: share 0 fails, share 1 hangs, share 2 finishes; all three start together."""
    import time

    script = tmp_path / "worker.py"
    script.write_text(
        "import sys, time, pathlib\n"
        f"pathlib.Path({str(tmp_path)!r}, 'started-' + sys.argv[-1].replace('/', '-')).touch()\n"
        "i = sys.argv[-1].split('/')[0]\n"
        "if i == '0':\n    print('noise\\nboom: out of resources', file=sys.stderr); sys.exit(3)\n"
        "if i == '1':\n    time.sleep(60)\n")
    log = []
    t0 = time.monotonic()
    tune.compile_in_workers([sys.executable, str(script)], 3, 3.0, log.append)
    assert time.monotonic() - t0 < 30
    assert sorted(p.name for p in tmp_path.glob("started-*")) == ["started-0-3", "started-1-3", "started-2-3"]
    assert log[0] == "compile worker 0: exit 3: boom: out of resources"
    assert log[1].startswith("compile worker 1: stopped after 3 s") and len(log) == 2


def test_main_compiles_in_workers_then_times_every_shape_in_order(monkeypatch, capsys):
    """main()'s wiring with the GPU parts faked: the workers get the same arguments and half the budget,
    then every shape of the plan is tuned here, with the per-process tuning budget lifted."""
    calls, tuned = [], []
    monkeypatch.setattr(tune, "refusal", lambda device: (0, ""))
    monkeypatch.setattr(tune, "compile_in_workers", lambda cmd, jobs, seconds, log: calls.append((cmd, jobs, seconds)))
    monkeypatch.setattr(tune, "tune_case", lambda tc, device: tuned.append(tc) or "tuned")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setenv(_tuning.BUDGET_ENV_VAR, "30")
    argv = ["--models", "b0", "--batches", "2", "--jobs", "2", "--time-budget", "100"]
    assert tune.main(argv) == 0
    ((cmd, jobs, seconds),) = calls
    assert cmd[1:] == ["-m", "benchmarks.tune", *argv] and (jobs, seconds) == (2, 50.0)
    assert tuned == tune.plan(["b0"], [2], ["fp16"], ["channels_last"])
    assert os.environ[_tuning.BUDGET_ENV_VAR] == "inf"
    assert f"{len(tuned)} shapes on Fake GPU: {len(tuned)} tuned" in capsys.readouterr().err


def test_tune_case_launches_one_tuned_class_per_case_and_the_se_ops_none(monkeypatch):
    """In Triton's interpreter (nothing is timed there: every class is ``default``), each kind of case at a
    tiny B0 launches exactly one shape class of its own kernel, with the case's specialisation; the SE ops
    launch no tuned kernel at all, which is why ``se`` is not among tune.OPS."""
    monkeypatch.delenv(_tuning.TUNE_ENV_VAR, raising=False)
    cases = tune.plan(["b0"], [1], ["fp32"], ["channels_last"], resolution=16)
    kinds = {  # first case of each kind -> (kernel, the key's (gate, residual, pool) for pointwise)
        "stem": lambda c: c.op == "conv",
        "dwconv": lambda c: c.op == "dwconv",
        "expand": lambda c: c.op == "pointwise" and c.activation == "silu" and not c.pool,
        "projection": lambda c: c.op == "pointwise" and c.gate and c.residual,
        "head": lambda c: c.pool,
    }
    kernels = {"conv": "conv_bn_act", "dwconv": "dwconv", "pointwise": "pointwise"}
    cpu = torch.device("cpu")
    try:
        with triton_interpreted():
            for kind, pick in kinds.items():
                tc = next(tc for tc in cases if pick(tc[0]))
                _tuning.clear_cache()
                assert tune.tune_case(tc, cpu) == "default", kind
                (key,) = _tuning._sources  # one shape class
                assert key[0] == kernels[tc[0].op], (kind, key)
                if tc[0].op == "pointwise":
                    assert key[6:9] == (tc[0].gate, tc[0].residual, tc[0].pool), (kind, key)
            se = op_cases.cases_for_models(["b0"], 1, ["se"], 16)[0]
            gen = torch.Generator(cpu).manual_seed(0)
            inputs = op_cases.make_inputs(se, torch.float32, torch.channels_last, cpu, gen)
            _tuning.clear_cache()
            _tuning.start_usage_log()
            op_cases.make_call(se, "triton", inputs)()
            assert _tuning.usage_counts() == {} and not _tuning._sources
    finally:
        _tuning.clear_cache()
