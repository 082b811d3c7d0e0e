"""An ONNX classifier's head read off its graph, and rewritten as convolutions.

The head starts where the trunk's ``[N, C, *spatial]`` map (1, 2 or 3 spatial
axes) becomes a vector: a ``Flatten`` (or a ``Reshape`` to ``[batch, N]``,
the batch given or fixed at 1 as torch's dynamo exporter writes it),
optionally after a ``Transpose`` (which sets the flatten order), or a global
pool (``GlobalAveragePool``/``GlobalMaxPool``, or ``ReduceMean``/``ReduceMax``
over every spatial axis) with or without a flatten after it. From there the
head runs through ``Gemm`` (or ``MatMul`` + ``Add``) layers and the nodes
between them that act on each cell's features alone (element-wise
activations, dropout, ``BatchNormalization``, ``LayerNormalization`` over the
features, ``PRelu`` and per-feature ``Mul``/``Add``, softmax) to the graph's
outputs, of which there may be several (a head that fans out).

The rewrite removes the flatten (and the nodes that only computed its shape),
turns each linear layer that reads the map into a ``Conv`` with the map's
size as its kernel, every later one into a 1×1 ``Conv``, a global pool into
the same pool over a window of the native map's size at stride 1, and gives
the input and the outputs symbolic spatial sizes. Weights are only permuted,
by :mod:`fcconv.geometry`; per-feature constants only reshaped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fcconv.errors import ConvolutionalizeError
from fcconv.patches import SPATIAL_AXES, PatchNd

# Ops that act on each element alone: they act on every cell of a map as they
# acted on the flat vector, wherever they sit in the head.
ELEMENTWISE = frozenset(
    {
        "Abs", "Celu", "Clip", "Dropout", "Elu", "Erf", "Exp", "Gelu", "HardSigmoid",
        "HardSwish", "Identity", "LeakyRelu", "Log", "Mish", "Neg", "Relu", "Selu", "Sigmoid",
        "Softplus", "Softsign", "Sqrt", "Tanh", "ThresholdedRelu",
    }
)  # fmt: skip
CHANNEL_WISE = frozenset({"Softmax", "LogSoftmax"})
# Ops with a per-feature constant operand (``[O]``, ``[1, O]`` or one value).
PER_FEATURE = frozenset({"Add", "Div", "Mul", "PRelu", "Sub"})
NORMALIZATIONS = frozenset({"BatchNormalization", "LayerNormalization"})
GLOBAL_POOLS = {"GlobalAveragePool": "AveragePool", "GlobalMaxPool": "MaxPool"}
REDUCE_POOLS = {"ReduceMean": "AveragePool", "ReduceMax": "MaxPool"}
LINEARS = ("Gemm", "MatMul")


@dataclass
class Linear:
    """One linear layer of the head: its nodes, its weight as ``[O, N]``, its bias."""

    nodes: list[Any]
    weight: Any  # numpy [O, N], the Linear weight
    bias: Any | None  # numpy [O]
    input: str  # the tensor it reads
    output: str  # the tensor the layer (with its bias) produces


@dataclass
class OnnxHead:
    """What the rewrite needs to know of the head.

    Attributes:
        source: the trunk's ``[N, C, *spatial]`` map.
        patch: that map at the native input size (the first conv's kernel, or
            the pool's window).
        order: the flatten order of the map's axes (``chw``, ``hwc``, ``cl`` …).
        order_detail: how the order was read, in words.
        flat: the tensor the head's first nodes read (the flattened or pooled map).
        pool: the global pool node, if the head pools.
        removed: Transpose / Flatten / Reshape nodes the rewrite drops.
        region: every head node after ``flat``, in graph order.
        linears: the head's linear layers, in graph order.
        readers: the outputs of the linear layers that read the map itself.
        outputs: the graph's outputs (all the head's).
    """

    source: str
    patch: PatchNd
    order: str
    order_detail: str
    flat: str
    pool: Any | None
    removed: list[Any]
    region: list[Any]
    linears: list[Linear]
    readers: set[str]
    outputs: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def ndim(self) -> int:
        return self.patch.ndim

    @property
    def order_from(self) -> str:
        """The graph says how it flattens: the order always comes from the model."""
        return "model"

    def to_dict(self) -> dict[str, Any]:
        return {
            "found": True,
            "feeder": self.source,
            "feature_map": str(self.patch),
            "removed": [_describe(node) for node in self.removed],
            "flatten": _describe(self.pool) if self.pool is not None else None,
            "pool": None if self.pool is None else self.pool.op_type,
            "order": self.order,
            "order_from": self.order_from,
            "order_detail": self.order_detail,
            "linears": [" + ".join(_describe(n) for n in linear.nodes) for linear in self.linears],
            "nodes": [_describe(node) for node in self.region],
            "outputs": list(self.outputs),
        }


def _onnx() -> Any:
    from fcconv.extras import require

    return require("onnx", "onnx", purpose="to read and write ONNX graphs")


def data_inputs(model: Any) -> list[Any]:
    """The graph's inputs that are not initializers (older files list both)."""
    constants = {t.name for t in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in constants]


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
            if not info.type.tensor_type.HasField("shape"):
                continue
            dims = info.type.tensor_type.shape.dim
            shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
            known = self.shapes.get(info.name)
            if known is not None and len(known) == len(shape):  # keep what is known of each
                shape = [a if a is not None else b for a, b in zip(known, shape, strict=True)]
            elif known is not None:
                continue
            self.shapes[info.name] = shape
        self.outputs = [o.name for o in graph.output]
        self.opset = max(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=1
        )

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

    def readers(self, name: str) -> list[Any]:
        return self.consumers.get(name, [])

    def computed_inputs(self, node: Any) -> list[str]:
        return [name for name in node.input if name and name not in self.constants]


def _describe(node: Any) -> str:
    return f"{node.op_type} node {node.name or node.output[0]!r}"


def find_head(model: Any) -> OnnxHead:
    """The head of an ONNX classifier (see the module's doc).

    Raises:
        ConvolutionalizeError: no flatten or global pool feeding a linear
            layer, a node in the head that does not act on each cell alone, or
            an output that does not come from the head (named in the message).
    """
    graph = _Graph(model)
    inputs = data_inputs(model)
    if len(inputs) != 1:
        raise ConvolutionalizeError(
            f"fcconv rewrites ONNX graphs with one input; this one has {len(inputs)} "
            f"({', '.join(value.name for value in inputs[:4])})"
        )
    entry = next((node for node in model.graph.node if _is_entry(graph, node)), None)
    if entry is None:
        raise ConvolutionalizeError(
            "no Flatten, Reshape or global pool of a [N, C, ...] map feeding a Gemm or MatMul "
            "in the ONNX graph; fcconv convolutionalizes classifiers whose head flattens or "
            "pools the trunk's map"
        )
    head = _read_entry(graph, entry)
    region = _region(graph, head.flat)
    head.region = region
    head.linears = _linears(graph, region)
    if not head.linears:
        raise ConvolutionalizeError("the ONNX head holds no Gemm or MatMul layer to convert")
    _check_region(graph, head)
    head.readers = {lin.output for lin in head.linears if _reads_flat(graph, lin.input, head.flat)}
    features = head.patch.features if head.pool is None else head.patch.channels
    for linear in head.linears:
        if linear.output in head.readers and linear.weight.shape[1] != features:
            raise ConvolutionalizeError(
                f"the {_describe(linear.nodes[0])} takes {linear.weight.shape[1]} features, "
                f"but the map {head.source!r} gives {features} ({head.patch.describe()})"
            )
    head.outputs = list(graph.outputs)
    return head


def _is_entry(graph: _Graph, node: Any) -> bool:
    """A flatten of a map, or a reduce over its spatial axes, that a linear layer reads."""
    if node.op_type in ("Flatten", "Reshape"):
        shape_in = graph.shapes.get(node.input[0])
        shape_out = graph.shapes.get(node.output[0])
        if not shape_in or len(shape_in) not in (3, 4, 5) or not shape_out or len(shape_out) != 2:
            return False
        if node.op_type == "Flatten" and graph.attribute(node, "axis", 1) != 1:
            return False
    elif node.op_type in REDUCE_POOLS:
        if graph.attribute(node, "keepdims", 1) or not _reduces_spatial(graph, node):
            return False
    else:
        return False
    return _feeds_linear(graph, node.output[0])


def _feeds_linear(graph: _Graph, name: str) -> bool:
    for reader in graph.readers(name):
        if reader.op_type in LINEARS:
            return True
        if reader.op_type in ELEMENTWISE and _feeds_linear(graph, reader.output[0]):
            return True
    return False


def _reduces_spatial(graph: _Graph, node: Any) -> bool:
    shape = graph.shapes.get(node.input[0])
    axes = graph.attribute(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = graph.constant(node.input[1])
        axes = None if value is None else value.tolist()
    if not shape or len(shape) not in (3, 4, 5) or axes is None:
        return False
    rank = len(shape)
    return sorted(a % rank for a in axes) == list(range(2, rank))


def _read_entry(graph: _Graph, entry: Any) -> OnnxHead:
    """The map, the order and the nodes the rewrite removes, from the entry node back."""
    removed: list[Any] = []
    pool = None
    source = entry.input[0]
    if entry.op_type in REDUCE_POOLS:
        pool = entry
    else:
        removed.append(entry)
        producer = graph.producer.get(source)
        if producer is not None and _is_global_pool(graph, producer):
            pool, source = producer, producer.input[0]
    shape = graph.shapes.get(pool.input[0] if pool is not None else source)
    rank = len(shape or [])
    letters = "c" + SPATIAL_AXES.get(rank - 2, "")
    order, detail = letters, f"{entry.op_type} of an N{letters.upper()} map"
    if pool is not None:
        source = pool.input[0]
        detail = f"{pool.op_type} over the map's {'×'.join(SPATIAL_AXES[rank - 2])}"
    else:
        producer = graph.producer.get(source)
        if producer is not None and producer.op_type == "Transpose":
            perm = list(graph.attribute(producer, "perm", []))
            only_flattened = source not in graph.outputs and all(
                reader is entry or reader.op_type == "Shape" for reader in graph.readers(source)
            )  # a dynamic-batch export also reads the transposed map's Shape
            if len(perm) == rank and perm[0] == 0 and only_flattened:
                order = "".join(letters[axis - 1] for axis in perm[1:])
                detail = f"Transpose{tuple(perm)} → {entry.op_type}"
                removed.insert(0, producer)
                source = producer.input[0]
        shape = graph.shapes.get(source)
    if not shape or len(shape) not in (3, 4, 5) or not all(isinstance(s, int) for s in shape[1:]):
        raise ConvolutionalizeError(
            f"the shape of the map {source!r} that the head reads is not known from the "
            "graph; export the model with a fixed input size"
        )
    patch = PatchNd(tuple(shape[2:]), shape[1])
    flat = entry.output[0]
    return OnnxHead(source, patch, order, detail, flat, pool, removed, [], [], set(), [])


def _is_global_pool(graph: _Graph, node: Any) -> bool:
    if node.op_type in GLOBAL_POOLS:
        return True
    if node.op_type in ("AveragePool", "MaxPool"):  # an adaptive pool to 1, as exported
        shape = graph.shapes.get(node.input[0])
        kernel = list(graph.attribute(node, "kernel_shape", []))
        pads = list(graph.attribute(node, "pads", [])) or [0]
        return bool(shape) and kernel == list(shape[2:]) and not any(pads)
    return (
        node.op_type in REDUCE_POOLS
        and bool(graph.attribute(node, "keepdims", 1))
        and _reduces_spatial(graph, node)
    )


def _region(graph: _Graph, flat: str) -> list[Any]:
    """Every node that reads ``flat``, directly or not, in graph order."""
    reached = {flat}
    region = []
    for node in graph.model.graph.node:
        if any(name in reached for name in node.input):
            region.append(node)
            reached.update(node.output)
    return region


def _linears(graph: _Graph, region: list[Any]) -> list[Linear]:
    found = []
    for node in region:
        if node.op_type in LINEARS:
            found.append(_linear(graph, node))
    return found


def _reads_flat(graph: _Graph, name: str, flat: str) -> bool:
    """Whether ``name`` is ``flat`` itself, through element-wise nodes only."""
    while name != flat:
        node = graph.producer.get(name)
        if node is None or node.op_type not in ELEMENTWISE:
            return False
        name = node.input[0]
    return True


def _check_region(graph: _Graph, head: OnnxHead) -> None:
    """Every head node reads the head alone and acts on each cell; every output is the head's."""
    inside = {head.flat}
    linear_nodes = {id(n) for linear in head.linears for n in linear.nodes}
    on_vector = head.pool is None and not all(size == 1 for size in head.patch.sizes)
    for node in head.region:
        computed = graph.computed_inputs(node)
        strays = [name for name in computed if name not in inside]
        if len(computed) != 1 or strays:
            raise ConvolutionalizeError(
                f"the {_describe(node)} in the head reads {', '.join(strays or computed)}; "
                "fcconv rewrites heads whose every node reads one head tensor (heads may fan "
                "out, not merge)"
            )
        inside.update(node.output)
        if id(node) in linear_nodes or node.op_type in ELEMENTWISE:
            continue
        flat_vector = on_vector and _reads_flat_map(graph, node, head.flat)
        if flat_vector or not _acts_per_cell(graph, node):
            where = "the flattened map" if flat_vector else "each cell's features alone"
            raise ConvolutionalizeError(
                f"the {_describe(node)} in the head does not act on {where}; fcconv carries "
                "element-wise activations, dropout, softmax, BatchNormalization, "
                "LayerNormalization over the features and per-feature PRelu/Mul/Add after a "
                "linear layer"
            )
    missing = [name for name in graph.outputs if name not in inside]
    if missing:
        raise ConvolutionalizeError(
            f"the ONNX output {missing[0]!r} does not come from the head; fcconv rewrites "
            "graphs whose every output is computed by the head"
        )


def _reads_flat_map(graph: _Graph, node: Any, flat: str) -> bool:
    """Whether ``node`` reads the flattened map with no linear layer between."""
    name = graph.computed_inputs(node)[0]
    while name != flat:
        producer = graph.producer.get(name)
        if producer is None or producer.op_type in LINEARS or producer.op_type == "Add":
            return False
        name = graph.computed_inputs(producer)[0]
    return True


def _acts_per_cell(graph: _Graph, node: Any) -> bool:
    op = node.op_type
    if op in CHANNEL_WISE:
        axis = graph.attribute(node, "axis", -1)
        return axis in (1, -1) and graph.opset >= 13
    if op == "BatchNormalization":
        return True
    if op == "LayerNormalization":
        return graph.attribute(node, "axis", -1) in (1, -1)
    if op in PER_FEATURE:
        constants = [name for name in node.input if name in graph.constants]
        if len(constants) != 1:
            return False
        value = graph.constant(constants[0])
        return value is not None and (value.size == 1 or value.ndim <= 2)
    return False


def _linear(graph: _Graph, node: Any) -> Linear:
    current = graph.computed_inputs(node)[0] if graph.computed_inputs(node) else node.input[0]
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
        return Linear([node], weight, _bias(bias, weight, node), current, node.output[0])
    if node.input[0] != current:
        raise ConvolutionalizeError(f"the {_describe(node)} multiplies the weight from the left")
    weight = _constant(graph, node, node.input[1]).T  # MatMul's x @ W holds W as [N, O]
    readers = graph.readers(node.output[0])
    add = readers[0] if len(readers) == 1 and node.output[0] not in graph.outputs else None
    if add is None or add.op_type != "Add":
        return Linear([node], weight, None, current, node.output[0])
    other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    bias = graph.constant(other)
    if bias is None or bias.size != weight.shape[0]:
        return Linear([node], weight, None, current, node.output[0])
    return Linear([node, add], weight, _bias(bias, weight, add), current, add.output[0])


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


def rewrite(model: Any, head: OnnxHead, stride: tuple[int, ...] | None = None) -> Any:
    """A new model whose head is convolutions (see the module's doc); ``model`` is kept."""
    onnx = _onnx()
    new = onnx.ModelProto()
    new.CopyFrom(model)
    graph = new.graph
    ndim = head.ndim
    step = tuple(stride) if stride is not None else (1,) * ndim
    names = {head.flat: head.source} if head.pool is None else {}
    if head.pool is not None and head.pool.output[0] != head.flat:
        names[head.flat] = head.pool.output[0]  # the flatten after a keepdims pool goes
    drop = {id(n) for n in head.removed} | {id(n) for n in head.region}
    if head.pool is not None:
        drop.add(id(head.pool))
    rewritten: list[Any] = []
    folded = {id(linear.nodes[-1]) for linear in head.linears if len(linear.nodes) > 1}
    starts = {id(linear.nodes[0]): linear for linear in head.linears}
    for old, node in zip(model.graph.node, graph.node, strict=True):
        if id(old) not in drop:
            rewritten.append(node)
            continue
        if head.pool is not None and old is head.pool:
            rewritten.append(_pool_node(head, step))
        elif id(old) in starts:
            rewritten.append(_conv_node(graph, head, starts[id(old)], names, step))
        elif id(old) in folded or any(old is n for n in head.removed):
            continue
        elif any(old is n for n in head.region):
            rewritten.extend(_cell_nodes(graph, head, node, names))
    del graph.node[:]
    graph.node.extend(_live(rewritten, head.outputs))
    _prune_initializers(graph)
    _free_dims(new, head)
    del graph.value_info[:]
    return new


def _pool_node(head: OnnxHead, stride: tuple[int, ...]) -> Any:
    from onnx import helper

    assert head.pool is not None
    op = GLOBAL_POOLS.get(head.pool.op_type) or REDUCE_POOLS.get(head.pool.op_type)
    op = op or head.pool.op_type  # an AveragePool/MaxPool over the whole map
    return helper.make_node(
        op,
        [head.source],
        [head.pool.output[0]],
        name=f"fcconv.{head.pool.name or 'pool'}",
        kernel_shape=list(head.patch.sizes),
        strides=list(stride),
        pads=[0] * (2 * head.ndim),
    )


def _conv_node(
    graph: Any, head: OnnxHead, linear: Linear, names: dict[str, str], stride: tuple[int, ...]
) -> Any:
    import torch
    from onnx import helper, numpy_helper

    from fcconv.geometry import linear_weight_to_conv_nd

    reads_map = linear.output in head.readers and head.pool is None
    ones = (1,) * head.ndim
    patch = head.patch if reads_map else PatchNd(ones, linear.weight.shape[1])
    order = head.order if reads_map else "c" + SPATIAL_AXES[head.ndim]
    kernel = linear_weight_to_conv_nd(torch.from_numpy(linear.weight.copy()), patch, order)
    name = f"fcconv.{linear.nodes[0].name or linear.output}"
    graph.initializer.append(numpy_helper.from_array(kernel.numpy(), f"{name}.weight"))
    inputs = [names.get(linear.input, linear.input), f"{name}.weight"]
    if linear.bias is not None:
        graph.initializer.append(numpy_helper.from_array(linear.bias, f"{name}.bias"))
        inputs.append(f"{name}.bias")
    return helper.make_node(
        "Conv",
        inputs,
        [linear.output],
        name=name,
        kernel_shape=list(patch.sizes),
        strides=list(stride if reads_map else ones),
        pads=[0] * (2 * head.ndim),
        dilations=list(ones),
        group=1,
    )


def _cell_nodes(graph: Any, head: OnnxHead, node: Any, names: dict[str, str]) -> list[Any]:
    """A per-cell node on the map: its axis on the channels, its constants per channel."""
    from onnx import helper, numpy_helper

    for index, name in enumerate(node.input):
        if name in names:
            node.input[index] = names[name]
    if node.op_type in CHANNEL_WISE:
        for attribute in node.attribute:
            if attribute.name == "axis":
                attribute.i = 1
        if not any(a.name == "axis" for a in node.attribute):
            node.attribute.append(helper.make_attribute("axis", 1))
    if node.op_type in PER_FEATURE:
        constants = {t.name: t for t in graph.initializer}
        for index, name in enumerate(node.input):
            value = _array(graph, name, constants)
            if value is not None and value.size > 1:
                reshaped = f"fcconv.{name}.per_channel"
                shaped = value.reshape(-1, *(1,) * head.ndim)
                graph.initializer.append(numpy_helper.from_array(shaped, reshaped))
                node.input[index] = reshaped
    if node.op_type == "LayerNormalization":
        return _channels_last(head, node)
    return [node]


def _array(graph: Any, name: str, constants: dict[str, Any]) -> Any | None:
    from onnx import numpy_helper

    if name in constants:
        return numpy_helper.to_array(constants[name])
    for node in graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            value = next((a for a in node.attribute if a.name == "value"), None)
            return None if value is None else numpy_helper.to_array(value.t)
    return None


def _channels_last(head: OnnxHead, node: Any) -> list[Any]:
    """LayerNormalization over the features of each cell: channels moved last and back."""
    from onnx import helper

    rank = head.ndim + 2
    source, target = node.input[0], node.output[0]
    last, back = f"{target}.fcconv_channels_last", f"{target}.fcconv_normalized"
    to_last = [0, *range(2, rank), 1]
    to_first = [0, rank - 1, *range(1, rank - 1)]
    node.input[0] = last
    node.output[0] = back
    for attribute in node.attribute:
        if attribute.name == "axis":
            attribute.i = -1
    return [
        helper.make_node("Transpose", [source], [last], perm=to_last),
        node,
        helper.make_node("Transpose", [back], [target], perm=to_first),
    ]


def _live(nodes: list[Any], outputs: list[str]) -> list[Any]:
    """The nodes the outputs depend on, in their order (the flatten's shape arithmetic goes)."""
    producer = {out: node for node in nodes for out in node.output}
    needed: set[int] = set()
    stack = list(outputs)
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


_LABELS = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}


def _free_dims(model: Any, head: OnnxHead) -> None:
    """Symbolic batch and spatial sizes on the input; each output a map of as many."""
    from onnx import TensorProto, helper

    value = data_inputs(model)[0]
    dims = value.type.tensor_type.shape.dim
    for index, label in enumerate(_LABELS[head.ndim], start=2):
        dims[index].Clear()
        dims[index].dim_param = label
    if not dims[0].dim_param and dims[0].dim_value != 1:
        dims[0].Clear()
        dims[0].dim_param = "batch"
    batch = dims[0].dim_param or dims[0].dim_value
    spatial = [f"map_{label}" for label in _LABELS[head.ndim]]
    for output in model.graph.output:
        element = output.type.tensor_type.elem_type or TensorProto.FLOAT
        last = output.type.tensor_type.shape.dim
        channels: Any = "classes"
        if len(last) and last[-1].HasField("dim_value"):
            channels = last[-1].dim_value
        replacement = helper.make_tensor_value_info(
            output.name, element, [batch, channels, *spatial]
        )
        output.CopyFrom(replacement)
