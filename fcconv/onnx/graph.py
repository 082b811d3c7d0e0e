"""An ONNX classifier's head read off its graph, and rewritten as convolutions.

The head is the chain that starts at a ``Flatten`` (or a ``Reshape`` to
``[batch, C·h·w]``) of the trunk's ``NCHW`` map, optionally after a
``Transpose`` (which sets the flatten order), and runs through ``Gemm``
(or ``MatMul`` + ``Add``) layers, with element-wise activations and dropout
between them, to the graph's output. The rewrite removes the flatten (and the
nodes that only computed its shape), turns the first linear layer into a
``k × k`` ``Conv`` over the map (the map's size as its kernel), every later
one into a ``1 × 1`` ``Conv``, and gives the input and output symbolic height
and width. Weights are only permuted, by :mod:`fcconv.geometry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fcconv.errors import ConvolutionalizeError
from fcconv.geometry import Patch, linear_weight_to_conv

# Ops that act on each element (or along the channel axis, for softmax) alone,
# so they act on every cell of a map as they acted on the flat vector.
ELEMENTWISE = frozenset(
    {
        "Celu", "Clip", "Dropout", "Elu", "Erf", "Gelu", "HardSigmoid", "HardSwish",
        "Identity", "LeakyRelu", "Mish", "Relu", "Selu", "Sigmoid", "Softplus", "Softsign",
        "Tanh", "ThresholdedRelu",
    }
)  # fmt: skip
CHANNEL_WISE = frozenset({"Softmax", "LogSoftmax"})
_AXIS_LETTER = {1: "c", 2: "h", 3: "w"}


@dataclass
class Linear:
    """One linear layer of the head: its nodes, its weight as ``[O, N]``, its bias."""

    nodes: list[Any]
    weight: Any  # numpy [O, N], the Linear weight
    bias: Any | None  # numpy [O]
    output: str  # the tensor the layer (with its bias) produces


@dataclass
class OnnxHead:
    """What the rewrite needs to know of the head."""

    source: str  # the trunk's NCHW map
    patch: Patch
    order: str
    order_from: str
    removed: list[Any]  # Transpose / Flatten / Reshape nodes
    chain: list[Any]  # every head node after the flatten, in order
    linears: list[Linear]
    output: str
    notes: list[str] = field(default_factory=list)


def _onnx() -> Any:
    from fcconv.extras import require

    return require("onnx", "onnx", purpose="to read and write ONNX graphs")


class _Graph:
    """Look-ups over a graph: producers, consumers, constants and inferred shapes."""

    def __init__(self, model: Any) -> None:
        onnx = _onnx()
        self.model = model
        graph = model.graph
        self.producer = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.constants = {t.name: t for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and node.attribute:
                value = next((a for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.constants[node.output[0]] = value.t
        inferred = onnx.shape_inference.infer_shapes(model)
        self.shapes: dict[str, list[Any]] = {}
        for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            dims = info.type.tensor_type.shape.dim
            self.shapes[info.name] = [
                d.dim_value if d.HasField("dim_value") else None for d in dims
            ]
        self.outputs = [o.name for o in graph.output]

    def constant(self, name: str) -> Any | None:
        from onnx import numpy_helper

        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def attribute(self, node: Any, name: str, default: Any = None) -> Any:
        from onnx import helper

        for attribute in node.attribute:
            if attribute.name == name:
                return helper.get_attribute_value(attribute)
        return default

    def only_consumer(self, name: str) -> Any | None:
        readers = self.consumers.get(name, [])
        return readers[0] if len(readers) == 1 and name not in self.outputs else None


def _describe(node: Any) -> str:
    return f"{node.op_type} node {node.name or node.output[0]!r}"


def find_head(model: Any) -> OnnxHead:
    """The head of an ONNX classifier (see the module's doc).

    Raises:
        ConvolutionalizeError: no flatten feeding a Gemm/MatMul, or a node in the
            head that does not act on each cell alone.
    """
    graph = _Graph(model)
    if len(model.graph.input) != 1 or len(graph.outputs) != 1:
        raise ConvolutionalizeError(
            "fcconv rewrites ONNX graphs with one input and one output; this one has "
            f"{len(model.graph.input)} input(s) and {len(graph.outputs)} output(s)"
        )
    flatten = next((n for n in model.graph.node if _is_flatten(graph, n)), None)
    if flatten is None:
        raise ConvolutionalizeError(
            "no Flatten or Reshape of a 4-D map feeding a Gemm or MatMul in the ONNX graph; "
            "fcconv convolutionalizes classifiers whose head flattens the trunk's map"
        )
    source, order, order_from, removed = flatten.input[0], "chw", "Flatten of an NCHW map", []
    producer = graph.producer.get(source)
    if producer is not None and producer.op_type == "Transpose":
        perm = list(graph.attribute(producer, "perm", []))
        readers = graph.consumers.get(source, [])
        # a dynamic-batch export also reads the transposed map's Shape (for the reshape)
        only_flattened = source not in graph.outputs and all(
            reader is flatten or reader.op_type == "Shape" for reader in readers
        )
        if len(perm) == 4 and perm[0] == 0 and only_flattened:
            order = "".join(_AXIS_LETTER[axis] for axis in perm[1:])
            order_from = f"Transpose{tuple(perm)} → {flatten.op_type}"
            removed.append(producer)
            source = producer.input[0]
    shape = graph.shapes.get(source)
    if not shape or len(shape) != 4 or not all(isinstance(s, int) for s in shape[1:]):
        raise ConvolutionalizeError(
            f"the shape of the map {source!r} that the head flattens is not known from the "
            "graph; export the model with a fixed input height and width"
        )
    _, channels, height, width = shape
    removed.append(flatten)
    chain, linears, current = _chain(graph, flatten.output[0])
    if not linears:
        raise ConvolutionalizeError("the ONNX head holds no Gemm or MatMul layer to convert")
    head = OnnxHead(
        source=source,
        patch=Patch(height, width, channels),
        order=order,
        order_from=order_from,
        removed=removed,
        chain=chain,
        linears=linears,
        output=current,
    )
    if linears[0].weight.shape[1] != head.patch.features:
        raise ConvolutionalizeError(
            f"the first linear layer takes {linears[0].weight.shape[1]} features, but the map "
            f"{source!r} holds {head.patch.features} ({channels}x{height}x{width})"
        )
    return head


def _is_flatten(graph: _Graph, node: Any) -> bool:
    if node.op_type not in ("Flatten", "Reshape"):
        return False
    shape_in = graph.shapes.get(node.input[0])
    shape_out = graph.shapes.get(node.output[0])
    if not shape_in or len(shape_in) != 4 or not shape_out or len(shape_out) != 2:
        return False
    if node.op_type == "Flatten" and graph.attribute(node, "axis", 1) != 1:
        return False
    reader = graph.only_consumer(node.output[0])
    return reader is not None and reader.op_type in ("Gemm", "MatMul")


def _chain(graph: _Graph, start: str) -> tuple[list[Any], list[Linear], str]:
    """Follow the head from the flatten's output to the graph's output."""
    chain: list[Any] = []
    linears: list[Linear] = []
    current = start
    while current not in graph.outputs:
        node = graph.only_consumer(current)
        if node is None:
            raise ConvolutionalizeError(
                f"the ONNX tensor {current!r} in the head is read by several nodes (or none); "
                "fcconv rewrites heads that are a single chain to the output"
            )
        if node.op_type in ("Gemm", "MatMul"):
            linear = _linear(graph, node, current)
            linears.append(linear)
            chain.extend(linear.nodes)
            current = linear.output
            continue
        if node.op_type in ELEMENTWISE or node.op_type in CHANNEL_WISE:
            _check_per_cell(graph, node)
            chain.append(node)
            current = node.output[0]
            continue
        raise ConvolutionalizeError(
            f"the {_describe(node)} in the head does not act on each cell of a map alone; "
            "fcconv carries element-wise activations, dropout and softmax between linear layers"
        )
    return chain, linears, current


def _check_per_cell(graph: _Graph, node: Any) -> None:
    if node.op_type in CHANNEL_WISE:
        axis = graph.attribute(node, "axis", -1)
        opset = max(o.version for o in graph.model.opset_import if o.domain in ("", "ai.onnx"))
        if axis not in (1, -1) or opset < 13:
            raise ConvolutionalizeError(
                f"the {_describe(node)} (axis {axis}, opset {opset}) cannot be carried onto a "
                "map; export with opset 13 or later and softmax over the classes"
            )
    for name in node.input[1:]:  # Clip's bounds and the like must be constants
        if name and graph.constant(name) is None:
            raise ConvolutionalizeError(f"the {_describe(node)} reads a computed tensor {name!r}")


def _linear(graph: _Graph, node: Any, current: str) -> Linear:
    if node.op_type == "Gemm":
        alpha, beta = graph.attribute(node, "alpha", 1.0), graph.attribute(node, "beta", 1.0)
        if (
            node.input[0] != current
            or graph.attribute(node, "transA", 0)
            or (alpha, beta)
            != (
                1.0,
                1.0,
            )
        ):
            raise ConvolutionalizeError(
                f"the {_describe(node)} is not y = x·Wᵀ + b (transA, alpha or beta set)"
            )
        weight = _constant(graph, node, node.input[1])
        if not graph.attribute(node, "transB", 0):
            weight = weight.T
        bias = None
        if len(node.input) > 2 and node.input[2]:
            bias = graph.constant(node.input[2])
            if bias is None:
                raise ConvolutionalizeError(f"the {_describe(node)} adds a computed bias")
        return Linear([node], weight, _bias(bias, weight, node), node.output[0])
    if node.input[0] != current:
        raise ConvolutionalizeError(f"the {_describe(node)} multiplies the weight from the left")
    weight = _constant(graph, node, node.input[1]).T  # MatMul's x @ W holds W as [N, O]
    add = graph.only_consumer(node.output[0])
    if add is None or add.op_type != "Add":
        return Linear([node], weight, None, node.output[0])
    other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    bias = graph.constant(other)
    if bias is None:
        return Linear([node], weight, None, node.output[0])
    return Linear([node, add], weight, _bias(bias, weight, add), add.output[0])


def _constant(graph: _Graph, node: Any, name: str) -> Any:
    value = graph.constant(name)
    if value is None or value.ndim != 2:
        raise ConvolutionalizeError(
            f"the {_describe(node)} reads {name!r}, which is not a constant 2-D weight"
        )
    return value


def _bias(bias: Any, weight: Any, node: Any) -> Any:
    if bias is None:
        return None
    if bias.size != weight.shape[0]:
        raise ConvolutionalizeError(
            f"the bias of the {_describe(node)} has {bias.size} values for "
            f"{weight.shape[0]} outputs"
        )
    return bias.reshape(-1)


# --------------------------------------------------------------------- rewrite


def rewrite(model: Any, head: OnnxHead, stride: tuple[int, int] = (1, 1)) -> Any:
    """A new model whose head is convolutions (see the module's doc); ``model`` is kept."""
    import torch

    onnx = _onnx()
    from onnx import helper, numpy_helper

    new = onnx.ModelProto()
    new.CopyFrom(model)
    graph = new.graph
    drop = {id(n) for n in head.removed} | {id(n) for n in head.chain}
    keep = [n for n, old in zip(graph.node, model.graph.node, strict=True) if id(old) not in drop]
    replaced: list[Any] = []
    current = head.source
    linears = iter(head.linears)
    pending = next(linears, None)
    for index, node in enumerate(head.chain):
        if pending is not None and node is pending.nodes[0]:
            first = pending is head.linears[0]
            patch = head.patch if first else Patch(1, 1, pending.weight.shape[1])
            order = head.order if first else "chw"
            kernel = linear_weight_to_conv(torch.from_numpy(pending.weight.copy()), patch, order)
            name = f"fcconv.conv{index}"
            tensors = [numpy_helper.from_array(kernel.numpy(), f"{name}.weight")]
            inputs = [current, f"{name}.weight"]
            if pending.bias is not None:
                tensors.append(numpy_helper.from_array(pending.bias, f"{name}.bias"))
                inputs.append(f"{name}.bias")
            graph.initializer.extend(tensors)
            replaced.append(
                helper.make_node(
                    "Conv",
                    inputs,
                    [pending.output],
                    name=name,
                    kernel_shape=[patch.height, patch.width],
                    strides=list(stride) if first else [1, 1],
                    pads=[0, 0, 0, 0],
                    dilations=[1, 1],
                    group=1,
                )  # fmt: skip
            )
            current = pending.output
            pending = next(linears, None)
            continue
        if pending is not None and node in pending.nodes:
            continue
        if any(node is linear.nodes[-1] for linear in head.linears):
            continue  # the Add of a MatMul + Add, folded into the Conv's bias
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[0] = current
        if copy.op_type in CHANNEL_WISE:
            for attribute in copy.attribute:
                if attribute.name == "axis":
                    attribute.i = 1
        replaced.append(copy)
        current = copy.output[0]
    del graph.node[:]
    graph.node.extend(_live([*keep, *replaced], head.output))
    _prune_initializers(graph)
    _free_dims(graph)
    del graph.value_info[:]
    return new


def _live(nodes: list[Any], output: str) -> list[Any]:
    """The nodes the output depends on, in their order (the flatten's shape arithmetic goes)."""
    producer = {out: node for node in nodes for out in node.output}
    needed: set[int] = set()
    stack = [output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(name for name in node.input if name)
    return [node for node in nodes if id(node) in needed]


def _prune_initializers(graph: Any) -> None:
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _free_dims(graph: Any) -> None:
    """Symbolic batch, height and width on the input; the output is a map of as many."""
    from onnx import TensorProto, helper

    dims = graph.input[0].type.tensor_type.shape.dim
    for index, label in ((2, "height"), (3, "width")):
        dims[index].Clear()
        dims[index].dim_param = label
    if not dims[0].dim_param and dims[0].dim_value != 1:
        dims[0].Clear()
        dims[0].dim_param = "batch"
    batch = dims[0].dim_param or dims[0].dim_value
    output = graph.output[0]
    element = output.type.tensor_type.elem_type or TensorProto.FLOAT
    classes = output.type.tensor_type.shape.dim[-1]
    channels = classes.dim_value if classes.HasField("dim_value") else "classes"
    replacement = helper.make_tensor_value_info(
        output.name, element, [batch, channels, "map_height", "map_width"]
    )
    output.CopyFrom(replacement)
