"""A Keras model config checked for the shape fcconv reads before anything reads it.

A ``.keras`` archive's ``config.json`` (or a legacy ``.h5``'s
``model_config``) is any JSON the file's author wrote. fcconv reads a few
fields of it (each layer's class, name, shapes, kernel sizes, the Dense
units, a Permute's dims, the links between layers) and rewrites it; a field
of another type than Keras writes (a list for a name, a string for the
units) would otherwise surface as an internal error deep in that code.
:func:`check_keras_config` checks the types and bounds of exactly those
fields, and the config's size and nesting, and refuses anything else in one
line.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fcconv.errors import CheckpointError

MAX_LAYERS = 100_000
MAX_DEPTH = 64
"""Nesting of the config (Keras writes about 12 levels for a Functional model)."""
_BIG = 1 << 31

_STRINGS = ("name", "data_format", "padding", "activation")
_SIZES = ("kernel_size", "pool_size", "strides", "dilation_rate")
_COUNTS = ("units", "filters")
_SHAPES = ("batch_shape", "batch_input_shape", "target_shape")


def _refuse(source: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{source}: the Keras model config {what}; re-save the model with Keras",
        path=source,
    )


def _is_int(value: Any, low: int = 0) -> bool:
    return type(value) is int and low <= value <= _BIG


def _is_shape(value: Any) -> bool:
    """A shape: a list of sizes or None (free), or a list of such shapes (several inputs)."""
    if not isinstance(value, list) or len(value) > 16:
        return False
    return all(v is None or _is_int(v) for v in value) or all(_is_shape(v) for v in value)


def _is_size(value: Any) -> bool:
    return _is_int(value, 1) or (
        isinstance(value, list) and 0 < len(value) <= 3 and all(_is_int(v, 1) for v in value)
    )


def _depth(value: Any) -> int:
    deepest = 0
    stack = [(value, 1)]
    while stack:
        current, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            return depth
        children = current.values() if isinstance(current, dict) else current
        if isinstance(current, (dict, list)):
            stack.extend((child, depth + 1) for child in children)
    return deepest


def layer_problems(layer: Any) -> Iterator[str]:
    """What in one layer's config is not of the type Keras writes."""
    if not isinstance(layer, dict):
        yield "lists a layer that is not an object"
        return
    if not isinstance(layer.get("class_name"), str):
        yield "has a layer without a class name"
    config = layer.get("config")
    if not isinstance(config, dict):
        yield f"has a {layer.get('class_name')!s:.40} layer without a config object"
        return
    if not isinstance(config.get("name"), str):
        yield f"has a {layer.get('class_name')!s:.40} layer without a name"
        return
    name = config["name"][:40]
    if layer.get("class_name") == "Dense" and "units" not in config:
        yield f"gives Dense layer {name!r} no units"
    for key in _STRINGS:
        if key in config and not isinstance(config[key], (str, type(None))):
            yield f"gives layer {name!r} a {key} that is not a string"
    for key in _SIZES:
        if key in config and config[key] is not None and not _is_size(config[key]):
            yield f"gives layer {name!r} a {key} that is not one to three sizes"
    for key in _COUNTS:
        if key in config and not _is_int(config[key], 1):
            yield f"gives layer {name!r} {key} that is not a positive integer"
    for key in _SHAPES:
        if key in config and config[key] is not None and not _is_shape(config[key]):
            yield f"gives layer {name!r} a {key} that is not a shape"
    axis = config.get("axis", -1)
    if not (type(axis) is int or (isinstance(axis, list) and all(type(a) is int for a in axis))):
        yield f"gives layer {name!r} an axis that is not an integer"
    dims = config.get("dims")
    if dims is not None and not (isinstance(dims, list) and all(_is_int(d) for d in dims)):
        yield f"gives layer {name!r} dims that are not axes"
    build = layer.get("build_config")
    if build is not None and not isinstance(build, dict):
        yield f"gives layer {name!r} a build_config that is not an object"
    elif isinstance(build, dict) and "input_shape" in build:
        if build["input_shape"] is not None and not _is_shape(build["input_shape"]):
            yield f"gives layer {name!r} an input_shape that is not a shape"
    yield from _history_problems(layer.get("inbound_nodes"), name)


def _history_problems(nodes: Any, name: str) -> Iterator[str]:
    stack = [nodes]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, dict):
            config = value.get("config")
            if value.get("class_name") == "__keras_tensor__" and isinstance(config, dict):
                history = config.get("keras_history")
                if history is not None and not (
                    isinstance(history, list) and history and isinstance(history[0], str)
                ):
                    yield f"links layer {name!r} to a tensor whose history is not a layer name"
                shape = config.get("shape")
                if shape is not None and not _is_shape(shape):
                    yield f"links layer {name!r} to a tensor whose shape is not a shape"
            stack.extend(value.values())


def check_keras_config(config: Any, source: str) -> None:
    """Refuse a model config whose fields fcconv reads are not what Keras writes.

    Raises:
        CheckpointError: too deep, too many layers, or a field of another type.
    """
    if not isinstance(config, dict):
        raise _refuse(source, "is not a JSON object")
    if _depth(config) > MAX_DEPTH:
        raise _refuse(source, f"nests deeper than {MAX_DEPTH} levels")
    if not isinstance(config.get("class_name", ""), str):
        raise _refuse(source, "has a class name that is not a string")
    inner = config.get("config")
    if inner is None:
        return
    if isinstance(inner, list) and config.get("class_name") == "Sequential":
        inner = {"layers": inner}  # Keras 2.0: a Sequential's config is its list of layers
    if not isinstance(inner, dict):
        raise _refuse(source, "holds a config that is not an object")
    layers = inner.get("layers")
    if layers is None:
        return
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
        raise _refuse(source, f"holds layers that are not a list of at most {MAX_LAYERS}")
    for key in ("build_input_shape",):
        if inner.get(key) is not None and not _is_shape(inner[key]):
            raise _refuse(source, f"has a {key} that is not a shape")
    for layer in layers:
        for problem in layer_problems(layer):
            raise _refuse(source, problem)
