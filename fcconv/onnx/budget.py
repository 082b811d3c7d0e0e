"""An ONNX graph's allocations checked against the memory budget before onnxruntime runs it.

A few-hundred-byte graph can ask for gigabytes: ``ConstantOfShape`` of
``[25000, 25000]``, an ``Expand`` or ``Tile`` to a constant shape, a
``Resize`` by a constant factor. onnxruntime folds such constants when the
session is created, so the memory is gone before the first input is fed.

:func:`check_allocations` infers every tensor's shape the graph fixes
(ONNX shape inference with data propagation) and refuses a tensor larger
than the budget. Shapes that depend on the input's height and width are
symbolic here and left to the run itself, which follows the image's size.
The shape-making operators are also computed directly from their constant
inputs, so the check holds where shape inference gives up.
"""

from __future__ import annotations

from typing import Any

from fcconv.errors import CheckpointError

MEMORY_BUDGET = 1 << 30
"""The most one tensor of a graph may take (1 GiB), so that a run stays under 2 GB."""

_SHAPE_INPUT = {"ConstantOfShape": 0, "Expand": 1, "Reshape": 1}
"""Operators whose output shape is one of their inputs (the index), when that input is constant."""


def _itemsize(onnx: Any, elem_type: int) -> int:
    try:
        return max(1, onnx.helper.tensor_dtype_to_np_dtype(elem_type).itemsize)
    except (KeyError, TypeError, ValueError):
        return 8


def _refuse(source: str, what: str, count: int, itemsize: int, budget: int) -> CheckpointError:
    return CheckpointError(
        f"{source}: {what} would take {count * itemsize} bytes, more than the budget of "
        f"{budget} bytes for one tensor; fcconv runs no graph that allocates more than it "
        "can hold",
        path=source,
    )


def check_allocations(model: Any, source: str, *, budget: int = MEMORY_BUDGET) -> None:
    """Refuse ``model`` when a tensor it fixes the shape of is larger than ``budget`` bytes.

    Raises:
        CheckpointError: names the tensor, its operator and its size.
    """
    import onnx

    _check_constant_shapes(onnx, model, source, budget)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # a graph shape inference cannot follow: the direct check above stands
        return
    producers = {out: node.op_type for node in inferred.graph.node for out in node.output}
    graph = inferred.graph
    for info in [*graph.value_info, *graph.output]:
        tensor = info.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        dims = tensor.shape.dim
        if not all(d.HasField("dim_value") for d in dims):
            continue
        count = 1
        for d in dims:
            count *= max(0, d.dim_value)
        size = _itemsize(onnx, tensor.elem_type)
        if count * size > budget:
            shape = "×".join(str(d.dim_value) for d in dims)
            what = f"{producers.get(info.name, 'a node')} output {info.name!r} ({shape})"
            raise _refuse(source, what, count, size, budget)


def _constants(onnx: Any, model: Any) -> dict[str, Any]:
    """The graph's small constant integer tensors by name (initializers and Constant nodes)."""
    from onnx import numpy_helper

    found = {}
    for tensor in model.graph.initializer:
        if len(tensor.dims) == 1 and tensor.dims[0] <= 16:
            found[tensor.name] = tensor
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.HasField("t"):
                    found[node.output[0]] = attribute.t
    values = {}
    for name, tensor in found.items():
        if tensor.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            continue
        if len(tensor.dims) > 1 or (tensor.dims and tensor.dims[0] > 16):
            continue
        try:
            values[name] = [int(v) for v in numpy_helper.to_array(tensor).reshape(-1)]
        except Exception:  # external or malformed data: not a constant we can read here
            continue
    return values


def _check_constant_shapes(onnx: Any, model: Any, source: str, budget: int) -> None:
    constants = _constants(onnx, model)
    for node in model.graph.node:
        index = _SHAPE_INPUT.get(node.op_type)
        if node.op_type == "Tile" and len(node.input) > 1 and node.input[1] in constants:
            repeats = constants[node.input[1]]
            factor = 1
            for r in repeats:
                factor *= max(0, r)
            if factor > budget:
                raise _refuse(source, f"Tile {node.name or node.output[0]!r}", factor, 1, budget)
            continue
        if index is None or len(node.input) <= index or node.input[index] not in constants:
            continue
        count = 1
        for extent in constants[node.input[index]]:
            count *= max(1, extent) if node.op_type != "ConstantOfShape" else max(0, extent)
        if count * 4 > budget:
            shape = "×".join(map(str, constants[node.input[index]]))
            what = f"{node.op_type} {node.name or node.output[0]!r} ({shape})"
            raise _refuse(source, what, count, 4, budget)
