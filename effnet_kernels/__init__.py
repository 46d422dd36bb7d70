"""effnet_kernels: fused GPU kernels for EfficientNet B0-B7.

One line: ``effnet_kernels.convert(model)`` swaps the inverted-residual blocks of a
torchvision, timm, transformers, efficientnet_pytorch or :mod:`effnet_kernels.models`
EfficientNet (and MobileNetV2/V3, MNASNet, EfficientNet-Lite, MixNet) for fused ones, in
place. :mod:`effnet_kernels.export` exports a converted model (torch.export, ONNX).
``python -m effnet_kernels info`` says which backends work here.
"""

from . import export, models, ops
from .backends import BackendUnavailableError, available_backends, use_backend
from .convert import ConversionReport, conversion_report, convert, revert
from .nn import FusedDWConvBNAct, MBConv, SqueezeExcite
from .stem_head import FusedConvBNAct

__version__ = "0.1.0"

__all__ = [
    "convert",
    "revert",
    "conversion_report",
    "ConversionReport",
    "MBConv",
    "SqueezeExcite",
    "FusedDWConvBNAct",
    "FusedConvBNAct",
    "ops",
    "models",
    "export",
    "use_backend",
    "available_backends",
    "BackendUnavailableError",
    "__version__",
]
