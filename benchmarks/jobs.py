"""Run one provider on one (model, batch, precision): gate it, then time each mode.

A :class:`Case` holds what every provider of one (model, batch) shares: the eager model
(BatchNorm calibrated), the rotated input buffers (the same data for every provider), the
fp32 reference output and what the checks need (:func:`prepare_checks`: a sub-batch, its
fp32 reference, the model's sensitivity). :func:`run_provider` returns one result row per
mode; a provider that fails a check or raises gets ``status = "failed: <check>: ..."`` rows
and no timings. The checks (see :mod:`benchmarks.gate`):

1. **network**: the output for buffer 0 in the job's precision vs eager fp32;
2. fused providers (a model with :class:`effnet_kernels.MBConv` blocks, looked for through
   ``_orig_mod`` for compiled ones) also: the **fp32** gate (the provider's kernels in fp32,
   TF32 off, on :data:`SUB_BATCH` images, at a tight tolerance) and **blockwise** parity
   (:func:`effnet_kernels.testing.blockwise_parity` on the sub-batch in the job's
   precision, each fused block fed exactly the input its eager twin saw). For compiled
   providers both run on the module they wrap: they check the kernels, the network gate
   checks what the compiler made of them;
3. **sensitivity**: the job's strictest check must be able to tell this input from an
   unrelated one (else ``failed: insensitive: ...``).

A CUDA error that poisons the context (illegal address, launch failure, device-side
assert, ...; :func:`is_sticky_cuda_error`) raises :class:`StickyCudaError` carrying the
job's failed rows, so the runner can record them and stop (exit code 75, ``--resume``).
"""

from __future__ import annotations

import copy
import gc
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import gate
from .precision import element_size, precision
from .providers import ProviderSkipped, get_provider, unwrap
from .roofline import Roofline, bound_img_per_s, fraction_of_bound
from .timing import Timing, TimingConfig, capture_graphs, time_calls

__all__ = ["MODES", "LAYOUTS", "SUB_BATCH", "Case", "run_provider", "eager_error", "first_line", "free_memory",
           "prepare_checks", "has_fused_blocks", "is_sticky_cuda_error", "StickyCudaError", "TORCH_DTYPES"]

MODES = ("infer", "infer-graph", "train")
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "tf32": torch.float32}
#: Images of buffer 0 the fp32 gate, the block-wise check and the sensitivity probe run on.
SUB_BATCH = 2

# Messages of CUDA errors after which every later CUDA call in the process fails.
_STICKY_PATTERNS = (
    "illegal memory access", "illegal address", "illegal instruction", "misaligned address",
    "unspecified launch failure", "launch failure", "device-side assert", "device side assert",
    "hardware stack error", "invalid program counter", "uncorrectable ecc error", "cuda_error_illegal_address",
    "cudaerrorillegaladdress", "cudaerrorlaunchfailure", "cuda_error_launch_failed", "cudaerrorassert",
    "cuda_error_assert", "cudaerrormisalignedaddress", "cudaerrorillegalinstruction",
)


@dataclass
class Case:
    """One (model, batch) on one device, shared by every provider and precision."""

    name: str
    model: nn.Module  # eager, eval mode, NCHW, fp32, on device, BatchNorm calibrated
    resolution: int
    batch: int
    inputs: list[torch.Tensor]  # NCHW fp32 buffers, rotated while timing
    ref: torch.Tensor  # eager fp32 (TF32 off) output for inputs[0]
    device: torch.device
    rooflines: dict[int, Roofline]  # element size -> roofline
    copy_gb_per_s: float
    note: str = ""
    eager_errs: dict[str, float] = field(default_factory=dict)
    sub: Optional[torch.Tensor] = None  # inputs[0][:SUB_BATCH]
    sub_ref: Optional[torch.Tensor] = None  # eager fp32 (TF32 off, NCHW) output for sub
    sub_eager_fp32_err: float = 0.0  # eager's own fp32 error on sub: max(channels_last vs sub_ref, sub_ref vs fp64)
    sensitivity: float = math.nan  # rel_err(eager fp32 of an unrelated sub-batch, sub_ref)
    ref64: Optional[nn.Module] = None  # fp64 twin of model (prepare_checks; the block-wise check reuses it)


class StickyCudaError(RuntimeError):
    """A CUDA error poisoned the context; ``rows`` are the failing job's rows (status ``failed: ...``)."""

    def __init__(self, message: str, rows: list[dict]):
        super().__init__(message)
        self.rows = rows


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (CSV cells stay one line)."""
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:300] if msg else ''}".rstrip(": ")


def is_sticky_cuda_error(exc: BaseException, device: Optional[torch.device] = None) -> bool:
    """Whether ``exc`` left the CUDA context unusable.

    True when its message (or its cause's) names an error CUDA cannot recover from (illegal
    memory access, launch failure, device-side assert, ...), or when ``device`` is a CUDA
    device and a one-element probe on it now fails.
    """
    if isinstance(exc, (ProviderSkipped, torch.cuda.OutOfMemoryError)):
        return False
    seen, e = 0, exc
    while e is not None and seen < 5:
        text = str(e).lower()
        if any(p in text for p in _STICKY_PATTERNS):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    if device is not None and torch.device(device).type == "cuda":
        try:
            torch.cuda.synchronize(device)
            torch.ones(1, device=device).add_(1).item()
        except Exception:
            return True
    return False


def free_memory(device: torch.device) -> None:
    """On a CUDA device: collect garbage and return cached blocks, so the next job starts clean
    (on the CPU, where only tests run, reference counting suffices and a full collection per job
    would cost more than the job)."""
    if device.type == "cuda":
        gc.collect()
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


def prepare_checks(case: Case, seed: int = 0) -> Case:
    """Fill ``case.sub``, ``sub_ref``, ``sub_eager_fp32_err``, ``sensitivity`` and ``ref64`` (eager fp32
    and fp64 runs on :data:`SUB_BATCH` images of buffer 0 and of an unrelated buffer: buffer 1,
    else fresh ``randn``)."""
    k = min(SUB_BATCH, case.inputs[0].shape[0])
    case.sub = case.inputs[0][:k]
    if len(case.inputs) > 1:
        other = case.inputs[1][:k]
    else:
        gen = torch.Generator(case.device).manual_seed(seed + 104729)
        other = torch.randn(case.sub.shape, generator=gen, device=case.device)
    fp32 = _forward_fn(case.model, "fp32", case.device)
    case.sub_ref = fp32(case.sub).float()
    case.sensitivity = gate.rel_err(fp32(other), case.sub_ref)
    # eager's own fp32 rounding, the scale of the fp32 gate: channels_last vs NCHW (other
    # algorithms) and NCHW vs fp64, whichever is larger
    cl = copy.deepcopy(case.model).to(memory_format=torch.channels_last)
    out = _forward_fn(cl, "fp32", case.device)(case.sub.contiguous(memory_format=torch.channels_last))
    del cl
    if case.ref64 is None:
        case.ref64 = copy.deepcopy(case.model).to(torch.float64)
    with torch.no_grad():
        out64 = case.ref64(case.sub.double())
    case.sub_eager_fp32_err = max(gate.rel_err(out, case.sub_ref), gate.rel_err(case.sub_ref, out64))
    del out, out64
    return case


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


def has_fused_blocks(model: nn.Module) -> bool:
    """Whether ``model`` (or the module a ``torch.compile`` wrapper holds) has fused MBConv blocks."""
    try:
        from effnet_kernels.nn import MBConv
    except ImportError:
        return False
    return any(isinstance(m, MBConv) for m in unwrap(model).modules())


def _check_fp32(case: Case, model: nn.Module, fmt: torch.memory_format) -> gate.GateResult:
    out = _forward_fn(unwrap(model), "fp32", case.device)(case.sub.contiguous(memory_format=fmt))
    return gate.check_fp32(out, case.sub_ref, case.sub_eager_fp32_err)


def _check_blocks(case: Case, model: nn.Module, dtype: str, fmt: torch.memory_format):
    from effnet_kernels.testing import blockwise_parity

    return blockwise_parity(case.model, unwrap(model), case.sub.contiguous(memory_format=fmt),
                            dtype=TORCH_DTYPES[dtype], context=lambda: precision(dtype, case.device),
                            reference=case.ref64)


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
        "sensitivity": case.sensitivity,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    timing: Timing | None = values.pop("timing", None)
    if timing is not None:
        img_per_s = case.batch / (timing.ms_p50 / 1e3)
        row.update(
            img_per_s=img_per_s, ms_p20=timing.ms_p20, ms_p50=timing.ms_p50, ms_p80=timing.ms_p80,
            iters=timing.iters, frac_of_bound=fraction_of_bound(img_per_s, bound),
        )
    extra_note = values.pop("extra_note", "")
    if extra_note:
        row["note"] = "; ".join(n for n in (row["note"], extra_note) if n)
    row.update(values)
    return row


def _summary(what: str, result: gate.GateResult) -> str:
    return f"{what} {result.err:.2g}{'<=' if result.ok else '>'}{result.limit:.2g}"


def _gate_checks(case: Case, dtype: str, model: nn.Module, forward, x0: torch.Tensor, fmt) -> tuple[str, gate.GateResult, list[str]]:
    """Run every check of the job; ``(failure status or "", network result, check summaries)``."""
    base_err = eager_error(case, dtype)
    result = gate.check(forward(x0), case.ref, dtype, base_err)
    checks = [_summary("network", result)]
    if not result.ok:
        return f"failed: {result.reason}", result, checks
    limits = [result.limit]
    if has_fused_blocks(model):
        fp32 = _check_fp32(case, model, fmt)
        checks.append(_summary("fp32", fp32))
        limits.append(fp32.limit)
        if not fp32.ok:
            return (f"failed: fp32 gate: rel err {fp32.err:.3g} > limit {fp32.limit:.3g} "
                    f"(kernels in fp32, TF32 off, {case.sub.shape[0]} images)"), result, checks
        blocks = _check_blocks(case, model, dtype, fmt)
        bad = [b for b in blocks if not b.ok]
        worst = max((b.err / b.limit if b.limit > 0 else math.inf for b in blocks), default=0.0)
        checks.append(f"blocks {len(blocks) - len(bad)}/{len(blocks)} ok (worst {worst:.2g} of limit)")
        if not blocks:
            return "failed: blockwise: no fused block ran in the eager forward", result, checks
        if bad:
            return f"failed: blockwise: {len(bad)} of {len(blocks)} blocks: {bad[0]}", result, checks
    strictest = min(limits)
    checks.append(f"sensitivity {case.sensitivity:.2g}")
    if not gate.sensitive_enough(case.sensitivity, strictest):
        return (f"failed: insensitive: an unrelated input moves the eager fp32 output by {case.sensitivity:.3g} "
                f"(rel), less than {gate.SENSITIVITY_MARGIN:g} x the strictest check's limit {strictest:.3g}: "
                "the check cannot tell this output from another input's"), result, checks
    return "", result, checks


def run_provider(
    case: Case,
    dtype: str,
    provider_name: str,
    layout: str,
    modes: Sequence[str],
    cfg: TimingConfig,
) -> list[dict]:
    """Gate and time ``provider_name`` in ``layout`` and precision ``dtype``, one row per mode.

    Raises :class:`StickyCudaError` (with this job's failed rows) when a CUDA error poisoned
    the context; any other error becomes ``failed: ...`` rows.
    """
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"modes must be among {MODES}, got {mode!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, got {layout!r}")
    device = case.device
    fmt = LAYOUTS[layout]
    if case.sub is None:
        prepare_checks(case)

    def rows(status: str, **values) -> list[dict]:
        return [_row(case, dtype, layout, provider_name, mode, status=status, **values) for mode in modes]

    def sticky(exc: BaseException, done: list[dict], what: str) -> StickyCudaError:
        status = f"failed: {what}{first_line(exc)}"
        left = [_row(case, dtype, layout, provider_name, mode, status=status) for mode in modes[len(done):]]
        return StickyCudaError(status, done + left)

    try:
        provider = get_provider(provider_name)
        model = copy.deepcopy(case.model).to(memory_format=fmt)
        if provider.needs_example:
            model = provider.prepare(model, device, case.inputs[0][:1].contiguous(memory_format=fmt))
        else:
            model = provider.prepare(model, device)
    except ProviderSkipped as exc:
        return rows(f"skipped: {exc}")
    except Exception as exc:  # a provider that cannot even be built is a failure, not a crash
        if is_sticky_cuda_error(exc, device):
            raise sticky(exc, [], "prepare: ") from exc
        free_memory(device)
        return rows(f"failed: prepare: {first_line(exc)}")
    note = getattr(model, "_bench_note", "") or getattr(unwrap(model), "_bench_note", "")
    inputs = [x.contiguous(memory_format=fmt) for x in case.inputs]
    forward = _forward_fn(model, dtype, device)
    out_rows: list[dict] = []
    try:
        failure, result, checks = _gate_checks(case, dtype, model, forward, inputs[0], fmt)
        summary = "; ".join(checks)
        if failure:
            return rows(failure, max_rel_err=result.err, checks=summary, extra_note=note)
        for mode in modes:
            if mode == "train" and provider.inference_only:
                out_rows.append(_row(case, dtype, layout, provider_name, mode, checks=summary, extra_note=note,
                                     status=f"skipped: {provider_name} is inference-only"))
                continue
            row = _run_mode(case, dtype, layout, provider_name, mode, model, forward, inputs, result,
                            eager_error(case, dtype), cfg)
            row.update(checks=summary)
            if note:
                row["note"] = "; ".join(n for n in (row.get("note", ""), note) if n)
            out_rows.append(row)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # an asynchronous error surfaces in the job that caused it
        return out_rows
    except StickyCudaError as exc:  # from _run_mode: this mode's row; the modes after it did not run
        done = out_rows + exc.rows
        left = [_row(case, dtype, layout, provider_name, mode, status=str(exc)) for mode in modes[len(done):]]
        raise StickyCudaError(str(exc), done + left) from exc
    except Exception as exc:
        if is_sticky_cuda_error(exc, device):
            raise sticky(exc, out_rows, "") from exc
        done = len(out_rows)
        return out_rows + [
            _row(case, dtype, layout, provider_name, mode, status=f"failed: {first_line(exc)}") for mode in modes[done:]
        ]
    finally:
        del model, forward, inputs
        free_memory(device)


def _run_mode(case, dtype, layout, provider_name, mode, model, forward, inputs, result, base_err, cfg) -> dict:
    """One mode's row; a sticky CUDA error raises :class:`StickyCudaError` with that row."""
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
        status = f"failed: {mode}: {first_line(exc)}"
        if is_sticky_cuda_error(exc, device):
            raise StickyCudaError(status, [_row(case, dtype, layout, provider_name, mode, status=status)]) from exc
        free_memory(device)
        return _row(case, dtype, layout, provider_name, mode, status=status)
