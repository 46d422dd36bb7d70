"""The launch-config tuner's logic (pure Python; timings are faked, no GPU needed)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from effnet_kernels.triton import _tuning  # noqa: E402
from effnet_kernels.triton._tuning import Config  # noqa: E402

A, B, C = Config(16, 64), Config(32, 32), Config(64, 16, 8)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Tuning enabled, ``do_bench`` replaced by a table of timings; returns the log of timed configs."""
    import triton.testing

    timings = {A: 3.0, B: 1.0, C: 2.0}
    timed = []

    def do_bench(fn, **kwargs):
        fn()
        return timings[timed[-1]]

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(_tuning, "tuning_enabled", lambda t: True)
    _tuning.clear_cache()
    yield timed
    _tuning.clear_cache()


def test_times_every_candidate_once_and_caches_the_fastest(fake_gpu):
    spaces = []

    def space():
        spaces.append(1)
        return [A, B, C], A

    t = torch.empty(1)
    assert _tuning.choose("k", t, space, fake_gpu.append) == B
    assert fake_gpu == [A, B, C]
    assert _tuning.choose("k", t, space, fake_gpu.append) == B
    assert fake_gpu == [A, B, C] and len(spaces) == 1, "a cached key must not be timed or enumerated again"
    assert _tuning.choose("other", t, space, fake_gpu.append) == B and len(fake_gpu) == 6


def test_a_config_that_fails_loses(fake_gpu):
    def run(cfg):
        fake_gpu.append(cfg)
        if cfg == B:
            raise RuntimeError("out of resources")

    assert _tuning.choose("k", torch.empty(1), lambda: ([A, B, C], A), run) == C


def test_all_failing_falls_back_to_the_default(fake_gpu):
    def run(cfg):
        raise RuntimeError("no")

    assert _tuning.choose("k", torch.empty(1), lambda: ([A, B], C), run) == C


def test_without_tuning_the_default_is_used_and_not_cached(monkeypatch):
    _tuning.clear_cache()
    monkeypatch.setattr(_tuning, "tuning_enabled", lambda t: False)

    def run(cfg):
        raise AssertionError("nothing may be timed")

    assert _tuning.choose("k", torch.empty(1), lambda: ([A, B], C), run) == C
    assert "k" not in _tuning._cache


def test_tuning_is_off_on_cpu_and_by_environment(monkeypatch):
    assert not _tuning.tuning_enabled(torch.empty(1))
    if torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        monkeypatch.setenv(_tuning.TUNE_ENV_VAR, "0")
        assert not _tuning.tuning_enabled(torch.empty(1, device="cuda"))


def test_tuning_stops_when_the_process_budget_is_spent(fake_gpu, monkeypatch, capsys):
    """Compiling every candidate costs seconds: past the budget new shape classes get the default, uncached."""
    monkeypatch.setenv(_tuning.BUDGET_ENV_VAR, "1e-12")
    t = torch.empty(1)
    assert _tuning.choose("first", t, lambda: ([A, B, C], A), fake_gpu.append) == B, "the first class is tuned"
    assert len(fake_gpu) == 3
    assert _tuning.choose("second", t, lambda: ([A, B, C], C), fake_gpu.append) == C
    assert len(fake_gpu) == 3 and "second" not in _tuning._cache
    assert _tuning.choose("first", t, lambda: ([A, B, C], A), fake_gpu.append) == B, "tuned classes stay cached"
    assert capsys.readouterr().err.count("tuning budget used up") == 1
    _tuning.choose("third", t, lambda: ([A, B, C], C), fake_gpu.append)
    assert "tuning budget" not in capsys.readouterr().err, "said once per process"


def test_budget_zero_and_default(fake_gpu, monkeypatch):
    monkeypatch.setenv(_tuning.BUDGET_ENV_VAR, "0")
    assert _tuning.choose("k", torch.empty(1), lambda: ([A, B, C], C), fake_gpu.append) == C and fake_gpu == []
    monkeypatch.setenv(_tuning.BUDGET_ENV_VAR, "inf")
    assert _tuning.choose("k", torch.empty(1), lambda: ([A, B, C], C), fake_gpu.append) == B
    monkeypatch.setenv(_tuning.BUDGET_ENV_VAR, "not a number")
    assert _tuning.tuning_budget_s() == _tuning.DEFAULT_BUDGET_S
    monkeypatch.delenv(_tuning.BUDGET_ENV_VAR)
    assert _tuning.tuning_budget_s() == _tuning.DEFAULT_BUDGET_S


def test_a_failing_trial_still_counts_against_the_budget(fake_gpu, monkeypatch):
    monkeypatch.setenv(_tuning.BUDGET_ENV_VAR, "1e-12")

    def run(cfg):
        raise RuntimeError("out of resources")

    assert _tuning.choose("k", torch.empty(1), lambda: ([A, B], C), run) == C
    assert _tuning._spent_s > 0
    assert _tuning.choose("k2", torch.empty(1), lambda: ([A, B], C), fake_gpu.append) == C and fake_gpu == []


# --- the store on disk: timings faked, the GPU's identity faked (no GPU needed) ---------------------

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from effnet_kernels.triton import _tuning_store as store  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
H200 = store.Identity("NVIDIA H200", (9, 0), "3.6.0")


@pytest.fixture
def on_disk(tmp_path, monkeypatch, fake_gpu):
    """A fresh store directory, a fake GPU identity (mutable: ``ident[0] = ...``); returns (dir, ident, timed)."""
    ident = [H200]
    monkeypatch.setenv(store.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.delenv(store.MODE_ENV_VAR, raising=False)
    monkeypatch.setattr(_tuning, "interpreted", lambda t: False)
    monkeypatch.setattr(store, "device_identity", lambda t: ident[0])
    store.configure()
    _tuning.clear_cache()
    yield tmp_path, ident, fake_gpu
    store.configure()
    _tuning.clear_cache()


def pick(key="k", version="v1", space=lambda: ([A, B, C], A), run=None, timed=None):
    return _tuning.choose(key, torch.empty(1), space, run or timed.append, kernel_version=version)


def store_files(root):
    return sorted(p for p in Path(root).rglob("*.json"))


def test_a_tuned_config_is_stored_with_its_timings_and_reused_after_the_process_forgets(on_disk):
    root, _, timed = on_disk
    assert pick(timed=timed) == B and timed == [A, B, C]
    (path,) = store_files(root)
    assert path == root / "v1" / "NVIDIA_H200-sm90-triton3.6.0.json"
    data = json.loads(path.read_text())
    assert (data["format"], data["gpu"], data["capability"], data["triton"]) == (1, "NVIDIA H200", [9, 0], "3.6.0")
    (entry,) = data["entries"].values()
    assert entry["config"] == {"block_a": 32, "block_b": 32, "num_warps": 4}
    assert [ms for _, ms in entry["timings_ms"]] == [3.0, 1.0, 2.0] and entry["measured_at"]
    _tuning.clear_cache()  # as a new process: the memory is gone, the file stays
    assert pick(timed=timed) == B and len(timed) == 3, "a stored config must not be timed again"
    assert _tuning.source_of("k") == "store"


@pytest.mark.parametrize("change", ["gpu_name", "capability", "triton", "kernel", "shape"])
def test_entries_are_separated_by_gpu_capability_triton_kernel_version_and_shape_class(on_disk, change):
    root, ident, timed = on_disk
    pick(timed=timed)
    _tuning.clear_cache()
    key, version = "k", "v1"
    if change == "gpu_name":
        ident[0] = store.Identity("NVIDIA H100 80GB HBM3", (9, 0), "3.6.0")
    elif change == "capability":
        ident[0] = store.Identity("NVIDIA H200", (10, 0), "3.6.0")
    elif change == "triton":
        ident[0] = store.Identity("NVIDIA H200", (9, 0), "3.7.0")
    elif change == "kernel":
        version = "v2"  # the kernel's source changed: its old entries are stale
    else:
        key = "k2"
    assert pick(key, version, timed=timed) == B
    assert len(timed) == 6, f"a config measured for another {change} must not be reused"
    assert len(store_files(root)) == (1 if change in ("kernel", "shape") else 2)


def test_real_keys_are_encoded_canonically_and_odd_keys_stay_in_memory(on_disk):
    root, _, timed = on_disk
    key = ("dwconv", 0, "nhwc", torch.float16, 3, 1, 1, 1, "atomic", 128, 1024, 256, False)
    assert store.encode_key(key) == '["dwconv",0,"nhwc","torch.float16",3,1,1,1,"atomic",128,1024,256,false]'
    assert store.encode_key(("x", object())) is None
    pick(("x", object()), timed=timed)
    assert store_files(root) == [], "a key that is not plain data is not persisted"


def test_the_default_kernel_version_hashes_the_launcher_and_what_it_uses(tmp_path, monkeypatch):
    from effnet_kernels.triton import dwconv

    run = dwconv._timed_launch(None, False)
    version = store.kernel_version_for(run)
    assert version and version.startswith("effnet_kernels.triton.dwconv@")
    deps = store.kernel_dependencies("effnet_kernels.triton.dwconv")
    assert {"effnet_kernels.triton.dwconv", "effnet_kernels.triton._jit", "effnet_kernels.triton._activation",
            "effnet_kernels._launch"} <= set(deps)
    assert "effnet_kernels.triton._tuning" not in deps and store.kernel_version_for([].append) is None
    # editing the module's source gives a new version
    mod = tmp_path / "effnet_kernels_fake_kernel.py"
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    mod.write_text("from effnet_kernels.triton._jit import next_pow2\ndef run(cfg):\n    pass\n")
    m = importlib.import_module("effnet_kernels_fake_kernel")
    v1 = store.kernel_version_for(m.run)
    mod.write_text("from effnet_kernels.triton._jit import next_pow2\ndef run(cfg):\n    return None\n")
    monkeypatch.setattr(store, "_versions", {})
    assert v1 and store.kernel_version_for(m.run) not in (None, v1)
    assert "effnet_kernels.triton._jit" in store.kernel_dependencies("effnet_kernels_fake_kernel")


def test_a_stored_config_that_is_no_longer_a_candidate_is_not_used(on_disk):
    _, _, timed = on_disk
    pick(timed=timed)
    _tuning.clear_cache()
    assert pick(space=lambda: ([A, C], A), timed=timed) == C and len(timed) == 5


@pytest.mark.parametrize("content", ["{not json", '{"format": 99, "entries": {}}', "[]",
                                     '{"format": 1, "gpu": "NVIDIA H100", "capability": [9, 0], "triton": "3.6.0", '
                                     '"entries": {}}'])
def test_a_corrupt_or_foreign_file_is_ignored_with_one_line_and_replaced(on_disk, capsys, content):
    root, _, timed = on_disk
    path = root / "v1" / H200.filename
    path.parent.mkdir(parents=True)
    path.write_text(content)
    assert pick(timed=timed) == B and len(timed) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ignoring Triton tuning store" in err[0] and str(path) in err[0]
    data = json.loads(path.read_text())  # the next write replaced it with a valid file
    assert data["format"] == 1 and len(data["entries"]) == 1


def test_a_malformed_entry_is_ignored(on_disk, capsys):
    root, _, timed = on_disk
    pick(timed=timed)
    (path,) = store_files(root)
    data = json.loads(path.read_text())
    for entry in data["entries"].values():
        entry["config"] = {"block_a": 32, "tile_z": 7}
    path.write_text(json.dumps(data))
    _tuning.clear_cache()
    assert pick(timed=timed) == B and len(timed) == 6
    assert "ignoring tuning store entry" in capsys.readouterr().err


def test_an_unwritable_store_warns_and_tuning_still_works(on_disk, monkeypatch, capsys, tmp_path):
    _, _, timed = on_disk
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv(store.CACHE_ENV_VAR, str(blocker))  # mkdir under a file fails
    assert pick(timed=timed) == B
    assert "could not write the Triton tuning store" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["env", "api"])
def test_store_off_writes_and_reads_nothing_read_only_reads(on_disk, monkeypatch, how):
    root, _, timed = on_disk
    if how == "env":
        monkeypatch.setenv(store.MODE_ENV_VAR, "off")
    else:
        store.configure(mode="off")
    assert pick(timed=timed) == B and store_files(root) == [] and not root.joinpath("v1").exists()
    # a stored entry, then read-only: it is read, and new classes are not written
    store.configure(mode="rw") if how == "api" else monkeypatch.setenv(store.MODE_ENV_VAR, "rw")
    _tuning.clear_cache()
    pick(timed=timed)
    before = store_files(root)[0].read_text()
    store.configure(mode="ro") if how == "api" else monkeypatch.setenv(store.MODE_ENV_VAR, "ro")
    _tuning.clear_cache()
    n = len(timed)
    assert pick(timed=timed) == B and len(timed) == n, "read-only still reads"
    pick("k2", timed=timed)
    assert store_files(root)[0].read_text() == before, "read-only writes nothing"
    store.configure(mode="off") if how == "api" else monkeypatch.setenv(store.MODE_ENV_VAR, "off")
    _tuning.clear_cache()
    pick(timed=timed)
    assert len(timed) == n + 6, "off does not read"


def test_bad_store_modes(monkeypatch, capsys):
    with pytest.raises(ValueError, match="mode"):
        store.configure(mode="sometimes")
    monkeypatch.setenv(store.MODE_ENV_VAR, "sometimes")
    store.forget_loaded()
    assert store.mode() == "off" and store.MODE_ENV_VAR in capsys.readouterr().err


def test_store_location(monkeypatch, tmp_path):
    monkeypatch.setenv(store.CACHE_ENV_VAR, str(tmp_path / "x"))
    assert store.directory() == tmp_path / "x"
    monkeypatch.delenv(store.CACHE_ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert store.directory() == tmp_path / "xdg" / "effnet_kernels" / "tuning"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert store.directory() == Path.home() / ".cache" / "effnet_kernels" / "tuning"
    store.configure(path=tmp_path / "api")
    try:
        assert store.directory() == tmp_path / "api"
    finally:
        store.configure()


def test_nothing_is_stored_for_cpu_tensors(tmp_path, monkeypatch, fake_gpu):
    """The identity is the real one here: a CPU tensor has none, so nothing touches the disk."""
    monkeypatch.setenv(store.CACHE_ENV_VAR, str(tmp_path))
    assert store.device_identity(torch.empty(1)) is None
    assert pick(timed=fake_gpu) == B and store_files(tmp_path) == []


def test_usage_counts_say_where_each_class_came_from(on_disk, monkeypatch):
    _, _, timed = on_disk
    pick("stored", timed=timed)
    _tuning.clear_cache()
    _tuning.start_usage_log()
    pick("stored", timed=timed)
    pick("stored", timed=timed)  # a memory hit of a stored class is still a store class
    pick("new", timed=timed)
    pick("one", space=lambda: ([A], A), timed=timed)
    monkeypatch.setattr(_tuning, "tuning_enabled", lambda t: False)
    pick("untimed", timed=timed)
    assert _tuning.usage_counts() == {"store": 1, "tuned": 1, "fixed": 1, "default": 1}
    assert _tuning.usage_counts() == {}, "stopped"
    _tuning.start_usage_log()
    pick("stored", timed=timed)
    assert _tuning.usage_counts(stop=False) == {"store": 1} == _tuning.usage_counts()


# Processes: each child fakes the GPU identity and do_bench (timings from its argv), tunes the
# keys it is given, and prints what it chose and what it timed.
CHILD = r"""
import json, sys
import torch, triton.testing
from effnet_kernels.triton import _tuning, _tuning_store as store
from effnet_kernels.triton._tuning import Config
args = json.loads(sys.argv[1])
store.device_identity = lambda t: store.Identity(*args["identity"])
_tuning.interpreted = lambda t: False
_tuning.tuning_enabled = lambda t: True
timed = []
times = {json.dumps(c): ms for c, ms in args["times"]}
def do_bench(fn, **kw):
    fn()
    return times[json.dumps(list(timed[-1].__dict__.values()))]
triton.testing.do_bench = do_bench
if args.get("barrier"):  # say ready, then start with the other writers
    import os, pathlib, time
    barrier = pathlib.Path(args["barrier"])
    (barrier / f"ready-{os.getpid()}").touch()
    while not (barrier / "go").exists():
        time.sleep(0.01)
space = lambda: ([Config(*c) for c, _ in args["times"]], Config(*args["times"][0][0]))
chose = [_tuning.choose(k, torch.empty(1), space, timed.append, kernel_version=args["version"]).__dict__
         for k in args["keys"]]
print(json.dumps({"chose": chose, "timed": len(timed), "sources": [_tuning.source_of(k) for k in args["keys"]]}))
"""


def child(root, keys, times, version="v1", identity=("NVIDIA H200", [9, 0], "3.6.0"), wait=True, barrier=None):
    env = {**os.environ, store.CACHE_ENV_VAR: str(root), "PYTHONPATH": str(REPO)}
    env.pop(store.MODE_ENV_VAR, None)
    arg = json.dumps({"keys": keys, "times": times, "version": version, "identity": list(identity),
                      "barrier": barrier and str(barrier)})
    p = subprocess.Popen([sys.executable, "-c", CHILD, arg], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    if not wait:
        return p
    return finish(p)


def finish(p):
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


TIMES = [[[16, 64, 4], 3.0], [[32, 32, 4], 1.0], [[64, 16, 8], 2.0]]


def test_a_fresh_process_reuses_what_another_process_tuned(tmp_path):
    first = child(tmp_path, ["a", "b"], TIMES)
    assert first["timed"] == 6 and first["sources"] == ["tuned", "tuned"]
    assert first["chose"][0] == {"block_a": 32, "block_b": 32, "num_warps": 4}
    # the second process would choose differently if it timed: it must not time
    flipped = [[c, -ms] for c, ms in TIMES]
    second = child(tmp_path, ["a", "b", "c"], flipped)
    assert second["chose"][:2] == first["chose"] and second["sources"] == ["store", "store", "tuned"]
    assert second["timed"] == 3 and second["chose"][2] == {"block_a": 16, "block_b": 64, "num_warps": 4}
    third = child(tmp_path, ["a"], flipped, version="v2")  # the kernel changed since
    assert third["sources"] == ["tuned"] and third["chose"][0]["block_a"] == 16


def test_concurrent_writers_keep_every_entry_and_a_valid_file(tmp_path):
    """Both processes start writing at the same moment (a file barrier), 100 entries each, each
    entry a read-merge-replace of the whole file."""
    import time

    barrier = tmp_path / "barrier"
    barrier.mkdir()
    keys = [[f"p{i}-{j}" for j in range(100)] for i in range(2)]
    procs = [child(tmp_path / "store", ks, TIMES, wait=False, barrier=barrier) for ks in keys]
    deadline = time.time() + 300
    while len(list(barrier.glob("ready-*"))) < 2 and time.time() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    (barrier / "go").touch()
    results = [finish(p) for p in procs]
    assert all(r["timed"] == 300 for r in results)
    tmp_path = tmp_path / "store"
    (path,) = store_files(tmp_path)
    data = json.loads(path.read_text())
    assert len(data["entries"]) == 200, "a writer's entries were lost"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"
    assert child(tmp_path, keys[0] + keys[1], TIMES)["timed"] == 0


# --- on a GPU: real compiles, real timings (run by `pytest -m gpu`) ----------------------------------

GPU_CHILD = r"""
import json, torch, triton.testing
import effnet_kernels as ek
from effnet_kernels.triton import _tuning
def no_timing(*a, **k):
    raise AssertionError("a stored class must not be timed")
triton.testing.do_bench = no_timing
dev = "cuda"
torch.manual_seed(0)
x = torch.randn(8, 240, 28, 28, device=dev, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
w, s, b = torch.randn(240, 1, 3, 3, device=dev) * 0.3, torch.rand(240, device=dev) + 0.5, torch.randn(240, device=dev)
_tuning.start_usage_log()
ek.ops.dwconv_bn_act(x, w, s, b, padding=(1, 1, 1, 1), squeeze=True, backend="triton")
torch.cuda.synchronize()
print(json.dumps({"counts": _tuning.usage_counts(), "chose": [c.__dict__ for c in _tuning._cache.values()]}))
"""


def gpu_env(root):
    env = {**os.environ, store.CACHE_ENV_VAR: str(root), "PYTHONPATH": str(REPO), _tuning.TUNE_ENV_VAR: "1",
           _tuning.BUDGET_ENV_VAR: "inf"}
    for var in (store.MODE_ENV_VAR, "TRITON_INTERPRET"):
        env.pop(var, None)
    return env


@pytest.mark.gpu
def test_gpu_a_class_tuned_here_is_reused_by_a_fresh_process_without_timing(tmp_path, monkeypatch):
    import effnet_kernels as ek

    monkeypatch.setenv(store.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.delenv(store.MODE_ENV_VAR, raising=False)
    monkeypatch.setenv(_tuning.TUNE_ENV_VAR, "1")
    monkeypatch.setenv(_tuning.BUDGET_ENV_VAR, "inf")
    store.configure()
    _tuning.clear_cache()
    dev = "cuda"
    x = torch.randn(8, 240, 28, 28, device=dev, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    w, s, b = torch.randn(240, 1, 3, 3, device=dev) * 0.3, torch.rand(240, device=dev) + 0.5, torch.randn(240, device=dev)
    _tuning.start_usage_log()
    ek.ops.dwconv_bn_act(x, w, s, b, padding=(1, 1, 1, 1), squeeze=True, backend="triton")
    torch.cuda.synchronize()
    assert _tuning.usage_counts() == {"tuned": 1}
    (path,) = store_files(tmp_path)
    assert torch.cuda.get_device_name() in json.loads(path.read_text())["gpu"]
    (entry,) = json.loads(path.read_text())["entries"].values()
    assert len(entry["timings_ms"]) >= 2 and all(ms > 0 for _, ms in entry["timings_ms"])
    out = subprocess.run([sys.executable, "-c", GPU_CHILD], env=gpu_env(tmp_path), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["counts"] == {"store": 1} and got["chose"] == [entry["config"]]
    _tuning.clear_cache()


@pytest.mark.gpu
def test_gpu_pretune_command_fills_the_store_and_a_second_run_reads_it(tmp_path):
    args = [sys.executable, "-m", "benchmarks.tune", "--models", "b0", "--batches", "64", "--limit", "2"]
    first = subprocess.run(args, cwd=REPO, env=gpu_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "tuned" in first.stderr and store_files(tmp_path)
    second = subprocess.run(args, cwd=REPO, env=gpu_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    lines = [ln for ln in second.stderr.splitlines() if ln.startswith("[")]
    assert len(lines) == 2 and not [ln for ln in lines if "tuned" in ln], second.stderr


# --- the shipped table (read only) and --promote ------------------------------------------------------

def test_the_shipped_table_holds_only_measured_entries():
    data = json.loads(store.SHIPPED_TABLE.read_text())
    assert data["format"] == store.FORMAT and isinstance(data["files"], dict)
    for name, f in data["files"].items():
        ident = store.Identity(f["gpu"], tuple(f["capability"]), f["triton"])
        assert name == ident.filename and f["gpu"]
        for key, entry in f["entries"].items():
            assert entry["timings_ms"] and entry["measured_at"] and entry["config"], key


def _table_with(path, entries, ident=H200):
    path.write_text(json.dumps({"format": 1, "files": {ident.filename: {**ident.header(), "entries": entries}}}))


def test_a_shipped_entry_is_used_without_timing_and_the_users_store_wins(on_disk, tmp_path_factory, monkeypatch):
    root, _, timed = on_disk
    tmp_path = tmp_path_factory.mktemp("table")
    table = tmp_path / "table.json"
    key = store.entry_key("v1", store.encode_key("k"))
    _table_with(table, {key: {"config": {"block_a": 64, "block_b": 16, "num_warps": 8}, "timings_ms": [[{}, 1.0]]}})
    monkeypatch.setattr(store, "SHIPPED_TABLE", table)
    assert pick(timed=timed) == C and timed == [] and _tuning.source_of("k") == "shipped"
    assert store_files(root) == [], "a shipped config is not copied into the store"
    store.configure(mode="off")
    _tuning.clear_cache()
    assert pick(timed=timed) == B and len(timed) == 3, "off reads no table either"
    store.configure(mode="rw")
    monkeypatch.setattr(store, "SHIPPED_TABLE", tmp_path / "none.json")
    _tuning.clear_cache()
    assert pick(timed=timed) == B and len(timed) == 6  # now the user's store has B for k
    monkeypatch.setattr(store, "SHIPPED_TABLE", table)
    _tuning.clear_cache()
    assert pick(timed=timed) == B and _tuning.source_of("k") == "store"
    _table_with(table, {key: {"config": {"block_a": 64, "block_b": 16, "num_warps": 8}}},
                ident=store.Identity("NVIDIA H100", (9, 0), "3.6.0"))
    store.configure(mode="rw", path=tmp_path / "empty")
    _tuning.clear_cache()
    assert pick(timed=timed) == B and _tuning.source_of("k") == "tuned", "another GPU's table entry is not used"


def test_promote_keeps_measured_entries_of_the_current_kernel_sources(tmp_path):
    from effnet_kernels.triton import dwconv  # noqa: F401  (its version is computed from the sources here)

    now = store.kernel_version_of("effnet_kernels.triton.dwconv")
    shape = store.encode_key(("dwconv", 0))
    measured = {"config": {"block_a": 32, "block_b": 32, "num_warps": 4}, "timings_ms": [[{}, 1.0]],
                "measured_at": "2026-12-01T00:00:00Z"}
    src = tmp_path / "tuning_store.json"
    src.write_text(json.dumps({**H200.header(), "entries": {
        store.entry_key(now, shape): measured,
        store.entry_key("effnet_kernels.triton.dwconv@0000000000000000", shape): measured,
        store.entry_key(now, store.encode_key(("dwconv", 1))): {"config": {"block_a": 1, "block_b": 1}},
    }}))
    table = tmp_path / "table.json"
    out = subprocess.run([sys.executable, "-m", "benchmarks.tune", "--promote", str(src), "--table", str(table)],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "1 entries kept, 1 stale" in out.stdout and "1 without timings" in out.stdout
    data = json.loads(table.read_text())
    assert list(data["files"][H200.filename]["entries"]) == [store.entry_key(now, shape)]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    out = subprocess.run([sys.executable, "-m", "benchmarks.tune", "--promote", str(bad), "--table", str(table)],
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2 and "store_files" in out.stderr and str(bad) in out.stderr
