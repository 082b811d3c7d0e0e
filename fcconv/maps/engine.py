"""The local engine: a dense program run tile by tile over an image, each tile's cells written.

:func:`map_size` finds the whole map's size from a small probe run,
:func:`tile_plan` cuts the map into tiles (:mod:`fcconv.maps.tiles`) that
fit a memory budget, and :func:`run_tiles` runs the program on each tile's
pixels and hands the tile's exact cells to a writer
(:mod:`fcconv.maps.writers`). Peak memory follows the tile, not the image.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fcconv.maps.tiles import Tile, cells_from_probe, plan_tiles, probe_size, tile_cells_for

FALLBACK_BYTES_PER_PIXEL = 16 * 1024
"""Bytes per input pixel a tile is assumed to cost where the system cannot measure it."""


class Source(Protocol):
    """An image read a region at a time: ``[C, h, w]`` float32, already normalised."""

    size: tuple[int, int]

    def read(self, rows: slice, columns: slice) -> Any: ...


@dataclass
class ArraySource:
    """An image already in memory (decoded by Pillow): ``[C, H, W]`` float32."""

    pixels: Any

    @property
    def size(self) -> tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[2])

    def read(self, rows: slice, columns: slice) -> Any:
        return self.pixels[:, rows, columns]


@dataclass
class Normalised:
    """A source with ``(x − mean) / std`` per channel applied to each region it reads."""

    source: Any
    mean: Sequence[float]
    std: Sequence[float]

    @property
    def size(self) -> tuple[int, int]:
        return self.source.size

    def read(self, rows: slice, columns: slice) -> Any:
        import numpy as np

        values = self.source.read(rows, columns)
        shift = np.asarray(self.mean, np.float32)[:, None, None]
        scale = np.asarray(self.std, np.float32)[:, None, None]
        return (values - shift) / scale


@dataclass(frozen=True)
class Geometry:
    """What the tiles need to know of the program's map along each axis."""

    offset: tuple[int, ...]
    step: tuple[int, ...]
    window: tuple[int, ...]
    coarse: tuple[int, ...]
    native: tuple[int, ...]
    runs: tuple[int, ...]
    map_axes: tuple[int, ...]


def geometry_of(program: Any, facts: Any) -> Geometry:
    """The :class:`Geometry` of one output of a :class:`~fcconv.maps.program.DenseProgram`."""
    cells = facts.cells
    coarse = tuple(s * f for s, f in zip(cells.stride, program.phases, strict=True))
    return Geometry(
        tuple(cells.offset),
        tuple(cells.stride),
        tuple(cells.window),
        coarse,
        tuple(program.smallest_size),
        tuple(program.phases),
        tuple(facts.map_axes),
    )


def as_map(tensor: Any, map_axes: Sequence[int]) -> Any:
    """One output ``[1, …]`` as ``[outputs…, H', W']`` numpy (map axes last)."""
    rest = [a for a in range(1, tensor.dim()) if a not in map_axes]
    return tensor[0:1].permute(0, *rest, *map_axes)[0].numpy()


def run_program(run: Callable[[Any], list[Any]], index: int, pixels: Any, map_axes) -> Any:
    """The program on ``[C, h, w]`` pixels: output ``index`` as ``[outputs…, h', w']``."""
    import numpy as np
    import torch

    wide = getattr(pixels, "dtype", None) == np.float64  # float64 runs (exactness checks)
    array = np.ascontiguousarray(pixels, dtype=np.float64 if wide else np.float32)
    if not array.flags.writeable:
        array = array.copy()
    with torch.no_grad():
        return as_map(run(torch.from_numpy(array)[None])[index], map_axes)


def map_size(
    run: Callable[[Any], list[Any]],
    index: int,
    geometry: Geometry,
    image: Sequence[int],
    channels: int,
    dtype: str = "float32",
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The map's ``(outputs…)`` and ``(H', W')`` on an image of ``image`` pixels, from a probe."""
    import numpy as np

    probe = tuple(
        probe_size(n, m, c) for n, m, c in zip(image, geometry.native, geometry.coarse, strict=True)
    )
    values = run_program(run, index, np.zeros((channels, *probe), dtype), geometry.map_axes)
    cells = tuple(
        cells_from_probe(n, p, j, c, f)
        for n, p, j, c, f in zip(
            image, probe, values.shape[-2:], geometry.coarse, geometry.runs, strict=True
        )
    )
    return tuple(values.shape[:-2]), cells


def tile_plan(
    geometry: Geometry, image: Sequence[int], cells: Sequence[int], per_tile: Sequence[int]
) -> list[Tile]:
    return plan_tiles(
        image,
        cells,
        geometry.offset,
        geometry.step,
        geometry.window,
        geometry.coarse,
        geometry.native,
        per_tile,
    )


# ------------------------------------------------------------------ memory


def _status(field: str) -> int | None:
    """A ``/proc/self/status`` size in bytes (``VmRSS``, ``VmHWM``), None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the process's peak RSS (Linux ``clear_refs``); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def resident_bytes() -> int:
    """This process's resident memory now (0 where the system does not say)."""
    return _status("VmRSS") or 0


def bytes_per_pixel(
    run: Callable[[Any], list[Any]], index: int, geometry: Geometry, channels: int
) -> float:
    """What one input pixel of a tile costs at the peak of a run, measured on a probe tile.

    The probe is the native size plus four coarse steps per axis; the rise
    of the process's peak RSS over its RSS before, divided by the probe's
    pixels (at least the input's own float32 bytes). Where the system has no
    peak to reset, :data:`FALLBACK_BYTES_PER_PIXEL`.
    """
    import numpy as np

    side = tuple(n + 4 * c for n, c in zip(geometry.native, geometry.coarse, strict=True))
    pixels = np.random.default_rng(0).random((channels, *side), dtype=np.float32)
    run_program(run, index, pixels, geometry.map_axes)  # warm-up: one-off allocations
    before = resident_bytes()
    if not before or not _reset_peak():
        return float(FALLBACK_BYTES_PER_PIXEL)
    run_program(run, index, pixels, geometry.map_axes)
    peak = _status("VmHWM") or before
    return max(float(channels * 4), (peak - before) / math.prod(side))


def machine_memory() -> int:
    """Half of the memory available now (Linux ``MemAvailable``), else 2 GiB."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 2 << 30


def cells_per_tile(
    memory: int, per_pixel: float, geometry: Geometry, channels: int, outputs: int
) -> list[int]:
    """Cells per tile side so that a tile's run fits what ``memory`` leaves over the process.

    The tile's pixels cost ``per_pixel`` each at the run's peak, its input
    ``4·C`` more; what the process holds already (the program, the image
    when Pillow decoded it) is subtracted from ``memory``.
    """
    spare = memory - resident_bytes()
    pixels = int(max(0, spare) / (per_pixel + 4 * channels + 8 * outputs))
    least = [n + c for n, c in zip(geometry.native, geometry.coarse, strict=True)]
    pixels = max(pixels, math.prod(least))
    return tile_cells_for(pixels, geometry.step, geometry.window)


# ------------------------------------------------------------------ running


class Writer(Protocol):
    """Where a tile's cells go: ``[outputs…, h, w]`` float32 at the map's ``cells`` slices."""

    def write(self, cells: tuple[slice, ...], values: Any) -> None: ...


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with ``threads`` torch threads (a float32 conv's last bits depend on them)."""
    import torch

    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_tile(run, index: int, source: Any, tile: Tile, map_axes) -> Any:  # noqa: ANN001
    """The tile's exact cells: the program on its pixels, cut to the cells it owns."""
    rows, columns = tile.pixels
    values = run_program(run, index, source.read(rows, columns), map_axes)
    local = tile.local
    return values[(Ellipsis, *local)]


def run_tiles(
    run: Callable[[Any], list[Any]],
    index: int,
    source: Any,
    tiles: Iterable[Tile],
    geometry: Geometry,
    writer: Any,
    *,
    done: Callable[[Tile, int], None] | None = None,
    threads: int | None = None,
) -> None:
    """Run every tile in order and write its cells; ``done(tile, cells)`` after each."""
    with torch_threads(threads):
        for tile in tiles:
            values = run_tile(run, index, source, tile, geometry.map_axes)
            writer.write(tile.cells, values)
            if done is not None:
                done(tile, math.prod(values.shape[-2:]))


def default_threads() -> int:
    """The threads a tile runs with by default: the CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class MemoryBudget:
    """How the tile size is chosen: cells per side given, or a memory budget in bytes."""

    memory: int | None
    tile: tuple[int, ...] | None

    @classmethod
    def choose(cls, memory: int | None, tile: Sequence[int] | None) -> MemoryBudget:
        if tile is not None:
            return cls(None, tuple(tile))
        return cls(int(memory) if memory else machine_memory(), None)

    def cells_per_tile(
        self, run, index: int, geometry: Geometry, channels: int, outputs: Sequence[int]
    ) -> list[int]:  # noqa: ANN001
        if self.tile is not None:
            return list(self.tile)
        assert self.memory is not None
        per_pixel = bytes_per_pixel(run, index, geometry, channels)
        return cells_per_tile(self.memory, per_pixel, geometry, channels, math.prod(outputs) or 1)
