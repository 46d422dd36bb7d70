"""Microbenchmarks of each op at B0-B7 layer shapes, with pytest-benchmark.

    pytest benchmarks/microbench --benchmark-json=benchmarks/results/microbench.json

Not collected by the default ``pytest`` run (``testpaths = tests``). Skipped without a
CUDA GPU unless ``MICROBENCH_DEVICE=cpu`` (a smoke run with the ``eager`` and ``torch``
providers). Each benchmark first checks the provider's output against a float64
reference, then times calls over rotated input buffers (each call synchronises the
device, so launch latency is included). ``extra_info`` holds the minimum bytes and the
achieved GB/s at the median.

Environment: ``MICROBENCH_MODELS`` (comma list, default b0..b7), ``MICROBENCH_BATCH``
(default 32), ``MICROBENCH_DTYPE`` (fp16), ``MICROBENCH_PROVIDERS`` (eager,triton,cuda).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from benchmarks import gate
from benchmarks.op_cases import DTYPES, cases_for_models, make_call, make_inputs, reference
from benchmarks.ops import check_output, main_output

DEVICE = torch.device(os.environ.get("MICROBENCH_DEVICE", "cuda"))
MODELS = os.environ.get("MICROBENCH_MODELS", "b0,b1,b2,b3,b4,b5,b6,b7").split(",")
BATCH = int(os.environ.get("MICROBENCH_BATCH", "32"))
DTYPE = os.environ.get("MICROBENCH_DTYPE", "fp16")
_DEFAULT_PROVIDERS = "eager,triton,cuda" if DEVICE.type == "cuda" else "eager,torch"
PROVIDERS = os.environ.get("MICROBENCH_PROVIDERS", _DEFAULT_PROVIDERS).split(",")
N_BUFFERS = 4

pytestmark = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU (or MICROBENCH_DEVICE=cpu)"
)

CASES = cases_for_models(MODELS, BATCH) if DEVICE.type == "cuda" or os.environ.get("MICROBENCH_DEVICE") else []


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=[f"{c.op}-{c.shape}" for c in CASES])
def test_op(benchmark, case, provider):
    from effnet_kernels import BackendUnavailableError

    dtype = DTYPES[DTYPE]
    gen = torch.Generator(DEVICE).manual_seed(0)
    inputs = [make_inputs(case, dtype, torch.channels_last, DEVICE, gen) for _ in range(N_BUFFERS)]
    ref = reference(case, inputs[0])
    eager_err = gate.rel_err(main_output(make_call(case, "eager", inputs[0])()), ref)
    try:
        calls = [make_call(case, provider, inp) for inp in inputs]
        out = calls[0]()
    except BackendUnavailableError as exc:
        pytest.skip(str(exc).splitlines()[0])
    result = check_output(case, out, ref, DTYPE, eager_err)
    assert result.ok, result.reason
    rotation = itertools.cycle(range(N_BUFFERS))

    def run(i):
        calls[i]()
        _sync()

    benchmark.pedantic(run, setup=lambda: ((next(rotation),), {}), rounds=50, warmup_rounds=5, iterations=1)
    min_bytes = case.min_bytes(torch.tensor([], dtype=dtype).element_size())
    median_s = benchmark.stats.stats.median
    benchmark.extra_info.update(
        op=case.op, shape=case.shape, model=case.model, dtype=DTYPE, provider=provider,
        min_bytes=min_bytes, gb_per_s=min_bytes / median_s / 1e9, max_rel_err=result.err,
    )
