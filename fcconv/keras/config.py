"""A Keras model's head read off its config, and the config rewritten: ``Flatten → Dense`` to
``Conv2D``.

The head of a classifier is what follows the ``Flatten`` (or ``Reshape((-1,))``)
or the global pool (``GlobalAveragePooling2D``, ``GlobalMaxPooling2D``) that
reads the trunk's map: ``Dense`` layers, and the layers between them that act
on each cell's features alone (activations, dropout, ``PReLU``,
``BatchNormalization``/``LayerNormalization`` over the last axis, softmax). It
may fan out into several outputs (MTCNN's R-Net: ``Dense → PReLU → (Dense
softmax, Dense)``). The model config may be of any Keras era
(:mod:`fcconv.keras.graph`).

**The flatten order** is read from the config (:func:`read_order`): the map's
layout (``channels_last`` rows, columns, channels; ``channels_first``
channels, rows, columns), then every ``Permute`` before the ``Flatten``, then
the ``Flatten``'s own ``data_format`` (``channels_first`` moves the channels
last first). MTCNN's ``Permute((3, 2, 1))`` on a channels-last map gives
``whc``.

**The rewrite** removes the ``Permute``/``Flatten``, turns the first ``Dense``
into a ``Conv2D`` with the feature map's size as its kernel
(``padding="valid"``, the stride), every later ``Dense`` into a 1×1
``Conv2D``, a global pool into the same pool over a window of the native
map's size at stride 1, a per-unit ``PReLU`` into one shared over the map
(its alpha reshaped, not changed), and frees the input's height and width.
Nothing here imports Keras.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from fcconv.errors import ConvolutionalizeError, SpecError
from fcconv.geometry import Patch
from fcconv.keras.graph import (
    KerasGraph,
    keras_tensors,
    layer_class,
    layer_config,
    layer_name,
    legacy_references,
    model_layers,
    read_graph,
)

KERAS_ORDER = "hwc"
"""How Keras flattens a channels-last map: rows, then columns, then channels."""

FLATTENS = ("Flatten", "Reshape")
GLOBAL_POOLS = {"GlobalAveragePooling2D": "AveragePooling2D", "GlobalMaxPooling2D": "MaxPooling2D"}
# Layers that act on each element alone: they may sit anywhere in a head, even
# between the Flatten and the first Dense.
ELEMENTWISE = (
    "ActivityRegularization",
    "AlphaDropout",
    "Dropout",
    "ELU",
    "GaussianDropout",
    "GaussianNoise",
    "Identity",
    "LeakyReLU",
    "ReLU",
)
# Layers that act on the last axis (the features of one cell): after a Dense
# layer (or a global pool) they act on each cell of a map the same way.
LAST_AXIS = ("Activation", "BatchNormalization", "LayerNormalization", "PReLU", "Softmax")
PER_CELL = ELEMENTWISE + LAST_AXIS
# Trunk layers that keep the map's layout (the walk back from a Flatten passes them).
_LAYOUT_KEEPING = (
    *PER_CELL,
    "Add",
    "Average",
    "Concatenate",
    "Maximum",
    "Minimum",
    "Multiply",
    "SpatialDropout2D",
    "Subtract",
)
_SOFTMAXES = ("softmax", "log_softmax")
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
class MapOrder:
    """How a Dense layer's input vector was made from the trunk's map, per the config.

    Attributes:
        entry: the ``Flatten``/``Reshape`` or global pool that feeds the Dense.
        order: the flatten order of the map's axes (``hwc``, ``whc``, ``chw`` …).
        patch: the map (``H × W × C``), or None when the config does not say.
        detail: how the order was read, in words (``Permute(3, 2, 1) → Flatten``).
        layout: the map's ``data_format``.
        permutes: the ``Permute`` layers between the map and the flatten.
        pool: the global pool's class, when ``entry`` is one.
    """

    entry: str
    order: str
    patch: Patch | None
    detail: str
    layout: str
    permutes: tuple[str, ...] = ()
    pool: str | None = None


@dataclass(frozen=True)
class KerasHead:
    """The head of a Keras classifier and what its rewrite needs.

    Attributes:
        graph: the model's layers and who reads whom.
        start: the first head layer (a ``Permute``, the flatten or the global pool).
        feeder: the trunk layer whose map the head reads.
        map_order: how the map becomes the first Dense layer's input.
        dense: the head's ``Dense`` layers, in config order.
        map_readers: the Dense layers that read the map (the others read a Dense's output).
        prelu: the head's ``PReLU`` layers (their alpha is shared over the map).
    """

    graph: KerasGraph
    start: str
    feeder: str
    map_order: MapOrder
    dense: list[str]
    map_readers: frozenset[str]
    prelu: tuple[str, ...] = ()
    region: tuple[str, ...] = field(default=())

    @property
    def patch(self) -> Patch | None:
        return self.map_order.patch

    @property
    def order(self) -> str:
        return self.map_order.order

    @property
    def order_from(self) -> str:
        return self.map_order.detail

    @property
    def pool(self) -> str | None:
        return self.map_order.pool

    @property
    def sequential(self) -> bool:
        return self.graph.sequential

    @property
    def removed(self) -> tuple[str, ...]:
        """The layers the rewrite takes out (a global pool is replaced, not removed)."""
        return () if self.pool else (*self.map_order.permutes, self.map_order.entry)

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "feeder": self.feeder,
            "flatten": self.map_order.entry,
            "permute": list(self.map_order.permutes),
            "pool": self.pool,
            "layout": self.map_order.layout,
            "feature_map": None if self.patch is None else str(self.patch),
            "order": self.order,
            "order_from": "model",
            "order_detail": self.order_from,
            "dense": list(self.dense),
            "outputs": list(self.graph.outputs),
        }


def _graph(config: dict[str, Any]) -> KerasGraph:
    graph = read_graph(config)
    if graph is None:
        raise ConvolutionalizeError(
            f"a Keras {config.get('class_name') or 'model'} config is not a Sequential or "
            "Functional model; convert its weights to PyTorch's layout with {format} torch"
        )
    return graph


def _input_shape(layer: dict[str, Any]) -> list[Any] | None:
    shape = (layer.get("build_config") or {}).get("input_shape")
    return list(shape) if isinstance(shape, list) else None


def _is_flatten(layer: dict[str, Any]) -> bool:
    cls = layer_class(layer)
    if cls == "Flatten":
        return True
    target = layer_config(layer).get("target_shape")
    return cls == "Reshape" and isinstance(target, list) and len(target) == 1


def _is_entry(layer: dict[str, Any]) -> bool:
    if layer_class(layer) in GLOBAL_POOLS:
        return not layer_config(layer).get("keepdims", False)
    return _is_flatten(layer)


def _is_elementwise(layer: dict[str, Any]) -> bool:
    cls = layer_class(layer)
    if cls == "Activation":
        return layer_config(layer).get("activation") not in _SOFTMAXES
    return cls in ELEMENTWISE


def _first_input(graph: KerasGraph, name: str) -> str | None:
    sources = graph.inputs.get(name) or []
    return sources[0] if sources else None


# ------------------------------------------------------------------- the order


def read_order(config: dict[str, Any], dense: str) -> MapOrder | None:
    """How the model made the input vector of its Dense layer ``dense``, read off the config.

    Returns None when ``dense`` does not read a flattened or globally pooled
    map (it reads another Dense layer, or the config does not show it).

    Raises:
        SpecError: the config shows a flatten but not how the map was laid out
            before it (a layer fcconv cannot follow), or a Permute of another rank.
    """
    graph = read_graph(config)
    if graph is not None and dense not in graph.inputs and "." in dense:
        outer, inner = dense.split(".", 1)  # a layer of a nested model
        if outer in graph.inputs:
            return read_order(graph.by_name(outer), inner)
    if graph is None or dense not in graph.inputs:
        return None
    name = _first_input(graph, dense)
    while name is not None and _is_elementwise(graph.by_name(name)):
        name = _first_input(graph, name)
    if name is None or not _is_entry(graph.by_name(name)):
        return None
    return _map_order(graph, name)


def _map_order(graph: KerasGraph, entry: str) -> MapOrder:
    flatten = graph.by_name(entry)
    cls = layer_class(flatten)
    permutes: list[str] = []
    name = _first_input(graph, entry)
    layout = None
    while name is not None:
        layer = graph.by_name(name)
        kind = layer_class(layer)
        if kind == "Permute" and cls not in GLOBAL_POOLS:
            permutes.insert(0, name)
        elif "data_format" in layer_config(layer):
            layout = layer_config(layer)["data_format"]
            break
        elif model_layers(layer) is not None:
            layout = _nested_layout(layer)
            break
        elif kind == "InputLayer":
            break
        elif kind not in _LAYOUT_KEEPING:
            raise SpecError(
                f"the Keras layer {name!r} ({kind}) lies between the map and {entry!r}, and "
                "fcconv cannot tell how it lays out the map; give {order} to say how the "
                "map was flattened",
                layer=name,
            )
        name = _first_input(graph, name)
    layout = layout or layer_config(flatten).get("data_format") or "channels_last"
    if cls in GLOBAL_POOLS:
        return _pooled(graph, entry, layout)
    labels = ["h", "w", "c"] if layout != "channels_first" else ["c", "h", "w"]
    words = [f"{layout} map"]
    for permute in permutes:
        dims = layer_config(graph.by_name(permute)).get("dims")
        if not isinstance(dims, list) or sorted(dims) != [1, 2, 3]:
            raise SpecError(
                f"Keras Permute {permute!r} has dims {dims!r}; fcconv reads permutations "
                "(1, 2, 3) of a 2-D map; give {order}",
                layer=permute,
            )
        labels = [labels[d - 1] for d in dims]
        words.append(f"Permute{tuple(dims)}")
    shape = _input_shape(flatten)
    patch = _patch_of(shape, labels)
    if patch is None:
        patch = _infer_patch(graph, permutes[0] if permutes else entry, layout)
    if cls == "Flatten" and layer_config(flatten).get("data_format") == "channels_first":
        labels = labels[1:] + labels[:1]
        words.append("Flatten(channels_first)")
    else:
        words.append(cls)
    detail = " → ".join(words)
    return MapOrder(entry, "".join(labels), patch, detail, layout, tuple(permutes))


def _pooled(graph: KerasGraph, entry: str, layout: str) -> MapOrder:
    shape = _input_shape(graph.by_name(entry))
    labels = ["h", "w", "c"] if layout != "channels_first" else ["c", "h", "w"]
    patch = _patch_of(shape, labels) or _infer_patch(graph, entry, layout)
    cls = layer_class(graph.by_name(entry))
    return MapOrder(entry, KERAS_ORDER, patch, f"{cls} of a {layout} map", layout, pool=cls)


def _patch_of(shape: list[Any] | None, labels: list[str]) -> Patch | None:
    if shape is None or len(shape) != 4 or not all(isinstance(s, int) for s in shape[1:]):
        return None
    sizes = dict(zip(labels, shape[1:], strict=True))
    return Patch(sizes["h"], sizes["w"], sizes["c"])


def _nested_layout(layer: dict[str, Any]) -> str | None:
    """The data_format of the last layer that has one in a nested model."""
    found = model_layers(layer)
    for inner in reversed(found[0] if found else []):
        if "data_format" in layer_config(inner):
            return layer_config(inner)["data_format"]
        if model_layers(inner) is not None:
            return _nested_layout(inner)
    return None


_SHAPE_KEEPING = (*PER_CELL, "InputLayer", "SpatialDropout2D")


def _infer_patch(graph: KerasGraph, entry: str, layout: str = "channels_last") -> Patch | None:
    """The map the entry reads, from the input's shape through convs and pools (legacy
    configs carry no ``build_config``), for a chain of layers of one layout; else None."""
    chain: list[dict[str, Any]] = []
    name = _first_input(graph, entry)
    while name is not None:
        chain.insert(0, graph.by_name(name))
        name = _first_input(graph, name)
    if graph.sequential and graph.layers and graph.layers[0] not in chain:
        chain.insert(0, graph.layers[0])  # its InputLayer, or (Keras 2) a first layer's shape
    shape: list[int] | None = None
    for layer in chain:
        cfg, cls = layer_config(layer), layer_class(layer)
        given = cfg.get("batch_shape") or cfg.get("batch_input_shape")
        if shape is None and isinstance(given, list) and len(given) == 4:
            shape = list(given[1:]) if layout != "channels_first" else [*given[2:], given[1]]
        if cls == "InputLayer" or shape is None or cls in _SHAPE_KEEPING:
            continue
        if cls == "Conv2D":
            shape = _window_shape(shape, cfg, cfg.get("kernel_size"), cfg.get("filters"), layout)
        elif cls in ("MaxPooling2D", "AveragePooling2D"):
            shape = _window_shape(shape, cfg, cfg.get("pool_size"), shape[2], layout)
        else:
            return None
        if shape is None:
            return None
    if shape is None or not all(isinstance(s, int) and s > 0 for s in shape):
        return None
    return Patch(*shape)


def _window_shape(
    shape: list[int], cfg: dict[str, Any], kernel: Any, channels: Any, layout: str
) -> list[int] | None:
    """``[H, W, C]`` after a conv or pool (in the map's layout; another one is unknown)."""
    strides = cfg.get("strides") or kernel
    dilation = cfg.get("dilation_rate", [1, 1])
    if cfg.get("data_format", "channels_last") != layout or not isinstance(channels, int):
        return None
    try:
        sizes = []
        for axis in (0, 1):
            size, k, s = shape[axis], kernel[axis], strides[axis]
            d = dilation[axis] if isinstance(dilation, list) else dilation
            span = d * (k - 1) + 1
            if cfg.get("padding", "valid") == "same":
                sizes.append(-(-size // s))
            else:
                sizes.append((size - span) // s + 1)
    except (TypeError, IndexError):
        return None
    return [*sizes, channels]


# ------------------------------------------------------------------- the head


def find_head(config: dict[str, Any]) -> KerasHead:
    """The head of a Keras classifier: its flatten or global pool, Dense layers and outputs.

    Raises:
        ConvolutionalizeError: no ``Flatten → Dense`` (or global pool → Dense)
            head, a layer in it that does not act on each cell alone, an output
            that does not come from the head, or a ``channels_first`` map.
    """
    graph = _graph(config)
    entry, region = None, []
    for layer in graph.layers:
        if _is_entry(layer):
            region = _downstream(graph, layer_name(layer))
            if any(layer_class(graph.by_name(name)) == "Dense" for name in region):
                entry = layer_name(layer)
                break
    if entry is None:
        raise ConvolutionalizeError(
            "no Flatten or global pool followed by a Dense layer in the Keras model; name the "
            "layers to convert with {layers} NAME=HxWxC and write the weights with {format} torch"
        )
    map_order = _map_order(graph, entry)
    if map_order.layout == "channels_first":
        raise ConvolutionalizeError(
            f"the Keras map that {entry!r} reads is channels_first; fcconv rewrites "
            "channels-last models (Keras's default); write the weights with {format} torch, "
            "which reads the order from the config"
        )
    start = map_order.permutes[0] if map_order.permutes else entry
    feeder = _first_input(graph, start)
    if feeder is None:
        raise ConvolutionalizeError(f"the Keras head at {start!r} reads no trunk")
    _check_region(graph, entry, region, map_order)
    dense = [name for name in region if layer_class(graph.by_name(name)) == "Dense"]
    readers = frozenset(name for name in dense if _reads_entry(graph, name, entry))
    prelu = tuple(name for name in region if layer_class(graph.by_name(name)) == "PReLU")
    return KerasHead(graph, start, feeder, map_order, dense, readers, prelu, tuple(region))


def _downstream(graph: KerasGraph, entry: str) -> list[str]:
    """Every layer that reads ``entry``'s output, directly or not, in config order."""
    reached = {entry}
    for name in graph.names():
        if any(source in reached for source in graph.inputs.get(name, [])):
            reached.add(name)
    return [name for name in graph.names() if name in reached and name != entry]


def _reads_entry(graph: KerasGraph, name: str, entry: str) -> bool:
    source = _first_input(graph, name)
    while source is not None and source != entry and _is_elementwise(graph.by_name(source)):
        source = _first_input(graph, source)
    return source == entry


def _check_region(graph: KerasGraph, entry: str, region: list[str], order: MapOrder) -> None:
    """Every head layer reads the head alone and acts per cell; every output is the head's."""
    inside = {entry, *region}
    flat_map = (
        order.pool is None
        and order.patch is not None
        and order.patch.features > (order.patch.channels)
    )
    for name in region:
        layer = graph.by_name(name)
        cls = layer_class(layer)
        sources = graph.inputs.get(name, [])
        if len(sources) != 1 or sources[0] not in inside:
            raise ConvolutionalizeError(
                f"Keras layer {name!r} ({cls}) reads {', '.join(sources) or 'nothing'}; a "
                "head layer reads one head tensor (fcconv rewrites heads that fan out, not "
                "heads that merge); write the weights with {format} torch",
                layer=name,
            )
        if cls == "Dense" or _is_elementwise(layer):
            continue
        on_flat_map = flat_map and _reads_entry_flat(graph, name, entry)
        if cls not in LAST_AXIS or on_flat_map or not _acts_on_last_axis(layer):
            where = "the flattened map" if on_flat_map else "each cell's features alone"
            raise ConvolutionalizeError(
                f"Keras layer {name!r} ({cls}) in the head does not act on {where}; fcconv "
                "carries activations, dropout, PReLU, softmax and normalization over the last "
                "axis after a Dense layer",
                layer=name,
            )
    strays = [name for name in graph.outputs if name not in region]
    if strays:
        raise ConvolutionalizeError(
            f"the Keras model's output {strays[0]!r} does not come from the head after "
            f"{entry!r}; fcconv rewrites models whose every output is a head's",
            layer=strays[0],
        )


def _reads_entry_flat(graph: KerasGraph, name: str, entry: str) -> bool:
    """Whether ``name`` reads the flattened map with no Dense layer between."""
    source = _first_input(graph, name)
    while source is not None and source != entry:
        if layer_class(graph.by_name(source)) == "Dense":
            return False
        source = _first_input(graph, source)
    return source == entry


def _acts_on_last_axis(layer: dict[str, Any]) -> bool:
    cfg = layer_config(layer)
    if layer_class(layer) == "PReLU":
        return cfg.get("shared_axes") in (None, [1], 1)
    axis = cfg.get("axis", -1)
    return axis in (-1, [-1], 1, [1])  # on a [B, N] vector axis 1 is the last


# --------------------------------------------------------------------- rewrite


def _free(shape: Any) -> Any:
    """A ``[B, H, W, C]`` (or head ``[B, N]``) shape with free height and width."""
    if isinstance(shape, list) and len(shape) in (2, 4):
        return [shape[0], None, None, shape[-1]]
    return shape


def conv_config(
    dense: dict[str, Any], kernel: tuple[int, int], stride: tuple[int, int], in_channels: int
) -> dict[str, Any]:
    """The ``Conv2D`` layer config that takes a ``Dense`` layer's place (same name)."""
    source = layer_config(dense)
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
    return _replaced(dense, "Conv2D", config, in_channels)


def _replaced(
    layer: dict[str, Any], cls: str, config: dict[str, Any], in_channels: int | None
) -> dict[str, Any]:
    kept = {k: copy.deepcopy(v) for k, v in layer.items() if k in ("name", "inbound_nodes")}
    new = {**kept, "class_name": cls, "config": config}
    if "module" in layer or "registered_name" in layer:  # a Keras 3 config
        new.update(module="keras.layers", registered_name=None)
    if in_channels is not None and ("build_config" in layer or "module" in layer):
        new["build_config"] = {"input_shape": [None, None, None, in_channels]}
    return new


def pool_config(layer: dict[str, Any], patch: Patch, stride: tuple[int, int]) -> dict[str, Any]:
    """The pool over a native-size window that takes a global pool's place (same name)."""
    source = layer_config(layer)
    keys = ("name", "trainable", "dtype")
    config = {key: copy.deepcopy(source[key]) for key in keys if key in source}
    config.update(
        pool_size=[patch.height, patch.width],
        strides=list(stride),
        padding="valid",
        data_format="channels_last",
    )
    return _replaced(layer, GLOBAL_POOLS[layer_class(layer)], config, patch.channels)


def _prelu_shared(layer: dict[str, Any]) -> None:
    """A PReLU of a [B, N] vector, shared over the map's rows and columns."""
    cfg = layer["config"]
    cfg["shared_axes"] = [1, 2] if cfg.get("shared_axes") in (None, []) else [1, 2, 3]


def prelu_shape(layer: dict[str, Any], units: int) -> tuple[int, int, int]:
    """The alpha shape of a head PReLU after :func:`rewrite` (same elements, new shape)."""
    shared = layer_config(layer).get("shared_axes")
    return (1, 1, units) if shared in (None, []) else (1, 1, 1)


def rewrite(
    config: dict[str, Any],
    head: KerasHead,
    convert: dict[str, tuple[Patch, tuple[int, int]]],
    pool_stride: tuple[int, int] = (1, 1),
) -> dict[str, Any]:
    """A new model config: flatten removed (or global pool windowed), Dense layers as Conv2D.

    Args:
        config: the model config (not modified).
        head: from :func:`find_head` on ``config``.
        convert: Dense layer name → (patch, stride) of its ``Conv2D``.
        pool_stride: the stride of the pool that replaces a global pool.
    """
    new = copy.deepcopy(config)
    body = new["config"]
    layers = body if isinstance(body, list) else body["layers"]
    removed = set(head.removed)
    channels = _head_channels(head)
    kept = []
    for layer in layers:
        name = layer_name(layer)
        if name in removed:
            continue
        if name in convert:
            patch, stride = convert[name]
            layer = conv_config(layer, (patch.height, patch.width), stride, patch.channels)
        elif name == head.map_order.entry and head.pool:
            assert head.patch is not None
            layer = pool_config(layer, head.patch, pool_stride)
        elif name in head.region:
            if name in head.prelu:
                _prelu_shared(layer)
            if "build_config" in layer and channels.get(name) is not None:
                layer["build_config"] = {"input_shape": [None, None, None, channels[name]]}
        else:
            _free_trunk_layer(layer)
        kept.append(layer)
    if isinstance(body, list):
        new["config"] = kept
    else:
        body["layers"] = kept
    if not head.sequential:
        _relink(kept, removed, head.feeder, head.patch.channels if head.patch else None)
    if isinstance(body, dict) and "build_input_shape" in body:
        body["build_input_shape"] = _free(body["build_input_shape"])
    build = new.get("build_config")
    if isinstance(build, dict) and "input_shape" in build:
        build["input_shape"] = _free(build["input_shape"])
    return new


def _head_channels(head: KerasHead) -> dict[str, int | None]:
    """The channels each head layer reads on the map (Dense: units out; others: through)."""
    graph = head.graph
    out: dict[str, int | None] = {}
    patch = head.patch
    out[head.map_order.entry] = patch.channels if patch is not None and head.pool else None
    channels: dict[str, int | None] = {}
    for name in head.region:
        source = _first_input(graph, name)
        channels[name] = out.get(source) if source is not None else None
        layer = graph.by_name(name)
        out[name] = (
            layer_config(layer).get("units") if layer_class(layer) == "Dense" else (channels[name])
        )
    return channels


def _free_trunk_layer(layer: dict[str, Any]) -> None:
    build = layer.get("build_config")
    if isinstance(build, dict) and "input_shape" in build:
        build["input_shape"] = _free(build["input_shape"])
    cfg = layer_config(layer)
    for key in ("batch_shape", "batch_input_shape"):
        if key in cfg:
            cfg[key] = _free(cfg[key])


def _relink(
    layers: list[dict[str, Any]], removed: set[str], feeder: str, channels: int | None
) -> None:
    """Point every reader of a removed layer at the feeder; free every tensor's shape."""
    for layer in layers:
        nodes = layer.get("inbound_nodes", [])
        for cfg in keras_tensors(nodes):
            shape, history = cfg.get("shape"), cfg.get("keras_history")
            if isinstance(shape, list) and len(shape) in (2, 4):
                cfg["shape"] = _free(shape)
            if isinstance(history, list) and history and history[0] in removed:
                history[0] = feeder
                history[1:] = [0, 0]
                if isinstance(cfg.get("shape"), list):
                    cfg["shape"] = [None, None, None, channels]
        for reference in legacy_references(nodes):
            if reference[0] in removed:
                reference[0], reference[1], reference[2] = feeder, 0, 0


def layer_classes(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, class) of the layers Keras saves weights for, in order.

    A ``Sequential`` model's ``layers`` leave out its ``InputLayer``; a
    ``Functional`` model's keep theirs.
    """
    graph = _graph(config)
    return [
        (layer_name(layer), layer_class(layer))
        for layer in graph.layers
        if not (graph.sequential and layer_class(layer) == "InputLayer")
    ]
