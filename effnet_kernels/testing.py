"""Evidence that can fail: sensitive models and the parity rule for whole networks and blocks.

A whole-model parity check only means something when the model's output depends on its
input. With random BatchNorm running statistics it hardly does (B0's logits for two
unrelated batches differ by ~2e-7 relative), so every whole-model check here works on a
model whose BatchNorm statistics were *calibrated* on a real forward pass
(:func:`calibrate_batchnorm`) and asserts its sensitivity (:func:`sensitivity`).

The parity rule (DESIGN.md): the error of the model under test against an fp64 run of the
eager model is at most ``factor`` (2 forward) times the error of eager PyTorch in the same
precision against that fp64 run, plus a small floor (:func:`parity_limit`). Deep
calibrated networks amplify rounding, so :func:`blockwise_parity` also compares block by
block, giving each fused block exactly the input its eager twin saw.

Used by the test suite, ``python -m effnet_kernels demo`` and the benchmark's gate.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Optional, Sequence

import torch
from torch import nn

Tensor = torch.Tensor

__all__ = [
    "calibrate_batchnorm",
    "sensitivity",
    "assert_sensitive",
    "ParityResult",
    "parity_limit",
    "max_abs_err",
    "model_parity",
    "blockwise_parity",
    "block_inputs",
    "fused_block_names",
    "train_step_parity",
    "BLIND_EAGER_FRACTION",
    "FLOOR",
    "FORWARD_FACTOR",
    "BACKWARD_FACTOR",
]

FORWARD_FACTOR = 2.0
BACKWARD_FACTOR = 3.0
# Floor, relative to max |fp64 reference|, so that a result eager PyTorch gets exactly
# right (error 0) does not demand 0 of the model under test. Far below any planted
# defect's effect (a 1% gate skew in one block moves B0's logits by ~1e-3 relative).
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
# DESIGN.md's fp32 rule, relative to max |fp64 reference|: forward, backward. The training checks
# allow the larger of it and the factor rule in fp32 (two fp32 errors of ~1e-6 relative differ by
# more than 3x in the tail of hundreds of tensors; 1e-4 is still far below any planted defect).
FP32_RELATIVE = {FORWARD_FACTOR: 1e-5, BACKWARD_FACTOR: 1e-4}
# A training check is blind where eager's own error and the model's are both over this fraction of
# the quantity's max |fp64| (a quarter: under two bits agree): the runs have diverged (a chaotic
# step: batch statistics over a few values, ReLU kinks crossed in one run and not another, a step
# that overflows) and a ratio of two such errors tells nothing of a defect. The suite's informative
# training checks have eager within 0.25 (fp32 networks at most 0.06, fp16 autocast B0 0.09-0.15,
# bf16 blocks 0.09, MobileNetV3's blocks under fp16 autocast 0.23 where the model is as far off).
BLIND_EAGER_FRACTION = 0.25

_BN = nn.modules.batchnorm._BatchNorm


def calibrate_batchnorm(model: nn.Module, x: Tensor, *, jitter: float = 0.1, seed: int = 0) -> nn.Module:
    """Jitter every BatchNorm's affine lightly, then set its running statistics from a forward pass of ``x``.

    The affine parameters are jittered first (``weight *= 1 + jitter * N(0, 1)``,
    ``bias += jitter * N(0, 1)``, from a generator seeded with ``seed``), so folding them is
    never a no-op. Then each BatchNorm's running mean and variance become exactly the
    statistics of its input over the batch ``x`` (a cumulative average over one batch,
    stored as BatchNorm stores it: the unbiased variance; the other modules stay in their
    current mode, so dropout and stochastic depth stay off in an eval model). The model's
    output then depends on its input, which makes parity checks on it meaningful. Calibrate on the batch the check runs on (or one like it), with
    enough values per channel at the last stage (batch x pixels; 8 or more: e.g. B0 at 64 px
    with batch 2): statistics taken from 2 values make deep stages amplify their input, up
    to fp16 overflow.

    Args:
        model: any module; modified in place (its training flags are restored).
        x: a representative input batch (random is fine; at least 2 samples).
        jitter: relative size of the affine jitter (0 to keep the affine as is).
        seed: seed of the jitter.

    Returns:
        ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] < 2:
        raise ValueError(f"x must be a batch of at least 2 samples to calibrate BatchNorm, got shape {list(x.shape)}")
    if not math.isfinite(jitter) or jitter < 0:
        raise ValueError(f"jitter must be a finite number >= 0, got {jitter}")
    if jitter > 0:
        # jitter first, calibrate after: statistics calibrated before a jitter no longer match
        # the activations, and channels of tiny variance amplify each mismatch ~1/sqrt(eps)
        # per layer (B7's residual stream grows to ~1e6 and fp32 rounding decides its logits)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, _BN) and m.affine:
                    c = m.num_features
                    m.weight.mul_((1 + jitter * torch.randn(c, generator=gen)).to(m.weight))
                    m.bias.add_((jitter * torch.randn(c, generator=gen)).to(m.bias))
    bns = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    saved = [(m, m.training, m.momentum) for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, exactly its statistics
            m.train()
        with torch.no_grad():
            model(x)
    finally:
        for m, training, momentum in saved:
            m.train(training)
            m.momentum = momentum
    return model


def _first_tensor(out: Any) -> Tensor:
    """The tensor a model returns (Hugging Face outputs: ``logits``; tuples: the first)."""
    if isinstance(out, Tensor):
        return out
    for attr in ("logits", "last_hidden_state"):
        value = getattr(out, attr, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot find the output tensor in a {type(out).__name__}")


def sensitivity(model: nn.Module, x: Tensor, other: Tensor) -> float:
    """``max |f(x) - f(other)| / max |f(x)|``: how much the output depends on the input."""
    with torch.no_grad():
        a = _first_tensor(model(x)).double()
        b = _first_tensor(model(other)).double()
    scale = float(a.abs().max()) if a.numel() else 0.0
    return float((a - b).abs().max()) / scale if scale > 0 else math.inf


def assert_sensitive(model: nn.Module, x: Tensor, tolerance: float, *, margin: float = 100.0) -> float:
    """Assert that an unrelated input moves the output by ``margin`` x ``tolerance`` or more.

    ``tolerance`` is the relative error (max abs error / max abs output) the parity check
    allows; an unrelated input is a fresh ``torch.randn_like(x)``. Returns the sensitivity.
    """
    s = sensitivity(model, x, torch.randn_like(x))
    assert s >= margin * tolerance, (
        f"the model is not sensitive to its input: an unrelated input changes the output by "
        f"{s:.3g} (relative), less than {margin:g} x the tolerance {tolerance:.3g}; a parity check on it is blind"
    )
    return s


def max_abs_err(out: Tensor, ref64: Tensor) -> float:
    """``max |out - ref64|`` in float64 (``inf`` for a shape mismatch, a non-finite ``out`` or a
    non-finite reference: an overflowed reference compares nothing)."""
    if tuple(out.shape) != tuple(ref64.shape):
        return math.inf
    if out.numel() == 0:
        return 0.0
    o = out.detach().to(device=ref64.device, dtype=torch.float64)
    if not bool(torch.isfinite(o).all()) or not bool(torch.isfinite(ref64).all()):
        return math.inf
    return float((o - ref64.detach().double()).abs().max())


def parity_limit(eager_err: float, ref_scale: float, dtype: torch.dtype, factor: float = FORWARD_FACTOR) -> float:
    """``factor * eager_err + FLOOR[dtype] * ref_scale``: the most error the rule allows."""
    floor = FLOOR.get(dtype, FLOOR[torch.float32])
    return factor * eager_err + floor * ref_scale


@dataclass(frozen=True)
class ParityResult:
    """One comparison by the parity rule (errors are max abs errors against fp64)."""

    what: str
    err: float  # model under test vs fp64
    eager_err: float  # eager PyTorch in the same precision vs fp64
    limit: float
    ref_scale: float  # max |fp64 reference|
    blind: str = ""  # why the comparison could not have failed (then it does not pass either)

    @property
    def ok(self) -> bool:
        """Within the limit, and the limit is a number: where eager's error or the reference is not
        finite (a run that overflowed), every error would be within it and nothing was checked."""
        return not self.blind and math.isfinite(self.limit) and self.err <= self.limit

    @property
    def rel_err(self) -> float:
        return self.err / self.ref_scale if self.ref_scale > 0 else (0.0 if self.err == 0 else math.inf)

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        if self.blind or not math.isfinite(self.limit):
            verdict = f"FAILED: a blind check ({self.blind or 'the reference or eager is not finite'})"
        return (f"{self.what}: error {self.err:.3g} (rel. {self.rel_err:.3g}) vs limit {self.limit:.3g} "
                f"(eager in the same precision: {self.eager_err:.3g}) {verdict}")


def _judge(what: str, out: Tensor, plain: Tensor, ref64: Tensor, dtype: torch.dtype, factor: float) -> ParityResult:
    scale = float(ref64.abs().max()) if ref64.numel() else 0.0
    eager_err = max_abs_err(plain, ref64)
    return ParityResult(what, max_abs_err(out, ref64), eager_err, parity_limit(eager_err, scale, dtype, factor), scale)


def _dtype_of(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _fp64_twin(eager: nn.Module) -> nn.Module:
    return copy.deepcopy(eager).to(torch.float64)


def model_parity(
    eager: nn.Module,
    model: nn.Module,
    x: Tensor,
    *,
    dtype: Optional[torch.dtype] = None,
    context: Callable[[], ContextManager] = contextlib.nullcontext,
    factor: float = FORWARD_FACTOR,
    reference: Optional[nn.Module] = None,
) -> ParityResult:
    """Whole-model parity: ``model(x)`` vs fp64 eager, judged against ``eager(x)`` in the same precision.

    Args:
        eager: the unconverted model, in the precision under test (e.g. ``.to(torch.bfloat16)``,
            or fp32 with an autocast ``context``).
        model: the model under test (typically ``convert(copy.deepcopy(eager))``).
        x: the input, already in the precision both models take.
        dtype: the precision under test, for the floor (default: ``eager``'s parameter dtype).
        context: a context both models run in (e.g. autocast); the fp64 reference runs outside it.
        factor: the rule's factor (2 forward).
        reference: an fp64 copy of ``eager`` to reuse (default: made here).
    """
    dtype = dtype or _dtype_of(eager)
    ref_model = reference if reference is not None else _fp64_twin(eager)
    with torch.no_grad():
        ref64 = _first_tensor(ref_model(x.to(torch.float64))).double()
        with context():
            plain = _first_tensor(eager(x))
            out = _first_tensor(model(x))
    return _judge("network output", out, plain, ref64, dtype, factor)


def fused_block_names(model: nn.Module) -> list[str]:
    """Qualified names of the fused blocks (:class:`effnet_kernels.MBConv`) in ``model``."""
    from .nn import MBConv

    return [name for name, m in model.named_modules() if isinstance(m, MBConv)]


def _to64(value: Any) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.detach().to(torch.float64)
    if isinstance(value, (tuple, list)):
        return type(value)(_to64(v) for v in value)
    return value


def blockwise_parity(
    eager: nn.Module,
    model: nn.Module,
    x: Tensor,
    *,
    names: Optional[Iterable[str]] = None,
    dtype: Optional[torch.dtype] = None,
    context: Callable[[], ContextManager] = contextlib.nullcontext,
    factor: float = FORWARD_FACTOR,
    reference: Optional[nn.Module] = None,
) -> list[ParityResult]:
    """Block-by-block parity: each block of ``model`` gets exactly the input its eager twin saw.

    ``eager`` runs once on ``x`` (inside ``context``) with hooks that record each named
    block's input. Then, per block, the block of ``model`` with that name, the eager
    block and an fp64 copy of the eager block each run on that recorded input (the fp64
    copy on its fp64 cast), and :func:`parity_limit` judges the block of ``model``.

    Args:
        eager: the unconverted model (same module names as ``model``).
        model: the model under test.
        x: the network input.
        names: the blocks to compare (default: every fused block of ``model``).
        dtype, context, factor, reference: as in :func:`model_parity`.

    Returns:
        One :class:`ParityResult` per block, in ``names`` order (empty when there are none).
    """
    dtype = dtype or _dtype_of(eager)
    names = list(fused_block_names(model) if names is None else names)
    eager_blocks = dict(eager.named_modules())
    model_blocks = dict(model.named_modules())
    missing = [n for n in names if n not in eager_blocks or n not in model_blocks]
    if missing:
        raise ValueError(f"names: blocks {missing} are not in both models")
    ref_model = reference if reference is not None else _fp64_twin(eager)
    ref_blocks = dict(ref_model.named_modules())
    seen = block_inputs(eager, x, names, context)
    results = []
    with torch.no_grad():
        for n in names:
            args, kwargs = seen[n]
            ref64 = _first_tensor(ref_blocks[n](*_to64(args), **kwargs)).double()
            with context():
                plain = _first_tensor(eager_blocks[n](*args, **kwargs))
                out = _first_tensor(model_blocks[n](*args, **kwargs))
            results.append(_judge(n, out, plain, ref64, dtype, factor))
    return results


def block_inputs(model: nn.Module, x: Tensor, names: Sequence[str],
                 context: Callable[[], ContextManager] = contextlib.nullcontext) -> dict[str, tuple[tuple, dict]]:
    """The ``(args, kwargs)`` each block named in ``names`` is first called with in one forward of
    ``model`` on ``x`` (no grad, under ``context``), by forward pre-hooks removed afterwards.

    Raises:
        ValueError: a name that is not a module of ``model``, or a block that did not run.
    """
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"names: blocks {missing} are not in the model")
    seen: dict[str, tuple[tuple, dict]] = {}

    def recorder(name: str):
        def hook(_module, args, kwargs):
            seen.setdefault(name, (args, kwargs))

        return hook

    handles = [modules[n].register_forward_pre_hook(recorder(n), with_kwargs=True) for n in names]
    try:
        with torch.no_grad(), context():
            model(x)
    finally:
        for h in handles:
            h.remove()
    for n in names:
        if n not in seen:
            raise ValueError(f"names: block {n!r} did not run in the eager forward")
    return seen


def failures(results: Sequence[ParityResult]) -> list[ParityResult]:
    """The results that broke the rule."""
    return [r for r in results if not r.ok]


def _grad_outputs(out: Tensor, seed: int) -> Tensor:
    """A fixed random projection of the output (float64), so the loss weighs every element differently."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device)


def _train_limit(eager_err: float, ref_scale: float, dtype: torch.dtype, factor: float) -> float:
    """:func:`parity_limit`, or in fp32 DESIGN.md's relative rule (:data:`FP32_RELATIVE`) where it allows more."""
    limit = parity_limit(eager_err, ref_scale, dtype, factor)
    return max(limit, FP32_RELATIVE[factor] * ref_scale) if dtype == torch.float32 else limit


def _judge_train(what: str, out: Tensor, plain: Tensor, ref64: Tensor, dtype: torch.dtype, factor: float) -> ParityResult:
    """:func:`_judge` with the training checks' limit (:func:`_train_limit`)."""
    r = _judge(what, out, plain, ref64, dtype, factor)
    return ParityResult(r.what, r.err, r.eager_err, _train_limit(r.eager_err, r.ref_scale, dtype, factor), r.ref_scale)


def _worst(what: str, pairs: Sequence[tuple[Tensor, Tensor, Tensor]], dtype: torch.dtype, factor: float) -> ParityResult:
    """One result for many tensors: the worst relative error of the model under test against the
    worst of eager, each over all ``(model, eager, fp64)`` tensors in ``pairs``.

    Relative to each tensor's max |fp64|. A tensor whose max |fp64| is under 1e-3 of the median of
    those over ``pairs`` is zero analytically (a BatchNorm bias feeding straight into another
    BatchNorm: ~1e-16 in fp64) and has no meaningful relative error: its error is taken relative to
    that median, the typical tensor of its kind. (Relative to 1e-3 of the median, as before, the
    rounding of those zero sums decided every half-precision comparison: under fp16 autocast eager's
    own worst was 5x the scale on timm's B0, the informative gradients never counted.)
    """
    scales = [float(ref64.abs().max()) if ref64.numel() else 0.0 for _, _, ref64 in pairs]
    median = float(torch.tensor(scales, dtype=torch.float64).median()) if scales else 0.0
    worst = worst_eager = 0.0
    for (out, plain, ref64), scale in zip(pairs, scales):
        scale = scale if scale >= 1e-3 * median else median
        err, eager_err = max_abs_err(out, ref64), max_abs_err(plain, ref64)
        if scale == 0.0:
            worst = max(worst, 0.0 if err == 0.0 else math.inf)
            continue
        if not math.isfinite(scale):  # an overflowed reference: nothing compared (and inf / inf is NaN)
            worst = worst_eager = math.inf
            continue
        worst, worst_eager = max(worst, err / scale), max(worst_eager, eager_err / scale)
    return ParityResult(what, worst, worst_eager, _train_limit(worst_eager, 1.0, dtype, factor), 1.0)


def train_step_parity(
    eager: nn.Module,
    model: nn.Module,
    x: Tensor,
    *,
    steps: int = 1,
    lr: float = 0.05,
    seed: int = 0,
    dtype: Optional[torch.dtype] = None,
    context: Callable[[], ContextManager] = contextlib.nullcontext,
    forward: Optional[Callable[[nn.Module, Tensor], Any]] = None,
    per_tensor: bool = True,
) -> list[ParityResult]:
    """Training parity over ``steps`` SGD steps against an fp64 twin of ``eager`` trained alongside.

    Judged by the rule (in fp32 also DESIGN.md's relative one, :data:`FP32_RELATIVE`, whichever
    allows more; forward factor for the first step's output; backward factor for gradients, for the
    state the optimizer steps leave and for the outputs of later steps, which that state computes):
    each step's output and every parameter gradient, and after the last step every parameter and
    floating BatchNorm buffer; integer buffers (``num_batches_tracked``) must be equal. With
    ``per_tensor=False`` the many tensors of a kind are judged together, the worst relative error of
    the model against the worst of eager (a deep network's training amplifies rounding, and the ratio
    of two random errors has a tail: per tensor is the precise check for a block, the worst-of
    comparison the robust one for a whole network). A result where eager and the model are both far
    off fp64 is blind, and fails (:data:`BLIND_EAGER_FRACTION`).

    All three models run in train mode from the same state, each step under the same seed
    (stochastic depth draws the same samples in every dtype where the library draws with
    ``bernoulli_``). The loss is ``sum(output * P)`` for a fixed random ``P`` (its gradient is ``P``).

    Args:
        eager: the unconverted model in the precision under test (or fp32 with an autocast ``context``).
        model: the model under test, with the same parameter and buffer names.
        x: the input, in the precision both take.
        steps, lr, seed: SGD steps (no momentum), learning rate, seed of step ``i`` is ``seed + i``.
        dtype, context: as in :func:`model_parity`.
        forward: ``forward(module, x)`` -> output (default ``module(x)``).
        per_tensor: one result per tensor (default) or one per kind.
    """
    dtype = dtype or _dtype_of(eager)
    run = forward or (lambda m, t: m(t))
    ref = _fp64_twin(eager)
    models = {"fp64": ref, "eager": eager, "model": model}
    for m in models.values():
        m.train()
    opts = {k: torch.optim.SGD(m.parameters(), lr=lr) for k, m in models.items()}
    results: list[ParityResult] = []

    def judge(what: str, items: dict[str, tuple[Tensor, Tensor, Tensor]], factor: float) -> None:
        if per_tensor:
            results.extend(_judge_train(f"{what} {name}", *t, dtype, factor) for name, t in items.items())
        elif items:
            results.append(_worst(f"{what} (worst of {len(items)})", list(items.values()), dtype, factor))

    for step in range(steps):
        outs, grads = {}, {}
        for key, m in models.items():
            m.zero_grad(set_to_none=True)
            torch.manual_seed(seed + step)
            if key == "fp64":
                out = _first_tensor(run(m, x.detach().to(torch.float64)))
            else:
                with context():
                    out = _first_tensor(run(m, x))
            (out.double() * _grad_outputs(out, seed + step)).sum().backward()
            outs[key] = out.detach()
            grads[key] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
            opts[key].step()
        # step 0's output is a forward of the given state; every later one is a forward of parameters
        # the optimizer made of gradients (as the state after the last step): the backward factor
        results.append(_judge_train(f"step {step} output", outs["model"], outs["eager"], outs["fp64"], dtype,
                                    FORWARD_FACTOR if step == 0 else BACKWARD_FACTOR))
        if grads["model"].keys() != grads["fp64"].keys():
            missing = sorted(set(grads["fp64"]) ^ set(grads["model"]))
            results.append(ParityResult(f"step {step} gradients of {missing}", math.inf, 0.0, 0.0, 1.0))
        judge(f"step {step} grad", {n: (grads["model"][n], grads["eager"][n], g) for n, g in grads["fp64"].items()
                                    if n in grads["model"]}, BACKWARD_FACTOR)
    states = {k: m.state_dict() for k, m in models.items()}
    params = dict(ref.named_parameters())
    floats = {n: (states["model"][n], states["eager"][n], v) for n, v in states["fp64"].items() if v.is_floating_point()}
    # the state after optimizer steps is made of gradients: judged with the backward factor
    judge(f"after {steps} steps: parameter", {n: t for n, t in floats.items() if n in params}, BACKWARD_FACTOR)
    judge(f"after {steps} steps: buffer", {n: t for n, t in floats.items() if n not in params}, BACKWARD_FACTOR)
    for name, v64 in states["fp64"].items():
        if not v64.is_floating_point() and not torch.equal(states["model"][name], v64):
            results.append(ParityResult(f"after {steps} steps: {name} = {states['model'][name].tolist()} "
                                        f"(eager: {v64.tolist()})", math.inf, 0.0, 0.0, 1.0))
    return [_unless_blind(r) for r in results]


def _unless_blind(r: ParityResult) -> ParityResult:
    """``r``, marked blind where eager's own error is over :data:`BLIND_EAGER_FRACTION` of the
    reference's scale (or not finite) and so is the model's. The rule's limit (a multiple of eager's
    error) would pass any defect there, so the model under test must itself be within that fraction
    of fp64; it is where eager alone is imprecise (autocast's fp16 SE convs, which the kernels run in
    fp32: 0.1% against eager's 39% on MobileNetV3's SE reduce gradient)."""
    def fraction(err: float) -> float:
        return err / r.ref_scale if r.ref_scale > 0 else (0.0 if err == 0 else math.inf)

    eager, model = fraction(r.eager_err), fraction(r.err)
    if eager <= BLIND_EAGER_FRACTION or model <= BLIND_EAGER_FRACTION:
        return r
    return dataclasses.replace(r, blind=f"eager's own error is {eager:.3g} of the reference's scale and this model's "
                                        f"{model:.3g}, both over {BLIND_EAGER_FRACTION}: the runs diverged, there is "
                                        "nothing to compare")
