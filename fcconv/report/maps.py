"""The picture job for people: what was drawn, where the cells lie, which equal their crop."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fcconv.report.console import num, table, text

if TYPE_CHECKING:
    from rich.console import Console

    from fcconv.api.maps import MapResult


def _sizes(values: object) -> str:
    return "x".join(str(v) for v in values)  # type: ignore[union-attr]


def render_map(console: Console, result: MapResult) -> None:
    """The model, image, output and channel drawn, the cells' geometry, the values, the file."""
    grid = result.grid
    low, high = grid.extremes()
    cells = grid.cells
    exact = grid.exact_count()
    rows, columns = grid.size
    crops = (
        "unknown (the model does not say)"
        if exact is None
        else f"{exact} of {rows * columns} cells equal the model on their crop (the others "
        "are hatched)"
    )
    facts = [
        ("model", result.model),
        ("image", f"{result.image} ({_sizes(result.image_size)}, fed at its own size)"),
        ("drawn", f"output {result.output}, channel {result.channel} of {result.channels}"),
        (
            "cells",
            f"{rows}x{columns}: offset {_sizes(cells.offset)}, stride {_sizes(cells.stride)}, "
            f"window {_sizes(cells.window)} (each painted on the stride-sized tile at the centre "
            "of its box)",
        ),
        ("values", f"{num(low)} … {num(high)}"),
        ("crops", crops),
    ]
    console.print(table(text(f"fcconv map {result.model} {result.image}"), facts))
    for note in result.notes:
        console.print(text(f"note: {note}"))
    console.print(text(f"wrote {result.picture}"))
