"""A Keras model config of any era read as a graph of layers: who reads whom.

Keras has written four shapes of model config, and fcconv reads them all:

- Keras 3 ``Sequential`` and ``Functional``: ``{"class_name": ..., "config":
  {"layers": [...]}}``; a Functional layer's ``inbound_nodes`` name the
  tensors it reads as ``__keras_tensor__`` objects with a ``keras_history``;
- Keras 2.2+ (``Model``/``Functional``): ``inbound_nodes`` as nested lists,
  ``[[["conv1", 0, 0, {}]]]``;
- Keras 2.0 ``Sequential``: ``"config"`` is the list of layers itself.

A layer whose own config holds ``layers`` is a nested model; its layers are
listed too (:func:`nested_models`), so that a Dense inside a sub-model is seen.
Nothing here imports Keras.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

MODEL_CLASSES = ("Sequential", "Functional", "Model")


@dataclass
class KerasGraph:
    """The layers of one model config, with the names each reads and the model's outputs.

    Attributes:
        layers: the layer configs (dicts as saved), in the config's order.
        sequential: a ``Sequential`` model (each layer reads the one before).
        inputs: layer name → the names of the layers it reads, in order.
        outputs: the names of the layers whose outputs are the model's.
        legacy: the config is Keras 2's (list-form inbound nodes or layers).
    """

    layers: list[dict[str, Any]]
    sequential: bool
    inputs: dict[str, list[str]] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    legacy: bool = False

    def by_name(self, name: str) -> dict[str, Any]:
        """The layer config named ``name``.

        Raises:
            ConvolutionalizeError: the config reads a layer it does not hold.
        """
        found = next((layer for layer in self.layers if layer_name(layer) == name), None)
        if found is None:
            from fcconv.errors import ConvolutionalizeError

            raise ConvolutionalizeError(
                f"the Keras config reads a layer {name!r} it does not hold; re-save the model",
                layer=name,
            )
        return found

    def readers(self, name: str) -> list[str]:
        """The layers that read ``name``'s output, in config order."""
        return [other for other, sources in self.inputs.items() if name in sources]

    def names(self) -> list[str]:
        return [layer_name(layer) for layer in self.layers]


def layer_name(layer: dict[str, Any]) -> str:
    """A layer config's name (Keras 2.0 keeps it in ``config`` only)."""
    config = layer.get("config")
    name = config.get("name") if isinstance(config, dict) else None
    return str(name if name is not None else layer.get("name", "?"))


def layer_class(layer: dict[str, Any]) -> str:
    return str(layer.get("class_name", ""))


def layer_config(layer: dict[str, Any]) -> dict[str, Any]:
    config = layer.get("config")
    return config if isinstance(config, dict) else {}


def model_layers(config: Any) -> tuple[list[dict[str, Any]], bool] | None:
    """The layer list of a model config and whether it is a Sequential; None for no model."""
    if not isinstance(config, dict) or config.get("class_name") not in MODEL_CLASSES:
        return None
    body = config.get("config")
    if isinstance(body, list):  # Keras 2.0 Sequential
        layers = body
    elif isinstance(body, dict) and isinstance(body.get("layers"), list):
        layers = body["layers"]
    else:
        return None
    layers = [layer for layer in layers if isinstance(layer, dict)]
    return layers, config.get("class_name") == "Sequential"


def read_graph(config: Any) -> KerasGraph | None:
    """The graph of a model config (see the module's doc); None when it is no model."""
    found = model_layers(config)
    if found is None:
        return None
    layers, sequential = found
    body = config.get("config")
    graph = KerasGraph(layers, sequential, legacy=isinstance(body, list))
    if sequential:
        kept = [layer for layer in layers if layer_class(layer) != "InputLayer"]
        previous: str | None = None
        for layer in kept:
            graph.inputs[layer_name(layer)] = [previous] if previous else []
            previous = layer_name(layer)
        graph.outputs = [previous] if previous else []
        return graph
    for layer in layers:
        names, legacy = inbound_names(layer.get("inbound_nodes"))
        graph.inputs[layer_name(layer)] = names
        graph.legacy |= legacy
    graph.outputs = _output_names(body.get("output_layers") if isinstance(body, dict) else None)
    return graph


def _output_names(value: Any) -> list[str]:
    """``[["a", 0, 0], ["b", 0, 0]]`` or one ``["a", 0, 0]`` (Keras 3, one output)."""
    if not isinstance(value, list) or not value:
        return []
    if isinstance(value[0], str):
        return [value[0]]
    return [str(item[0]) for item in value if isinstance(item, list) and item]


def keras_tensors(value: Any) -> Iterator[dict[str, Any]]:
    """The config of every Keras 3 tensor a layer's ``inbound_nodes`` name, in order."""
    if isinstance(value, dict):
        config = value.get("config")
        if value.get("class_name") == "__keras_tensor__" and isinstance(config, dict):
            yield config
            return
        for item in value.values():
            yield from keras_tensors(item)
    elif isinstance(value, list):
        for item in value:
            yield from keras_tensors(item)


def legacy_references(value: Any) -> Iterator[list[Any]]:
    """Every ``["name", node, tensor, {...}]`` of Keras 2 ``inbound_nodes``."""
    if isinstance(value, list):
        if value and isinstance(value[0], str) and len(value) >= 3:
            yield value
            return
        for item in value:
            yield from legacy_references(item)


def inbound_names(nodes: Any) -> tuple[list[str], bool]:
    """The layers a layer reads (first node), and whether the nodes are Keras 2's."""
    if not isinstance(nodes, list) or not nodes:
        return [], False
    first = nodes[0]
    histories = [cfg.get("keras_history") for cfg in keras_tensors(first)]
    names = [str(h[0]) for h in histories if isinstance(h, list) and h]
    if names:
        return names, False
    return [str(ref[0]) for ref in legacy_references(first)], True


def nested_models(config: Any, prefix: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """``(qualified name, layer)`` of every layer, nested models' layers included
    (``backbone.fc1`` for layer ``fc1`` inside the sub-model ``backbone``)."""
    found = model_layers(config)
    if found is None:
        return
    for layer in found[0]:
        name = f"{prefix}{layer_name(layer)}"
        yield name, layer
        if model_layers(layer) is not None:
            yield from nested_models(layer, f"{name}.")
