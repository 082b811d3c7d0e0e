"""A Keras model config, read and rewritten as JSON: ``Flatten → Dense …`` to ``Conv2D …``.

The head of a classifier saved by Keras 3 is read off its config: the
``Flatten`` (or ``Reshape((-1,))``) that feeds the first ``Dense``, any
``Permute`` before it, and the ``Dense`` layers after it, with the layers
between them that act on the last axis alone (activations, dropout,
normalization). The feature map's shape comes from the layers'
``build_config``; the flatten order is ``hwc`` (Keras flattens channels-last
maps) unless a ``Permute`` reorders the axes first.

The rewrite removes the ``Permute``/``Flatten``, turns the first ``Dense``
into a ``Conv2D`` with the feature map's size as its kernel
(``padding="valid"``, the strides), every later ``Dense`` into a 1×1
``Conv2D``, and frees the input's height and width: the model then runs on
larger inputs and emits a map. Only chain-shaped models (``Sequential``, or a
``Functional`` model in which every layer feeds the next) are rewritten.
Nothing here imports Keras.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fcconv.errors import ConvolutionalizeError
from fcconv.geometry import Patch

KERAS_ORDER = "hwc"
"""How Keras flattens a channels-last map: rows, then columns, then channels."""

FLATTENS = ("Flatten", "Reshape")
# Layers that may sit between the Dense layers of a head: they act on the last
# axis alone (or element-wise), so they act on each cell of a map the same way.
PER_CELL = (
    "Activation",
    "AlphaDropout",
    "BatchNormalization",
    "Dropout",
    "ELU",
    "GaussianDropout",
    "GaussianNoise",
    "LayerNormalization",
    "LeakyReLU",
    "ReLU",
    "Softmax",
)
_CONV_KEYS = (
    "name",
    "trainable",
    "dtype",
    "activation",
    "use_bias",
    "kernel_initializer",
    "bias_initializer",
    "kernel_regularizer",
    "bias_regularizer",
    "activity_regularizer",
    "kernel_constraint",
    "bias_constraint",
)


@dataclass(frozen=True)
class KerasHead:
    """Where the head of a chain-shaped Keras model starts, and what it reads.

    Attributes:
        layers: the model's layer configs, in order.
        start: index of the first layer of the head (a ``Permute`` or the flatten).
        dense: the names of the head's ``Dense`` layers, in order.
        patch: the feature map the flatten reads (channels-last), or None when
            the config does not record it.
        order: the flatten order of that map's axes.
        order_from: how the order was found, in words.
        sequential: whether the model is a ``Sequential``.
    """

    layers: list[dict[str, Any]]
    start: int
    dense: list[str]
    patch: Patch | None
    order: str
    order_from: str
    sequential: bool


def _layers(config: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    cls = config.get("class_name")
    layers = (config.get("config") or {}).get("layers")
    if cls not in ("Sequential", "Functional", "Model") or not isinstance(layers, list):
        raise ConvolutionalizeError(
            f"a Keras {cls or 'model'} config is not a Sequential or Functional model; "
            "convert its weights to PyTorch's layout with {format} torch"
        )
    return layers, cls == "Sequential"


def _name(layer: dict[str, Any]) -> str:
    return str(layer.get("config", {}).get("name", "?"))


def _input_shape(layer: dict[str, Any]) -> list[Any] | None:
    shape = (layer.get("build_config") or {}).get("input_shape")
    return list(shape) if isinstance(shape, list) else None


def _is_flatten(layer: dict[str, Any]) -> bool:
    cls = layer.get("class_name")
    if cls == "Flatten":
        return True
    target = layer.get("config", {}).get("target_shape")
    return cls == "Reshape" and isinstance(target, list) and len(target) == 1


def _check_chain(layers: list[dict[str, Any]], sequential: bool) -> None:
    """A Functional model is rewritten only when every layer reads the one before it."""
    if sequential:
        return
    for before, layer in zip(layers, layers[1:], strict=False):
        sources = _inbound_names(layer)
        if sources != [_name(before)]:
            raise ConvolutionalizeError(
                f"Keras layer {_name(layer)!r} does not simply read {_name(before)!r} "
                "(fcconv rewrites chain-shaped models only); convert the weights to "
                "PyTorch's layout with {format} torch"
            )


def _keras_tensors(value: Any) -> Iterator[dict[str, Any]]:
    """The config of every tensor a layer's ``inbound_nodes`` name, in order."""
    if isinstance(value, dict):
        config = value.get("config")
        if value.get("class_name") == "__keras_tensor__" and isinstance(config, dict):
            yield config
            return
        for item in value.values():
            yield from _keras_tensors(item)
    elif isinstance(value, list):
        for item in value:
            yield from _keras_tensors(item)


def _inbound_names(layer: dict[str, Any]) -> list[str]:
    histories = (cfg.get("keras_history") for cfg in _keras_tensors(layer.get("inbound_nodes")))
    return [str(history[0]) for history in histories if isinstance(history, list) and history]


def find_head(config: dict[str, Any]) -> KerasHead:
    """The head of a chain-shaped Keras classifier: its flatten, its Dense layers, its patch.

    Raises:
        ConvolutionalizeError: no ``Flatten → Dense`` head, a layer in it that
            does not act per cell, or a model that is not a chain.
    """
    layers, sequential = _layers(config)
    flat = next((i for i, layer in enumerate(layers) if _is_flatten(layer)), None)
    if flat is None or flat + 1 >= len(layers) or layers[flat + 1].get("class_name") != "Dense":
        raise ConvolutionalizeError(
            "no Flatten followed by a Dense layer in the Keras model; name the layers to "
            "convert with {layers} NAME=HxWxC and write the weights with {format} torch"
        )
    _check_chain(layers, sequential)
    trunk_first = [
        layer
        for layer in layers[: flat + 1]
        if layer.get("config", {}).get("data_format") == "channels_first"
    ]
    first = trunk_first[0] if trunk_first else None
    if first is not None:
        raise ConvolutionalizeError(
            f"Keras layer {_name(first)!r} is channels_first; fcconv rewrites channels-last "
            "models (Keras's default); write the weights with {format} torch instead"
        )
    start, order, order_from = flat, KERAS_ORDER, "Flatten of a channels-last map"
    if flat > 0 and layers[flat - 1].get("class_name") == "Permute":
        start = flat - 1
        order, order_from = _permuted_order(layers[start])
    dense = []
    for layer in layers[flat + 1 :]:
        cls = layer.get("class_name")
        if cls == "Dense":
            dense.append(_name(layer))
        elif cls not in PER_CELL or not _acts_on_last_axis(layer):
            raise ConvolutionalizeError(
                f"Keras layer {_name(layer)!r} ({cls}) in the head does not act on each "
                "cell of a map alone; fcconv carries activations, dropout and "
                "normalization over the last axis between Dense layers"
            )
    patch = _patch(layers[start]) or _infer_patch(layers[:start])
    return KerasHead(layers, start, dense, patch, order, order_from, sequential)


def _acts_on_last_axis(layer: dict[str, Any]) -> bool:
    axis = layer.get("config", {}).get("axis", -1)
    return axis in (-1, [-1])


def _permuted_order(layer: dict[str, Any]) -> tuple[str, str]:
    dims = layer.get("config", {}).get("dims")
    if not isinstance(dims, list) or sorted(dims) != [1, 2, 3]:
        raise ConvolutionalizeError(
            f"Keras Permute {_name(layer)!r} has dims {dims!r}; expected a permutation of "
            "(1, 2, 3) of a channels-last map"
        )
    order = "".join(KERAS_ORDER[d - 1] for d in dims)
    return order, f"Permute{tuple(dims)} → Flatten"


def _patch(layer: dict[str, Any]) -> Patch | None:
    shape = _input_shape(layer)
    if shape is None or len(shape) != 4 or not all(isinstance(s, int) for s in shape[1:]):
        return None
    height, width, channels = shape[1:]
    return Patch(height, width, channels)


_SHAPE_KEEPING = (*PER_CELL, "InputLayer", "SpatialDropout2D", "ActivityRegularization")


def _infer_patch(trunk: list[dict[str, Any]]) -> Patch | None:
    """The trunk's output map, from the input's shape through convs and pools (legacy
    configs carry no ``build_config``); None where a layer's arithmetic is unknown."""
    shape: list[int] | None = None
    for layer in trunk:
        cfg, cls = layer.get("config", {}), layer.get("class_name")
        if cls == "InputLayer":
            given = cfg.get("batch_shape") or cfg.get("batch_input_shape")
            shape = list(given[1:]) if isinstance(given, list) and len(given) == 4 else None
        elif shape is None or cls in _SHAPE_KEEPING:
            continue
        elif cls == "Conv2D":
            shape = _window_shape(shape, cfg, cfg.get("kernel_size"), cfg.get("filters"))
        elif cls in ("MaxPooling2D", "AveragePooling2D"):
            shape = _window_shape(shape, cfg, cfg.get("pool_size"), shape[2])
        else:
            return None
        if shape is None:
            return None
    if shape is None or not all(isinstance(s, int) and s > 0 for s in shape):
        return None
    return Patch(*shape)


def _window_shape(
    shape: list[int], cfg: dict[str, Any], kernel: Any, channels: Any
) -> list[int] | None:
    strides = cfg.get("strides") or kernel
    dilation = cfg.get("dilation_rate", [1, 1])
    if cfg.get("data_format", "channels_last") != "channels_last" or not isinstance(channels, int):
        return None
    try:
        sizes = []
        for axis in (0, 1):
            size, k, s, d = shape[axis], kernel[axis], strides[axis], dilation[axis]
            span = d * (k - 1) + 1
            if cfg.get("padding", "valid") == "same":
                sizes.append(-(-size // s))
            else:
                sizes.append((size - span) // s + 1)
    except (TypeError, IndexError):
        return None
    return [*sizes, channels]


# --------------------------------------------------------------------- rewrite


def _free(shape: Any) -> Any:
    """A channels-last ``[B, H, W, C]`` shape with free height and width."""
    if isinstance(shape, list) and len(shape) == 4:
        return [shape[0], None, None, shape[3]]
    return shape


def _free_build(layer: dict[str, Any]) -> None:
    build = layer.get("build_config")
    if isinstance(build, dict) and "input_shape" in build:
        build["input_shape"] = _free(build["input_shape"])


def conv_config(
    dense: dict[str, Any], kernel: tuple[int, int], stride: tuple[int, int], in_channels: int
) -> dict[str, Any]:
    """The ``Conv2D`` layer config that takes a ``Dense`` layer's place (same name)."""
    source = dense.get("config", {})
    config = {key: copy.deepcopy(source[key]) for key in _CONV_KEYS if key in source}
    config.update(
        filters=source["units"],
        kernel_size=list(kernel),
        strides=list(stride),
        padding="valid",
        data_format="channels_last",
        dilation_rate=[1, 1],
        groups=1,
    )
    layer = {k: copy.deepcopy(v) for k, v in dense.items() if k in ("name", "inbound_nodes")}
    return {
        **layer,
        "module": "keras.layers",
        "class_name": "Conv2D",
        "config": config,
        "registered_name": None,
        "build_config": {"input_shape": [None, None, None, in_channels]},
    }


def rewrite(
    config: dict[str, Any],
    head: KerasHead,
    convert: dict[str, tuple[Patch, tuple[int, int]]],
) -> dict[str, Any]:
    """A new model config: flatten removed, the ``convert`` Dense layers as ``Conv2D``.

    Args:
        config: the model config (not modified).
        head: from :func:`find_head` on ``config``.
        convert: Dense layer name → (patch, stride) of its ``Conv2D``.
    """
    new = copy.deepcopy(config)
    layers = new["config"]["layers"]
    count = 2 if layers[head.start].get("class_name") == "Permute" else 1
    removed = [_name(layer) for layer in layers[head.start : head.start + count]]
    feeder = _name(layers[head.start - 1]) if head.start else None
    kept = []
    channels = None
    for index, layer in enumerate(layers):
        name = _name(layer)
        if name in removed:
            continue
        if index < head.start:
            _free_build(layer)
            if layer.get("class_name") == "InputLayer":
                cfg = layer["config"]
                for key in ("batch_shape", "batch_input_shape"):
                    if key in cfg:
                        cfg[key] = _free(cfg[key])
            kept.append(layer)
            continue
        if name in convert:
            patch, stride = convert[name]
            channels = layer["config"]["units"]
            layer = conv_config(layer, (patch.height, patch.width), stride, patch.channels)
        elif channels is not None and "build_config" in layer:
            layer["build_config"] = {"input_shape": [None, None, None, channels]}
        if layer.get("class_name") == "Dense":
            channels = layer["config"]["units"]
        kept.append(layer)
    if not head.sequential:
        first = convert.get(head.dense[0])
        _relink(kept, removed, feeder, first[0].channels if first else None)
    new["config"]["layers"] = kept
    if "build_input_shape" in new["config"]:
        new["config"]["build_input_shape"] = _free(new["config"]["build_input_shape"])
    build = new.get("build_config")
    if isinstance(build, dict) and "input_shape" in build:
        build["input_shape"] = _free(build["input_shape"])
    return new


def _relink(
    layers: list[dict[str, Any]], removed: list[str], feeder: str | None, channels: int | None
) -> None:
    """Point every reader of a removed layer at the layer before them; free tensor shapes."""
    for layer in layers:
        for cfg in _keras_tensors(layer.get("inbound_nodes", [])):
            shape, history = cfg.get("shape"), cfg.get("keras_history")
            if isinstance(shape, list) and len(shape) > 1:
                cfg["shape"] = [shape[0], None, None, shape[-1]]
            if isinstance(history, list) and history and history[0] in removed:
                history[0] = feeder
                history[1:] = [0, 0]
                cfg["shape"] = [None, None, None, channels]


def layer_classes(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, class) of the layers Keras saves weights for, in order.

    A ``Sequential`` model's ``layers`` leave out its ``InputLayer``; a
    ``Functional`` model's keep theirs.
    """
    layers, sequential = _layers(config)
    return [
        (_name(layer), str(layer.get("class_name")))
        for layer in layers
        if not (sequential and layer.get("class_name") == "InputLayer")
    ]
