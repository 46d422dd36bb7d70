"""Argument normalisation and validation shared by every op and every backend.

Every public op calls these before dispatch, and the op implementations call the
``check_*`` functions again (they are cheap) so that calling ``torch.ops.effnet.*``
directly cannot crash a kernel. Errors are ``TypeError`` (wrong type or dtype) or
``ValueError`` (wrong shape or value) and name the argument and what was expected.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

IntOrPair = Union[int, Sequence[int]]

#: Dtypes the fused kernels (``triton``, ``cuda``) take.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Dtypes the ops take: float64 inputs are served by the ``torch`` reference (in float64).
OP_DTYPES = FLOAT_DTYPES + (torch.float64,)
_DTYPE_NAMES = {FLOAT_DTYPES: "float32, float16 or bfloat16", OP_DTYPES: "float32, float16, bfloat16 or float64"}

#: ``dwconv_bn_act``'s ``activation``.
ACTIVATIONS = ("identity", "silu", "relu", "relu6", "hardswish")
#: ``se_gate``'s ``activation`` (between the two FCs) and ``gate`` (the output nonlinearity).
SE_ACTIVATIONS = ("silu", "relu")
SE_GATES = ("sigmoid", "hardsigmoid")
#: One code per elementwise function, shared by every kernel: the Triton kernels' ``ACT`` /
#: ``GATE`` constexprs and the CUDA kernels' ``Act`` template argument (``effnet::Act`` in
#: csrc/effnet_ext.h holds the same numbers). PyTorch's definitions: ``hardswish(u) =
#: u * relu6(u + 3) / 6``, ``hardsigmoid(u) = relu6(u + 3) / 6``.
ACT_CODES = {"identity": 0, "silu": 1, "relu": 2, "relu6": 3, "hardswish": 4, "sigmoid": 5, "hardsigmoid": 6}


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """float32, or float64 for a float64 ``t``: the dtype the ops accumulate in and return their
    float results (squeeze, pool, gate, statistics) in; float64 is the ``torch`` reference's."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_tensor(t: object, name: str, ndim: int | tuple[int, ...], dtypes=OP_DTYPES) -> torch.Tensor:
    """``t`` must be a tensor of rank ``ndim`` (or one of them) with a dtype in ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name} must be {want}, got a {t.dim()}-D tensor of shape {_shape(t)}")
    if t.dtype not in dtypes:
        names = _DTYPE_NAMES.get(tuple(dtypes)) or ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}, got {t.dtype}")
    return t


def require_tensors(**tensors: object) -> None:
    """Each keyword argument must be a torch.Tensor (checked before reaching the dispatcher)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_same_device(ref: torch.Tensor, ref_name: str, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` must live on ``ref``'s device."""
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} must be on {ref.device} like {ref_name}, got {t.device}")


def check_vector(t: torch.Tensor, name: str, length: int, what: str) -> None:
    """``t`` must be 1-D with ``length`` elements."""
    check_tensor(t, name, 1)
    if t.shape[0] != length:
        raise ValueError(f"{name} must have shape [{length}] ({what}), got {_shape(t)}")


def normalize_pair(value: IntOrPair, name: str) -> tuple[int, int]:
    """An int or a pair of ints -> a pair of ints."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    try:
        pair = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def normalize_stride(stride: IntOrPair) -> tuple[int, int]:
    """``stride`` (int or pair) -> (sh, sw), each 1 or 2."""
    pair = normalize_pair(stride, "stride")
    if any(s not in (1, 2) for s in pair):
        raise ValueError(f"stride must be 1 or 2 (or a pair of them), got {stride!r}")
    return pair


def normalize_padding(padding: None | int | Sequence[int], kernel_size: int) -> tuple[int, int, int, int]:
    """``padding`` -> (left, right, top, bottom), the order of ``F.pad``.

    ``None`` means ``kernel_size // 2`` on every side; an int pads every side; a pair
    ``(ph, pw)`` pads top/bottom by ``ph`` and left/right by ``pw`` (as ``nn.Conv2d``);
    a 4-tuple is taken as ``(left, right, top, bottom)`` so TF "same" padding works.
    """
    if padding is None:
        p = kernel_size // 2
        return (p, p, p, p)
    if isinstance(padding, bool):
        raise TypeError(f"padding must be None, an int, a pair or a 4-tuple of ints, got {padding!r}")
    if isinstance(padding, int):
        out = (padding,) * 4
    else:
        try:
            seq = tuple(padding)
        except TypeError:
            raise TypeError(
                f"padding must be None, an int, a pair or a 4-tuple of ints, got {padding!r}"
            ) from None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in seq):
            raise TypeError(f"padding must contain ints, got {padding!r}")
        if len(seq) == 2:
            out = (seq[1], seq[1], seq[0], seq[0])
        elif len(seq) == 4:
            out = seq
        else:
            raise ValueError(f"padding must have 2 or 4 entries (left, right, top, bottom), got {padding!r}")
    if any(p < 0 for p in out):
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return out  # type: ignore[return-value]


def check_choice(value: object, name: str, allowed: tuple[str, ...]) -> str:
    """``value`` must be one of the strings ``allowed``; raise ``ValueError`` naming ``name`` otherwise."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def normalize_activation(activation: str) -> str:
    """``activation`` if it is one of :data:`ACTIVATIONS` (``dwconv_bn_act``'s), else ``ValueError``."""
    return check_choice(activation, "activation", ACTIVATIONS)


def normalize_se_activation(activation: str, gate: str) -> tuple[str, str]:
    """``(activation, gate)`` of ``se_gate`` if they are in :data:`SE_ACTIVATIONS` / :data:`SE_GATES`."""
    return check_choice(activation, "activation", SE_ACTIVATIONS), check_choice(gate, "gate", SE_GATES)


def conv_output_size(size: int, before: int, after: int, k: int, stride: int, dim: str) -> int:
    """Output length of a k-tap, ``stride`` convolution over ``size`` padded by before/after."""
    padded = size + before + after
    if padded < k:
        raise ValueError(
            f"x's {dim} ({size}) plus padding ({before}+{after}) is smaller than the kernel ({k})"
        )
    return (padded - k) // stride + 1


def check_dwconv_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    affine_names: tuple[str, str] = ("scale", "shift"),
) -> tuple[int, int]:
    """Validate ``dwconv_bn_act`` inputs (already normalised); return the output (H, W).

    ``affine_names`` are the names the per-channel pair goes by in errors (``("gamma", "beta")``
    for the train-mode op); ``scale=shift=None``: an op without one (``dwconv_bn_stats``)."""
    check_tensor(x, "x", 4)
    check_tensor(weight, "weight", 4)
    c = x.shape[1]
    if weight.shape[0] != c or weight.shape[1] != 1 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must have shape [C, 1, k, k] with C = {c} (x's channels), got {_shape(weight)}")
    k = weight.shape[2]
    if k % 2 == 0:
        raise ValueError(f"weight's kernel size must be odd, got {k}")
    a, b = affine_names
    if scale is not None or shift is not None:
        check_vector(scale, a, c, "one per channel of x")
        check_vector(shift, b, c, "one per channel of x")
        folded = (torch.float32, torch.float64) if x.dtype == torch.float64 else (torch.float32,)
        if scale.dtype not in folded or shift.dtype not in folded:
            raise TypeError(
                f"{a} and {b} must be float32 (BatchNorm parameters in fp32; float64 too when x is float64), "
                f"got {scale.dtype} and {shift.dtype}"
            )
    check_same_device(x, "x", weight=weight, **{a: scale, b: shift})
    if len(stride) != 2 or any(s not in (1, 2) for s in stride):
        raise ValueError(f"stride must be a pair of 1s and 2s, got {list(stride)}")
    if len(padding) != 4 or any(p < 0 for p in padding):
        raise ValueError(f"padding must be 4 non-negative ints (left, right, top, bottom), got {list(padding)}")
    left, right, top, bottom = padding
    ho = conv_output_size(x.shape[2], top, bottom, k, stride[0], "height")
    wo = conv_output_size(x.shape[3], left, right, k, stride[1], "width")
    return ho, wo


def check_se_gate_args(
    pooled: torch.Tensor,
    w_reduce: torch.Tensor,
    b_reduce: torch.Tensor,
    w_expand: torch.Tensor,
    b_expand: torch.Tensor,
) -> None:
    """Validate ``se_gate`` inputs with 2-D weights ([R, C] and [C, R])."""
    check_tensor(pooled, "pooled", 2)
    c = pooled.shape[1]
    check_tensor(w_reduce, "w_reduce", 2)
    r = w_reduce.shape[0]
    if w_reduce.shape[1] != c:
        raise ValueError(f"w_reduce must have shape [R, {c}] (C = pooled's channels), got {_shape(w_reduce)}")
    if r < 1:
        raise ValueError("w_reduce must have at least one output channel (R >= 1)")
    check_tensor(w_expand, "w_expand", 2)
    if tuple(w_expand.shape) != (c, r):
        raise ValueError(f"w_expand must have shape [{c}, {r}] ([C, R]), got {_shape(w_expand)}")
    check_vector(b_reduce, "b_reduce", r, "R, w_reduce's rows")
    check_vector(b_expand, "b_expand", c, "C, pooled's channels")
    check_same_device(pooled, "pooled", w_reduce=w_reduce, b_reduce=b_reduce, w_expand=w_expand, b_expand=b_expand)


def check_se_excite_args(y: torch.Tensor, gate: torch.Tensor) -> None:
    """Validate ``se_excite`` inputs: y [N, C, H, W], gate [N, C]."""
    check_tensor(y, "y", 4)
    check_tensor(gate, "gate", 2)
    if tuple(gate.shape) != tuple(y.shape[:2]):
        raise ValueError(f"gate must have shape [{y.shape[0]}, {y.shape[1]}] ([N, C] of y), got {_shape(gate)}")
    check_same_device(y, "y", gate=gate)


def check_conv_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
) -> tuple[int, int]:
    """Validate ``conv_bn_act`` inputs (a dense k x k conv, one group); return the output (H, W)."""
    check_tensor(x, "x", 4)
    check_tensor(weight, "weight", 4)
    cin = x.shape[1]
    if weight.shape[1] != cin or weight.shape[2] != weight.shape[3] or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape [Cout, {cin}, k, k] (Cin = x's channels, Cout >= 1), "
                         f"got {_shape(weight)}")
    k = weight.shape[2]
    if k % 2 == 0:
        raise ValueError(f"weight's kernel size must be odd, got {k}")
    if bias is not None:
        check_vector(bias, "bias", weight.shape[0], "Cout, weight's first dimension")
        allowed = {torch.float32, x.dtype} | ({torch.float64} if x.dtype == torch.float64 else set())
        if bias.dtype not in allowed:
            raise TypeError(f"bias must be float32 or x's dtype ({x.dtype}), got {bias.dtype}")
    check_same_device(x, "x", weight=weight, bias=bias)
    if len(stride) != 2 or any(s not in (1, 2) for s in stride):
        raise ValueError(f"stride must be a pair of 1s and 2s, got {list(stride)}")
    if len(padding) != 4 or any(p < 0 for p in padding):
        raise ValueError(f"padding must be 4 non-negative ints (left, right, top, bottom), got {list(padding)}")
    left, right, top, bottom = padding
    return (conv_output_size(x.shape[2], top, bottom, k, stride[0], "height"),
            conv_output_size(x.shape[3], left, right, k, stride[1], "width"))


def check_pointwise_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gate: torch.Tensor | None,
    residual: torch.Tensor | None,
    pool: bool,
) -> None:
    """Validate ``pointwise_conv`` inputs: x [N, K, H, W], weight [Cout, K], bias [Cout] (float32, x's
    dtype, or float64 when x is), gate [N, K] (float32 or x's dtype), residual like the output
    (x's dtype; not with ``pool``)."""
    check_tensor(x, "x", 4)
    check_tensor(weight, "weight", 2)
    n, k = x.shape[0], x.shape[1]
    if weight.shape[1] != k:
        raise ValueError(f"weight must have shape [Cout, {k}] (K = x's channels), got {_shape(weight)}")
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one output channel (Cout >= 1)")
    cout = weight.shape[0]
    allowed = {torch.float32, x.dtype} | ({torch.float64} if x.dtype == torch.float64 else set())
    if bias is not None:
        check_vector(bias, "bias", cout, "Cout, weight's rows")
        if bias.dtype not in allowed:
            raise TypeError(f"bias must be float32 or x's dtype ({x.dtype}), got {bias.dtype}")
    if gate is not None:
        check_tensor(gate, "gate", 2)
        if tuple(gate.shape) != (n, k):
            raise ValueError(f"gate must have shape [{n}, {k}] ([N, K] of x), got {_shape(gate)}")
        if gate.dtype not in allowed:
            raise TypeError(f"gate must be float32 or x's dtype ({x.dtype}), got {gate.dtype}")
    if residual is not None:
        if pool:
            raise ValueError("residual cannot be combined with pool=True (the pooled output has no pixels to add to)")
        check_tensor(residual, "residual", 4)
        want = (n, cout, x.shape[2], x.shape[3])
        if tuple(residual.shape) != want:
            raise ValueError(f"residual must have the output's shape {list(want)}, got {_shape(residual)}")
        if residual.dtype != x.dtype:
            raise TypeError(f"residual must have x's dtype ({x.dtype}), got {residual.dtype}")
    check_same_device(x, "x", weight=weight, bias=bias, gate=gate, residual=residual)


def squeeze_weight_2d(w: torch.Tensor, name: str) -> torch.Tensor:
    """A 1x1 conv weight [O, I, 1, 1] -> [O, I]; a 2-D weight passes through."""
    check_tensor(w, name, (2, 4))
    if w.dim() == 4:
        if w.shape[2] != 1 or w.shape[3] != 1:
            raise ValueError(f"{name} must be 2-D or a 1x1 conv weight [O, I, 1, 1], got {_shape(w)}")
        return w.reshape(w.shape[0], w.shape[1])
    return w


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """The memory format an output of a 4-D op on ``x`` keeps.

    channels_last when ``x`` is channels_last (and not also NCHW-contiguous, as for
    C = 1 or H = W = 1), or, for other strided views, when its channel stride is the
    smallest; NCHW (contiguous_format) otherwise.
    """
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    s = x.stride()
    if x.shape[1] > 1 and s[1] < s[3] and s[1] < s[2]:
        return torch.channels_last
    return torch.contiguous_format
