"""Command line: ``python -m effnet_kernels {info,demo,bench}``.

* ``info``  — Python, torch, Triton, CUDA/GPU versions and each backend, available or why not.
* ``demo``  — safe on a CPU: builds B0, converts it (and an efficientnet_pytorch B0 when that
  package is installed), prints parity and time per available backend.
* ``bench`` — on a GPU, the full benchmark (``benchmarks/`` in the repository; see
  ``python -m effnet_kernels bench --help``); without a GPU it says so and runs the demo.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import platform
import sys
import time
from typing import Callable, Optional, Sequence

import torch


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception as exc:  # a broken install is information, not a crash
        return f"import failed: {exc}"


def cmd_info(_: argparse.Namespace) -> int:
    """Print versions, the GPU, and each backend with the reasons it is or is not available."""
    from . import __version__, available_backends

    print(f"effnet_kernels {__version__}")
    print(f"python  {platform.python_version()} ({sys.executable})")
    print(f"torch   {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"triton  {_version('triton')}")
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        print(f"GPU     {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]}), cuDNN {torch.backends.cudnn.version()}")
    else:
        print("GPU     none visible to torch")
    print("backends:")
    for status in available_backends().values():
        print(f"  {status}")
    return 0


def _time_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def _demo_backends(device: torch.device) -> list[str]:
    from . import available_backends

    names = []
    for name, status in available_backends().items():
        if not status.available:
            print(f"  {name:7s} skipped: {'; '.join(status.reasons)}")
        elif device.type == "cpu" and name == "triton":
            print("  triton  skipped: the Triton interpreter is a correctness tool, far too slow for a whole network")
        else:
            names.append(name)
    return names


def _compare(title: str, model: torch.nn.Module, x: torch.Tensor, repeats: int) -> bool:
    """Print each available backend's time and parity (DESIGN's rule vs fp64); False if any fails."""
    from . import conversion_report, convert
    from .testing import model_parity, sensitivity

    print(f"\n{title}: input {tuple(x.shape)} on {x.device}")
    reference = copy.deepcopy(model).to(torch.float64)
    ok = True
    with torch.no_grad():
        sens = sensitivity(model, x, torch.randn_like(x))
        print(f"  BatchNorm calibrated on this batch: an unrelated input changes the output by {sens:.2g} (relative)")
        eager_ms = _time_ms(lambda: model(x), repeats)
        print(f"  {'eager':7s} {eager_ms:8.2f} ms  (reference)")
        for name in _demo_backends(x.device):
            fused = convert(copy.deepcopy(model), backend=name)
            result = model_parity(model, fused, x, reference=reference)
            ms = _time_ms(lambda: fused(x), repeats)
            verdict = "ok" if result.ok else "FAILED"
            ok = ok and result.ok
            print(f"  {name:7s} {ms:8.2f} ms  rel. error vs fp64 {result.rel_err:.2e} (eager fp32: "
                  f"{result.eager_err / max(result.ref_scale, 1e-30):.2e}) parity {verdict}  "
                  f"({len(conversion_report(fused).swapped)} blocks fused)")
    return ok


def cmd_demo(args: argparse.Namespace) -> int:
    """Build B0, convert it with every available backend, print parity and time; 1 if parity fails."""
    from . import models
    from .testing import calibrate_batchnorm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        print("No GPU is visible: this is the CPU demo (correctness and a rough CPU time only; "
              "the fused kernels are GPU kernels, so CPU times say nothing about their speed).")
    torch.manual_seed(0)
    size = args.resolution
    x = torch.randn(args.batch, 3, size, size, device=device)
    model = calibrate_batchnorm(models.efficientnet("b0").to(device).eval(), x)
    ok = _compare("effnet_kernels.models B0", model, x, args.repeats)
    if importlib.util.find_spec("efficientnet_pytorch") is not None:
        from efficientnet_pytorch import EfficientNet

        ext = calibrate_batchnorm(EfficientNet.from_name("efficientnet-b0", image_size=size).to(device).eval(), x)
        ok = _compare("efficientnet_pytorch B0 (TF 'same' padding)", ext, x, args.repeats) and ok
    else:
        print("\nefficientnet_pytorch is not installed: skipping its B0")
    return 0 if ok else 1


#: BatchNorm statistics calibrated on fewer values per channel at B0's last stage (batch x its H x W)
#: make fp32 rounding grow through the network until the parity verdict is noise (at 32 px, batch 2:
#: 2 values, and the fused error swung to 4x eager's)
MIN_LAST_STAGE_VALUES = 8


def _check_demo_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` (exit 2) naming the argument when the demo's batch or resolution cannot give a
    meaningful parity check."""
    if args.batch < 2:
        parser.error(f"--batch must be at least 2 (BatchNorm is calibrated on the batch), got {args.batch}")
    if args.resolution < 32:
        parser.error(f"--resolution must be at least 32 (B0 downsamples 32x), got {args.resolution}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    last = -(-args.resolution // 32)
    if args.batch * last * last < MIN_LAST_STAGE_VALUES:
        parser.error(f"--batch {args.batch} at --resolution {args.resolution} calibrates B0's last stage "
                     f"({last}x{last} maps) on {args.batch * last * last} values per channel; it needs at least "
                     f"{MIN_LAST_STAGE_VALUES} (batch x ceil(resolution / 32)^2) for the parity check to mean "
                     f"anything: raise --batch or --resolution")


def cmd_bench(args: argparse.Namespace, rest: Sequence[str]) -> int:
    """The GPU benchmark; on a machine without a GPU, say so and run the demo instead."""
    if not torch.cuda.is_available():
        print("No GPU is visible: the benchmark needs a CUDA GPU. Running the CPU demo instead.\n")
        return cmd_demo(argparse.Namespace(batch=2, resolution=64, repeats=3))
    try:
        from benchmarks import network
    except ImportError as exc:
        print(f"The benchmark code lives in the repository's benchmarks/ folder; run this from the "
              f"repository root ({exc}).", file=sys.stderr)
        return 2
    return int(network.main(list(rest)) or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m effnet_kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and backend availability")
    demo = sub.add_parser("demo", help="parity and time of converted B0 per backend (safe on a CPU)")
    demo.add_argument("--batch", type=int, default=2, help="batch size (at least 2: BatchNorm is calibrated on it; batch x ceil(resolution / 32)^2 >= 8)")
    demo.add_argument("--resolution", type=int, default=64)
    demo.add_argument("--repeats", type=int, default=5)
    sub.add_parser("bench", help="full-network GPU benchmark (CPU: the demo)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        _check_demo_args(parser, args)
    if args.command == "bench":
        return cmd_bench(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return {"info": cmd_info, "demo": cmd_demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
