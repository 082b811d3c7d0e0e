"""Writing a converted model: a ``torch.export`` program (``.pt2``) or its state dict.

Both are written atomically; an existing file is kept unless ``force``. The
program carries fcconv's facts (the native size, and each output's
coordinate map) as the extra file ``fcconv.json``::

    extra = {"fcconv.json": ""}
    program = torch.export.load("dense.pt2", extra_files=extra)
    facts = json.loads(extra["fcconv.json"])  # facts["outputs"][0]["cells"]["stride"]
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from fcconv import dtypes
from fcconv.errors import ConvolutionalizeError, SpecError
from fcconv.fcn.analyse import size_tuple
from fcconv.fcn.check import max_abs
from fcconv.fcn.results import ExportInfo
from fcconv.fcn.trace import InputLayout, first_layer, model_dtype_device, running_eval
from fcconv.io.atomic import atomic_output, check_output_path
from fcconv.progress import phased
from fcconv.verify.judge import Comparison, compare, model_rule

METADATA = "fcconv.json"
"""The extra file of a ``.pt2`` that holds fcconv's facts about the program."""

_AXIS_LABELS = {1: ("length",), 2: ("height", "width"), 3: ("depth", "height", "width")}


def _backed_size_oblivious() -> contextlib.AbstractContextManager[Any]:
    """Keep export from specializing sizes that are 1 in no example, e.g. a 1×1 map.

    ``torch.export`` adds ``size != 1`` guards in its contiguity checks when
    the example's sizes are not 1, which would reject the native size (a 1×1
    map). The size-oblivious setting is private torch configuration; where it
    is missing, export runs without it.
    """
    try:
        from torch.fx.experimental import _config as fx_config
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    if not hasattr(fx_config, "backed_size_oblivious"):
        return contextlib.nullcontext()
    return fx_config.patch(backed_size_oblivious=True)


@contextlib.contextmanager
def _quiet_symbolic_shapes() -> Any:
    """Keep torch's symbolic-shape reasoning from logging its give-ups on stderr.

    A stitched map (:mod:`fcconv.fcn.stride`) has sizes with floor divisions
    that sympy cannot always reduce; torch then logs a traceback per attempt
    at WARNING level and carries on. The probes below judge the program.
    """
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _finite(value: Any) -> int | None:
    """A sympy bound as an int, or None for torch's symbolic infinity."""
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None
    return number if abs(number) < 2**62 else None


def _input_ranges(
    program: torch.export.ExportedProgram, layout: InputLayout
) -> dict[str, tuple[int | None, int | None]]:
    user_input = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.name == user_input)
    ranges: dict[str, tuple[int | None, int | None]] = {}
    channel = () if layout.channels is None else ("channels",)
    labels = ("batch", *channel, *_AXIS_LABELS[layout.ndim])
    for label, size in zip(labels, node.meta["val"].shape, strict=False):
        if isinstance(size, torch.SymInt):
            bounds = program.range_constraints.get(size.node.expr)
            low = _finite(bounds.lower) if bounds is not None else None
            high = _finite(bounds.upper) if bounds is not None else None
            ranges[label] = (max(low or 1, 1), high)
        else:
            ranges[label] = (int(size), int(size))
    return ranges


def _probe_shapes(
    layout: InputLayout, example: torch.Tensor, native: tuple[int, ...] | None
) -> list[tuple[int, ...]]:
    """Input shapes an exported program must accept: native (one cell), odd sizes, batch 1."""
    batch = example.shape[0]
    size = tuple(example.shape[-layout.ndim :])
    odd = tuple(n + 1 + 2 * i for i, n in enumerate(size))
    shapes = [tuple(example.shape), layout.shape(1, odd)]
    if native is not None:
        grown = tuple(n + 1 + i for i, n in enumerate(native))
        shapes += [layout.shape(1, native), layout.shape(batch + 1, grown)]
    return list(dict.fromkeys(shapes))


def _rejected(
    program: torch.export.ExportedProgram,
    model: nn.Module,
    shapes: list[tuple[int, ...]],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[list[tuple[int, ...]], float]:
    """The probe shapes the program refuses or gets wrong, and the largest difference."""
    runnable = program.module()
    generator = torch.Generator().manual_seed(1)
    rejected, largest = [], 0.0
    for shape in shapes:
        x = torch.randn(shape, generator=generator, dtype=dtype).to(device)
        try:
            got = runnable(x)
        except Exception:  # a guard of the program refused this shape
            rejected.append(shape)
            continue
        pairs = list(zip(_leaves(got), _leaves(model(x)), strict=False))
        rule = model_rule(dtypes.name_of(dtype))
        same = len(pairs) == len(_leaves(got)) and all(
            g.shape == e.shape and _agrees(compare(g, e, rule)) for g, e in pairs
        )
        if not same:
            rejected.append(shape)
        else:
            largest = max([largest, *(max_abs(g, e) for g, e in pairs)])
    return rejected, largest


def _agrees(found: Comparison) -> bool:
    """The program agrees with the model: within the rule, or identical (all-zero outputs)."""
    return found.passed or found.identical


def _leaves(output: Any) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def _layout_of(model: nn.Module, in_channels: int | None, native: Any) -> InputLayout:
    meta = getattr(model, "meta", None)
    recorded = meta.get("fcconv", {}) if isinstance(meta, dict) else {}
    size = tuple(native or recorded.get("input_size") or ())
    if "in_channels" in recorded and in_channels is None:
        return InputLayout(recorded["in_channels"], size)
    first = first_layer(model)
    channels = in_channels or (first[0] if first else None)
    if channels is None:
        raise SpecError("cannot tell the model's input channels; give them with {channels}")
    return InputLayout(channels, size)


@phased("exporting")
def save_exported(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_size: Sequence[int] | int,
    *,
    in_channels: int | None = None,
    native_size: Sequence[int] | None = None,
    batch: int = 2,
    force: bool = False,
) -> ExportInfo:
    """Save ``model`` as a ``torch.export`` program with dynamic batch and spatial sizes.

    The program loads with ``torch.export.load(path).module()`` in a process
    that has none of the model's code. Export needs an example input
    (``[batch, C, *example_size]``); the sizes the program accepts are found
    by export itself from the model's arithmetic (for a VGG-style net: any
    height and width at least the native size) and returned in
    :attr:`ExportInfo.ranges`. A model made by :func:`convolutionalize` also
    carries its facts (native size, each output's coordinate map) into the
    program's extra file ``fcconv.json`` (see the module's documentation).

    Export may add guards of its own (``size != 1`` for sizes that are not 1
    in the example, divisibility on some torch versions), so every candidate
    program is run on probe shapes (the example, the native size with its
    single cell, odd sizes, batch 1) against the model; the first that
    accepts them all is written, else the one that accepts most, and the
    note names the shapes it refuses. Candidates: dynamic shapes with
    size-oblivious reasoning, dynamic shapes without it, and the example's
    static shape.

    Args:
        model: the converted model (any ``nn.Module`` taking one tensor).
        path: the ``.pt2`` file to write.
        example_size: the example input's size (``T``, ``(H, W)``, ``(D, H, W)``);
            a size giving a map of at least 2 cells per axis is best.
        in_channels: default: recorded by :func:`convolutionalize`.
        native_size: the native size, probed; default: recorded.
        batch: the example's batch size.
        force: replace an existing file.

    The file is written atomically: a temporary file beside it, then a
    rename. An existing file is kept unless ``force``.
    """
    target = Path(path)
    check_output_path(target, force)
    size = size_tuple(example_size, "example_size")
    layout = _layout_of(model, in_channels, native_size)
    native = tuple(layout.size) or None
    layout = InputLayout(layout.channels, native or size)
    dtype, device = model_dtype_device(model)
    generator = torch.Generator().manual_seed(0)
    example = layout.example(batch, size=size, dtype=dtype, device=device, generator=generator)
    shapes = _probe_shapes(layout, example, native)
    dynamic = torch.export.Dim.DYNAMIC
    axes = (0, *range(example.dim() - layout.ndim, example.dim()))
    dims = ({axis: dynamic for axis in axes},)
    candidates = [
        ("dynamic", _backed_size_oblivious, dims),
        ("dynamic", contextlib.nullcontext, dims),
        ("static", contextlib.nullcontext, None),
    ]
    best = None
    errors = []
    with running_eval(model), torch.no_grad():
        for kind, setting, dynamic_shapes in candidates:
            try:
                with setting(), _quiet_symbolic_shapes():
                    program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
            except Exception as error:  # this kind of export failed: try the next
                errors.append(f"{kind} export failed ({_first_line(error)})")
                continue
            rejected, largest = _rejected(program, model, shapes, dtype, device)
            if best is None or len(rejected) < len(best[2]):
                best = (kind, program, rejected, largest)
            if not rejected:
                break
    if best is None:
        raise ConvolutionalizeError(
            f"torch.export cannot export the converted model: {'; '.join(errors)}"
        )
    kind, program, rejected, largest = best
    notes = []
    if kind == "static":
        notes.append(f"the program accepts only inputs of shape {tuple(example.shape)}")
    if rejected:
        shown = ", ".join("x".join(map(str, shape)) for shape in rejected)
        notes.append(f"the program refuses or mis-computes probe input(s) {shown}")
    ranges = _input_ranges(program, layout)
    meta = getattr(model, "meta", None)
    facts = meta.get("fcconv") if isinstance(meta, dict) else None
    extra = {METADATA: json.dumps(facts)} if facts else None
    # Serialized in memory first: torch.export.save aborts the process when the disk
    # fills under it; a failed write of the bytes is an OSError the guard reports.
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files=extra)
    with atomic_output(target, force=force) as temporary, open(temporary, "wb") as handle:
        handle.write(buffer.getbuffer())
    return ExportInfo(
        path=str(target),
        dynamic=kind == "dynamic",
        ranges=ranges,
        example_shape=tuple(example.shape),
        roundtrip_max_abs_diff=largest,
        probed_shapes=[s for s in shapes if s not in rejected],
        rejected_shapes=rejected,
        note="; ".join(notes),
        metadata=METADATA if extra else "",
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


@phased("writing the weights")
def save_state_dict(model: nn.Module, path: str | os.PathLike[str], *, force: bool = False) -> str:
    """Write the converted model's state dict (``.safetensors`` or torch pickle), atomically.

    Keys keep the original module names (``classifier.0.weight`` is now the
    4-D conv kernel), so a hand-written conv architecture loads it directly.
    """
    target = Path(path)
    check_output_path(target, force)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_output(target, force=force) as temporary:
        if target.suffix == ".safetensors":
            from safetensors.torch import save

            # bytes into the prepared file: it keeps the permissions atomic_output gave it
            temporary.write_bytes(save(state, metadata={"fcconv": "convolutionalize"}))
        else:
            torch.save(state, temporary)
    return str(target)
