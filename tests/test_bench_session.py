"""scripts/gpu_session.sh and its pytest deadline plugin, simulated on the CPU.

The one GPU call is the scarcest resource: the headline network rows come first, every
step's command line must parse, every step must leave its log and keep its time slot
(one that hangs is stopped at its end), a benchmark that exits 75 (sticky CUDA error) is
rerun with --resume under the same run id, a failed build drops the fused-cuda providers
instead of JIT-building again, $OUT must hold only what the device tool returns (at most 8
files, plain names, no deeper than 2 folders), and a test step that runs out of time must
still write its JUnit XML. A fake nvidia-smi, a fake build and a stub network benchmark
(which prints the real plan) keep it fast.
"""

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.environments import child_pytest_env

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_session.sh"


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _fake_nvidia_smi(bin_dir: Path) -> None:
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/sh\ncase "$*" in *query-gpu*) echo 580.00.00;; *) echo "fake nvidia-smi";; esac\n')
    smi.chmod(0o755)


# The network benchmark as the script sees it: every call is logged (argv, run id); calls
# whose command line matches $FAKE_NET_EXIT75 exit 75 (a sticky CUDA error, the failing job
# recorded) - once per marker file, or every time with FAKE_NET_EXIT75_ALWAYS=1; calls that
# match $FAKE_NET_SLEEP hang until the step's timeout; the rest print the real plan
# (--dry-run), with the agreed providers that this checkout may not register yet stubbed
# as eager and --resume dropped where the benchmark does not take it yet.
NET_STUB = r"""
import json, os, re, sys, time
argv = sys.argv[1:]
line = " ".join(argv)
with open(os.environ["FAKE_NET_CALLS"], "a") as fh:
    fh.write(json.dumps({"argv": argv, "run_id": os.environ.get("EFFNET_RUN_ID", "")}) + "\n")
if os.environ.get("FAKE_NET_SLEEP") and re.search(os.environ["FAKE_NET_SLEEP"], line):
    print("fake network: hanging", flush=True)
    time.sleep(600)
if os.environ.get("FAKE_NET_EXIT75") and re.search(os.environ["FAKE_NET_EXIT75"], line):
    marker = os.environ["FAKE_NET_CALLS"] + ".75"
    if os.environ.get("FAKE_NET_EXIT75_ALWAYS") or not os.path.exists(marker):
        open(marker, "w").close()
        print("fake network: sticky CUDA error, failing job recorded; exit 75", flush=True)
        sys.exit(75)
import inspect
from benchmarks import network, providers as P
for name in ("eager-folded", "compile-freeze", "fused-triton+compile", "fused-cuda+compile", "fused-torch+compile"):
    if name not in P.PROVIDERS:
        P.register_provider(P.Provider(name, P.PROVIDERS["eager"].prepare))
if "--resume" in argv and "--resume" not in inspect.getsource(network):
    argv.remove("--resume")
sys.exit(network.main(argv + ["--dry-run"]))
"""

# timeout-capable pytest for the tests step where pytest-timeout is not installed
FAKE_PYTEST_TIMEOUT = (
    "def pytest_addoption(parser):\n"
    "    parser.addoption('--timeout', type=float, default=None)\n"
)


def _fake_tools(tmp_path: Path) -> dict:
    """bin/ with nvidia-smi and a python whose CUDA build fails and whose network benchmark is NET_STUB."""
    import importlib.util

    bin_dir = tmp_path / "bin"
    _fake_nvidia_smi(bin_dir)
    stub = tmp_path / "net_stub.py"
    stub.write_text(NET_STUB)
    py = bin_dir / "python"
    py.write_text(
        "#!/bin/bash\n"
        f'if [[ "$1 $2" == "-m benchmarks.network" ]]; then shift 2; exec {sys.executable} {stub} "$@"; fi\n'
        'case "$1" in setup.py|effnet_kernels/_build.py) echo "fake build: nvcc failed" >&2; exit 1;; esac\n'
        f'exec {sys.executable} "$@"\n'
    )
    py.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": str(py),
        "FAKE_NET_CALLS": str(tmp_path / "net_calls.jsonl"),
    }
    for var in ("EFFNET_PYTEST_DEADLINE", "EFFNET_RUN_ID", "EFFNET_PYTEST_NO_CUDA_BUILD", "STEPS", "SESSION_BUDGET",
                "EFFNET_KERNELS_CUDA_ARCHS"):  # .ci/run sets it for its own build; the script's default is tested
        env.pop(var, None)
    if importlib.util.find_spec("pytest_timeout") is None:
        plugins = tmp_path / "plugins"
        plugins.mkdir()
        (plugins / "pytest_timeout.py").write_text(FAKE_PYTEST_TIMEOUT)
        env["PYTHONPATH"] = f"{plugins}:{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(plugins)
        env["PYTEST_PLUGINS"] = "pytest_timeout"
    return env


def _net_calls(env: dict) -> list[dict]:
    path = Path(env["FAKE_NET_CALLS"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _without_time_budget(argv: list[str]) -> list[str]:
    i = argv.index("--time-budget")
    return argv[:i] + argv[i + 2:]


def _summary_steps(summary: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^(\w+)\s+(?:rc=|skipped)", summary, re.M)]


def _logs(out: Path) -> dict:
    with tarfile.open(out / "logs.tar.gz") as tar:
        return {Path(m.name).name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


def test_session_runs_every_step_in_order_and_returns_what_the_device_tool_can_fetch(tmp_path):
    out = tmp_path / "out"
    env = {
        **_fake_tools(tmp_path),
        "OUT": str(out),
        "EFFNET_COMMIT": "cafe1234",
        "FAKE_NET_EXIT75": r"--batches 256 ",  # the headline step hits a sticky CUDA error once
        "PYTEST_ARGS": "-k test_bench_gpu",
        "PYTEST_WORKERS": "0",  # xdist: see test_deadline_plugin_works_under_xdist
        "OPS_ARGS": "--models b0 --ops se --limit 1 --batch 1 --dtypes fp32 --device cpu --copy-mb 1 "
                    "--warmup-s 0 --min-time-s 0 --min-iters 1 --max-iters 2 --quiet",
        "SESSION_BUDGET": "570",
    }
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    assert "commit cafe1234" in summary and ", done" in summary
    # the headline first, the tests and op benchmarks after it
    steps = ("env", "build", "precompile", "pretune", "net256", "compile", "net1", "train", "tests", "ops")
    assert _summary_steps(summary) == list(steps), summary
    for step in ("env", "compile", "net1", "train", "tests", "ops"):
        assert re.search(rf"^{step}\s+rc=0\b", summary, re.M), summary
    assert re.search(r"^build\s+rc=1\b", summary, re.M), summary  # the fake nvcc fails
    assert re.search(r"^pretune\s+rc=69\b", summary, re.M), summary  # no GPU here: nothing tuned
    assert re.search(r"^precompile\s+rc=69\b", summary, re.M), summary  # nor compiled
    assert re.search(r"^net256\s+rc=0 .*\(exit 75: resumed 1x\)", summary, re.M), summary
    assert "NOTE: fused-cuda* providers and the ops' cuda provider dropped" in summary

    # what comes back from $OUT: at most 8 plain files with plain names
    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert len(files) <= 8
    assert {"summary.txt", "logs.tar.gz", "junit_gpu.xml", "ops.csv"} <= set(files)
    logs = _logs(out)
    all_models = "b0,b1,b2,b3,b4,b5,b6,b7"
    assert set(logs) == {f"{s}.log" for s in steps}
    assert "fake nvidia-smi" in logs["env.log"] and "commit cafe1234" in logs["env.log"]
    assert "archs 90" in logs["env.log"]
    assert "fake build: nvcc failed" in logs["build.log"]
    assert "no CUDA GPU is visible" in logs["pretune.log"] and "--batches 256,1,32" in logs["pretune.log"]
    assert "tuning_store.json" not in files, "no measured configs, no store"
    # the precompile plan: the fused-triton rows of net256, net1 and train (fused-cuda's build failure
    # does not touch it), in the precision of the network steps
    assert "no CUDA GPU is visible: nothing was compiled" in logs["precompile.log"]
    assert (f'--plan {all_models}:fused-triton:256,1:infer b0,b4:fused-triton:128:train --dtypes fp16 --jobs 8'
            in logs["precompile.log"]), logs["precompile.log"]

    # network runs: one run id for the session; the 75 is rerun with --resume, same command
    calls = _net_calls(env)
    run_id = calls[0]["run_id"]
    assert run_id and f"run {run_id}" in summary and all(c["run_id"] == run_id for c in calls)
    argvs = [c["argv"] for c in calls]
    assert len(argvs) == 7, argvs
    first, resumed, compile_b0, compile_b4, net1, train, train_compiled = argvs
    assert "--resume" not in first and resumed.count("--resume") == 1
    assert _without_time_budget([a for a in resumed if a != "--resume"]) == _without_time_budget(first)
    for argv in argvs:
        assert _arg(argv, "--out") == f"{out}/results.csv" and _arg(argv, "--dtypes") == "fp16"
        assert "fused-cuda" not in _arg(argv, "--providers"), argv  # dropped after the failed build
        assert float(_arg(argv, "--time-budget")) > 0
    assert (_arg(first, "--models"), _arg(first, "--batches"), _arg(first, "--providers")) == (
        all_models, "256", "eager,eager-folded,fused-triton")
    assert (_arg(compile_b0, "--models"), _arg(compile_b0, "--providers")) == ("b0", "compile,fused-triton+compile")
    assert (_arg(compile_b4, "--models"), _arg(compile_b4, "--providers")) == ("b4", "compile")
    assert (_arg(net1, "--models"), _arg(net1, "--batches"), _arg(net1, "--providers")) == (
        all_models, "1", "eager,eager-folded,fused-triton")
    assert (_arg(train, "--models"), _arg(train, "--batches"), _arg(train, "--providers"), _arg(train, "--modes")) == (
        "b0,b4", "128", "eager,fused-triton", "train")
    assert (_arg(train_compiled, "--models"), _arg(train_compiled, "--providers"), _arg(train_compiled, "--modes")) == (
        "b0", "compile,fused-triton+compile", "train")  # the compiled training steps last
    # ... and every command line parses: each printed its plan
    plan = "providers=['eager@channels_last', 'eager-folded@channels_last', 'fused-triton@channels_last']"
    assert "24 jobs" in logs["net256.log"] and plan in logs["net256.log"] and "batches=[256]" in logs["net256.log"]
    assert "exit 75" in logs["net256.log"] and "rerunning with --resume" in logs["net256.log"]
    assert "2 jobs: models=['b0'] batches=[256]" in logs["compile.log"]
    assert "1 jobs: models=['b4'] batches=[256]" in logs["compile.log"]
    assert "24 jobs" in logs["net1.log"] and plan in logs["net1.log"] and "batches=[1]" in logs["net1.log"]
    assert "4 jobs: models=['b0', 'b4'] batches=[128]" in logs["train.log"]
    assert "2 jobs: models=['b0'] batches=[128]" in logs["train.log"]

    # tests: parity files first, short tracebacks, a per-test timeout, no JIT rebuild of the
    # extension whose build failed
    cmd = next(line for line in logs["tests.log"].splitlines() if line.startswith("+ ") and " pytest " in line)
    order = [cmd.index(f) for f in ("tests/test_ops_parity.py", "tests/test_triton_gpu.py", "tests/test_cuda_ops.py",
                                    "tests/test_convert_torchvision_timm.py", "tests/test_auto_table.py",
                                    "tests/test_bench_gpu.py")]
    assert order == sorted(order), cmd
    assert cmd.count("tests/test_ops_parity.py") == 1 and " tests " not in cmd + " "
    assert "--tb=short" in cmd and "--timeout 20" in cmd and '-m gpu or adapters' in cmd
    assert "EFFNET_PYTEST_NO_CUDA_BUILD=the build step left no usable" in cmd
    assert 'tests="' in (out / "junit_gpu.xml").read_text()
    assert "--providers eager,triton " in logs["ops.log"]


def test_a_step_that_hangs_keeps_its_slot_and_the_resume_loop_is_bounded(tmp_path):
    out = tmp_path / "out"
    env = {
        **_fake_tools(tmp_path), "OUT": str(out), "EFFNET_COMMIT": "x",
        "STEPS": "net256,net1", "SESSION_BUDGET": "60", "T_NET256": "11", "T_NET1": "25",
        "FAKE_NET_SLEEP": r"--batches 256 ", "FAKE_NET_EXIT75": r"--batches 1 ", "FAKE_NET_EXIT75_ALWAYS": "1",
        "MAX_RESUMES": "2",
    }
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.monotonic() - t0 < 40
    summary = (out / "summary.txt").read_text()
    assert re.search(r"^net256\s+rc=124\s+1[12]s \(timed out\)", summary, re.M), summary
    assert re.search(r"^net1\s+rc=75 .*\(exit 75: resumed 2x, then gave up\)", summary, re.M), summary
    net1 = [c["argv"] for c in _net_calls(env) if _arg(c["argv"], "--batches") == "1"]
    assert ["--resume" in a for a in net1] == [False, True, True]


def test_session_skips_steps_once_the_budget_is_used_up(tmp_path):
    out = tmp_path / "out"
    env = {**_fake_tools(tmp_path), "OUT": str(out), "EFFNET_COMMIT": "x",
           "STEPS": "net256,net1", "SESSION_BUDGET": "20"}
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    for step in ("net256", "net1"):
        assert re.search(rf"^{step}\s+skipped: session budget used up", summary, re.M), summary
    assert _net_calls(env) == []
    assert {p.name for p in out.iterdir()} <= {"summary.txt", "logs.tar.gz"}


def test_session_budget_ends_the_script_30_s_before_the_device_command_limit():
    text = SCRIPT.read_text()
    assert 'SESSION_BUDGET="${SESSION_BUDGET:-570}"' in text
    slots = dict(re.findall(r'^step (\w+) "\$\{T_\w+:-(\d+)\}"', text, re.M))
    default = re.search(r'STEPS="\$\{STEPS:-([\w,]+)\}"', text).group(1).split(",")
    assert default == ["env", "build", "precompile", "pretune", "net256", "compile", "net1", "train", "tests", "ops"]
    assert sum(int(slots[s]) for s in default) == 570 - 20  # 20 s for the summary


def _run_pytest(tmp_path: Path, deadline: float | str | None) -> tuple[subprocess.CompletedProcess, str]:
    # test_first runs past the deadline (it moves the deadline to "now" when it has none:
    # deterministic however slowly pytest starts); test_second would start after it
    (tmp_path / "test_slow.py").write_text(
        "import os, time\n"
        "def test_first():\n"
        "    if os.environ.get('EFFNET_PYTEST_DEADLINE') == 'at-first-test':\n"
        "        os.environ['EFFNET_PYTEST_DEADLINE'] = str(time.time())\n"
        "    time.sleep(0.1)\n"
        "def test_second():\n    pass\n"
    )
    env = child_pytest_env(PYTHONPATH=str(REPO))
    env.pop("EFFNET_PYTEST_DEADLINE", None)
    if deadline is not None:
        env["EFFNET_PYTEST_DEADLINE"] = str(deadline)
    junit = tmp_path / "junit.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-p", "benchmarks.pytest_deadline",
         f"--junitxml={junit}", "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_slow.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return proc, junit.read_text() if junit.exists() else ""


def test_deadline_plugin_skips_tests_that_would_start_late_and_junit_is_written(tmp_path):
    proc, junit = _run_pytest(tmp_path, "at-first-test")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 1 skipped" in proc.stdout
    assert "not run: session deadline passed" in proc.stdout
    assert "1 tests not run: the session deadline" in proc.stdout
    assert 'tests="2"' in junit and 'skipped="1"' in junit


@pytest.mark.parametrize("deadline", [None, "far"])
def test_deadline_plugin_is_inert_without_a_passed_deadline(tmp_path, deadline):
    proc, junit = _run_pytest(tmp_path, None if deadline is None else time.time() + 3600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout and "deadline" not in proc.stdout


def test_deadline_plugin_works_under_xdist(tmp_path):
    pytest.importorskip("xdist")
    (tmp_path / "test_x.py").write_text("def test_a():\n    pass\n\ndef test_b():\n    pass\n")
    env = child_pytest_env(PYTHONPATH=str(REPO), EFFNET_PYTEST_DEADLINE=str(time.time() - 1))
    junit = tmp_path / "junit.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "-p", "no:cacheprovider", "-p", "benchmarks.pytest_deadline",
         f"--junitxml={junit}", "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_x.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 tests not run: the session deadline" in proc.stdout
    assert 'skipped="2"' in junit.read_text()


def test_no_cuda_build_switch_stops_jit_builds_in_every_test_process(tmp_path):
    # after a failed build step the GPU tests must not repeat the build in every process
    (tmp_path / "test_build.py").write_text(
        "import pytest\n"
        "from effnet_kernels import _build\n"
        "def test_jit_build_fails_at_once():\n"
        "    with pytest.raises(_build.BuildError, match='build step failed'):\n"
        "        _build.jit_build(['90'], builder=lambda cfg: pytest.fail('built'))\n"
    )
    env = child_pytest_env(PYTHONPATH=str(REPO), EFFNET_PYTEST_NO_CUDA_BUILD="the build step failed")
    env.pop("EFFNET_PYTEST_DEADLINE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "benchmarks.pytest_deadline",
         "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_build.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout + proc.stderr
