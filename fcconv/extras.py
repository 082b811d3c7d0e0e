"""Optional dependencies: imported on first use, or a one-line error naming the install.

The core install (torch, safetensors, click, rich) stays small; Keras files
need ``h5py`` (and ``keras`` to run the models), ONNX graphs need ``onnx``
and ``onnxruntime``, pictures of maps need ``pillow`` and ``matplotlib``.
Each comes with an extra of the ``fcconv`` package.

>>> require("json", "keras").__name__
'json'
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from fcconv.errors import MissingExtraError

INSTALL = {
    "keras": "pip install 'fcconv[keras]'",
    "onnx": "pip install 'fcconv[onnx]'",
    "map": "pip install 'fcconv[map]'",
}
"""The command that installs each extra."""


def require(module: str, extra: str, *, purpose: str = "") -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming the extra to install.

    Args:
        module: the module to import (``h5py``, ``onnxruntime``).
        extra: the ``fcconv`` extra that installs it (``keras``, ``onnx``).
        purpose: what it is needed for, e.g. ``"to read Keras files"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing = getattr(error, "name", None) or module
        why = f" {purpose}" if purpose else ""
        raise MissingExtraError(
            f"fcconv needs {missing}{why}, which is not installed; install it with: "
            f"{INSTALL[extra]}",
            extra=extra,
        ) from None


def require_keras() -> ModuleType:
    """Keras 3, on its torch backend unless the caller chose another.

    TensorFlow is never required: fcconv installs torch, and Keras 3 runs on it.
    """
    os.environ.setdefault("KERAS_BACKEND", "torch")
    return require("keras", "keras", purpose="to load and run Keras models")
