"""fcconv: rewrite Linear layers as the strided Conv2d that computes the same thing.

The Python API mirrors the command line:

>>> import torch
>>> from fcconv import Patch, linear_weight_to_conv
>>> kernel = linear_weight_to_conv(torch.zeros(64, 4000), Patch(20, 20, 10), "chw")
>>> tuple(kernel.shape)
(64, 10, 20, 20)
"""

from fcconv.geometry import (
    ORDERS,
    Patch,
    PatchSpec,
    conv_weight_to_linear,
    linear_weight_to_conv,
    parse_order,
    parse_patch,
    parse_stride,
)

__version__ = "0.1.0"

# Torch-heavy entry points load on first use, so `fcconv --help` starts fast.
_LAZY = {
    "linear_to_conv": "fcconv.surgery",
    "conv_to_linear": "fcconv.surgery",
    "replace_module": "fcconv.surgery",
    "load_checkpoint": "fcconv.checkpoint",
    "save_checkpoint": "fcconv.checkpoint",
    "verify_conversion": "fcconv.verify",
    "functional_check": "fcconv.verify",
    "convolutionalize": "fcconv.fcn",
    "verify_dense": "fcconv.fcn",
    "rank_orders": "fcconv.evidence",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fcconv' has no attribute {name!r}")


__all__ = [
    "ORDERS",
    "Patch",
    "PatchSpec",
    "__version__",
    "conv_to_linear",
    "convolutionalize",
    "conv_weight_to_linear",
    "functional_check",
    "linear_to_conv",
    "linear_weight_to_conv",
    "load_checkpoint",
    "parse_order",
    "parse_patch",
    "parse_stride",
    "rank_orders",
    "replace_module",
    "save_checkpoint",
    "verify_conversion",
    "verify_dense",
]
