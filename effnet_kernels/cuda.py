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

from . import _build, _folded_weights, _launch, backends

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


def _unsupported(op: str, t: Tensor, args: tuple = ()) -> list[str]:
    reasons = []
    if op == "dwconv_bn_act" and len(args) > 1 and args[1].shape[-1] not in KERNEL_SIZES:
        reasons.append(f"kernel size {args[1].shape[-1]} is not compiled (3, 5 or 7); the torch and triton backends take any odd k")
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


IMPLEMENTATIONS: dict[str, Callable] = {
    "dwconv_bn_act": dwconv_bn_act,
    "se_gate": se_gate,
    "se_excite": se_excite,
}


def _load() -> dict:
    extension()  # build/load now, so a failure surfaces at the first call with its reason
    return dict(IMPLEMENTATIONS)


backends.register_backend("cuda", unavailable=_unavailable, unsupported=_unsupported, load=_load)
