"""The map job for people: what was mapped, where the cells lie, what was written; progress."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from fcconv.report.console import num, table, text

if TYPE_CHECKING:
    from rich.console import Console

    from fcconv.api.maps import MapResult


def _sizes(values: object) -> str:
    return "x".join(str(v) for v in values)  # type: ignore[union-attr]


def render_map(console: Console, result: MapResult) -> None:
    """The model, image, output and channel, the cells' geometry, the tiles, what was written."""
    cells = result.cells_geometry
    rows, columns = result.map_size
    facts = [
        ("model", result.model),
        ("image", f"{result.image} ({_sizes(result.image_size)}, fed at its own size)"),
        (
            "cells",
            f"{rows}x{columns}: offset {_sizes(cells.offset)}, stride {_sizes(cells.stride)}, "
            f"window {_sizes(cells.window)}",
        ),
        (
            "tiles",
            f"{result.tiles} of {_sizes(result.tile_cells)} cells"
            + (
                f" ({result.tiles_resumed} kept from the interrupted run)"
                if result.tiles_resumed
                else ""
            )
            + (f", {result.threads} threads each" if result.threads else ""),
        ),
    ]
    grid = result.grid
    if grid is not None:
        low, high = grid.extremes()
        exact = grid.exact_count()
        crops = (
            "unknown (the model does not say)"
            if exact is None
            else f"{exact} of {rows * columns} cells equal the model on their crop (the others "
            "are hatched)"
        )
        facts += [
            ("drawn", f"output {result.output}, channel {result.channel} of {result.channels}"),
            ("values", f"{num(low)} … {num(high)}"),
            ("crops", crops),
        ]
    else:
        shape = _sizes([*result.outputs, *result.map_size])
        facts.append(("values", f"output {result.output}: {shape} float32 ({result.data_format})"))
    console.print(table(text(f"fcconv map {result.model} {result.image}"), facts))
    for note in result.notes:
        console.print(text(f"note: {note}"))
    for written in (result.data, result.picture):
        if written:
            console.print(text(f"wrote {written}"))


@contextlib.contextmanager
def tile_progress(
    *, enabled: bool | None = None
) -> Iterator[Callable[[int, int, int], None] | None]:
    """A rich progress bar on stderr as a ``progress(tiles done, tiles, cells done)`` callback.

    Shows tiles, cells per second and the time left; on by default only when
    stderr is a terminal, so pipes and logs stay clean.

    >>> with tile_progress(enabled=False) as progress:
    ...     progress is None
    True
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield None
        return
    import time

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("mapping tiles"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    start = time.perf_counter()
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("tiles", total=None, rate="")

        def update(done: int, total: int, cells: int) -> None:
            elapsed = time.perf_counter() - start
            rate = f"{cells / elapsed:,.0f} cells/s" if elapsed > 0 and cells else ""
            bar.update(task, completed=done, total=total, rate=rate)

        yield update
