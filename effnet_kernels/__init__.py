"""effnet_kernels: fused GPU kernels for EfficientNet B0-B7.

One line: ``effnet_kernels.convert(model)`` swaps the MBConv blocks of a torchvision,
timm, efficientnet_pytorch or :mod:`effnet_kernels.models` EfficientNet for fused
ones, in place. ``python -m effnet_kernels info`` says which backends work here.
"""

from . import models, ops
from .backends import BackendUnavailableError, available_backends, use_backend
from .convert import ConversionReport, conversion_report, convert, revert
from .nn import FusedDWConvBNAct, MBConv, SqueezeExcite

__version__ = "0.1.0"

__all__ = [
    "convert",
    "revert",
    "conversion_report",
    "ConversionReport",
    "MBConv",
    "SqueezeExcite",
    "FusedDWConvBNAct",
    "ops",
    "models",
    "use_backend",
    "available_backends",
    "BackendUnavailableError",
    "__version__",
]
