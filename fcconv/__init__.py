"""fcconv: rewrite Linear layers as the strided convolutions that compute the same thing.

Every job the command line does is a function here, returning a result that
is truthy on success, has ``.to_dict()`` (the body of the ``--json`` document) and
``.exit_code``:

- :func:`inspect_checkpoint`, :func:`convert_checkpoint`,
  :func:`verify_checkpoints`: checkpoint files (``.pt``, ``.safetensors``,
  sharded folders, Keras ``.keras``/``.weights.h5``/``.h5``);
- :func:`convolutionalize_file`: a whole model file to a ``.pt2`` program or
  an ``.onnx`` graph; :func:`convolutionalize_onnx`, :func:`verify_onnx`: ONNX
  graphs, checked in onnxruntime;
- :func:`convolutionalize`, :func:`verify_dense`: the same on an ``nn.Module``;
- :func:`map_image`: a dense model's map drawn over an image (``fcconv map``);
- :func:`linear_weight_to_conv`, :func:`linear_to_conv`: tensors and modules.

Paths, patches, orders and strides are taken as text (``"8x8x16"``) or as
typed values (a :class:`Patch`, a tuple ``(8, 8, 16)``, an int stride); a
state dict in memory is taken wherever a checkpoint path is
(``convert_checkpoint(model.state_dict(), layers=["fc"], patch=(8, 8, 16))``
returns the converted one as ``result.state_dict`` when no output path is
given). A value of the wrong type is refused with a :class:`FcconvError`
(``SpecError``, ``CheckpointError``, ``LayerError``), as is bad input.

>>> import torch
>>> from fcconv import Patch, linear_weight_to_conv
>>> kernel = linear_weight_to_conv(torch.zeros(64, 4000), Patch(20, 20, 10), "chw")
>>> tuple(kernel.shape)
(64, 10, 20, 20)
"""

from fcconv.errors import (
    CheckpointError,
    FcconvError,
    LayerError,
    OutputError,
    PatchSpellingError,
    SpecError,
)
from fcconv.geometry import (
    ORDERS,
    Patch,
    PatchNd,
    PatchSpec,
    conv_weight_to_linear,
    linear_weight_to_conv,
    parse_order,
    parse_patch,
    parse_stride,
)

# Entry points that need torch (or a lot of code) load on first use, so
# `fcconv --help` starts fast.
_LAZY = {
    "inspect_checkpoint": "fcconv.api",
    "convert_checkpoint": "fcconv.api",
    "verify_checkpoints": "fcconv.api",
    "convolutionalize_file": "fcconv.api",
    "map_image": "fcconv.api",
    "MapResult": "fcconv.api",
    "convolutionalize_onnx": "fcconv.api.onnx",
    "verify_onnx": "fcconv.api.onnx",
    "InspectResult": "fcconv.api",
    "ConvertResult": "fcconv.api",
    "ConvolutionalizeResult": "fcconv.api",
    "linear_to_conv": "fcconv.surgery",
    "conv_to_linear": "fcconv.surgery",
    "replace_module": "fcconv.surgery",
    "load_checkpoint": "fcconv.io.checkpoint",
    "save_checkpoint": "fcconv.io.checkpoint",
    "VerifyResult": "fcconv.verify",
    "functional_check": "fcconv.verify",
    "convolutionalize": "fcconv.fcn",
    "verify_dense": "fcconv.fcn",
    "rank_orders": "fcconv.evidence",
}


def __getattr__(name: str):
    if name == "__version__":  # importlib.metadata costs 50 ms of every start: only on demand
        from importlib import metadata

        try:
            return metadata.version("fcconv")
        except metadata.PackageNotFoundError:  # pragma: no cover - a bare source tree
            return "0+unknown"
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fcconv' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names and the public API that loads on first use (for completion)."""
    return sorted({*globals(), *__all__})


__all__ = [
    "ORDERS",
    "CheckpointError",
    "ConvertResult",
    "ConvolutionalizeResult",
    "FcconvError",
    "InspectResult",
    "LayerError",
    "MapResult",
    "OutputError",
    "Patch",
    "PatchNd",
    "PatchSpec",
    "PatchSpellingError",
    "SpecError",
    "VerifyResult",
    "__version__",
    "conv_to_linear",
    "conv_weight_to_linear",
    "convert_checkpoint",
    "convolutionalize",
    "convolutionalize_file",
    "convolutionalize_onnx",
    "functional_check",
    "inspect_checkpoint",
    "linear_to_conv",
    "linear_weight_to_conv",
    "load_checkpoint",
    "map_image",
    "parse_order",
    "parse_patch",
    "parse_stride",
    "rank_orders",
    "replace_module",
    "save_checkpoint",
    "verify_checkpoints",
    "verify_dense",
    "verify_onnx",
]
