"""A dense ONNX model run in onnxruntime: its map against the original graph's head.

The original graph is cut in two with ``onnx.utils.Extractor``: the trunk
(input → the map the head flattens) and the head (that map → the output).
On a larger input the trunk's map is cut into every window, the head runs on
each, and the dense model's map must match cell by cell (the judge of
:mod:`fcconv.verify.runtime`). Then the coordinate map (where each cell's
window lies in the input) and, where the trunk allows, the crop account: the
whole original model run on each cell's crop, and how many cells it equals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fcconv.onnx.graph import OnnxHead, _onnx, data_inputs
from fcconv.verify.judge import compare
from fcconv.verify.runtime import FLOAT32_RTOL, RULE, RuntimeCheck

# Ops whose output cell (i, j) reads input cells (s·i …) with stride s, no padding.
_STRIDED = ("Conv", "MaxPool", "AveragePool")
_PER_CELL = frozenset(
    {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Clip", "Dropout", "Identity",
     "BatchNormalization", "Add", "Mul", "Sub", "Div", "HardSwish", "HardSigmoid", "Gelu",
     "Softplus", "Erf", "Sqrt", "Pow", "Constant", "Cast"}
)  # fmt: skip


@dataclass
class Coordinates:
    """Where cell ``(p, q)`` of the map looks: ``offset + stride·(p, q)``, ``window`` tall."""

    offset: tuple[int, int]
    stride: tuple[int, int]
    window: tuple[int, int]
    crops_compared: int = 0
    crop_exact: int = 0
    crop_max_abs_diff: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "offset": list(self.offset),
            "stride": list(self.stride),
            "window": list(self.window),
            "crops_compared": self.crops_compared,
            "crop_exact": self.crop_exact,
            "crop_max_abs_diff": self.crop_max_abs_diff,
            "note": self.note,
        }


def session(model: Any) -> Any:
    """An onnxruntime session on the CPU for a model (or its bytes)."""
    from fcconv.extras import require

    ort = require("onnxruntime", "onnx", purpose="to run ONNX models")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run(model_session: Any, x: Any) -> Any:
    """Run a one-input session; its first output."""
    return run_all(model_session, x)[0]


def run_all(model_session: Any, x: Any) -> list[Any]:
    """Run a one-input session; every output."""
    name = model_session.get_inputs()[0].name
    return list(model_session.run(None, {name: x}))


def _part(model: Any, inputs: list[str], outputs: list[str], free: tuple[int, ...]) -> Any:
    """A sub-graph of ``model``, its input's ``free`` axes made symbolic."""
    onnx = _onnx()
    inferred = onnx.shape_inference.infer_shapes(model)  # Extractor needs every shape
    part = onnx.utils.Extractor(inferred).extract_model(inputs, outputs)
    dims = data_inputs(part)[0].type.tensor_type.shape.dim
    for axis in free:
        dims[axis].Clear()
        dims[axis].dim_param = f"free{axis}"
    del part.graph.value_info[:]
    for output in part.graph.output:
        output.type.tensor_type.ClearField("shape")
    return part


def input_shape(model: Any) -> tuple[int | None, ...]:
    dims = data_inputs(model)[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)


def check_dense(
    original: Any, dense: Any, head: OnnxHead, stride: tuple[int, ...], *, seed: int = 0
) -> tuple[RuntimeCheck, Coordinates | None]:
    """Run both graphs in onnxruntime and compare every map with the head on every window.

    A graph whose batch is fixed (torch's dynamo exporter fixes it at 1, in
    the input and in the head's ``Reshape``) runs that many windows at a time.
    """
    import numpy as np
    import onnxruntime

    from fcconv.keras.check import judge_outputs

    shape = input_shape(original)
    fixed = shape[0]
    batch = fixed or 2
    channels, native = shape[1], tuple(shape[2:])
    if channels is None or any(side is None for side in native):
        raise ValueError("the original graph's input needs fixed channels and spatial sizes")
    check = RuntimeCheck(f"onnxruntime {onnxruntime.__version__}", native)  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, channels, *native)).astype(np.float32)
    whole, dense_session = session(original), session(dense)
    native_pairs = [
        (got.reshape(batch, -1), want.astype(np.float64).reshape(batch, -1))
        for got, want in zip(run_all(dense_session, x), run_all(whole, x), strict=True)
    ]
    larger = tuple(2 * side for side in native)
    big = rng.standard_normal((batch, channels, *larger)).astype(np.float32)
    free = tuple(range(len(shape)))
    name = data_inputs(original)[0].name
    trunk = session(_part(original, [name], [head.source], (0, *free[2:])))
    features = run(trunk, big)
    windows, grid = cut_windows_nd(features, head.patch.sizes, stride)
    check.larger_size, check.map_size = larger, grid  # type: ignore[assignment]
    check.windows = int(np.prod(grid)) if grid else 0
    if not grid or min(grid) < 1:
        check.problems.append(f"the trunk's map at {'x'.join(map(str, larger))} holds no window")
        return check, None
    if all(count == 1 for count in grid):
        check.problems.append(
            f"the map is 1 cell on a {'x'.join(map(str, larger))} input, as at the native "
            "size: the dense graph does not slide its head"
        )
        return check, None
    outputs = [output.name for output in original.graph.output]
    head_session = session(_part(original, [head.source], outputs, (0,)))
    chunk = fixed or len(windows)
    parts = [run_all(head_session, windows[i : i + chunk]) for i in range(0, len(windows), chunk)]
    expected = [
        np.concatenate([part[k] for part in parts]).astype(np.float64).reshape(batch, *grid, -1)
        for k in range(len(outputs))
    ]
    got = [np.moveaxis(y, 1, -1) for y in run_all(dense_session, big)]
    judge_outputs(check, native_pairs, list(zip(got, expected, strict=True)))
    coordinates = None
    if head.ndim == 2 and len(outputs) == 1:
        coordinates = _coordinates(original, head, stride, native)  # type: ignore[arg-type]
    if coordinates is not None and check.passed:
        scale = check.comparisons["dense"].reference_scale
        _crop_account(coordinates, whole, big, got[0], scale)
    return check, coordinates


def cut_windows_nd(
    features: Any, window: tuple[int, ...], stride: tuple[int, ...]
) -> tuple[Any, tuple[int, ...]]:
    """Every window of an ``[B, C, *spatial]`` map, batched cell by cell (row-major), and
    the grid of cells: ``[B·∏grid, C, *window]``."""
    import itertools

    import numpy as np

    spatial = features.shape[2:]
    grid = tuple(
        (size - side) // step + 1 for size, side, step in zip(spatial, window, stride, strict=True)
    )
    if any(count < 1 for count in grid):
        return features[:0], grid
    cells = []
    for corner in itertools.product(*(range(count) for count in grid)):
        index = tuple(
            slice(c * step, c * step + side)
            for c, step, side in zip(corner, stride, window, strict=True)
        )
        cells.append(features[(slice(None), slice(None), *index)])
    stacked = np.stack(cells, axis=1)  # [B, cells, C, *window]
    return np.ascontiguousarray(stacked.reshape(-1, *stacked.shape[2:])), grid


def _coordinates(
    model: Any, head: OnnxHead, stride: tuple[int, int], native: tuple[int, int]
) -> Coordinates | None:
    """The window stride in pixels: the trunk's strides times the first Conv's, where the
    trunk is a chain of convs, pools and per-cell ops; None elsewhere."""
    from fcconv.onnx.graph import _Graph

    graph = _Graph(model)
    total, padded = [1, 1], []
    name = head.source
    while name != data_inputs(model)[0].name:
        node = graph.producer.get(name)
        if node is None:
            return None
        if node.op_type in _STRIDED:
            steps = list(graph.attribute(node, "strides", [1, 1]))
            total = [total[0] * steps[0], total[1] * steps[1]]
            pads = list(graph.attribute(node, "pads", [0, 0, 0, 0]))
            if any(pads) or graph.attribute(node, "auto_pad", b"NOTSET") not in (
                b"NOTSET",
                b"VALID",
            ):
                padded.append(node.name or node.output[0])
        elif node.op_type not in _PER_CELL:
            return None
        computed = [n for n in node.input if n and n not in graph.constants]
        if len(computed) != 1:
            return None
        name = computed[0]
    coordinates = Coordinates((0, 0), (total[0] * stride[0], total[1] * stride[1]), native)
    if padded:
        coordinates.note = (
            f"the trunk pads ({', '.join(padded[:3])}), so a crop sees zeros at its own borders "
            "where the whole input has pixels: cells near a crop's border differ"
        )
    return coordinates


def _crop_account(
    coordinates: Coordinates, whole: Any, big: Any, dense: Any, scale: float, limit: int = 16
) -> None:
    """Run the original model on each cell's crop; count the cells it equals."""
    import numpy as np

    (sh, sw), (wh, ww) = coordinates.stride, coordinates.window
    height, width = big.shape[2:]
    cells = [
        (p, q)
        for p in range(dense.shape[1])
        for q in range(dense.shape[2])
        if p * sh + wh <= height and q * sw + ww <= width
    ][:limit]
    worst = 0.0
    for p, q in cells:
        crop = np.ascontiguousarray(big[:, :, p * sh : p * sh + wh, q * sw : q * sw + ww])
        found = compare(run(whole, crop), dense[:, p, q], RULE, scale=scale)
        worst = max(worst, found.max_abs_diff)
        coordinates.crop_exact += found.passed
    coordinates.crops_compared = len(cells)
    coordinates.crop_max_abs_diff = worst if cells else None
    if cells and coordinates.crop_exact == len(cells):
        coordinates.note = (
            f"the original model run on each of {len(cells)} crops gives its cell's scores "
            f"(float32 tolerance {FLOAT32_RTOL:g} relative)"
        )
