"""The whole-model job: a classifier file in, a fully convolutional ``.pt2`` program out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcconv.api.checkpoints import Size, pair
from fcconv.errors import SpecError
from fcconv.geometry import parse_size, parse_stride
from fcconv.io.atomic import STDIO, check_output_path, inputs_protected


@dataclass
class ConvolutionalizeResult:
    """A whole model made fully convolutional: the conversion, its check, what was written.

    Truthy when the dense model passed verification (and was written).
    """

    model: str
    conversion: Any
    verification: Any
    export: Any = None
    state_dict: str | None = None

    def __bool__(self) -> bool:
        return bool(self.verification)

    @property
    def exit_code(self) -> int:
        return 0 if self else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": "convolutionalize",
            "model": self.model,
            "ok": bool(self),
            "conversion": self.conversion.to_dict(),
            "verification": self.verification.to_dict(),
            "export": self.export.to_dict() if self.export is not None else None,
            "state_dict": self.state_dict,
        }


@inputs_protected("model")
def convolutionalize_file(
    model: str | Path,
    output: str | Path,
    *,
    input_size: Size,
    arch: str | None = None,
    layers: Sequence[str] | None = None,
    stride: Size = None,
    channels: int | None = None,
    check_size: Size = None,
    state_dict_out: str | Path | None = None,
    trust_pickle: bool = False,
    force: bool = False,
) -> ConvolutionalizeResult:
    """Make the classifier in ``model`` fully convolutional and save it as a ``.pt2`` program.

    Args:
        model: a pickled ``nn.Module`` (only with ``trust_pickle``) or, with
            ``arch``, the weights of the model the factory builds.
        output: the ``torch.export`` program (``.pt2``) to write.
        input_size: the native ``HxW`` the classifier was trained at.
        arch: ``package.module:callable`` that builds the model.
        layers: the head's Linear layers (default: found from the trace).
        stride: the first conv's stride in feature-map cells (default 1x1).
        channels: the input's channels, when the model does not start with a conv.
        check_size: the larger input the dense map is verified on.
        state_dict_out: also write the converted weights here.
        trust_pickle: allow unpickling ``model`` (runs code from the file).
        force: replace existing outputs.

    Nothing is written unless the dense model passes verification.
    """
    from fcconv import fcn

    native = pair(input_size, parse_size)
    assert native is not None
    step = pair(stride, parse_stride)
    larger = pair(check_size, parse_size)
    if str(output) == STDIO or (state_dict_out is not None and str(state_dict_out) == STDIO):
        raise SpecError("convolutionalize writes files; give a file name as {output}, not -")
    target = Path(output)
    extra = Path(state_dict_out) if state_dict_out is not None else None
    if extra is not None and extra.resolve() == target.resolve():
        raise SpecError("the state dict output must differ from the program's output path")
    inputs = (Path(model),) if str(model) != STDIO else ()
    check_output_path(target, force, inputs)  # refused now, not after the slow part
    if extra is not None:
        check_output_path(extra, force, inputs)

    original = fcn.load_model(str(model), arch=arch, trust_pickle=trust_pickle)
    conversion = fcn.convolutionalize_detailed(
        original, native, layers=layers or None, stride=step, in_channels=channels
    )
    check = fcn.verify_dense(original, conversion.model, native, larger, layers=layers or None)
    result = ConvolutionalizeResult(str(model), conversion, check)
    if check:
        result.export = fcn.save_exported(
            conversion.model,
            target,
            larger or check.larger_size,
            in_channels=conversion.in_channels,
            native_size=conversion.input_size,
            force=force,
        )
        if extra is not None:
            result.state_dict = fcn.save_state_dict(conversion.model, extra, force=force)
    return result
