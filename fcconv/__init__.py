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

__all__ = [
    "ORDERS",
    "Patch",
    "PatchSpec",
    "__version__",
    "conv_weight_to_linear",
    "linear_weight_to_conv",
    "parse_order",
    "parse_patch",
    "parse_stride",
]
