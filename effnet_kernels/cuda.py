"""The ``cuda`` backend: loads the compiled extension ``effnet_kernels._C``.

The extension is torch-ABI-free (raw pointers, sizes, a stream; it links only the CUDA
runtime), so one build serves every torch version. Where it comes from, in order:

1. a prebuilt ``effnet_kernels/_C*.so`` (``pip install .`` or
   ``python setup.py build_ext --inplace``), checked against the sources here;
2. otherwise it is JIT-built on first use with nvcc + ninja into
   ``~/.cache/effnet_kernels/<python-tag>-<source-hash>/`` for the visible GPUs
   (see :mod:`effnet_kernels._build`).

Import of ``effnet_kernels`` never fails because of it: ``available_backends()["cuda"]``
lists what is missing, and asking for ``backend="cuda"`` raises
:class:`~effnet_kernels.backends.BackendUnavailableError` with those reasons.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType
from typing import Callable, Optional, Sequence

import torch

from . import _aten_convs, _build, _folded_weights, _launch, backends

Tensor = torch.Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_SIZES = (3, 5, 7)
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_REBUILD_HINT = "rebuild it with `python setup.py build_ext --inplace` (or `pip install .`), or delete it to JIT-build on first use"

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_failure: Optional[str] = None  # why loading failed (remembered: a failed JIT build is not retried per call)


class CudaExtensionError(RuntimeError):
    """A kernel of the CUDA extension reported an error (the message names the op)."""


# ------------------------------------------------------------------ finding the module
def _expected_hash() -> Optional[str]:
    src = _build.source_dir()
    return _build.source_hash(src) if src is not None else None


def _prebuilt_path() -> Optional[str]:
    spec = importlib.util.find_spec(_build.MODULE)
    return spec.origin if spec is not None else None


def _gpu_capabilities() -> list[int]:
    if not torch.cuda.is_available():
        return []
    caps = set()
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        caps.add(major * 10 + minor)
    return sorted(caps)


def _module_problems(module: ModuleType) -> list[str]:
    """Why an imported ``_C`` must not be used: stale sources, other ABI, missing GPU arch."""
    try:
        info = module.build_info()
    except Exception as exc:  # a foreign or broken module
        return [f"effnet_kernels._C at {getattr(module, '__file__', '?')} has no usable build_info(): {exc!r}; {_REBUILD_HINT}"]
    problems = _build.check_build_info(info, _expected_hash())
    if problems:
        return [f"effnet_kernels._C at {module.__file__} is stale: " + "; ".join(problems) + f"; {_REBUILD_HINT}"]
    missing = [c for c in _gpu_capabilities() if not _build.archs_cover(str(info.get("archs", "")), c)]
    if missing:
        return [
            f"effnet_kernels._C was built for sm_{str(info.get('archs')).replace(';', ',sm_')}, "
            f"this GPU is sm_{missing[0]}; rebuild with {_build.ARCHS_ENV}=\"{missing[0]}\" "
            "`python setup.py build_ext --inplace`"
        ]
    return []


def _import_extension() -> ModuleType:
    return importlib.import_module(_build.MODULE)


def _import_prebuilt() -> tuple[Optional[ModuleType], list[str]]:
    """(module, problems) for an in-package ``_C``; (None, []) when there is none."""
    path = _prebuilt_path()
    if path is None:
        return None, []
    try:
        module = _import_extension()
    except Exception as exc:
        return None, [f"effnet_kernels._C at {path} failed to import: {exc}; {_REBUILD_HINT}"]
    return module, _module_problems(module)


def _jit_archs() -> tuple[str, ...]:
    """Archs a JIT build targets: ``$EFFNET_KERNELS_CUDA_ARCHS``, else the visible GPUs'."""
    caps = _gpu_capabilities()
    return _build.requested_archs(default=tuple(str(c) for c in caps) or _build.DEFAULT_ARCHS)


def _import_file(path: str, register: bool = True) -> ModuleType:
    """Import the extension from ``path`` (a JIT build); ``register`` puts it in ``sys.modules``."""
    spec = importlib.util.spec_from_file_location(_build.MODULE, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if register:
        sys.modules[_build.MODULE] = module
    return module


def extension_problems() -> list[str]:
    """Why the extension cannot be used here, without building anything ([] = usable or JIT-buildable)."""
    module, problems = _import_prebuilt()
    if module is not None or problems:
        return problems
    src_hash = _expected_hash()
    if src_hash is not None:
        try:
            archs = _jit_archs()
        except ValueError as exc:
            return [str(exc)]
        if _build.cached_build_ok(_build.jit_dir(src_hash), src_hash, archs):
            return []
    missing = _build.missing_tools()
    if missing:
        return ["effnet_kernels._C is not built and cannot be JIT-built: " + "; ".join(missing)]
    return []


def extension() -> ModuleType:
    """The loaded, checked ``effnet_kernels._C`` (prebuilt, else JIT-built once).

    Raises:
        BackendUnavailableError: it is stale, or cannot be built or imported (the
            failure is remembered for the rest of the process; see :func:`reset`).
    """
    global _module, _failure
    if _module is not None:
        return _module
    with _lock:
        if _module is None and _failure is None:
            try:
                _module = _find_or_build()
            except (_build.BuildError, ValueError, ImportError, OSError) as exc:
                _failure = f"effnet_kernels cuda backend: {exc}"
            except backends.BackendUnavailableError as exc:
                _failure = str(exc)
        if _module is None:
            raise backends.BackendUnavailableError(_failure)
        return _module


def _find_or_build() -> ModuleType:
    module, problems = _import_prebuilt()
    if module is None and not problems:
        module = _import_file(str(_build.jit_build(_jit_archs())))
        problems = _module_problems(module)
    if problems:
        raise backends.BackendUnavailableError("effnet_kernels cuda backend: " + "; ".join(problems))
    assert module is not None
    return module


def reset() -> None:
    """Forget the loaded module and any remembered failure (tests; after rebuilding)."""
    global _module, _failure
    with _lock:
        _module, _failure = None, None


# ------------------------------------------------------------------ backend hooks
def _unavailable() -> list[str]:
    reasons = []
    if not torch.cuda.is_available():
        reasons.append("no CUDA GPU is visible to torch (torch.cuda.is_available() is False)")
    old_gpus = [c for c in _gpu_capabilities() if c < _build.MIN_ARCH]
    if old_gpus:
        reasons.append(f"the CUDA kernels need a GPU of compute capability >= {_build.MIN_ARCH / 10}, this one is sm_{old_gpus[0]}")
        return reasons
    reasons.extend(extension_problems())
    return reasons


# where each depthwise op's weight sits among its arguments (the kernel size check)
_WEIGHT_ARG = {"dwconv_bn_act": 1, "dwconv_bn_act_backward": 3, "dwconv_bn_act_train": 1,
               "dwconv_bn_act_train_backward": 3, "dwconv_bn_stats": 1, "dwconv_bn_grad_sums": 3,
               "dwconv_bn_input_grads": 3}


def _unsupported(op: str, t: Tensor, args: tuple = ()) -> list[str]:
    reasons = []
    w = _WEIGHT_ARG.get(op)
    if w is not None and len(args) > w and isinstance(args[w], Tensor) and args[w].shape[-1] not in KERNEL_SIZES:
        reasons.append(f"kernel size {args[w].shape[-1]} is not compiled (3, 5 or 7); the torch and triton backends take any odd k")
    if t.device.type != "cuda":
        reasons.append(f"tensors must be on a CUDA device, got {t.device}")
    reasons.extend(backends.dtype_reasons("the cuda kernels", SUPPORTED_DTYPES, (t, *args)))
    return reasons


def check(op: str, err: Optional[str]) -> None:
    """Raise :class:`CudaExtensionError` naming ``op`` if the extension returned an error message."""
    if err is not None:
        raise CudaExtensionError(f"effnet_kernels cuda backend: {op} failed: {err}")


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # what Inductor's get_raw_stream uses


def _stream(t: Tensor) -> int:
    """The current CUDA stream of ``t``'s device as an integer ``cudaStream_t``."""
    if _raw_stream is not None:
        return _raw_stream(t.device.index)
    return torch.cuda.current_stream(t.device).cuda_stream


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


# ------------------------------------------------------------------ prepared weights
def fold_tap_major(weight: Tensor, scale: Tensor) -> Tensor:
    """``weight`` [C, 1, k, k] with ``scale`` [C] folded in, tap-major [k*k, C] dense fp32 (what the
    kernels read): :func:`effnet_kernels._folded_weights.fold_tap_major`."""
    return _folded_weights.fold_tap_major(weight, scale)


#: the kernels' folded weights, one entry per live (weight, scale) pair (see effnet_kernels._folded_weights)
prepared_weights = _folded_weights.FoldedWeightCache(lambda w, s: fold_tap_major(w, s))


# ------------------------------------------------------------------ implementations
def dwconv_bn_act(
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    activation: str,
    squeeze: bool,
) -> tuple[Tensor, Optional[Tensor]]:
    """CUDA ``dwconv_bn_act`` (signature of :func:`effnet_kernels.reference.dwconv_bn_act`).

    NCHW inputs run their own kernel (no layout conversion); NHWC uses 16-byte accesses
    along C when C and the pointers allow. The kernels read the weight tap-major with the BN
    scale folded in (:func:`fold_tap_major`, cached per source tensors in
    :data:`prepared_weights`) and add ``shift`` in the epilogue. The squeeze is reduced
    without atomics when ``torch.are_deterministic_algorithms_enabled()``.

    Raises:
        BackendUnavailableError: the kernel size is not 3, 5 or 7.
        CudaExtensionError: a launch failed (the message is CUDA's).
    """
    k = weight.shape[-1]
    if k not in KERNEL_SIZES:
        raise backends.BackendUnavailableError(
            f"effnet_kernels cuda backend: dwconv_bn_act supports kernel sizes {KERNEL_SIZES}, got {k}; "
            "use backend='torch' or 'triton'"
        )
    C = extension()
    launch = _launch.prepare_dwconv(x, weight, scale, shift, stride, padding, activation, squeeze)
    if launch.n == 0 or launch.c == 0:
        return launch.y, launch.mean
    dtype = _DTYPE_CODES[launch.x.dtype]
    nhwc = launch.layout == "nhwc"
    deterministic = squeeze and launch.deterministic
    numel = C.dwconv_partials_numel(
        dtype, nhwc, launch.n, launch.c, launch.ho, launch.wo, k, launch.stride_w, squeeze, deterministic
    )
    partials = torch.empty(numel, dtype=torch.float32, device=x.device) if numel else None
    folded = prepared_weights.get(weight, scale)
    check(
        "dwconv_bn_act",
        C.dwconv_bn_act(
            launch.x.data_ptr(), launch.y.data_ptr(), folded.data_ptr(), launch.shift.data_ptr(),
            _ptr(launch.mean), _ptr(partials), numel, dtype, nhwc,
            launch.n, launch.c, launch.h, launch.w, launch.ho, launch.wo, k, launch.stride_h, launch.stride_w,
            launch.pad_top, launch.pad_left, launch.act, squeeze, deterministic, x.device.index or 0, _stream(x),
        ),
    )
    return launch.y, launch.mean


def se_gate(
    pooled: Tensor, w_reduce: Tensor, b_reduce: Tensor, w_expand: Tensor, b_expand: Tensor, activation: str, gate: str
) -> Tensor:
    """CUDA ``se_gate`` (signature of :func:`effnet_kernels.reference.se_gate`); fp32 accumulation.

    The four weights are read in their own dtype when they share one, else as float32.
    """
    C = extension()
    launch = _launch.prepare_se_gate(pooled, w_reduce, b_reduce, w_expand, b_expand, activation, gate)
    weights = (launch.w_reduce, launch.b_reduce, launch.w_expand, launch.b_expand)
    if len({w.dtype for w in weights}) > 1:
        weights = tuple(_launch.fp32_contiguous(w) for w in weights)
    hidden = torch.empty((launch.n, launch.r), dtype=torch.float32, device=pooled.device)
    check(
        "se_gate",
        C.se_gate(
            *(w.data_ptr() for w in (launch.pooled, *weights)), hidden.data_ptr(), launch.gate.data_ptr(),
            _DTYPE_CODES[launch.pooled.dtype], _DTYPE_CODES[weights[0].dtype], launch.n, launch.c, launch.r,
            launch.act, launch.gate_act, pooled.device.index or 0, _stream(pooled),
        ),
    )
    return launch.gate


def se_excite(y: Tensor, gate: Tensor) -> Tensor:
    """CUDA ``se_excite`` (signature of :func:`effnet_kernels.reference.se_excite`); a non-fp32 gate is read as fp32."""
    C = extension()
    launch = _launch.prepare_se_excite(y, gate)
    g = _launch.fp32_contiguous(launch.gate)
    n, c, h, w = launch.y.shape
    check(
        "se_excite",
        C.se_excite(
            launch.y.data_ptr(), g.data_ptr(), launch.out.data_ptr(), _DTYPE_CODES[launch.y.dtype],
            launch.layout == "nhwc", n, c, h, w, y.device.index or 0, _stream(y),
        ),
    )
    return launch.out


# ------------------------------------------------------------------ training (issue #11)
def _new_output(name: str, shape: Sequence[int], like: Tensor, dtype: torch.dtype,
                memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """An uninitialised output (or scratch) tensor the kernels fill completely; ``name`` lets the
    host-shim tests (:mod:`effnet_kernels.cuda_host`) poison and fence it."""
    return torch.empty(tuple(shape), dtype=dtype, device=like.device, memory_format=memory_format)


def _strides(t: Tensor) -> tuple[int, int, int, int]:
    return tuple(int(s) for s in t.stride())  # type: ignore[return-value]


def _check_kernel_size(op: str, weight: Tensor) -> int:
    k = weight.shape[-1]
    if k not in KERNEL_SIZES:
        raise backends.BackendUnavailableError(
            f"effnet_kernels cuda backend: {op} supports kernel sizes {KERNEL_SIZES}, got {k}; "
            "use backend='torch' or 'triton'"
        )
    return k


def _train_args(x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int], activation: str) -> dict:
    """The DWConvTrainArgs fields every training pass takes (x read in place, any strides)."""
    from .ops._checks import ACT_CODES

    n, c, h, w = x.shape
    k = weight.shape[-1]
    left, right, top, bottom = padding
    return dict(
        x=x.data_ptr(), xs=_strides(x), weight=_launch.fp32_contiguous(weight.reshape(c, k * k)),
        dtype=_DTYPE_CODES[x.dtype], nhwc=_launch.layout_of(x) == "nhwc",
        n=n, c=c, h=h, w=w, ho=(h + top + bottom - k) // stride[0] + 1, wo=(w + left + right - k) // stride[1] + 1,
        k=k, stride_h=stride[0], stride_w=stride[1], pad_top=top, pad_left=left, act=ACT_CODES[activation],
        device=x.device.index or 0, stream=_stream(x),
    )


def _with_partials(C: ModuleType, args: dict, like: Tensor) -> Tensor:
    """Put the weight pointer and a partials scratch buffer into ``args``; returns the scratch."""
    weight = args["weight"]
    args["weight"] = weight.data_ptr()
    numel = C.dwconv_train_partials_numel(args)
    partials = _new_output("partials", (max(numel, 1),), like, torch.float32)
    args.update(partials=partials.data_ptr(), partials_numel=numel)
    return partials


def dwconv_bn_stats(x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int]) -> tuple[Tensor, Tensor]:
    """CUDA ``dwconv_bn_stats`` (signature of the reference's): per-block Welford partials of the conv
    output, combined in a fixed order (deterministic); float32 ``[C]`` mean and biased variance."""
    _check_kernel_size("dwconv_bn_stats", weight)
    C = extension()
    n, c = x.shape[0], x.shape[1]
    if n == 0 or c == 0:
        z = torch.zeros(c, dtype=torch.float32, device=x.device)
        return z, z.clone()
    args = _train_args(x, weight, stride, padding, "identity")
    keep = [args["weight"], _with_partials(C, args, x)]  # alive until the launch is queued
    mean = _new_output("mean", (c,), x, torch.float32)
    var = _new_output("var", (c,), x, torch.float32)
    args.update(mean=mean.data_ptr(), var=var.data_ptr())
    check("dwconv_bn_stats", C.dwconv_bn_stats(args))
    del keep
    return mean, var


def dwconv_bn_act_train(
    x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, mean: Optional[Tensor], var: Optional[Tensor],
    eps: float, stride: Sequence[int], padding: Sequence[int], activation: str, squeeze: bool,
) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """CUDA ``dwconv_bn_act_train`` (signature of :func:`effnet_kernels.reference.dwconv_bn_act_train`).

    Without given statistics, :func:`dwconv_bn_stats` computes the batch mean and biased
    variance of the conv output; then the eval forward kernel applies ``scale = gamma / sqrt(var +
    eps)``, ``shift = beta - mean * scale`` (fp32, folded here) with the activation and the optional
    squeeze.
    """
    _check_kernel_size("dwconv_bn_act_train", weight)
    if mean is None or var is None:
        mean, var = dwconv_bn_stats(x, weight, stride, padding)
        mean, var = mean.to(gamma.dtype), var.to(gamma.dtype)
    scale = gamma.float() * torch.rsqrt(var.float() + eps)
    shift = beta.float() - mean.float() * scale
    y, pooled = dwconv_bn_act(x, weight, scale, shift, stride, padding, activation, squeeze)
    return y, pooled, mean, var


def _train_backward(op: str, grad_y: Optional[Tensor], grad_pooled: Optional[Tensor], x: Tensor, weight: Tensor,
                    gamma: Tensor, beta: Tensor, mean: Tensor, var: Tensor, eps: float, stride: Sequence[int],
                    padding: Sequence[int], activation: str, sums: Optional[tuple[Tensor, Tensor, int]] = None,
                    input_grads: bool = True) -> tuple[Optional[Tensor], Optional[Tensor], Tensor, Tensor]:
    """Launch the backward (``op``: ``dwconv_bn_act_train_backward``), its first half alone
    (``dwconv_bn_grad_sums``: ``input_grads=False``) or its second half given ``sums = (sum g xhat,
    sum g, count)`` (``dwconv_bn_input_grads``). Returns (grad_x, grad_w tap-major, grad_gamma,
    grad_beta), fp32 but for grad_x; the grad_x / grad_w of the first half alone are None."""
    k = _check_kernel_size(op, weight)
    C = extension()
    n, c, h, w = x.shape
    fmt = torch.channels_last if _launch.layout_of(x) == "nhwc" else torch.contiguous_format
    grad_x = _new_output("grad_x", (n, c, h, w), x, x.dtype, fmt) if input_grads else None
    grad_w = _new_output("grad_weight", (k * k, c), x, torch.float32) if input_grads else None
    if sums is None:
        grad_gamma = _new_output("grad_gamma", (c,), x, torch.float32)
        grad_beta = _new_output("grad_beta", (c,), x, torch.float32)
    else:
        grad_gamma, grad_beta = _launch.fp32_contiguous(sums[0]), _launch.fp32_contiguous(sums[1])
    if n == 0 or c == 0:
        for t in (grad_x, grad_w) if sums is not None else (grad_x, grad_w, grad_gamma, grad_beta):
            if t is not None:
                t.zero_()
        return grad_x, grad_w, grad_gamma, grad_beta
    args = _train_args(x, weight, stride, padding, activation)
    keep = [args["weight"], _with_partials(C, args, x)]  # alive until the launches are queued
    ho, wo = args["ho"], args["wo"]
    if grad_y is not None:
        grad_y = grad_y.to(x.dtype)
        keep.append(grad_y)
        args.update(grad_y=grad_y.data_ptr(), gys=_strides(grad_y))
    if grad_pooled is not None and grad_pooled.numel() > 0:
        gp = _launch.fp32_contiguous(grad_pooled)
        keep.append(gp)
        args["grad_pooled"] = gp.data_ptr()
    stats = [_launch.fp32_contiguous(t) for t in (gamma, beta, mean, var)]
    keep.extend(stats)
    args.update(gamma=stats[0].data_ptr(), beta=stats[1].data_ptr(), in_mean=stats[2].data_ptr(),
                in_var=stats[3].data_ptr(), eps=float(eps), grad_gamma=grad_gamma.data_ptr(),
                grad_beta=grad_beta.data_ptr())
    if input_grads:
        gz = _new_output("gz", (n, c, ho, wo), x, torch.float32, fmt)
        keep.append(gz)
        args.update(gz=gz.data_ptr(), gzs=_strides(gz), grad_x=grad_x.data_ptr(), gxs=_strides(grad_x),
                    grad_weight=grad_w.data_ptr())
    if sums is not None:
        args["count"] = int(sums[2])
    launch = {"dwconv_bn_act_train_backward": C.dwconv_bn_act_train_backward,
              "dwconv_bn_grad_sums": C.dwconv_bn_grad_sums, "dwconv_bn_input_grads": C.dwconv_bn_input_grads}[op]
    check(op, launch(args))
    del keep
    return grad_x, grad_w, grad_gamma, grad_beta


def _grad_weight(grad_w: Tensor, weight: Tensor) -> Tensor:
    return grad_w.t().reshape(weight.shape).to(weight.dtype).contiguous()


def dwconv_bn_act_train_backward(
    grad_y: Optional[Tensor], grad_pooled: Optional[Tensor], x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor,
    mean: Tensor, var: Tensor, eps: float, stride: Sequence[int], padding: Sequence[int], activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CUDA ``dwconv_bn_act_train_backward`` (signature of the reference's).

    x and grad_y are read in place with their strides (no layout conversion); grad_x comes in
    x's memory format. Scratch: the fp32 gradient at the conv output (N*C*Ho*Wo floats) and
    the reductions' partials. Every reduction is fixed-order: the gradients are bitwise
    reproducible.
    """
    grad_x, grad_w, grad_gamma, grad_beta = _train_backward(
        "dwconv_bn_act_train_backward", grad_y, grad_pooled, x, weight, gamma, beta, mean, var, eps, stride, padding,
        activation)
    return grad_x, _grad_weight(grad_w, weight), grad_gamma.to(gamma.dtype), grad_beta.to(beta.dtype)


def dwconv_bn_grad_sums(
    grad_y: Optional[Tensor], grad_pooled: Optional[Tensor], x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor,
    mean: Tensor, var: Tensor, eps: float, stride: Sequence[int], padding: Sequence[int], activation: str,
) -> tuple[Tensor, Tensor]:
    """CUDA ``dwconv_bn_grad_sums`` (signature of the reference's): the backward's first pass alone."""
    _, _, grad_gamma, grad_beta = _train_backward(
        "dwconv_bn_grad_sums", grad_y, grad_pooled, x, weight, gamma, beta, mean, var, eps, stride, padding,
        activation, input_grads=False)
    return grad_gamma.to(gamma.dtype), grad_beta.to(beta.dtype)


def dwconv_bn_input_grads(
    grad_y: Optional[Tensor], grad_pooled: Optional[Tensor], x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor,
    mean: Tensor, var: Tensor, sum_g_xhat: Tensor, sum_g: Tensor, count: int, eps: float, stride: Sequence[int],
    padding: Sequence[int], activation: str,
) -> tuple[Tensor, Tensor]:
    """CUDA ``dwconv_bn_input_grads`` (signature of the reference's): the backward's second pass with
    the given sums over ``count`` values per channel."""
    grad_x, grad_w, _, _ = _train_backward(
        "dwconv_bn_input_grads", grad_y, grad_pooled, x, weight, gamma, beta, mean, var, eps, stride, padding,
        activation, sums=(sum_g_xhat, sum_g, count))
    return grad_x, _grad_weight(grad_w, weight)


def dwconv_bn_act_backward(
    grad_y: Optional[Tensor], grad_mean: Optional[Tensor], x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor,
    stride: Sequence[int], padding: Sequence[int], activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CUDA ``dwconv_bn_act_backward`` (eval mode; signature of the reference's): the train-mode backward's two
    halves with the BatchNorm as ``u = z * scale + shift`` (mean 0, variance 1, eps 0, so ``xhat = z`` exactly):
    the first half's ``sum(g z)``, ``sum(g)`` are the scale's and shift's gradients, the second, given zero
    sums, has ``gz = scale * g`` (no gradient through statistics). One recompute of the conv more than a fused
    eval pass would make (``X E + P E`` bytes, see :mod:`effnet_kernels.triton.dwconv_backward`)."""
    zeros = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
    ones = torch.ones_like(zeros)
    grad_scale, grad_shift = dwconv_bn_grad_sums(grad_y, grad_mean, x, weight, scale, shift, zeros, ones, 0.0, stride,
                                                 padding, activation)
    grad_x, grad_w = dwconv_bn_input_grads(grad_y, grad_mean, x, weight, scale, shift, zeros, ones, zeros, zeros, 1,
                                           0.0, stride, padding, activation)
    return grad_x, grad_w, grad_scale.to(scale.dtype), grad_shift.to(shift.dtype)


def se_excite_backward(grad_out: Tensor, y: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """CUDA ``se_excite_backward`` (signature of the reference's): one pass over grad_out and y,
    grad_gate reduced per (n, c) in a fixed order (fp32, then gate's dtype)."""
    C = extension()
    layout = _launch.layout_of(y)
    yd = _launch.as_layout(y, layout)
    go = _launch.as_layout(grad_out.to(y.dtype), layout)
    g = _launch.fp32_contiguous(gate)
    n, c, h, w = yd.shape
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    grad_y = _new_output("grad_y", (n, c, h, w), y, y.dtype, fmt)
    grad_gate = _new_output("grad_gate", (n, c), y, torch.float32)
    check(
        "se_excite_backward",
        C.se_excite_backward(dict(
            grad_out=go.data_ptr(), y=yd.data_ptr(), gate=g.data_ptr(), grad_y=grad_y.data_ptr(),
            grad_gate=grad_gate.data_ptr(), dtype=_DTYPE_CODES[y.dtype], nhwc=layout == "nhwc",
            n=n, c=c, h=h, w=w, device=y.device.index or 0, stream=_stream(y),
        )),
    )
    return grad_y, grad_gate.to(gate.dtype)


def se_gate_backward(
    grad_gate: Tensor, pooled: Tensor, w_reduce: Tensor, b_reduce: Tensor, w_expand: Tensor, b_expand: Tensor,
    activation: str, gate: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """CUDA ``se_gate_backward`` (signature of the reference's): fp32 throughout (the inputs are
    O(N*C + R*C) and read as fp32 copies when they are not), the gradients in their inputs' dtypes."""
    from .ops._checks import ACT_CODES

    C = extension()
    ins = [_launch.fp32_contiguous(t) for t in (grad_gate, pooled, w_reduce, b_reduce, w_expand, b_expand)]
    n, c = pooled.shape
    r = w_reduce.shape[0]
    like = pooled
    dv = _new_output("dv", (n, c), like, torch.float32)
    da = _new_output("da", (n, r), like, torch.float32)
    hidden = _new_output("hidden", (n, r), like, torch.float32)
    outs = [_new_output(name, shape, like, torch.float32) for name, shape in
            (("grad_pooled", (n, c)), ("grad_w_reduce", (r, c)), ("grad_b_reduce", (r,)), ("grad_w_expand", (c, r)),
             ("grad_b_expand", (c,)))]
    names = ("grad_gate", "pooled", "w_reduce", "b_reduce", "w_expand", "b_expand")
    args = {name: t.data_ptr() for name, t in zip(names, ins)}
    args.update({name: t.data_ptr() for name, t in zip(
        ("grad_pooled", "grad_w_reduce", "grad_b_reduce", "grad_w_expand", "grad_b_expand"), outs)})
    args.update(dv=dv.data_ptr(), da=da.data_ptr(), hidden=hidden.data_ptr(), n=n, c=c, r=r,
                act=ACT_CODES[activation], gate_act=ACT_CODES[gate], device=pooled.device.index or 0,
                stream=_stream(pooled))
    check("se_gate_backward", C.se_gate_backward(args))
    return tuple(o.to(t.dtype) for o, t in zip(outs, (pooled, w_reduce, b_reduce, w_expand, b_expand)))  # type: ignore[return-value]


def pointwise_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], gate: Optional[Tensor],
                   residual: Optional[Tensor], activation: str, pool: bool) -> Tensor:
    """cuDNN's 1x1 conv and aten's epilogue ops, the gate by this backend's excite kernel
    (:mod:`effnet_kernels._aten_convs`: no CUDA C++ GEMM)."""
    return _aten_convs.pointwise_conv(x, weight, bias, gate, residual, activation, pool, excite=se_excite)


pointwise_conv_backward = _aten_convs.pointwise_conv_backward_with(se_excite, se_excite_backward)


def conv_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                activation: str) -> Tensor:
    """cuDNN's conv with the folded bias, then aten's activation (:mod:`effnet_kernels._aten_convs`)."""
    return _aten_convs.conv_bn_act(x, weight, bias, stride, padding, activation)


IMPLEMENTATIONS: dict[str, Callable] = {
    "dwconv_bn_act": dwconv_bn_act,
    "dwconv_bn_act_backward": dwconv_bn_act_backward,
    "pointwise_conv": pointwise_conv,
    "pointwise_conv_backward": pointwise_conv_backward,
    "conv_bn_act": conv_bn_act,
    "conv_bn_act_backward": _aten_convs.conv_bn_act_backward,
    "bn_act_train_backward": _aten_convs.bn_act_train_backward,
    "expand_bn_act_train_backward": _aten_convs.expand_bn_act_train_backward,
    "se_gate": se_gate,
    "se_excite": se_excite,
    "dwconv_bn_act_train": dwconv_bn_act_train,
    "dwconv_bn_act_train_backward": dwconv_bn_act_train_backward,
    "dwconv_bn_stats": dwconv_bn_stats,
    "dwconv_bn_grad_sums": dwconv_bn_grad_sums,
    "dwconv_bn_input_grads": dwconv_bn_input_grads,
    "se_excite_backward": se_excite_backward,
    "se_gate_backward": se_gate_backward,
}


def _load() -> dict:
    extension()  # build/load now, so a failure surfaces at the first call with its reason
    return dict(IMPLEMENTATIONS)


backends.register_backend("cuda", unavailable=_unavailable, unsupported=_unsupported, load=_load)
