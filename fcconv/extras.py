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


def install_advice(extra: str) -> str:
    """How to install ``extra``: for a packaged fcconv, and for one installed from a clone.

    ``pip install 'fcconv[map]'`` fetches fcconv itself from the package index,
    which is not what someone who installed from a clone wants; pip's own
    record of the install (``direct_url.json``) names the clone when there is
    one, and the advice then installs the extra from that folder.
    """
    packaged = f"pip install 'fcconv[{extra}]'"
    folder = _installed_from()
    if folder is None:
        return (
            f"{packaged} (from a clone of fcconv: pip install -e '.[{extra}]' in it, "
            f"or make install)"
        )
    return (
        f"pip install -e '{folder}[{extra}]' (fcconv was installed from that clone; "
        f"for a packaged fcconv: {packaged})"
    )


def _installed_from() -> str | None:
    """The local folder fcconv was installed from (a clone), if pip recorded one."""
    import json
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    try:  # a stale fcconv.egg-info in the working folder may come first: it records no url
        records = (
            found.read_text("direct_url.json") for found in metadata.distributions(name="fcconv")
        )
        url = json.loads(next((r for r in records if r), "{}")).get("url", "")
    except (ValueError, AttributeError, OSError):
        return None
    parsed = urlparse(url) if isinstance(url, str) else None
    if parsed is None or parsed.scheme != "file" or not parsed.path:
        return None
    folder = unquote(parsed.path)
    return folder if os.path.isfile(os.path.join(folder, "pyproject.toml")) else None


def require(module: str, extra: str, *, purpose: str = "") -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming the extra to install.

    Args:
        module: the module to import (``h5py``, ``onnxruntime``).
        extra: the ``fcconv`` extra that installs it (``keras``, ``onnx``, ``map``).
        purpose: what it is needed for, e.g. ``"to read Keras files"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing = getattr(error, "name", None) or module
        why = f" {purpose}" if purpose else ""
        raise MissingExtraError(
            f"fcconv needs {missing}{why}, which is not installed; install it with: "
            f"{install_advice(extra)}",
            extra=extra,
        ) from None


def require_keras() -> ModuleType:
    """Keras 3, on its torch backend unless the caller chose another.

    TensorFlow is never required: fcconv installs torch, and Keras 3 runs on it.
    """
    os.environ.setdefault("KERAS_BACKEND", "torch")
    return require("keras", "keras", purpose="to load and run Keras models")
