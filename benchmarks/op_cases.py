"""Op-level benchmark cases at B0-B7 layer shapes, and each provider's callable.

Shared by :mod:`benchmarks.ops` (the CSV runner) and ``benchmarks/microbench`` (the
pytest-benchmark suite). The cases:

* ``dwconv``: depthwise conv + BatchNorm + SiLU + SE squeeze (spatial mean).
  Eager chain: ``conv2d(groups=C)`` + ``batch_norm`` + ``silu`` + ``mean`` (the SE pool
  of an eager network: ``y.mean((2, 3), keepdim=True)`` in y's dtype); fused:
  ``effnet_kernels.ops.dwconv_bn_act(..., squeeze=True)`` (fp32 means).
* ``se``: the SE excitation after the squeeze. Eager chain: 1x1 conv + SiLU + 1x1 conv +
  ``sigmoid`` + ``mul`` on the mean the eager ``dwconv`` chain already computed
  (``pooled_eager``); fused: ``se_gate`` + ``se_excite`` on the fp32 means the fused
  ``dwconv`` already produced (``pooled``). Neither side re-reads ``y`` to pool: the pool is
  timed once, in ``dwconv``, on both sides.
* ``pointwise``: a block's 1x1 conv + eval BatchNorm, as ``pointwise_conv`` with the BN folded
  into the weight (fp32, as a converted block passes it under autocast) and its shift as the
  bias. Two kinds per MBConv block: the expand conv (K = block input channels -> expanded,
  SiLU; blocks with expand ratio 1 have none) at the block's input size, and the projection
  (K = expanded -> output channels, identity, the SE gate applied on load where the block has
  SE, the residual added where it has one) at its output size; and per network the head
  (last block's output channels -> 1280 x width, SiLU) with the global average pool after it
  (``pool=True``, as a converted ``effnet_kernels.models`` network calls it; eager: the head
  chain + ``adaptive_avg_pool2d``). Eager chain: (``x * gate``,
  the eager SE's excite, with the gate in x's dtype [N, K, 1, 1]) + ``conv2d`` (the fp32
  weight cast to x's dtype in the call, as autocast casts a parameter) + ``batch_norm`` + the
  activation (+ ``residual``); fused: ``pointwise_conv(x, w*scale, shift, gate=fp32 [N, K],
  residual=..., activation=...)``. (The ``se`` case times the standalone excite of the
  three-kernel block; the projection case the excite the four-kernel block fuses into the
  GEMM: on both sides an excite appears in both.)
* ``conv`` (the stem; not in :data:`OPS`, so ``benchmarks.ops`` does not run it: :func:`stem_case`
  builds it for ``benchmarks.tune``): dense k x k conv + eval BatchNorm + SiLU on the
  ``3 x R x R`` input. Eager chain: ``conv2d`` (weight cast to x's dtype) + ``batch_norm`` +
  ``silu``; fused: ``conv_bn_act(x, w*scale, shift, ...)``, as a converted stem calls it.

Minimum bytes: every activation tensor read once and written once (dwconv: x, y and the
fp32 means; se: y, the output and the fp32 means); weights are not counted, except in
``pointwise``, whose weight is a GEMM operand ([Cout, K] in x's dtype, up to ~10 MB in
B7): x, the fp32 gate, the weight, the fp32 bias and the residual read, y written; and in
``conv``: x, the weight in x's dtype and the fp32 bias read, y written.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from effnet_kernels import ops as fused
from effnet_kernels.models import layer_shapes
from effnet_kernels.reference import ACTIVATION_FNS

__all__ = ["OpCase", "cases_for_models", "layer_cases", "stem_case", "make_inputs", "make_call", "reference", "parse_pointwise_shape",
           "OPS", "OP_PROVIDERS", "BN_EPS"]

OPS = ("dwconv", "se", "pointwise")
OP_PROVIDERS = ("eager", "triton", "cuda", "torch")
BN_EPS = 1e-3
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class OpCase:
    """One op at one layer shape: ``x`` is ``[n, c, h, w]``; dwconv outputs ``[n, c, ho, wo]``,
    pointwise ``[n, cout, h, w]`` (``c`` is its K), conv ``[n, cout, ho, wo]`` (padding ``k // 2``)."""

    op: str
    model: str
    n: int
    c: int
    h: int
    w: int
    k: int = 3
    stride: int = 1
    reduced: int = 1  # SE squeeze width
    cout: int = 0  # pointwise, conv: output channels
    activation: str = "identity"  # pointwise, conv: after the bias
    gate: bool = False  # pointwise: the SE gate applied to x on load
    residual: bool = False  # pointwise: a residual [n, cout, h, w] added last
    pool: bool = False  # pointwise: the head's global average pool in the epilogue ([n, cout] fp32 out)

    @property
    def anonymous(self) -> "OpCase":
        """This case with no model named: the same launch in any network compares equal."""
        return replace(self, model="")

    @property
    def ho(self) -> int:
        return (self.h + 2 * (self.k // 2) - self.k) // self.stride + 1 if self.op in ("dwconv", "conv") else self.h

    @property
    def wo(self) -> int:
        return (self.w + 2 * (self.k // 2) - self.k) // self.stride + 1 if self.op in ("dwconv", "conv") else self.w

    @property
    def shape(self) -> str:
        """``NxCxHxW/k3s2`` (dwconv), ``NxCxHxW/r48`` (se), ``NxKxHxW/o{Cout}[/{act}][/gate][/res][/pool]``
        (pointwise; the activation named unless identity; :func:`parse_pointwise_shape` reads it back),
        ``NxCxHxW/o{Cout}/k3s2/{act}`` (conv)."""
        base = f"{self.n}x{self.c}x{self.h}x{self.w}"
        if self.op == "dwconv":
            return f"{base}/k{self.k}s{self.stride}"
        if self.op == "conv":
            return f"{base}/o{self.cout}/k{self.k}s{self.stride}/{self.activation}"
        if self.op == "pointwise":
            parts = [base, f"o{self.cout}"]
            if self.activation != "identity":
                parts.append(self.activation)
            return "/".join(parts + ["gate"] * self.gate + ["res"] * self.residual + ["pool"] * self.pool)
        return f"{base}/r{self.reduced}"

    def min_bytes(self, element_size: int) -> int:
        """Bytes read once and written once (see the module docstring)."""
        x = self.n * self.c * self.h * self.w * element_size
        means = self.n * self.c * 4
        if self.op == "dwconv":
            return x + self.n * self.c * self.ho * self.wo * element_size + means
        if self.op == "pointwise":
            y = self.n * self.cout * (4 if self.pool else self.h * self.w * element_size)
            weight, bias = self.cout * self.c * element_size, self.cout * 4
            gate = self.n * self.c * 4 if self.gate else 0
            return x + gate + weight + bias + y * (2 if self.residual else 1)
        if self.op == "conv":
            weight = self.cout * self.c * self.k * self.k * element_size
            return x + weight + self.cout * 4 + self.n * self.cout * self.ho * self.wo * element_size
        return 2 * x + means


def parse_pointwise_shape(shape: str, model: str = "") -> OpCase:
    """The pointwise :class:`OpCase` whose :attr:`OpCase.shape` is ``shape``."""
    dims, *parts = shape.split("/")
    n, c, h, w = (int(v) for v in dims.split("x"))
    if not parts or not parts[0].startswith("o"):
        raise ValueError(f"not a pointwise shape (NxKxHxW/o<Cout>[/act][/gate][/res]): {shape!r}")
    cout, flags = int(parts[0][1:]), parts[1:]
    activation = flags.pop(0) if flags and flags[0] in ACTIVATION_FNS else "identity"
    if set(flags) - {"gate", "res", "pool"} or len(set(flags)) != len(flags):
        raise ValueError(f"unknown or repeated flags in pointwise shape {shape!r}")
    return OpCase("pointwise", model, n, c, h, w, cout=cout, activation=activation,
                  gate="gate" in flags, residual="res" in flags, pool="pool" in flags)


def layer_cases(name: str, batch: int, ops: Iterable[str] = OPS, resolution: int | None = None) -> list[OpCase]:
    """The cases of ``ops`` one forward of EfficientNet-``name`` launches, in order, repeats included."""
    ops = list(ops)
    for op in ops:
        if op not in OPS:
            raise ValueError(f"ops must be among {OPS}, got {op!r}")
    shapes = layer_shapes(name, batch, resolution)
    found = []
    for layer in shapes:
        h, w, ho, wo = layer.H, layer.W, layer.Ho, layer.Wo
        if "pointwise" in ops and layer.expand_ratio != 1:  # the expand conv, at the block's input size
            found.append(OpCase("pointwise", name, batch, layer.in_channels, h, w, cout=layer.mid_channels,
                                activation="silu"))
        if "dwconv" in ops:
            found.append(OpCase("dwconv", name, batch, layer.mid_channels, h, w, layer.kernel, layer.stride))
        if "se" in ops and layer.se_reduced:
            found.append(OpCase("se", name, batch, layer.mid_channels, ho, wo, reduced=layer.se_reduced))
        if "pointwise" in ops:  # the projection, at the block's output size
            found.append(OpCase("pointwise", name, batch, layer.mid_channels, ho, wo, cout=layer.out_channels,
                                gate=bool(layer.se_reduced), residual=layer.has_residual))
        if "pointwise" in ops and layer is shapes[-1]:  # the head (1x1 conv + BN + SiLU) + global average pool
            found.append(OpCase("pointwise", name, batch, layer.out_channels, ho, wo, cout=_head_channels(name),
                                activation="silu", pool=True))
    return found


def cases_for_models(models: Iterable[str], batch: int, ops: Iterable[str] = OPS, resolution: int | None = None) -> list[OpCase]:
    """Distinct cases over the MBConv blocks of ``models`` (first model to use a shape names it)."""
    ops = list(ops)
    seen, out = set(), []
    for name in models:
        for case in layer_cases(name, batch, ops, resolution):
            if case.anonymous not in seen:
                seen.add(case.anonymous)
                out.append(case)
    return out


def stem_case(name: str, batch: int, resolution: int | None = None) -> OpCase:
    """The stem of EfficientNet-``name`` (conv + BN + SiLU) on ``3 x R x R`` (R: ``resolution``, default native)."""
    from effnet_kernels.models import native_resolution

    from .kernel_audit.workloads import stem_conv

    cin, cout, k, stride, pad = stem_conv(name)
    if pad != k // 2:
        raise ValueError(f"{name}'s stem pads {pad}, a conv case pads k // 2 = {k // 2}")
    r = resolution or native_resolution(name)
    return OpCase("conv", name, batch, cin, r, r, k, stride, cout=cout, activation="silu")


def _head_channels(name: str) -> int:
    """The head conv's output channels of EfficientNet-``name`` (1280 scaled by the width)."""
    from effnet_kernels import models

    return models.round_filters(models.HEAD_CHANNELS, models.PARAMS[name][0])


def make_inputs(case: OpCase, dtype: torch.dtype, layout: torch.memory_format, device: torch.device, generator: torch.Generator) -> dict:
    """Random inputs for ``case`` (activations in ``dtype`` and ``layout``, parameters fp32).

    ``generator`` must live on ``device`` (``torch.Generator(device)``), or be ``None`` (the meta
    device, which has none: shapes only).
    """

    def rnd(*shape, scale=1.0, offset=0.0):
        return torch.randn(*shape, generator=generator, device=device) * scale + offset

    x = rnd(case.n, case.c, case.h, case.w).to(dtype).contiguous(memory_format=layout)
    if case.op == "pointwise":
        co = case.cout
        out = {
            "x": x, "weight": rnd(co, case.c, 1, 1, scale=case.c ** -0.5),
            "gamma": rnd(co, scale=0.2, offset=1.0), "beta": rnd(co, scale=0.1),
            "running_mean": rnd(co, scale=0.1), "running_var": torch.rand(co, generator=generator, device=device) + 0.5,
        }
        if case.gate:  # se_gate's fp32 [N, K] (fused) and the eager SE's sigmoid in x's dtype [N, K, 1, 1]
            g = torch.sigmoid(rnd(case.n, case.c))
            out.update(gate=g, gate_eager=g.to(dtype)[:, :, None, None])
        if case.residual:
            out["residual"] = rnd(case.n, co, case.h, case.w).to(dtype).contiguous(memory_format=layout)
        return out
    if case.op in ("dwconv", "conv"):
        co = case.cout if case.op == "conv" else case.c
        var = torch.rand(co, generator=generator, device=device) + 0.5
        weight = rnd(co, case.c, case.k, case.k, scale=(case.c * case.k * case.k) ** -0.5) if case.op == "conv" \
            else rnd(co, 1, case.k, case.k, scale=1.0 / case.k)
        return {
            "x": x, "weight": weight,
            "gamma": rnd(co, scale=0.2, offset=1.0), "beta": rnd(co, scale=0.1),
            "running_mean": rnd(co, scale=0.1), "running_var": var,
        }
    r = case.reduced
    return {
        # the squeeze each side's dwconv step already produced: fp32 [N, C] (fused) and
        # x.dtype [N, C, 1, 1] (eager, exactly what the eager dwconv chain returns)
        "x": x, "pooled": x.float().mean((2, 3)), "pooled_eager": x.mean((2, 3), keepdim=True),
        "w_reduce": rnd(r, case.c, scale=case.c ** -0.5), "b_reduce": rnd(r, scale=0.1),
        "w_expand": rnd(case.c, r, scale=r ** -0.5), "b_expand": rnd(case.c, scale=0.1),
    }


def _folded(inp: dict) -> tuple[torch.Tensor, torch.Tensor]:
    scale = inp["gamma"] / torch.sqrt(inp["running_var"] + BN_EPS)
    return scale, inp["beta"] - inp["running_mean"] * scale


def make_call(case: OpCase, provider: str, inp: dict) -> Callable[[], object]:
    """A no-argument callable that runs ``case`` with ``provider`` on ``inp``."""
    if provider not in OP_PROVIDERS:
        raise ValueError(f"provider must be one of {OP_PROVIDERS}, got {provider!r}")
    x = inp["x"]
    if case.op == "pointwise":
        return _pointwise_call(case, provider, inp)
    if case.op in ("dwconv", "conv"):
        return _conv_call(case, provider, inp)
    if provider == "eager":
        wr, br = inp["w_reduce"][:, :, None, None].to(x.dtype), inp["b_reduce"].to(x.dtype)
        we, be = inp["w_expand"][:, :, None, None].to(x.dtype), inp["b_expand"].to(x.dtype)
        pooled_eager = inp["pooled_eager"]  # computed by the eager dwconv chain, not here

        def eager_se():
            s = F.conv2d(F.silu(F.conv2d(pooled_eager, wr, br)), we, be)
            return x * torch.sigmoid(s)

        return eager_se
    pooled, wr, br, we, be = (inp[k] for k in ("pooled", "w_reduce", "b_reduce", "w_expand", "b_expand"))
    return lambda: fused.se_excite(x, fused.se_gate(pooled, wr, br, we, be, backend=provider), backend=provider)


def _conv_call(case: OpCase, provider: str, inp: dict) -> Callable[[], object]:
    """dwconv (+ the squeeze) or the stem's dense conv, both with BN and SiLU."""
    x, pad, depthwise = inp["x"], case.k // 2, case.op == "dwconv"
    act = F.silu if depthwise else ACTIVATION_FNS[case.activation]
    if provider == "eager":
        w = inp["weight"].to(x.dtype)
        args = [inp[k] for k in ("running_mean", "running_var", "gamma", "beta")]  # fp32, as under autocast

        def eager_conv():
            z = F.conv2d(x, w, stride=case.stride, padding=pad, groups=case.c if depthwise else 1)
            y = act(F.batch_norm(z, *args, training=False, eps=BN_EPS))
            return (y, y.mean((2, 3), keepdim=True)) if depthwise else y  # dwconv: the SE pool of an eager network

        return eager_conv
    scale, shift = _folded(inp)
    weight = inp["weight"]
    if depthwise:
        return lambda: fused.dwconv_bn_act(x, weight, scale, shift, stride=case.stride, padding=pad, squeeze=True,
                                           backend=provider)
    weight = weight * scale[:, None, None, None]  # folded once, as a converted stem caches it
    return lambda: fused.conv_bn_act(x, weight, shift, stride=case.stride, padding=pad, activation=case.activation,
                                     backend=provider)


def _pointwise_call(case: OpCase, provider: str, inp: dict) -> Callable[[], torch.Tensor]:
    x, residual = inp["x"], inp.get("residual")
    act = ACTIVATION_FNS[case.activation]
    if provider == "eager":
        w = inp["weight"]  # fp32: cast in the call, as autocast casts a conv's parameter
        gate = inp.get("gate_eager")
        bn = [inp[k] for k in ("running_mean", "running_var", "gamma", "beta")]  # fp32, as under autocast

        def eager_pw():
            xin = x * gate if gate is not None else x  # the eager SE's excite
            y = act(F.batch_norm(F.conv2d(xin, w.to(x.dtype)), *bn, training=False, eps=BN_EPS))
            if case.pool:  # the network's pool after the head
                return F.adaptive_avg_pool2d(y, 1).flatten(1)
            return y + residual if residual is not None else y

        return eager_pw
    scale, shift = _folded(inp)  # folded once, as a converted block caches it
    weight = inp["weight"][:, :, 0, 0] * scale[:, None]
    gate = inp.get("gate")
    return lambda: fused.pointwise_conv(x, weight, shift, gate=gate, residual=residual, activation=case.activation,
                                        pool=case.pool, backend=provider)


def reference(case: OpCase, inp: dict) -> torch.Tensor:
    """The op's main output computed in float64 from the same inputs (the gate's reference)."""
    x = inp["x"].double()
    if case.op == "pointwise":
        scale, shift = _folded({k: inp[k].double() for k in ("gamma", "beta", "running_mean", "running_var")})
        if case.gate:
            x = x * inp["gate"].double()[:, :, None, None]
        z = F.conv2d(x, inp["weight"].double()) * scale[None, :, None, None] + shift[None, :, None, None]
        y = ACTIVATION_FNS[case.activation](z)
        if case.pool:
            return y.mean((2, 3))
        return y + inp["residual"].double() if case.residual else y
    if case.op in ("dwconv", "conv"):
        scale, shift = _folded({k: v.double() for k, v in inp.items() if k != "x"})
        z = F.conv2d(x, inp["weight"].double(), stride=case.stride, padding=case.k // 2,
                     groups=case.c if case.op == "dwconv" else 1)
        act = F.silu if case.op == "dwconv" else ACTIVATION_FNS[case.activation]
        return act(z * scale[None, :, None, None] + shift[None, :, None, None])
    s = x.mean((2, 3))
    a = F.silu(s @ inp["w_reduce"].double().t() + inp["b_reduce"].double())
    gate = torch.sigmoid(a @ inp["w_expand"].double().t() + inp["b_expand"].double())
    return x * gate[:, :, None, None]
