"""The picture job: a dense model run on an image, its map drawn over the image.

``fcconv map MODEL IMAGE -o map.png`` and :func:`map_image` run a dense model
(a ``.pt2`` from ``fcconv convolutionalize``, or an ``.onnx`` one with
onnxruntime) on the image at its own size, take one channel of one output,
and draw each cell on its input box from the coordinate map the model
carries. Pillow reads the image, matplotlib draws (``pip install 'fcconv[map]'``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcconv.errors import ImageError, SpecError
from fcconv.io.atomic import (
    STDIO,
    atomic_output,
    check_output_folder,
    check_output_path,
    inputs_protected,
)

FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".pdf": "pdf", ".svg": "svg"}
"""Picture formats by suffix; pixel placement (``placement``) holds for the raster ones."""


PICTURES = FORMATS
OTHER_PICTURES = ", ".join(suffix for suffix in sorted(FORMATS) if suffix != ".png")
DATA = {".npy": "npy", ".zarr": "zarr"}
"""Data formats by suffix: the map's values ``[outputs…, H', W']`` float32."""


@dataclass
class MapResult:
    """A dense map of an image, written as a picture or as data; truthy once written.

    Attributes:
        model, image: the files read.
        picture: the picture written (the target, or ``--picture`` beside data), if any.
        output: the output mapped; ``channel`` the channel drawn.
        image_size: the image's ``(H, W)``, fed at that size.
        grid: the cells drawn (values, boxes, tiles, crop-exactness); None for data.
        output_stride: the map's stride when it was made denser, else None.
        placement: where the image lies in the picture (None without one).
        data: the ``.npy``/``.zarr`` written, if any; ``data_format`` its kind.
        map_size: the map's ``(H', W')``; ``outputs`` the channels before them.
        cells_geometry: the coordinate map.
        tiles: tiles run (and how many were already in a resumed store).
        tile_cells: cells per tile side; ``memory`` the budget that chose it.
        values: the map in memory when the API was asked for it (``keep=True``).
        notes: plain-words remarks.
    """

    model: str
    image: str
    picture: str | None
    output: str
    channel: int
    channels: int
    image_size: tuple[int, int]
    grid: Any
    output_stride: tuple[int, ...] | None
    placement: Any
    data: str | None = None
    data_format: str | None = None
    map_size: tuple[int, ...] = ()
    outputs: tuple[int, ...] = ()
    cells_geometry: Any = None
    tiles: int = 0
    tiles_resumed: int = 0
    tile_cells: tuple[int, ...] = ()
    memory: int | None = None
    threads: int | None = None
    values: Any = None
    notes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return True

    @property
    def exit_code(self) -> int:
        return 0

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "command": "map",
            "ok": True,
            "model": self.model,
            "image": self.image,
            "picture": self.picture,
            "data": self.data,
            "format": self.data_format or "picture",
            "output": self.output,
            "channel": self.channel,
            "channels": self.channels,
            "image_size": list(self.image_size),
            "map_size": list(self.map_size),
            "map_shape": [*self.outputs, *self.map_size],
            "cells": self.cells_geometry.to_dict(),
            "output_stride": None if self.output_stride is None else list(self.output_stride),
            "tiles": self.tiles,
            "tiles_resumed": self.tiles_resumed,
            "tile_cells": list(self.tile_cells),
            "memory": self.memory,
            "threads": self.threads,
            "notes": list(self.notes),
        }
        if self.grid is not None:
            low, high = self.grid.extremes()
            document.update(
                min=low,
                max=high,
                crop_exact=self.grid.exact_count(),
                placement=self.placement.to_dict(),
                grid=self.grid.cell_list(),
            )
        return document


def _kind_of(target: Path) -> tuple[str, str]:
    """``("picture", format)`` or ``("data", "npy"|"zarr")`` from the target's suffix."""
    suffix = target.suffix.lower()
    if suffix in DATA:
        return "data", DATA[suffix]
    if suffix in FORMATS:
        return "picture", FORMATS[suffix]
    raise SpecError(
        f"name the map {{output}} .png (a picture; or {OTHER_PICTURES}), "
        f".npy or .zarr (the values), not {suffix or 'no suffix'}"
    )


def _format_of(picture: Path) -> str:
    suffix = picture.suffix.lower()
    if suffix not in FORMATS:
        raise SpecError(
            f"name the picture {{picture}} .png (or {OTHER_PICTURES}), not {suffix or 'no suffix'}"
        )
    return FORMATS[suffix]


def _pair(value: Sequence[int] | int | None, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    values = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) == 1:
        values = (values[0], values[0])
    if len(values) != 2 or min(values) < 1:
        raise SpecError(f"{what} takes one or two positive numbers; fix {{tile}}")
    return values[0], values[1]


def _open_source(image: str | Path, channels: int, mean, std) -> tuple[Any, Any]:
    """The image as a tiled source, and its ``[H, W, 3]`` RGB when Pillow decoded it."""
    from fcconv.maps.engine import ArraySource, Normalised
    from fcconv.maps.image import per_channel, read_image
    from fcconv.maps.tiff import is_tiff, open_tiff

    if is_tiff(image):
        shift, scale = per_channel(mean, channels, "mean"), per_channel(std, channels, "std")
        source = open_tiff(image, channels)
        return Normalised(source, shift, scale), None
    fed = read_image(image, channels, mean=mean, std=std)
    return ArraySource(fed.tensor[0].numpy()), fed.rgb


@inputs_protected("model", "image")
def map_image(
    model: str | Path,
    image: str | Path,
    target: str | Path,
    *,
    output: str | None = None,
    channel: int = 0,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    picture: str | Path | None = None,
    memory: int | None = None,
    tile: Sequence[int] | int | None = None,
    resume: bool = False,
    threads: int | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    keep: bool = False,
    trust_pickle: bool = False,
    force: bool = False,
) -> MapResult:
    """Run the dense ``model`` on ``image`` tile by tile and write its map.

    The suffix of ``target`` decides what is written: ``.png`` (``.jpg``,
    ``.pdf``, ``.svg``) draws one channel of the map over the image, each
    cell on its input box; ``.npy`` writes the values ``[outputs…, H', W']``
    float32 through a memory map, with the coordinate map in
    ``TARGET.json``; ``.zarr`` writes them as a chunked store (one chunk per
    tile) with the coordinate map in its attributes (``fcconv``).

    The program runs on overlapping tiles of the image (:mod:`fcconv.maps.tiles`)
    whose cells equal the one-pass map's; the tile size follows ``memory``
    (bytes; default half the memory available) or ``tile`` (cells per side).

    Args:
        model: a ``.pt2`` program from ``fcconv convolutionalize`` (or its
            ``.onnx`` export) carrying fcconv's coordinate map.
        image: a TIFF/BigTIFF/OME-TIFF (read region by region), or any file
            Pillow reads; converted to the model's channels, scaled to [0, 1].
        target: the map to write (``.png``, ``.npy`` or ``.zarr``).
        output: the model output to map (default: the first).
        channel: the channel drawn in a picture (a class's score, say).
        mean, std: per-channel normalisation after scaling, ``(x − mean) / std``.
        picture: with ``.npy``/``.zarr``, also a downsampled picture of ``channel``.
        memory: the memory budget in bytes that picks the tile size.
        tile: cells per tile side (one number or two), instead of ``memory``.
        resume: keep the tiles an interrupted ``.zarr`` run of the same job wrote.
        threads: torch threads each tile runs with (default: the CPUs available).
        progress: called ``(tiles done, tiles, cells done)`` after each tile.
        keep: also return the map's values in memory (``result.values``).
        trust_pickle: load a ``.pt2`` whose archive would unpickle arbitrary objects.
        force: replace an existing target.

    Raises:
        ImageError: the image cannot be read or is smaller than the model's smallest input.
        SpecError, CheckpointError: a bad channel, output name, model or target path.
    """
    from fcconv.maps.engine import MemoryBudget, default_threads, geometry_of
    from fcconv.maps.program import load_program

    target = Path(target)
    if str(target) == STDIO:
        raise SpecError("fcconv map writes a file; give a file name as {output}, not -")
    kind, file_format = _kind_of(target)
    sources = (Path(model), Path(image))
    if picture is not None:
        if kind == "picture":
            raise SpecError("{picture} adds a picture to a .npy or .zarr map; leave it out")
        picture_format = _format_of(Path(picture))
        check_output_path(Path(picture), force, sources)
    tile_cells = _pair(tile, "the tile size")
    if kind == "data" and file_format == "zarr":
        check_output_folder(target, force, sources)
    else:
        check_output_path(target, force, sources)
    program = load_program(model, trust_pickle=trust_pickle)
    index, facts = program.output(output)
    source, rgb = _open_source(image, program.in_channels, mean, std)
    try:
        size = tuple(source.size)
        smallest = program.smallest_size
        if any(n < s for n, s in zip(size, smallest, strict=True)):
            raise ImageError(
                f"{image} is {size[0]}x{size[1]}, smaller than the smallest input the model "
                f"takes ({smallest[0]}x{smallest[1]}); use a larger image",
                path=str(image),
            )
        geometry = geometry_of(program, facts)
        threads = threads or default_threads()
        budget = MemoryBudget.choose(memory, tile_cells)
        job = _Job(program, index, geometry, source, size, threads, budget)
        outputs, cells = job.size_of_map()
        if not 0 <= channel < (outputs[0] if outputs else 1):
            raise SpecError(
                f"output {facts.name!r} has {outputs[0] if outputs else 1} channels (0 to "
                f"{(outputs[0] if outputs else 1) - 1}); choose one with {{channel}}"
            )
        per_tile = [min(t, n) for t, n in zip(job.cells_per_tile(outputs), cells, strict=True)]
        result = MapResult(
            model=str(model),
            image=str(image),
            picture=None,
            output=facts.name,
            channel=channel,
            channels=outputs[0] if outputs else 1,
            image_size=(size[0], size[1]),
            grid=None,
            output_stride=program.output_stride,
            placement=None,
            map_size=cells,
            outputs=outputs,
            cells_geometry=facts.cells,
            tile_cells=tuple(per_tile),
            memory=budget.memory,
            threads=threads,
        )
        coordinates = _coordinates(program, facts, result, str(model), str(image))
        if kind == "picture":
            values = job.into_memory(outputs, cells, per_tile, progress, result)
            _draw(program, facts, values, rgb, source, target, file_format, result, force, sources)
        elif file_format == "npy":
            from fcconv.maps.writers import npy_output

            with npy_output(
                target, (*outputs, *cells), coordinates, force=force, sources=sources
            ) as writer:
                job.run(job.plan(cells, per_tile), writer, progress, result)
            result.data, result.data_format = str(target), "npy"
        else:
            from fcconv.maps.writers import zarr_output

            key = {**coordinates, "tile_cells": list(per_tile)}
            with zarr_output(
                target,
                (*outputs, *cells),
                (*outputs, *per_tile),
                key,
                force=force,
                resume=resume,
                sources=sources,
            ) as writer:
                tiles = job.plan(cells, per_tile)
                skipped = [t for t in tiles if t.index in writer.done]
                result.tiles_resumed = len(skipped)
                todo = [t for t in tiles if t.index not in writer.done]
                job.run(todo, writer, progress, result, total=len(tiles), first=len(skipped))
                writer.array.attrs["fcconv"] = coordinates
            result.data, result.data_format = str(target), "zarr"
        if kind == "data":
            result.notes.append(f"coordinate map: {_where_coordinates(target, file_format)}")
            if picture is not None:
                picture = Path(picture)
                _heatmap(target, file_format, channel, picture, picture_format, force, sources)
                result.picture = str(picture)
            if keep:
                result.values = _load(target, file_format)
    finally:
        close = getattr(getattr(source, "source", source), "close", None)
        if close is not None:
            close()
    return result


@dataclass
class _Job:
    """One image through one program: its map's size, tiles and runs."""

    program: Any
    index: int
    geometry: Any
    source: Any
    size: tuple[int, ...]
    threads: int
    budget: Any

    def size_of_map(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        from fcconv.maps.engine import map_size, torch_threads

        with torch_threads(self.threads):
            return map_size(
                self.program.run, self.index, self.geometry, self.size, self.program.in_channels
            )

    def cells_per_tile(self, outputs: tuple[int, ...]) -> list[int]:
        from fcconv.maps.engine import torch_threads

        with torch_threads(self.threads):
            return self.budget.cells_per_tile(
                self.program.run, self.index, self.geometry, self.program.in_channels, outputs
            )

    def plan(self, cells: tuple[int, ...], per_tile: Sequence[int]) -> list[Any]:
        from fcconv.maps.engine import tile_plan

        return tile_plan(self.geometry, self.size, cells, per_tile)

    def run(
        self,
        tiles: list[Any],
        writer: Any,
        progress: Callable[[int, int, int], None] | None,
        result: MapResult,
        *,
        total: int | None = None,
        first: int = 0,
    ) -> None:
        from fcconv.maps.engine import run_tiles

        count = [first, 0]
        total = len(tiles) if total is None else total
        result.tiles = total
        finished = getattr(writer, "finished", None)

        def done(tile: Any, cells: int) -> None:
            if finished is not None:
                finished(tile.index)
            count[0] += 1
            count[1] += cells
            if progress is not None:
                progress(count[0], total, count[1])

        if progress is not None:
            progress(first, total, 0)
        run_tiles(
            self.program.run,
            self.index,
            self.source,
            tiles,
            self.geometry,
            writer,
            done=done,
            threads=self.threads,
        )

    def into_memory(self, outputs, cells, per_tile, progress, result: MapResult) -> Any:
        from fcconv.maps.writers import MemoryWriter

        writer = MemoryWriter((*outputs, *cells))
        self.run(self.plan(cells, per_tile), writer, progress, result)
        return writer.array


def _coordinates(program: Any, facts: Any, result: MapResult, model: str, image: str) -> dict:
    """The coordinate map that goes with the values (zarr attributes, the .npy sidecar)."""
    return {
        "written_by": "fcconv map",
        "model": model,
        "image": image,
        "output": facts.name,
        "image_size": list(result.image_size),
        "shape": [*result.outputs, *result.map_size],
        "axes": [*("output" for _ in result.outputs), "y", "x"],
        "dtype": "float32",
        "cells": facts.cells.to_dict(),
        "cell_box": "cell (p, q) reads input rows offset[0] + p*stride[0] ... + window[0] and "
        "columns offset[1] + q*stride[1] ... + window[1]",
        "output_stride": None if program.output_stride is None else list(program.output_stride),
        "native_size": list(program.native_size),
        "reads_past": None
        if program.reads_past is None
        else {k: list(v) for k, v in program.reads_past.items()},
    }


def _where_coordinates(target: Path, file_format: str) -> str:
    if file_format == "zarr":
        return f"{target} attributes 'fcconv'"
    from fcconv.maps.writers import sidecar_of

    return str(sidecar_of(target))


def _draw(program, facts, values, rgb, source, target, file_format, result, force, sources) -> None:
    """The picture: channel ``result.channel`` of the map drawn over the image."""
    import numpy as np

    from fcconv.maps.draw import draw_map
    from fcconv.maps.grid import MapGrid, crop_exact_grid

    if rgb is None:  # a TIFF: drawn from its pixels, which a picture needs whole
        full = source.source.read(slice(None), slice(None)) if hasattr(source, "source") else None
        if full is None:
            raise ImageError(f"{result.image} cannot be drawn; write a .npy or .zarr map")
        grey = full[:3] if full.shape[0] >= 3 else np.repeat(full[:1], 3, axis=0)
        rgb = (np.clip(grey.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)
    plane = np.asarray(values[result.channel], dtype=np.float64)
    counts = tuple(int(n) for n in plane.shape)
    step = facts.cells.stride
    exact = crop_exact_grid(
        counts, program.reads_past, program.native_size, result.image_size, step, program.phases
    )
    grid = MapGrid(plane.tolist(), facts.cells, exact)
    if exact is None:
        result.notes.append(f"{result.model} does not say which cells equal their crop")
    stride = "x".join(map(str, step))
    size = result.image_size
    title = (
        f"{facts.name} channel {result.channel}: {counts[0]}x{counts[1]} cells at stride "
        f"{stride} on {size[0]}x{size[1]}"
    )
    if exact is not None and grid.exact_count() != counts[0] * counts[1]:
        title += "; hatched: not the model on its crop"
    with (
        atomic_output(target, force=force, sources=sources) as temporary,
        open(temporary, "wb") as handle,
    ):
        result.placement = draw_map(
            grid,
            rgb,
            handle,
            title=title,
            label=f"{facts.name}[{result.channel}]",
            file_format=file_format,
        )
    result.grid = grid
    result.picture = str(target)


def _load(target: Path, file_format: str) -> Any:
    import numpy as np

    if file_format == "npy":
        return np.load(target)
    from fcconv.extras import require

    zarr = require("zarr", "tiff", purpose="to read .zarr maps")
    return np.asarray(zarr.open_array(str(target), mode="r")[...])


PICTURE_SIDE = 1024
"""The longer side of a --picture, in cells (a map larger than that is subsampled)."""


def _heatmap(target, file_format, channel, picture: Path, picture_format, force, sources) -> None:
    """A downsampled picture of one channel of a written map: every k-th cell, viridis."""
    import numpy as np

    from fcconv.extras import require

    require("matplotlib", "map", purpose="to draw maps")
    from matplotlib import colormaps

    image_module = require("PIL.Image", "map", purpose="to write pictures")
    if file_format == "npy":
        values = np.load(target, mmap_mode="r")
    else:
        zarr = require("zarr", "tiff", purpose="to read .zarr maps")
        values = zarr.open_array(str(target), mode="r")
    rows, columns = values.shape[-2:]
    every = max(1, -(-max(rows, columns) // PICTURE_SIDE))
    plane = np.asarray(values[channel, ::every, ::every], dtype=np.float64)
    finite = plane[np.isfinite(plane)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    scaled = (plane - low) / (high - low) if high > low else np.zeros_like(plane)
    colours = (colormaps["viridis"](np.nan_to_num(scaled))[..., :3] * 255).astype(np.uint8)
    with (
        atomic_output(picture, force=force, sources=sources) as temporary,
        open(temporary, "wb") as handle,
    ):
        image_module.fromarray(colours).save(handle, format=picture_format.upper())
