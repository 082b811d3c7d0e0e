"""The picture job: a dense model run on an image, its map drawn over the image.

``fcconv map MODEL IMAGE -o map.png`` and :func:`map_image` run a dense model
(a ``.pt2`` from ``fcconv convolutionalize``, or an ``.onnx`` one with
onnxruntime) on the image at its own size, take one channel of one output,
and draw each cell on its input box from the coordinate map the model
carries. Pillow reads the image, matplotlib draws (``pip install 'fcconv[map]'``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcconv.errors import ImageError, SpecError
from fcconv.io.atomic import STDIO, atomic_output, check_output_path, inputs_protected

FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".pdf": "pdf", ".svg": "svg"}
"""Picture formats by suffix; pixel placement (``placement``) holds for the raster ones."""


@dataclass
class MapResult:
    """A map drawn over an image; truthy once the picture is written.

    Attributes:
        model, image, picture: the files.
        output: the output drawn; ``channel`` its channel.
        image_size: the image's ``(H, W)``, fed at that size.
        grid: the cells (values, boxes, tiles, crop-exactness).
        output_stride: the map's stride when it was made denser, else None.
        placement: where the image lies in the picture.
        notes: plain-words remarks.
    """

    model: str
    image: str
    picture: str
    output: str
    channel: int
    channels: int
    image_size: tuple[int, int]
    grid: Any
    output_stride: tuple[int, ...] | None
    placement: Any
    notes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return True

    @property
    def exit_code(self) -> int:
        return 0

    def to_dict(self) -> dict[str, Any]:
        low, high = self.grid.extremes()
        return {
            "command": "map",
            "ok": True,
            "model": self.model,
            "image": self.image,
            "picture": self.picture,
            "output": self.output,
            "channel": self.channel,
            "channels": self.channels,
            "image_size": list(self.image_size),
            "map_size": list(self.grid.size),
            "cells": self.grid.cells.to_dict(),
            "output_stride": None if self.output_stride is None else list(self.output_stride),
            "min": low,
            "max": high,
            "crop_exact": self.grid.exact_count(),
            "placement": self.placement.to_dict(),
            "grid": self.grid.cell_list(),
            "notes": list(self.notes),
        }


def _format_of(picture: Path) -> str:
    suffix = picture.suffix.lower()
    if suffix not in FORMATS:
        raise SpecError(
            f"name the picture {{output}} .png (or {', '.join(sorted(FORMATS)[1:])}), "
            f"not {suffix or 'no suffix'}"
        )
    return FORMATS[suffix]


@inputs_protected("model", "image")
def map_image(
    model: str | Path,
    image: str | Path,
    picture: str | Path,
    *,
    output: str | None = None,
    channel: int = 0,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    trust_pickle: bool = False,
    force: bool = False,
) -> MapResult:
    """Run the dense ``model`` on ``image`` and draw one channel of its map over it.

    Args:
        model: a ``.pt2`` program from ``fcconv convolutionalize`` (or its
            ``.onnx`` export) carrying fcconv's coordinate map.
        image: any file Pillow reads; fed at its own size, converted to the
            model's channels (grey, RGB or RGBA), scaled to [0, 1].
        picture: the picture to write (``.png``; ``.jpg``, ``.pdf``, ``.svg`` too).
        output: the model output to draw (default: the first).
        channel: the channel of that output (a class's score, say).
        mean, std: per-channel normalisation after scaling, ``(x − mean) / std``.
        trust_pickle: load a ``.pt2`` whose archive would unpickle arbitrary objects.
        force: replace an existing picture.

    Raises:
        ImageError: the image cannot be read or is smaller than the model's smallest input.
        SpecError, CheckpointError: a bad channel, output name, model or picture path.
    """
    from fcconv.maps.draw import draw_map
    from fcconv.maps.grid import MapGrid, crop_exact_grid
    from fcconv.maps.image import read_image
    from fcconv.maps.program import load_program

    target = Path(picture)
    if str(picture) == STDIO:
        raise SpecError("fcconv map writes a file; give a file name as {output}, not -")
    file_format = _format_of(target)
    check_output_path(target, force, (Path(model), Path(image)))
    program = load_program(model, trust_pickle=trust_pickle)
    index, facts = program.output(output)
    fed = read_image(image, program.in_channels, mean=mean, std=std)
    smallest = program.smallest_size
    if any(n < s for n, s in zip(fed.size, smallest, strict=True)):
        raise ImageError(
            f"{image} is {fed.size[0]}x{fed.size[1]}, smaller than the smallest input the model "
            f"takes ({smallest[0]}x{smallest[1]}); use a larger image",
            path=str(image),
        )
    maps = program.run(fed.tensor)
    scores = maps[index]
    if not 0 <= channel < scores.shape[1]:
        raise SpecError(
            f"output {facts.name!r} has {scores.shape[1]} channels (0 to {scores.shape[1] - 1}); "
            "choose one with {channel}"
        )
    plane = scores[0, channel].permute(*(a - 2 for a in facts.map_axes)).double()
    counts = tuple(int(n) for n in plane.shape)
    step = facts.cells.stride
    exact = crop_exact_grid(
        counts, program.reads_past, program.native_size, fed.size, step, program.phases
    )
    grid = MapGrid(plane.tolist(), facts.cells, exact)
    notes = [] if exact is not None else [f"{model} does not say which cells equal their crop"]
    stride = "x".join(map(str, step))
    title = (
        f"{facts.name} channel {channel}: {counts[0]}x{counts[1]} cells at stride {stride} "
        f"on {fed.size[0]}x{fed.size[1]}"
    )
    if exact is not None and grid.exact_count() != counts[0] * counts[1]:
        title += "; hatched: not the model on its crop"
    with (
        atomic_output(target, force=force, sources=(model, image)) as temporary,
        open(temporary, "wb") as handle,
    ):
        placement = draw_map(
            grid,
            fed.rgb,
            handle,
            title=title,
            label=f"{facts.name}[{channel}]",
            file_format=file_format,
        )
    return MapResult(
        model=str(model),
        image=str(image),
        picture=str(target),
        output=facts.name,
        channel=channel,
        channels=int(scores.shape[1]),
        image_size=fed.size,
        grid=grid,
        output_stride=program.output_stride,
        placement=placement,
        notes=notes,
    )
