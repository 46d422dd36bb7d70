"""Run one provider on one (model, batch, precision): gate it, then time each mode.

A :class:`Case` holds what every provider of one (model, batch) shares: the eager model,
the rotated input buffers (the same data for every provider) and the fp32 reference
output. :func:`run_provider` returns one result row per mode; a provider that fails the
gate or raises gets ``status = "failed: ..."`` rows and no timings.
"""

from __future__ import annotations

import copy
import gc
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import gate
from .precision import element_size, precision
from .providers import ProviderSkipped, get_provider
from .roofline import Roofline, bound_img_per_s, fraction_of_bound
from .timing import Timing, TimingConfig, capture_graphs, time_calls

__all__ = ["MODES", "LAYOUTS", "Case", "run_provider", "eager_error", "first_line", "free_memory"]

MODES = ("infer", "infer-graph", "train")
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}


@dataclass
class Case:
    """One (model, batch) on one device, shared by every provider and precision."""

    name: str
    model: nn.Module  # eager, eval mode, NCHW, fp32, on device
    resolution: int
    batch: int
    inputs: list[torch.Tensor]  # NCHW fp32 buffers, rotated while timing
    ref: torch.Tensor  # eager fp32 (TF32 off) output for inputs[0]
    device: torch.device
    rooflines: dict[int, Roofline]  # element size -> roofline
    copy_gb_per_s: float
    note: str = ""
    eager_errs: dict[str, float] = field(default_factory=dict)


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (CSV cells stay one line)."""
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:300] if msg else ''}".rstrip(": ")


def free_memory(device: torch.device) -> None:
    """Collect garbage and return cached CUDA blocks, so the next job starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _forward_fn(model: nn.Module, dtype: str, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), precision(dtype, device):
            return model(x)

    return forward


def _train_step(model: nn.Module, dtype: str, device: torch.device, num_classes: int, batch: int) -> Callable[[torch.Tensor], None]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    labels = torch.randint(0, num_classes, (batch,), device=device)

    def step(x: torch.Tensor) -> None:
        with precision(dtype, device):
            out = model(x)
            loss = F.cross_entropy(out.float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def eager_error(case: Case, dtype: str) -> float:
    """Eager PyTorch's own error (channels_last, precision ``dtype``) against the fp32 reference."""
    if dtype not in case.eager_errs:
        model = copy.deepcopy(case.model).to(memory_format=torch.channels_last)
        x = case.inputs[0].contiguous(memory_format=torch.channels_last)
        out = _forward_fn(model, dtype, case.device)(x)
        case.eager_errs[dtype] = gate.rel_err(out, case.ref)
        del model, out
        free_memory(case.device)
    return case.eager_errs[dtype]


def _timed(call: Callable[[int], object], case: Case, cfg: TimingConfig) -> tuple[Timing, float]:
    if case.device.type == "cuda":
        torch.cuda.synchronize(case.device)
        torch.cuda.reset_peak_memory_stats(case.device)
    timing = time_calls(call, len(case.inputs), case.device, cfg)
    peak = torch.cuda.max_memory_allocated(case.device) / 2**20 if case.device.type == "cuda" else float("nan")
    return timing, peak


def _row(case: Case, dtype: str, layout: str, provider: str, mode: str, **values) -> dict:
    rl = case.rooflines[element_size(dtype)]
    bound = bound_img_per_s(rl.bytes_per_image, case.copy_gb_per_s)
    row = {
        "model": case.name, "resolution": case.resolution, "batch": case.batch, "dtype": dtype,
        "layout": layout, "provider": provider, "mode": mode,
        "act_mb_per_img": rl.mb_per_image, "gflops_per_img": rl.gflops_per_image,
        "copy_gb_per_s": case.copy_gb_per_s, "bound_img_per_s": bound, "note": case.note,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    timing: Timing | None = values.pop("timing", None)
    if timing is not None:
        img_per_s = case.batch / (timing.ms_p50 / 1e3)
        row.update(
            img_per_s=img_per_s, ms_p20=timing.ms_p20, ms_p50=timing.ms_p50, ms_p80=timing.ms_p80,
            iters=timing.iters, frac_of_bound=fraction_of_bound(img_per_s, bound),
        )
    row.update(values)
    return row


def run_provider(
    case: Case,
    dtype: str,
    provider_name: str,
    layout: str,
    modes: Sequence[str],
    cfg: TimingConfig,
) -> list[dict]:
    """Gate and time ``provider_name`` in ``layout`` and precision ``dtype``, one row per mode."""
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"modes must be among {MODES}, got {mode!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, got {layout!r}")
    device = case.device
    fmt = LAYOUTS[layout]

    def rows(status: str, **values) -> list[dict]:
        return [_row(case, dtype, layout, provider_name, mode, status=status, **values) for mode in modes]

    try:
        provider = get_provider(provider_name)
        model = provider.prepare(copy.deepcopy(case.model).to(memory_format=fmt), device)
    except ProviderSkipped as exc:
        return rows(f"skipped: {exc}")
    except Exception as exc:  # a provider that cannot even be built is a failure, not a crash
        free_memory(device)
        return rows(f"failed: prepare: {first_line(exc)}")
    inputs = [x.contiguous(memory_format=fmt) for x in case.inputs]
    forward = _forward_fn(model, dtype, device)
    out_rows = []
    try:
        base_err = eager_error(case, dtype)
        result = gate.check(forward(inputs[0]), case.ref, dtype, base_err)
        if not result.ok:
            return rows(f"failed: {result.reason}", max_rel_err=result.err)
        for mode in modes:
            out_rows.append(_run_mode(case, dtype, layout, provider_name, mode, model, forward, inputs, result, base_err, cfg))
        return out_rows
    except Exception as exc:
        done = len(out_rows)
        return out_rows + [
            _row(case, dtype, layout, provider_name, mode, status=f"failed: {first_line(exc)}") for mode in modes[done:]
        ]
    finally:
        del model, forward, inputs
        free_memory(device)


def _run_mode(case, dtype, layout, provider_name, mode, model, forward, inputs, result, base_err, cfg) -> dict:
    device = case.device
    try:
        if mode == "infer":
            timing, peak = _timed(lambda i: forward(inputs[i]), case, cfg)
            return _row(case, dtype, layout, provider_name, mode, status="ok", timing=timing, peak_mem_mb=peak, max_rel_err=result.err)
        if mode == "infer-graph":
            if device.type != "cuda":
                return _row(case, dtype, layout, provider_name, mode, status="skipped: CUDA graphs need a CUDA device")
            replays, outs = capture_graphs(forward, inputs)
            try:
                replays[0]()
                graph_result = gate.check(outs[0], case.ref, dtype, base_err)
                if not graph_result.ok:
                    return _row(case, dtype, layout, provider_name, mode, status=f"failed: graph replay: {graph_result.reason}", max_rel_err=graph_result.err)
                timing, peak = _timed(lambda i: replays[i](), case, cfg)
            finally:
                del replays, outs
            return _row(case, dtype, layout, provider_name, mode, status="ok", timing=timing, peak_mem_mb=peak, max_rel_err=graph_result.err)
        # train: gated on the inference output above (dropout makes train outputs random)
        num_classes = case.ref.shape[-1]
        step = _train_step(model, dtype, device, num_classes, case.batch)
        timing, peak = _timed(lambda i: step(inputs[i]), case, cfg)
        model.eval()
        return _row(case, dtype, layout, provider_name, mode, status="ok", timing=timing, peak_mem_mb=peak, max_rel_err=result.err)
    except torch.cuda.OutOfMemoryError:
        free_memory(device)
        return _row(case, dtype, layout, provider_name, mode, status="failed: out of memory")
    except Exception as exc:
        free_memory(device)
        return _row(case, dtype, layout, provider_name, mode, status=f"failed: {mode}: {first_line(exc)}")
