"""benchmarks.timing, benchmarks.gate and benchmarks.env on the CPU."""

import math

import pytest
import torch

from benchmarks import env, gate
from benchmarks.timing import TimingConfig, quantiles, time_calls


def test_quantiles_hand_computed():
    samples = [float(v) for v in range(11)]  # 0..10
    assert quantiles(samples) == pytest.approx((2.0, 5.0, 8.0))
    assert quantiles([3.0]) == (3.0, 3.0, 3.0)
    with pytest.raises(ValueError):
        quantiles([])


def test_time_calls_rotates_inputs_and_respects_iteration_bounds():
    seen = []
    cfg = TimingConfig(warmup_iters=2, warmup_s=0.0, min_time_s=10.0, min_iters=5, max_iters=7)
    t = time_calls(seen.append, 3, "cpu", cfg)
    assert t.iters == 7  # min_time_s asks for more, max_iters caps
    assert len(seen) == 2 + 7
    assert seen == [i % 3 for i in range(9)]
    assert 0 <= t.ms_p20 <= t.ms_p50 <= t.ms_p80


def test_timing_config_validation():
    with pytest.raises(ValueError, match="max_iters"):
        TimingConfig(min_iters=10, max_iters=5)
    with pytest.raises(ValueError, match="warmup_iters"):
        TimingConfig(warmup_iters=0)
    with pytest.raises(ValueError, match="n_inputs"):
        time_calls(lambda i: None, 0, "cpu")


def test_rel_err_and_gate():
    ref = torch.randn(4, 10, dtype=torch.float64)
    noise = torch.randn(4, 10, dtype=torch.float64)
    out = ref + 1e-3 * noise
    assert gate.rel_err(out, ref) == pytest.approx(1e-3 * noise.norm().item() / ref.norm().item())
    bad = out.clone()
    bad[0, 0] = float("nan")
    assert gate.rel_err(bad, ref) == math.inf
    assert gate.rel_err(out[:2], ref) == math.inf
    assert gate.check(out.half(), ref, "fp16", eager_err=0.0).ok  # 1e-3 < fp16 floor 1e-2
    result = gate.check(out, ref, "fp32", eager_err=0.0)  # 1e-3 > fp32 floor 1e-4
    assert not result.ok and "output differs from eager" in result.reason
    assert gate.check(out, ref, "fp32", eager_err=1e-3).ok  # within 3x eager's own error
    with pytest.raises(ValueError, match="dtype"):
        gate.check(out, ref, "int8", 0.0)


def test_env(monkeypatch):
    monkeypatch.setenv(env.COMMIT_ENV, "abc123")
    versions = env.collect_versions("cpu")
    assert tuple(versions) == env.VERSION_COLUMNS
    assert versions["commit"] == "abc123" and versions["torch"] == torch.__version__ and versions["gpu"] == "cpu"
    assert env.measure_copy_bandwidth("cpu", 1 << 20, iters=3) > 0
    with pytest.raises(ValueError, match="nbytes"):
        env.measure_copy_bandwidth("cpu", 0)


def test_time_calls_cuda_path_brackets_only_timed_calls_and_syncs_before_reading(monkeypatch):
    """CUDA branch with a fake Event: warm-up calls are not timed, each timed call sits between
    its own start/end events on the current stream, and no elapsed time is read before a sync."""
    log = []

    class FakeEvent:
        count = 0

        def __init__(self, enable_timing=False):
            assert enable_timing
            FakeEvent.count += 1
            self.id = FakeEvent.count

        def record(self, stream=None):
            assert stream is None  # the current stream
            log.append(("record", self.id))

        def elapsed_time(self, end):
            assert log[-1] == ("sync",) or log[-1][0] == "elapsed", "elapsed_time read before synchronize"
            log.append(("elapsed", self.id))
            return float(end.id - self.id) * (self.id % 7 + 1)

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(("sync",)))
    cfg = TimingConfig(warmup_iters=2, warmup_s=0.0, min_time_s=0.0, min_iters=4, max_iters=4)
    t = time_calls(lambda i: log.append(("call", i)), 3, "cuda", cfg)
    assert t.iters == 4
    warm = log[:4]
    assert warm == [("call", 0), ("sync",), ("call", 1), ("sync",)]  # warm-up: untimed, synchronised
    timed = [e for e in log[4:] if e[0] in ("record", "call")]
    for k in range(4):
        start, call, end = timed[3 * k: 3 * k + 3]
        assert start[0] == "record" and end[0] == "record" and call == ("call", (2 + k) % 3)
    first_elapsed = next(n for n, e in enumerate(log) if e[0] == "elapsed")
    assert log[first_elapsed - 1] == ("sync",)
    assert sum(e[0] == "elapsed" for e in log) == 4


def test_capture_graphs_warms_up_on_a_side_stream_then_captures_into_one_pool(monkeypatch):
    """The documented capture recipe, checked with fakes: side stream waits for the current
    one, every input is warmed up on it, the current stream waits for it, then one graph per
    input is captured, all in one memory pool."""
    from benchmarks.timing import capture_graphs

    log, state = [], {"stream": "current", "capturing": None}

    class FakeStream:
        def __init__(self, name="side"):
            self.name = name

        def wait_stream(self, other):
            log.append(("wait", self.name, other.name))

    class StreamCtx:
        def __init__(self, s):
            self.s = s

        def __enter__(self):
            self.prev, state["stream"] = state["stream"], self.s.name

        def __exit__(self, *exc):
            state["stream"] = self.prev

    class FakeGraph:
        def replay(self):
            log.append(("replay", id(self)))

    class GraphCtx:
        def __init__(self, graph, pool=None):
            self.graph, self.pool = graph, pool

        def __enter__(self):
            state["capturing"] = self.graph
            log.append(("capture", self.pool))

        def __exit__(self, *exc):
            state["capturing"] = None

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", StreamCtx)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: FakeStream("current"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(("sync",)))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool-1")
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", GraphCtx)

    class FakeInput:
        device = torch.device("cuda")

        def __init__(self, k):
            self.k = k

    def fn(x):
        log.append(("fn", x.k, state["stream"], state["capturing"] is not None))
        return f"out{x.k}"

    replays, outs = capture_graphs(fn, [FakeInput(0), FakeInput(1)], warmup=2)
    assert outs == ["out0", "out1"] and len(replays) == 2
    assert log[0] == ("wait", "side", "current")
    warm = [e for e in log if e[0] == "fn" and not e[3]]
    assert warm == [("fn", 0, "side", False), ("fn", 1, "side", False)] * 2
    first_capture = log.index(("capture", "pool-1"))
    assert log.index(("wait", "current", "side")) < first_capture
    assert all(log.index(e) < first_capture for e in warm)
    assert [e for e in log if e[0] == "capture"] == [("capture", "pool-1")] * 2
    assert [e[1] for e in log if e[0] == "fn" and e[3]] == [0, 1]
