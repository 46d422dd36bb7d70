"""Op-level benchmark cases at B0-B7 layer shapes, and each provider's callable.

Shared by :mod:`benchmarks.ops` (the CSV runner) and ``benchmarks/microbench`` (the
pytest-benchmark suite). Two ops:

* ``dwconv``: depthwise conv + BatchNorm + SiLU + SE squeeze (spatial mean).
  Eager chain: ``conv2d(groups=C)`` + ``batch_norm`` + ``silu`` + ``mean`` (the SE pool
  of an eager network: ``y.mean((2, 3), keepdim=True)`` in y's dtype); fused:
  ``effnet_kernels.ops.dwconv_bn_act(..., squeeze=True)`` (fp32 means).
* ``se``: the SE excitation after the squeeze. Eager chain: 1x1 conv + SiLU + 1x1 conv +
  ``sigmoid`` + ``mul`` on the mean the eager ``dwconv`` chain already computed
  (``pooled_eager``); fused: ``se_gate`` + ``se_excite`` on the fp32 means the fused
  ``dwconv`` already produced (``pooled``). Neither side re-reads ``y`` to pool: the pool is
  timed once, in ``dwconv``, on both sides.

Minimum bytes: every activation tensor read once and written once (dwconv: x, y and the
fp32 means; se: y, the output and the fp32 means); weights are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from effnet_kernels import ops as fused
from effnet_kernels.models import layer_shapes

__all__ = ["OpCase", "cases_for_models", "make_inputs", "make_call", "reference", "OPS", "OP_PROVIDERS", "BN_EPS"]

OPS = ("dwconv", "se")
OP_PROVIDERS = ("eager", "triton", "cuda", "torch")
BN_EPS = 1e-3
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class OpCase:
    """One op at one layer shape: ``x`` is ``[n, c, h, w]``; dwconv outputs ``[n, c, ho, wo]``."""

    op: str
    model: str
    n: int
    c: int
    h: int
    w: int
    k: int = 3
    stride: int = 1
    reduced: int = 1  # SE squeeze width

    @property
    def ho(self) -> int:
        return (self.h + 2 * (self.k // 2) - self.k) // self.stride + 1 if self.op == "dwconv" else self.h

    @property
    def wo(self) -> int:
        return (self.w + 2 * (self.k // 2) - self.k) // self.stride + 1 if self.op == "dwconv" else self.w

    @property
    def shape(self) -> str:
        base = f"{self.n}x{self.c}x{self.h}x{self.w}"
        return f"{base}/k{self.k}s{self.stride}" if self.op == "dwconv" else f"{base}/r{self.reduced}"

    def min_bytes(self, element_size: int) -> int:
        """Activation bytes read once and written once (see the module docstring)."""
        x = self.n * self.c * self.h * self.w * element_size
        means = self.n * self.c * 4
        if self.op == "dwconv":
            return x + self.n * self.c * self.ho * self.wo * element_size + means
        return 2 * x + means


def cases_for_models(models: Iterable[str], batch: int, ops: Iterable[str] = OPS, resolution: int | None = None) -> list[OpCase]:
    """Distinct cases over the MBConv blocks of ``models`` (first model to use a shape names it)."""
    ops = list(ops)
    for op in ops:
        if op not in OPS:
            raise ValueError(f"ops must be among {OPS}, got {op!r}")
    seen, out = set(), []
    for name in models:
        for layer in layer_shapes(name, batch, resolution):
            h, w = getattr(layer, "H", None) or layer.h, getattr(layer, "W", None) or layer.w
            ho, wo = getattr(layer, "Ho", None) or layer.ho, getattr(layer, "Wo", None) or layer.wo
            found = []
            if "dwconv" in ops:
                found.append(OpCase("dwconv", name, batch, layer.mid_channels, h, w, layer.kernel, layer.stride))
            if "se" in ops and layer.se_reduced:
                found.append(OpCase("se", name, batch, layer.mid_channels, ho, wo, reduced=layer.se_reduced))
            for case in found:
                key = (case.op, case.n, case.c, case.h, case.w, case.k, case.stride, case.reduced)
                if key not in seen:
                    seen.add(key)
                    out.append(case)
    return out


def make_inputs(case: OpCase, dtype: torch.dtype, layout: torch.memory_format, device: torch.device, generator: torch.Generator) -> dict:
    """Random inputs for ``case`` (activations in ``dtype`` and ``layout``, parameters fp32).

    ``generator`` must live on ``device`` (``torch.Generator(device)``).
    """

    def rnd(*shape, scale=1.0, offset=0.0):
        return torch.randn(*shape, generator=generator, device=device) * scale + offset

    x = rnd(case.n, case.c, case.h, case.w).to(dtype).contiguous(memory_format=layout)
    if case.op == "dwconv":
        var = torch.rand(case.c, generator=generator, device=device) + 0.5
        return {
            "x": x, "weight": rnd(case.c, 1, case.k, case.k, scale=1.0 / case.k),
            "gamma": rnd(case.c, scale=0.2, offset=1.0), "beta": rnd(case.c, scale=0.1),
            "running_mean": rnd(case.c, scale=0.1), "running_var": var,
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
    if case.op == "dwconv":
        pad = case.k // 2
        if provider == "eager":
            w = inp["weight"].to(x.dtype)
            args = [inp[k] for k in ("running_mean", "running_var", "gamma", "beta")]  # fp32, as under autocast

            def eager_dw():
                z = F.conv2d(x, w, stride=case.stride, padding=pad, groups=case.c)
                y = F.silu(F.batch_norm(z, *args, training=False, eps=BN_EPS))
                return y, y.mean((2, 3), keepdim=True)  # the SE pool of an eager network

            return eager_dw
        scale, shift = _folded(inp)
        weight = inp["weight"]
        return lambda: fused.dwconv_bn_act(x, weight, scale, shift, stride=case.stride, padding=pad, squeeze=True, backend=provider)
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


def reference(case: OpCase, inp: dict) -> torch.Tensor:
    """The op's main output computed in float64 from the same inputs (the gate's reference)."""
    x = inp["x"].double()
    if case.op == "dwconv":
        scale, shift = _folded({k: v.double() for k, v in inp.items() if k != "x"})
        z = F.conv2d(x, inp["weight"].double(), stride=case.stride, padding=case.k // 2, groups=case.c)
        return F.silu(z * scale[None, :, None, None] + shift[None, :, None, None])
    s = x.mean((2, 3))
    a = F.silu(s @ inp["w_reduce"].double().t() + inp["b_reduce"].double())
    gate = torch.sigmoid(a @ inp["w_expand"].double().t() + inp["b_expand"].double())
    return x * gate[:, :, None, None]
