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
from fcconv.geometry import Patch
from fcconv.io.atomic import atomic_output, check_output_path, inputs_protected
from fcconv.onnx.budget import check_allocations

ONNX_SUFFIX = ".onnx"


@dataclass
class OnnxConvolutionalizeResult:
    """An ONNX classifier made fully convolutional; truthy when verified (and written)."""

    model: str
    output: str
    input_size: tuple[int, int]
    patch: Patch
    order: str
    order_from: str
    stride: tuple[int, int]
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
            "order_from": self.order_from,
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
    return model


def _fix_input(model: Any, size: tuple[int, int] | None) -> tuple[int, int]:
    """The graph's native height and width, fixing symbolic ones to ``size``."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise SpecError("the ONNX graph's input is not a 4-D NCHW image tensor")
    native = []
    for axis in (2, 3):
        known = dims[axis].dim_value if dims[axis].HasField("dim_value") else None
        given = size[axis - 2] if size is not None else None
        if known is not None and given is not None and known != given:
            raise SpecError(
                f"the ONNX graph's input is {dims[2].dim_value}x{dims[3].dim_value}, not "
                f"{size[0]}x{size[1]}; give its own size as {{input_size}}"
            )
        if known is None:
            if given is None:
                raise SpecError(
                    "the ONNX graph's input height and width are symbolic; give the size "
                    "the classifier was trained at as {input_size}"
                )
            dims[axis].Clear()
            dims[axis].dim_value = given
        native.append(known or given)
    return native[0], native[1]


@inputs_protected("model_path")
def convolutionalize_onnx(
    model_path: str | Path,
    output: str | Path,
    *,
    input_size: tuple[int, int] | None,
    stride: tuple[int, int] | None = None,
    force: bool = False,
) -> OnnxConvolutionalizeResult:
    """Rewrite an ONNX classifier's flatten → Gemm head as convolutions; verify; write.

    Args:
        model_path: the ``.onnx`` graph.
        output: the dense ``.onnx`` graph to write.
        input_size: the native ``(H, W)``; needed when the graph's are symbolic.
        stride: the first Conv's stride in feature-map cells (default 1x1).
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
    step = stride or (1, 1)
    dense = rewrite(original, head, step)
    onnx_checker().check_model(dense, full_check=True)  # a graph any ONNX runtime accepts
    check, coordinates = _checked(original, dense, head, step)
    layers = [
        {
            "was": " + ".join(node.op_type for node in linear.nodes),
            "weight": list(linear.weight.shape),
            "now": (
                f"Conv {head.patch.height}x{head.patch.width}, stride {step[0]}x{step[1]}"
                if index == 0
                else "Conv 1x1"
            ),
        }
        for index, linear in enumerate(head.linears)
    ]
    result = OnnxConvolutionalizeResult(
        str(model_path), str(target), native, head.patch, head.order, head.order_from, step,
        layers, check, coordinates,
    )  # fmt: skip
    if check:
        with atomic_output(target, force=force, sources=(model_path,)) as temporary:
            temporary.write_bytes(dense.SerializeToString())
        result.written = True
    return result


def _checked(original: Any, dense: Any, head: Any, stride: tuple[int, int]) -> tuple[Any, Any]:
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
    patch: Patch
    order: str
    stride: tuple[int, int]
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


def _first_conv_stride(dense: Any, source: str) -> tuple[int, int]:
    """The stride of the Conv that reads the trunk's map in the dense graph (else 1x1)."""
    from onnx import helper

    for node in dense.graph.node:
        if node.op_type == "Conv" and node.input and node.input[0] == source:
            for attribute in node.attribute:
                if attribute.name == "strides":
                    strides = helper.get_attribute_value(attribute)
                    return int(strides[0]), int(strides[1])
    return (1, 1)


def verify_onnx(
    original: str | Path,
    converted: str | Path,
    *,
    input_size: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
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
    step = stride or _first_conv_stride(after, head.source)
    check, coordinates = _checked(before, after, head, step)
    return OnnxVerifyResult(
        str(original), str(converted), head.patch, head.order, step, check, coordinates
    )
