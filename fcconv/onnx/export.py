"""A convolutionalized PyTorch model written as an ONNX graph with dynamic height and width.

``torch.onnx.export`` (the TorchScript exporter, ``dynamo=False``: the dynamo
exporter needs onnxscript) traces the model once; batch, height and width
are declared dynamic. The graph is then run in onnxruntime on probe shapes
against the PyTorch model before it is written, atomically.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fcconv.errors import ConvolutionalizeError
from fcconv.io.atomic import atomic_output, check_output_path
from fcconv.progress import phased

OPSET = 17


def export_bytes(model: Any, example: Any) -> bytes:
    """The ONNX graph of ``model`` traced on ``example``, batch/height/width dynamic."""
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of one that needs onnxscript.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        try:
            torch.onnx.export(
                model,
                (example,),
                buffer,
                dynamo=False,
                opset_version=OPSET,
                input_names=["input"],
                output_names=["scores"],
                dynamic_axes={
                    "input": {0: "batch", 2: "height", 3: "width"},
                    "scores": {0: "batch", 2: "map_height", 3: "map_width"},
                },
            )
        except Exception as error:  # any exporter failure is the model's, told in one line
            text = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
            raise ConvolutionalizeError(
                f"torch.onnx.export cannot export the converted model ({type(error).__name__}: "
                f"{text}); write a .pt2 program instead"
            ) from None
    return buffer.getvalue()


@phased("exporting")
def save_onnx(
    model: Any,
    path: str | os.PathLike[str],
    example_size: Sequence[int],
    *,
    in_channels: int,
    native_size: Sequence[int],
    force: bool = False,
) -> Any:
    """Export ``model`` to ONNX, check it in onnxruntime on probe shapes, write it atomically.

    Returns:
        An :class:`~fcconv.fcn.results.ExportInfo` (the same facts as a ``.pt2`` export).
    """
    import torch

    from fcconv.fcn.results import ExportInfo
    from fcconv.onnx.check import run, session
    from fcconv.verify.judge import compare
    from fcconv.verify.runtime import RULE

    target = Path(path)
    check_output_path(target, force)
    generator = torch.Generator().manual_seed(0)
    height, width = example_size
    example = torch.randn(2, in_channels, height, width, generator=generator)
    model = model.float().eval()
    data = export_bytes(model, example)
    runnable = session(data)
    probes = [
        (2, in_channels, height, width),
        (1, in_channels, *native_size),
        (1, in_channels, native_size[0] + 1, native_size[1] + 3),
    ]
    rejected, largest = [], 0.0
    with torch.no_grad():
        for shape in probes:
            x = torch.randn(shape, generator=generator)
            expected = model(x).numpy()
            try:
                got = run(runnable, x.numpy())
            except Exception:  # onnxruntime refused this shape
                rejected.append(shape)
                continue
            found = compare(got, expected, RULE) if got.shape == expected.shape else None
            if found is None or not (found.passed or found.identical):
                rejected.append(shape)
            else:
                largest = max(largest, found.max_abs_diff)
    if rejected:
        shown = ", ".join("x".join(map(str, shape)) for shape in rejected)
        raise ConvolutionalizeError(
            f"the ONNX export of the converted model refuses or mis-computes input(s) {shown} "
            "in onnxruntime; write a .pt2 program instead"
        )
    data, metadata = _with_facts(data, model)
    with atomic_output(target, force=force) as temporary:
        temporary.write_bytes(data)
    return ExportInfo(
        path=str(target),
        dynamic=True,
        ranges={
            "batch": (1, None),
            "channels": (in_channels, in_channels),
            "height": (native_size[0], None),
            "width": (native_size[1], None),
        },
        example_shape=tuple(example.shape),
        roundtrip_max_abs_diff=largest,
        probed_shapes=probes,
        rejected_shapes=[],
        note=f"ONNX opset {OPSET}, checked in onnxruntime against the PyTorch model",
        metadata=metadata,
    )


METADATA = "fcconv.json"
"""The ``metadata_props`` key of fcconv's facts (native size, each output's coordinate map)."""


def _with_facts(data: bytes, model: Any) -> tuple[bytes, str]:
    """The graph with fcconv's facts in its ``metadata_props``, as a ``.pt2`` carries them."""
    import json

    from fcconv.onnx.graph import _onnx

    meta = getattr(model, "meta", None)
    facts = meta.get("fcconv") if isinstance(meta, dict) else None
    if not facts:
        return data, ""
    onnx = _onnx()
    graph = onnx.load_from_string(data)
    entry = graph.metadata_props.add()
    entry.key, entry.value = METADATA, json.dumps(facts)
    return graph.SerializeToString(), METADATA
