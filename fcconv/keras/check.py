"""A converted ``.keras`` model run in Keras: its map against the original head on every window.

Both models are loaded with ``keras.saving.load_model`` (safe mode: no
lambda or custom code is deserialized). The original is cut where its head
starts (the ``Permute``/``Flatten`` found in its config): its trunk runs on a
larger input, every window of the trunk's feature map goes through its head,
and the converted model's map must match cell by cell (see
:mod:`fcconv.verify.runtime`).
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

from fcconv.errors import CheckpointError, ConvolutionalizeError
from fcconv.geometry import Patch
from fcconv.keras.config import KerasHead
from fcconv.verify.runtime import RuntimeCheck, cut_windows, judge


def load(path: str | Path) -> Any:
    """A ``.keras`` model, loaded by Keras in safe mode, uncompiled."""
    from fcconv.extras import require_keras

    keras = require_keras()
    file = Path(path)
    try:
        if file.suffix == ".keras":
            return keras.saving.load_model(str(file), compile=False, safe_mode=True)
        # Keras tells formats by the name: a temporary output is shown to it as .keras
        with tempfile.TemporaryDirectory(prefix="fcconv-") as folder:
            named = Path(folder) / "model.keras"
            named.symlink_to(file.resolve())
            return keras.saving.load_model(str(named), compile=False, safe_mode=True)
    except Exception as error:  # Keras raises many kinds; each means "cannot load"
        text = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise CheckpointError(
            f"Keras cannot load {path} ({type(error).__name__}: {text}); check that it is "
            "a Keras 3 model saved with model.save(...)"
        ) from None


def _run(layers: list[Any], x: Any) -> Any:
    for layer in layers:
        x = layer(x, training=False) if _takes_training(layer) else layer(x)
    return x


def _takes_training(layer: Any) -> bool:
    import inspect

    try:
        return "training" in inspect.signature(layer.call).parameters
    except (TypeError, ValueError):
        return False


def _numpy(tensor: Any) -> Any:
    from fcconv.extras import require_keras

    with warnings.catch_warnings():
        # Keras's torch backend calls np.array(tensor) the way NumPy 2 deprecates
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return require_keras().ops.convert_to_numpy(tensor)


def check_models(
    original_path: str | Path,
    converted_path: str | Path,
    head: KerasHead,
    patch: Patch,
    stride: tuple[int, int],
    *,
    seed: int = 0,
    batch: int = 2,
) -> RuntimeCheck:
    """Run both models in Keras and compare the map with the head on every window.

    Args:
        original_path: the model before conversion.
        converted_path: the rewritten model (e.g. the temporary output).
        head: where the original's head starts (``find_head`` on its config).
        patch: the feature map the head reads (channels-last ``H × W × C``).
        stride: the first Conv2D's stride, in feature-map cells.
    """
    from fcconv.extras import require_keras

    keras = require_keras()
    original, converted = load(original_path), load(converted_path)
    try:
        return _compare(keras, original, converted, head, patch, stride, seed, batch)
    except (ValueError, TypeError, RuntimeError, IndexError) as error:  # Keras ran, and failed
        text = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise ConvolutionalizeError(
            f"Keras cannot run the models to check them ({type(error).__name__}: {text})"
        ) from None


def _compare(
    keras: Any,
    original: Any,
    converted: Any,
    head: KerasHead,
    patch: Patch,
    stride: tuple[int, int],
    seed: int,
    batch: int,
) -> RuntimeCheck:
    import numpy as np

    layers = [layer for layer in original.layers if type(layer).__name__ != "InputLayer"]
    names = [layer.name for layer in layers]
    first = head.layers[head.start]["config"]["name"]
    cut = names.index(first)
    shape = tuple(original.inputs[0].shape)
    native = (int(shape[1]), int(shape[2]))
    check = RuntimeCheck(f"keras {keras.__version__} ({keras.backend.backend()} backend)", native)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *native, int(shape[3]))).astype(np.float32)
    native_pair = (
        _numpy(converted(x)).reshape(batch, -1),
        _numpy(original(x)).astype(np.float64).reshape(batch, -1),
    )
    larger = (2 * native[0], 2 * native[1])
    big = rng.standard_normal((batch, *larger, int(shape[3]))).astype(np.float32)
    features = _numpy(_run(layers[:cut], big))
    windows, rows, cols = cut_windows(features, patch, stride, channels_last=True)
    check.larger_size, check.map_size, check.windows = larger, (rows, cols), rows * cols
    if rows < 1 or cols < 1:
        check.problems.append(
            f"the trunk's {features.shape[1]}x{features.shape[2]} map at {larger[0]}x"
            f"{larger[1]} holds no {patch.height}x{patch.width} window"
        )
        return check
    expected = _numpy(_run(layers[cut:], windows)).astype(np.float64)
    expected = expected.reshape(batch, rows, cols, -1)
    got = _numpy(converted(big))
    return judge(check, native_pair, (got, expected))
