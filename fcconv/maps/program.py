"""A dense model written by ``fcconv convolutionalize``, loaded with the facts it carries.

A ``.pt2`` program carries them in its extra file ``fcconv.json``, an
``.onnx`` graph in its ``metadata_props`` under the same key: the native
size, the input channels, and each output's coordinate map. They are read
defensively (a hand-made file may claim anything) and checked for the types
and lengths the map needs before anything relies on them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcconv.errors import CheckpointError, SpecError, UnsafeCheckpointError
from fcconv.geometry import CellGeometry
from fcconv.io.pt2 import code_in_program
from fcconv.progress import phased

METADATA = "fcconv.json"


@dataclass(frozen=True)
class ProgramOutput:
    """One output of a dense program: its name, coordinate map and the tensor axes of its map."""

    name: str
    cells: CellGeometry
    map_axes: tuple[int, ...]


@dataclass
class DenseProgram:
    """A runnable dense model and its facts.

    Attributes:
        path: the file.
        kind: ``pt2`` or ``onnx``.
        run: ``[1, C, H, W]`` float32 tensor → the output tensors, in the
            order of ``outputs``.
        native_size: the size the model was trained at.
        in_channels: the input's channels.
        outputs: each output's facts.
        output_stride: the map's stride when it was made denser, else None.
        phases: shifted runs per axis of a stitched map, else ones.
        reads_past: per axis, whether the model reads past the start / end of
            its input at the native size (None when the file does not say).
    """

    path: str
    kind: str
    run: Callable[[Any], list[Any]]
    native_size: tuple[int, ...]
    in_channels: int
    outputs: list[ProgramOutput]
    output_stride: tuple[int, ...] | None
    phases: tuple[int, ...]
    reads_past: dict[str, tuple[bool, ...]] | None

    @property
    def smallest_size(self) -> tuple[int, ...]:
        """The smallest input the program takes: every shifted run at least the native size."""
        step = self.output_stride or (1,) * len(self.native_size)
        return tuple(
            n + (f - 1) * s for n, s, f in zip(self.native_size, step, self.phases, strict=True)
        )

    def output(self, name: str | None) -> tuple[int, ProgramOutput]:
        """The index and facts of output ``name`` (default: the first)."""
        if name is None:
            return 0, self.outputs[0]
        for index, facts in enumerate(self.outputs):
            if facts.name == name:
                return index, facts
        known = ", ".join(repr(o.name) for o in self.outputs)
        raise SpecError(
            f"the model has no output {name!r}; choose one of {known} with {{map_output}}"
        )


MAX_FACTS_BYTES = 1 << 20
"""The most text fcconv's facts may take (fcconv writes a few hundred bytes per output)."""
MAX_FACTS_DEPTH = 16
"""The deepest nesting of fcconv's facts (fcconv writes 4 levels)."""
MAX_OUTPUTS = 1024
_BIG = 1 << 31
"""Sizes, strides and offsets in the facts stay within ±2**31 (no image is larger)."""


def _ints(
    value: Any, length: int | None, what: str, path: str, low: int = -_BIG, high: int = _BIG
) -> tuple[int, ...]:
    ok = isinstance(value, list) and all(type(v) is int and low <= v <= high for v in value)
    if not ok or (length is not None and len(value) != length) or len(value) > 8:
        raise CheckpointError(
            f"{path}: fcconv's facts hold a malformed {what} ({str(value)[:60]}; integers "
            f"from {low} to {high} expected); convolutionalize the model again with fcconv",
            path=path,
        )
    return tuple(value)


def _malformed(path: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: fcconv's facts hold {what}; convolutionalize the model again with fcconv",
        path=path,
    )


def _load_facts(text: str, path: str) -> Any:
    """The facts' JSON, parsed only when its size and nesting are within bounds."""
    from fcconv.io.pt2 import json_depth

    data = text.encode("utf-8", "replace") if isinstance(text, str) else b""
    if len(data) > MAX_FACTS_BYTES:
        raise _malformed(path, f"{len(data)} bytes, more than the {MAX_FACTS_BYTES} they may")
    if json_depth(data) > MAX_FACTS_DEPTH:
        raise _malformed(path, f"JSON nested deeper than {MAX_FACTS_DEPTH} levels")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _output_facts(entry: Any, path: str) -> ProgramOutput:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise CheckpointError(f"{path}: fcconv's facts hold a malformed output", path=path)
    name = entry["name"]
    if len(name) > 256:
        raise _malformed(path, "an output name longer than 256 characters")
    cells = entry.get("cells")
    if not isinstance(cells, dict):
        raise SpecError(
            f"{path}: output {name!r} has no coordinate map (the trunk holds a "
            "layer whose geometry fcconv does not know), so its cells cannot be drawn"
        )
    geometry = CellGeometry(
        _ints(cells.get("offset"), 2, "cell offset", path),
        _ints(cells.get("stride"), 2, "cell stride", path, low=1),
        _ints(cells.get("window"), 2, "cell window", path, low=1),
    )
    axes = _ints(entry.get("map_axes"), 2, "map axes", path, low=0, high=7)
    if sorted(axes) != [2, 3]:
        raise SpecError(
            f"{path}: output {name!r} has its map along axes {list(axes)}; fcconv map draws "
            "maps along axes 2 and 3 of [N, C, H, W] outputs"
        )
    return ProgramOutput(name, geometry, axes)


def _reads_past(reads: Any) -> dict[str, tuple[bool, ...]] | None:
    if not isinstance(reads, dict):
        return None
    sides = {side: reads.get(side) for side in ("start", "end")}
    if not all(isinstance(v, list) and len(v) == 2 for v in sides.values()):
        return None
    return {side: tuple(bool(v) for v in values) for side, values in sides.items()}


def parse_facts(text: str, path: str) -> dict[str, Any]:
    """fcconv's facts from a program's metadata, checked against their schema; 2-D maps only.

    The schema: ``input_size`` two sizes ≥ 1, ``in_channels`` 1 to 65536,
    ``outputs`` 1 to 1024 objects each with a ``name``, ``cells``
    (``offset``, ``stride`` ≥ 1, ``window`` ≥ 1, two integers each) and
    ``map_axes`` (axes 2 and 3); optional ``output_stride`` (≥ 1), ``phases``
    (1 to 64) and ``reads_past``. Every integer within ±2**31, nesting at
    most :data:`MAX_FACTS_DEPTH`, text at most :data:`MAX_FACTS_BYTES`.

    Raises:
        CheckpointError: facts missing or outside the schema.
        SpecError: facts of a map fcconv map does not draw (not 2-D, no cells).
    """
    facts = _load_facts(text, path)
    if not isinstance(facts, dict) or not isinstance(facts.get("outputs"), list):
        raise CheckpointError(
            f"{path} carries no coordinate map of fcconv's ({METADATA}); make the dense model "
            "with fcconv convolutionalize",
            path=path,
        )
    native = _ints(facts.get("input_size"), None, "native size", path, low=1)
    if len(native) != 2:
        raise SpecError(f"{path} is a {len(native)}-D model; fcconv map draws 2-D image maps")
    channels = facts.get("in_channels")
    if type(channels) is not int or not 1 <= channels <= 65536:
        raise CheckpointError(f"{path}: fcconv's facts name no input channels", path=path)
    if len(facts["outputs"]) > MAX_OUTPUTS:
        raise _malformed(path, f"more than {MAX_OUTPUTS} outputs")
    outputs = [_output_facts(entry, path) for entry in facts["outputs"]]
    if not outputs:
        raise CheckpointError(f"{path}: fcconv's facts list no outputs", path=path)
    stride = facts.get("output_stride")
    phases = facts.get("phases")
    return {
        "native_size": native,
        "in_channels": channels,
        "outputs": outputs,
        "output_stride": (
            None if stride is None else _ints(stride, 2, "output stride", path, low=1)
        ),
        "phases": (1, 1) if phases is None else _ints(phases, 2, "phases", path, 1, 64),
        "reads_past": _reads_past(facts.get("reads_past")),
    }


def _checked_run(
    run: Callable[[Any], list[Any]], outputs: list[ProgramOutput], path: str
) -> Callable[[Any], list[Any]]:
    """``run``, refusing results that do not match the facts (count, [N, C, H, W])."""

    def checked(x: Any) -> list[Any]:
        tensors = run(x)
        if len(tensors) != len(outputs):
            raise _malformed(
                path, f"{len(outputs)} outputs but the program returns {len(tensors)} tensors"
            )
        for tensor, facts in zip(tensors, outputs, strict=True):
            if tensor.dim() != 4:
                raise _malformed(
                    path, f"a 2-D map for {facts.name!r}, which is {tensor.dim()}-D, not NCHW"
                )
        return tensors

    return checked


@phased("loading the program")
def load_program(path: str | Path, *, trust_pickle: bool = False) -> DenseProgram:
    """Load a ``.pt2`` program (or an ``.onnx`` graph, with onnxruntime) and its facts.

    A ``.pt2`` whose archive would make ``torch.export.load`` unpickle
    arbitrary objects is refused unless ``trust_pickle``.
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"no such file: {file}; check the path", path=str(file))
    suffix = file.suffix.lower()
    if suffix == ".pt2":
        run, text = _load_pt2(file, trust_pickle)
    elif suffix == ".onnx":
        run, text = _load_onnx(file)
    else:
        raise SpecError(
            f"{file} is neither a .pt2 program nor an .onnx graph; make one with "
            "fcconv convolutionalize"
        )
    facts = parse_facts(text, str(file))
    run = _checked_run(run, facts["outputs"], str(file))
    return DenseProgram(str(file), suffix[1:], run, **facts)


def _unpickling_needed(file: Path) -> str | None:
    """Why loading this ``.pt2`` would unpickle arbitrary objects, or None if it would not.

    ``torch.export.load`` unpickles (``weights_only=False``) weights or
    constants whose payload config says ``use_pickle``, custom and opaque
    objects, legacy ``.pt`` payloads, and sample inputs that a safe load
    refuses. fcconv's own programs hold none of these.
    """
    import io
    import zipfile

    import torch

    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError):
        return None  # not a zip: torch.export.load refuses it before any unpickling
    with archive:
        for info in archive.infolist():
            name = info.filename
            if "/data/weights/" in name or "/data/constants/" in name:
                if name.endswith(".pt") or "custom_obj" in name or "opaque_obj" in name:
                    return f"it holds {name}"
                if name.endswith(".json") and _marks_pickles(archive.read(name)):
                    return f"{name} marks pickled payloads"
            elif name.endswith(".pt"):
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception:  # anything a safe load refuses would be unpickled
                    return f"{name} is not a plain tensor file"
    return None


def _marks_pickles(data: bytes) -> bool:
    """Whether a payload config asks for any pickled entry (or cannot be read to tell)."""
    try:
        config = json.loads(data)
    except ValueError:
        return True
    stack = [config]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if value.get("use_pickle") not in (None, False):
                return True
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


def _load_pt2(file: Path, trust_pickle: bool) -> tuple[Callable[[Any], list[Any]], str]:
    import torch
    import torch.utils._pytree as pytree

    reason = None if trust_pickle else _unpickling_needed(file)
    if reason is not None:
        raise UnsafeCheckpointError(
            f"{file} would need arbitrary unpickling to load ({reason}); pass {{trust_pickle}} "
            "only if you trust the file",
            path=str(file),
        )
    code = None if trust_pickle else code_in_program(file)
    if code is not None:
        raise UnsafeCheckpointError(
            f"{file} holds what torch would run as code when loading it ({code}); pass "
            "{trust_pickle} only if you trust the file",
            path=str(file),
        )
    extra = {METADATA: ""}
    try:
        program = torch.export.load(str(file), extra_files=extra)
    except Exception as error:  # zip, JSON or schema errors alike: not a usable program
        detail = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        raise CheckpointError(
            f"{file} is not a torch.export program ({type(error).__name__}: {detail}); make "
            "one with fcconv convolutionalize",
            path=str(file),
        ) from None
    module = program.module()

    @phased("running the model")
    def run(x: Any) -> list[Any]:
        with torch.no_grad():
            result = module(x)
        return [leaf for leaf in pytree.tree_leaves(result) if isinstance(leaf, torch.Tensor)]

    return run, extra[METADATA]


def _load_onnx(file: Path) -> tuple[Callable[[Any], list[Any]], str]:
    from fcconv.extras import require

    ort = require("onnxruntime", "onnx", purpose="to run ONNX models")
    _check_onnx_allocations(file)
    try:
        session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    except Exception as error:  # protobuf or graph errors: not a usable model
        detail = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        raise CheckpointError(
            f"{file} is not a valid ONNX model ({type(error).__name__}: {detail})", path=str(file)
        ) from None
    name = session.get_inputs()[0].name

    @phased("running the model")
    def run(x: Any) -> list[Any]:
        import torch

        return [torch.from_numpy(a) for a in session.run(None, {name: x.numpy()})]

    return run, session.get_modelmeta().custom_metadata_map.get(METADATA, "")


def _check_onnx_allocations(file: Path) -> None:
    """Refuse a graph that fixes a tensor larger than the memory budget (before onnxruntime)."""
    from fcconv.extras import require
    from fcconv.onnx.budget import check_allocations

    onnx = require("onnx", "onnx", purpose="to read ONNX models")
    try:
        model = onnx.load(str(file), load_external_data=False)
    except Exception:  # not a protobuf: onnxruntime says so in its own words
        return
    check_allocations(model, str(file))
