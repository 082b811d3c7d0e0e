"""The whole-model job for ONNX graphs: ``model.onnx`` in, a dense ``.onnx`` graph out.

The head is read off the graph (:mod:`fcconv.onnx.graph`), rewritten as
convolutions with dynamic height and width, and the result is run in
onnxruntime against the original graph's head on every window
(:mod:`fcconv.onnx.check`) before it is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcconv.errors import CheckpointError, SpecError
from fcconv.io.atomic import atomic_output, check_output_path, inputs_protected
from fcconv.onnx.budget import check_allocations

ONNX_SUFFIX = ".onnx"


@dataclass
class OnnxConvolutionalizeResult:
    """An ONNX classifier made fully convolutional; truthy when verified (and written)."""

    model: str
    output: str
    input_size: tuple[int, ...]
    patch: Any  # the native feature map, a PatchNd
    order: str
    order_from: str
    stride: tuple[int, ...]
    layers: list[dict[str, Any]]
    check: Any
    coordinates: Any = None
    written: bool = False
    notes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.check) and self.written

    @property
    def exit_code(self) -> int:
        return 0 if self else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": "convolutionalize",
            "format": "onnx",
            "model": self.model,
            "output": self.output,
            "ok": bool(self),
            "input_size": list(self.input_size),
            "feature_map": str(self.patch),
            "order": self.order,
            "order_from": "model",
            "order_detail": self.order_from,
            "stride": list(self.stride),
            "layers": self.layers,
            "verification": self.check.to_dict(),
            "coordinates": None if self.coordinates is None else self.coordinates.to_dict(),
            "written": self.written,
            "notes": self.notes,
        }


def onnx_checker() -> Any:
    """``onnx.checker``, through the extra's one-line error when onnx is missing."""
    from fcconv.onnx.graph import _onnx

    return _onnx().checker


def load_onnx(path: str | Path) -> Any:
    """An ONNX model, parsed and checked (a protobuf: nothing in it runs)."""
    from fcconv.onnx.graph import _onnx

    onnx = _onnx()
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"no such file: {file}; check the path")
    try:
        model = onnx.load(str(file))
        onnx.checker.check_model(model)
    except Exception as error:  # protobuf and checker errors alike: not a usable graph
        text = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        raise CheckpointError(
            f"{file} is not a valid ONNX model ({type(error).__name__}: {text}); re-export it"
        ) from None
    check_allocations(model, str(file))
    _unlist_initializers(model)
    return model


def _unlist_initializers(model: Any) -> None:
    """Older files (IR version 3, model-zoo era) list every initializer as a graph input
    too; the graph computes the same with them as constants alone (IR version 4 on)."""
    constants = {t.name for t in model.graph.initializer}
    if not any(value.name in constants for value in model.graph.input):
        return
    kept = [value for value in model.graph.input if value.name not in constants]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    model.ir_version = max(model.ir_version, 4)


def _fix_input(model: Any, size: tuple[int, ...] | None) -> tuple[int, ...]:
    """The graph's native spatial sizes, fixing symbolic ones to ``size``."""
    from fcconv.onnx.graph import data_inputs

    inputs = data_inputs(model)
    if len(inputs) != 1:
        raise SpecError(
            f"fcconv rewrites ONNX graphs with one input; this one has {len(inputs)} "
            f"({', '.join(value.name for value in inputs[:4])})"
        )
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) not in (3, 4, 5):
        raise SpecError(
            f"the ONNX graph's input has {len(dims)} axes; fcconv reads [N, C, L], "
            "[N, C, H, W] and [N, C, D, H, W] tensors"
        )
    rank = len(dims) - 2
    if size is not None and len(size) == 1 and rank > 1:
        size = tuple(size) * rank  # one number for every axis
    if size is not None and len(size) != rank:
        raise SpecError(
            f"the ONNX graph's input has {rank} spatial axes; give {rank} sizes as {{input_size}}"
        )
    known = [d.dim_value if d.HasField("dim_value") else None for d in dims[2:]]
    if size is not None and any(k is not None and k != g for k, g in zip(known, size, strict=True)):
        shown = "x".join(str(k) if k is not None else "?" for k in known)
        raise SpecError(
            f"the ONNX graph's input is {shown}, not {'x'.join(map(str, size))}; give its "
            "own size as {input_size}"
        )
    native = []
    for axis, side in enumerate(known, start=2):
        if side is None:
            if size is None:
                raise SpecError(
                    "the ONNX graph's input sizes are symbolic; give the size the classifier "
                    "was trained at as {input_size}"
                )
            dims[axis].Clear()
            dims[axis].dim_value = size[axis - 2]
        native.append(side or size[axis - 2])  # type: ignore[index]
    return tuple(native)


@inputs_protected("model_path")
def convolutionalize_onnx(
    model_path: str | Path,
    output: str | Path,
    *,
    input_size: tuple[int, ...] | None,
    stride: tuple[int, ...] | None = None,
    force: bool = False,
) -> OnnxConvolutionalizeResult:
    """Rewrite an ONNX classifier's flatten → Gemm head as convolutions; verify; write.

    Args:
        model_path: the ``.onnx`` graph.
        output: the dense ``.onnx`` graph to write.
        input_size: the native ``(H, W)`` (``(L,)``, ``(D, H, W)``); needed when the
            graph's are symbolic.
        stride: the stride of the first Conv (or of a global pool's window) in
            feature-map cells (default 1 on every axis).
        force: replace an existing output.
    """
    from fcconv.onnx.graph import find_head, rewrite

    target = Path(output)
    if target.suffix.lower() != ONNX_SUFFIX:
        raise SpecError(
            f"an ONNX model is written as an ONNX graph; name the {{output}} {target.stem}.onnx"
        )
    check_output_path(target, force, (Path(model_path),))
    original = load_onnx(model_path)
    native = _fix_input(original, input_size)
    head = find_head(original)
    step = _steps(stride, head.ndim)
    dense = rewrite(original, head, step)
    onnx_checker().check_model(dense, full_check=True)  # a graph any ONNX runtime accepts
    check, coordinates = _checked(original, dense, head, step)
    layers = _layer_rows(head, step)
    result = OnnxConvolutionalizeResult(
        str(model_path), str(target), native, head.patch, head.order, head.order_detail, step,
        layers, check, coordinates,
    )  # fmt: skip
    if check:
        with atomic_output(target, force=force, sources=(model_path,)) as temporary:
            temporary.write_bytes(dense.SerializeToString())
        result.written = True
    return result


def _steps(stride: tuple[int, ...] | None, ndim: int) -> tuple[int, ...]:
    if stride is None:
        return (1,) * ndim
    if len(stride) == 1:
        return tuple(stride) * ndim
    if len(stride) != ndim:
        raise SpecError(
            f"the ONNX head reads a {ndim}-D map; give {{stride}} with {ndim} numbers or one"
        )
    return tuple(stride)


def _layer_rows(head: Any, step: tuple[int, ...]) -> list[dict[str, Any]]:
    """What each linear layer (and a global pool) became, for the report."""
    window = "x".join(map(str, head.patch.sizes))
    ones = "x".join("1" * head.ndim)
    rows = []
    if head.pool is not None:
        rows.append(
            {
                "was": head.pool.op_type,
                "weight": [],
                "now": f"pool {window}, stride {'x'.join(map(str, step))}",
            }
        )
    for linear in head.linears:
        reads_map = linear.output in head.readers and head.pool is None
        now = f"Conv {window}, stride {'x'.join(map(str, step))}" if reads_map else f"Conv {ones}"
        rows.append(
            {
                "was": " + ".join(node.op_type for node in linear.nodes),
                "weight": list(linear.weight.shape),
                "now": now,
            }
        )
    return rows


def _checked(original: Any, dense: Any, head: Any, stride: tuple[int, ...]) -> tuple[Any, Any]:
    """The onnxruntime check; a graph it cannot run is the user's to fix, in one line."""
    from fcconv.errors import ConvolutionalizeError
    from fcconv.onnx.check import check_dense

    try:
        return check_dense(original, dense, head, stride)
    except (ValueError, RuntimeError) as error:  # onnxruntime's errors are RuntimeErrors
        text = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise ConvolutionalizeError(
            f"onnxruntime cannot run the graphs to verify them ({type(error).__name__}: {text})"
        ) from None


@dataclass
class OnnxVerifyResult:
    """A dense ONNX graph checked against the original; truthy when equivalent."""

    original: str
    converted: str
    patch: Any
    order: str
    stride: tuple[int, ...]
    check: Any
    coordinates: Any = None

    def __bool__(self) -> bool:
        return bool(self.check)

    @property
    def exit_code(self) -> int:
        """0 equivalent, 1 a difference was found."""
        return 0 if self else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "onnx",
            "equivalent": bool(self),
            "exit_code": self.exit_code,
            "original": self.original,
            "converted": self.converted,
            "feature_map": str(self.patch),
            "order": self.order,
            "stride": list(self.stride),
            "runtime": [self.check.to_dict()],
            "coordinates": None if self.coordinates is None else self.coordinates.to_dict(),
        }


def _first_conv_stride(dense: Any, source: str, ndim: int) -> tuple[int, ...]:
    """The stride of the Conv or pool that reads the trunk's map in the dense graph (else 1)."""
    from onnx import helper

    for node in dense.graph.node:
        if node.op_type in ("Conv", "AveragePool", "MaxPool") and node.input[:1] == [source]:
            for attribute in node.attribute:
                if attribute.name == "strides":
                    return tuple(int(s) for s in helper.get_attribute_value(attribute))
    return (1,) * ndim


def verify_onnx(
    original: str | Path,
    converted: str | Path,
    *,
    input_size: tuple[int, ...] | None = None,
    stride: tuple[int, ...] | None = None,
    seed: int = 0,
) -> OnnxVerifyResult:
    """Check in onnxruntime that ``converted`` maps the original head over every window.

    Works on any dense graph (one fcconv wrote, or one made by hand): the
    original's head and trunk come from its own graph; the window stride is
    the first Conv's that reads the trunk's map in ``converted`` unless given.
    """
    from fcconv.onnx.graph import find_head

    before, after = load_onnx(original), load_onnx(converted)
    _fix_input(before, input_size)
    head = find_head(before)
    step = (
        _steps(stride, head.ndim) if stride else _first_conv_stride(after, head.source, head.ndim)
    )
    check, coordinates = _checked(before, after, head, step)
    return OnnxVerifyResult(
        str(original), str(converted), head.patch, head.order, step, check, coordinates
    )
