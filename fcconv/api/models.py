"""The whole-model job: a model file in, a fully convolutional ``.pt2`` program out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from fcconv.api.checkpoints import Size
from fcconv.errors import SpecError
from fcconv.geometry import parse_extent
from fcconv.io.atomic import STDIO, check_output_path, inputs_protected


@dataclass
class ConvolutionalizeResult:
    """A whole model made fully convolutional: the conversion, its check, what was written.

    Truthy when the dense model passed verification (and was written).
    ``warnings`` are the one-line warnings for people (stderr), e.g. that the
    dense map is not the model run on each crop.
    """

    model: str | None
    conversion: Any
    verification: Any
    export: Any = None
    state_dict: str | None = None
    cost: Any = None

    def __bool__(self) -> bool:
        return bool(self.verification)

    @property
    def exit_code(self) -> int:
        return 0 if self else 1

    @property
    def warnings(self) -> list[str]:
        return list(self.verification.warnings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": "convolutionalize",
            "model": self.model,
            "ok": bool(self),
            "conversion": self.conversion.to_dict(),
            "verification": self.verification.to_dict(),
            "export": self.export.to_dict() if self.export is not None else None,
            "state_dict": self.state_dict,
            "cost": None if self.cost is None else self.cost.to_dict(),
            "warnings": self.warnings,
        }


def _load(model: str | Path | None, arch: str | None, trust_pickle: bool) -> tuple[Any, str]:
    """The model, and where its weights came from: ``file`` (MODEL) or ``factory`` (``arch``)."""
    from fcconv import fcn

    if model is None:
        from fcconv.fcn.load import build_model

        return build_model(arch).eval(), "factory"  # type: ignore[arg-type]
    return fcn.load_model(str(model), arch=arch, trust_pickle=trust_pickle), "file"


def _extent(value: Size | int, what: str) -> tuple[int, ...] | None:
    """``"24x24"``, ``"1024"``, ``(24, 24)`` or ``1024`` as a tuple of sizes."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_extent(value, what)
    if isinstance(value, int):
        return parse_extent(str(value), what)
    return parse_extent("x".join(str(int(v)) for v in value), what)


@inputs_protected("model")
def convolutionalize_file(
    model: str | Path | None,
    output: str | Path,
    *,
    input_size: Size | int = None,
    arch: str | None = None,
    layers: Sequence[str] | None = None,
    outputs: Sequence[str] | None = None,
    stride: Size | int = None,
    channels: int | None = None,
    check_size: Size | int = None,
    state_dict_out: str | Path | None = None,
    trust_pickle: bool = False,
    force: bool = False,
    output_stride: Size | int = None,
    head: str | None = None,
) -> ConvolutionalizeResult:
    """Make the model in ``model`` fully convolutional and save it as a ``.pt2`` program.

    Args:
        model: a pickled ``nn.Module`` (only with ``trust_pickle``) or, with
            ``arch``, the weights of the model the factory builds; ``-``: stdin.
            None with ``arch``: the factory builds the model with its own
            weights (``timm:create_model("resnet18", pretrained=True)``), and
            the result records that they came from the factory.
        output: the ``torch.export`` program (``.pt2``) to write.
        input_size: the native size the model was trained at: ``T`` (1-D),
            ``HxW`` (one number: square) or ``DxHxW``.
        arch: ``package.module:callable`` that builds the model, optionally
            with literal arguments: ``package.module:Net(depth=3)``.
        layers: Linear layers of the head, checked (default: found from the trace).
        outputs: keep only these outputs (``0``, ``boxes``, ``out.landmarks``);
            one name makes the program return that map alone.
        stride: the first convs' stride in feature-map cells (default 1 per axis).
        channels: the input's channels, when the model does not start with a conv.
        check_size: the larger input the dense map is verified on.
        state_dict_out: also write the converted weights here.
        trust_pickle: allow unpickling ``model`` (runs code from the file).
        force: replace existing outputs.
        output_stride: the map's stride in input pixels (``8`` or ``8x8``), a
            divisor of the trunk's: the map is made denser by shift-and-stitch
            (:mod:`fcconv.fcn.stride`), verified on every cell against the
            original trunk run on the shifted inputs, and its cost measured
            (``result.cost``).
        head: what a global pool before the head becomes: ``pool`` (default) the
            same pool over every native-size window of the feature map at
            stride 1; ``cam`` none, the head at every feature cell (a class
            activation map).

    Nothing is written unless the dense model passes verification. The output's
    suffix decides its format: ``.pt2`` (a ``torch.export`` program) or
    ``.onnx`` (an ONNX graph, checked in onnxruntime). An ``.onnx`` model is
    rewritten as an ONNX graph (:func:`fcconv.api.onnx.convolutionalize_onnx`).
    """
    from fcconv import fcn

    step = _extent(stride, "stride")
    if str(output) == STDIO or (state_dict_out is not None and str(state_dict_out) == STDIO):
        raise SpecError("convolutionalize writes files; give a file name as {output}, not -")
    target = Path(output)
    extra = Path(state_dict_out) if state_dict_out is not None else None
    if extra is not None and extra.resolve() == target.resolve():
        raise SpecError("the state dict output must differ from the program's output path")
    if model is None and arch is None:
        raise SpecError(
            "give the model: a pickled module, weights with {arch}, or {arch} alone when "
            "the factory builds a trained model itself"
        )
    inputs = (Path(model),) if model is not None and str(model) != STDIO else ()
    check_output_path(target, force, inputs)  # refused now, not after the slow part
    if extra is not None:
        check_output_path(extra, force, inputs)
    finer = _extent(output_stride, "output stride")
    if step is not None and finer is not None and any(s != 1 for s in step):
        raise SpecError(
            "give either {stride} (the head's stride in feature-map cells) or "
            "{output_stride} (the map's stride in input pixels), not both"
        )
    if model is not None and Path(str(model)).suffix.lower() == ".onnx":
        from fcconv.api.onnx import convolutionalize_onnx

        given = {"arch": arch, "layers": layers, "channels": channels, "outputs": outputs}
        given["head"] = head
        given["output_stride"] = output_stride
        given |= {"check_size": check_size, "state_dict_out": state_dict_out}
        unused = [name for name, value in given.items() if value]
        if unused:
            names = ", ".join(f"{{{name}}}" for name in unused)
            raise SpecError(
                f"an ONNX graph carries its own architecture and weights; leave out {names}"
            )
        native_size = _extent(input_size, "input size")
        return convolutionalize_onnx(  # type: ignore[return-value]
            model, output, input_size=native_size, stride=step, force=force
        )
    suffix = target.suffix.lower()
    if suffix not in (".pt2", ".onnx"):
        raise SpecError(
            f"the output's suffix says what to write: name the {{output}} .pt2 (a "
            f"torch.export program) or .onnx (an ONNX graph), not {suffix or 'no suffix'}"
        )
    native = _extent(input_size, "input size")
    if native is None:
        raise SpecError("give the size the model was trained at with {input_size}")
    larger = _extent(check_size, "check size")

    original, weights_from = _load(model, arch, trust_pickle)
    convert = partial(fcn.convolutionalize_detailed, original, native, head=head)
    conversion = convert(layers=layers or None, stride=step, in_channels=channels, outputs=outputs)
    conversion.weights_from = weights_from
    conversion.model.meta["fcconv"] = conversion.recorded()
    coarse = conversion
    if finer is not None:
        conversion = fcn.with_output_stride(conversion, finer)
    check = fcn.verify_dense(
        original, conversion.model, native, larger, layers=layers or None, in_channels=channels
    )
    result = ConvolutionalizeResult(None if model is None else str(model), conversion, check)
    if check:
        smallest = conversion.input_size  # one number for a 2-D model is a square
        if finer is not None:
            smallest = fcn.smallest_size(smallest, conversion.output_stride, conversion.phases)
            result.cost = fcn.measure_cost(
                original,
                coarse.model,
                conversion.model,
                conversion.layout,
                check.larger_size,
                conversion.output_stride,
                conversion.outputs[0].cells_map.map_axes,
            )
        save = fcn.save_exported
        if suffix == ".onnx":
            from fcconv.onnx.export import save_onnx as save
        result.export = save(
            conversion.model,
            target,
            larger or check.larger_size,
            in_channels=conversion.in_channels,
            native_size=smallest,
            force=force,
        )
        if extra is not None:
            result.state_dict = fcn.save_state_dict(conversion.model, extra, force=force)
    return result
