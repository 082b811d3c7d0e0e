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
    """The converted model's maps against the original head on every window, output by output.

    The original's head is cut out as a model of its own (from the first head
    layer's input to every output); the trunk's map on a larger input comes
    from the converted model, whose trunk is the original's, freed of its
    input size (and checked against the original at the native size).
    """
    import numpy as np

    shape = tuple(original.inputs[0].shape)
    native = (int(shape[1]), int(shape[2]))
    check = RuntimeCheck(f"keras {keras.__version__} ({keras.backend.backend()} backend)", native)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *native, int(shape[3]))).astype(np.float32)
    got_native = [_numpy(y).reshape(batch, -1) for y in _outputs(converted(x))]
    want_native = [_numpy(y).astype(np.float64).reshape(batch, -1) for y in _outputs(original(x))]
    larger = (2 * native[0], 2 * native[1])
    big = rng.standard_normal((batch, *larger, int(shape[3]))).astype(np.float32)
    features = _numpy(_trunk(keras, converted, head)(big))
    window = (patch.height, patch.width) if head.pool is None else _native_map(head, patch)
    windows, rows, cols = cut_windows(
        features, Patch(*window, patch.channels), stride, channels_last=True
    )
    check.larger_size, check.map_size, check.windows = larger, (rows, cols), rows * cols
    if rows < 1 or cols < 1:
        check.problems.append(
            f"the trunk's {features.shape[1]}x{features.shape[2]} map at {larger[0]}x"
            f"{larger[1]} holds no {window[0]}x{window[1]} window"
        )
        return check
    if rows == cols == 1:
        check.problems.append(
            f"the map is 1 cell on a {larger[0]}x{larger[1]} input, as at the native size: "
            "the converted model does not slide its head"
        )
        return check
    cut = _head_model(keras, original, head, windows.shape[1:])
    expected = [_numpy(y).astype(np.float64) for y in _outputs(cut(windows))]
    got = [_numpy(y) for y in _outputs(converted(big))]
    if len(got) != len(expected):
        check.problems.append(
            f"the converted model has {len(got)} outputs, the original {len(expected)}"
        )
        return check
    pairs = [(g, e.reshape(batch, rows, cols, -1)) for g, e in zip(got, expected, strict=True)]
    return judge_outputs(check, list(zip(got_native, want_native, strict=True)), pairs)


def _replay(model: Any, head: KerasHead, names: list[str], tensors: dict[str, Any]) -> None:
    """Call ``model``'s layers ``names`` (in order) on new tensors, as the config connects them."""
    for name in names:
        sources = [tensors[source] for source in head.graph.inputs.get(name, [])]
        layer = model.get_layer(name)
        tensors[name] = layer(sources[0] if len(sources) == 1 else sources)


def _trunk(keras: Any, converted: Any, head: KerasHead) -> Any:
    """The converted model up to the map the head reads (its input height and width free)."""
    if not head.graph.sequential:
        return keras.Model(converted.inputs[0], converted.get_layer(head.feeder).output)
    names = list(head.graph.inputs)  # a Sequential's layers in order, its InputLayer left out
    image = keras.Input(tuple(converted.inputs[0].shape[1:]))
    x = image
    for name in names[: names.index(head.feeder) + 1]:
        x = converted.get_layer(name)(x)
    return keras.Model(image, x)


def _head_model(keras: Any, original: Any, head: KerasHead, window: tuple[int, ...]) -> Any:
    """The original's head as a model of its own: one window of the map in, every output out."""
    x = keras.Input(tuple(window))
    tensors = {head.feeder: x}
    order = head.graph.names()
    names = [*head.map_order.permutes, head.map_order.entry, *head.region]
    _replay(original, head, sorted(names, key=order.index), tensors)
    return keras.Model(x, [tensors[name] for name in head.graph.outputs])


def _native_map(head: KerasHead, patch: Patch) -> tuple[int, int]:
    """The window of a global pool's head: the native feature map."""
    assert head.patch is not None
    return head.patch.height, head.patch.width


def _outputs(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [value[key] for key in sorted(value)]
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


def judge_outputs(
    check: RuntimeCheck,
    native: list[tuple[Any, Any]],
    dense: list[tuple[Any, Any]],
) -> RuntimeCheck:
    """Judge every output of a model (the one judge, rule ``runtime-float32``); ``check``
    holds the worst difference, every comparison and every problem.

    Each output is judged on its own scale (a softmax and box offsets differ in
    size); with several outputs the comparisons are ``native:0``, ``dense:0``, …
    and the problems name the output.
    """
    worst_native: float | None = None
    worst_dense: float | None = None
    for index, (pair, native_pair) in enumerate(zip(dense, native, strict=True)):
        one = judge(RuntimeCheck(check.runtime, check.native_size), native_pair, pair)
        several = len(dense) > 1
        prefix = f"output {index}: " if several else ""
        check.problems += [f"{prefix}{problem}" for problem in one.problems]
        for what, found in one.comparisons.items():
            check.comparisons[f"{what}:{index}" if several else what] = found
        worst_native = _worst(worst_native, one.native_max_abs_diff)
        worst_dense = _worst(worst_dense, one.dense_max_abs_diff)
    check.native_max_abs_diff, check.dense_max_abs_diff = worst_native, worst_dense
    if len(dense) > 1:
        check.notes.append(f"{len(dense)} outputs, each judged against the head on every window")
    return check


def _worst(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else max(a, b)
