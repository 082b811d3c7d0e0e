"""A dense map as a grid of cells on the image: value, input box, tile, crop-exactness.

Each cell's **box** is its receptive window on the input
(:meth:`~fcconv.geometry.CellGeometry.box`). Boxes overlap when the window
is wider than the stride, so a picture paints each cell on its **tile**: the
stride-sized square at the centre of its box. Neighbouring tiles touch and
never overlap; when window and stride are equal, tile and box are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fcconv.geometry import CellGeometry

Span = tuple[int, int]


def tile(cells: CellGeometry, *index: int) -> tuple[Span, ...]:
    """The stride-sized ``(start, stop)`` per axis at the centre of the cell's box.

    >>> tile(CellGeometry((0, 0), (8, 8), (24, 24)), 1, 2)
    ((16, 24), (24, 32))
    """
    return tuple(
        (start + (w - s) // 2, start + (w - s) // 2 + s)
        for (start, _), s, w in zip(cells.box(*index), cells.stride, cells.window, strict=True)
    )


def crop_exact_grid(
    counts: tuple[int, ...],
    reads_past: dict[str, tuple[bool, ...]] | None,
    native: tuple[int, ...],
    total: tuple[int, ...],
    step: tuple[int, ...],
    phases: tuple[int, ...],
) -> list[list[bool]] | None:
    """For a 2-D map, which cells equal the model run on their crop; None when unknown."""
    if reads_past is None:
        return None
    from fcconv.fcn.cells import CropPlan
    from fcconv.fcn.check import exact_along

    plan = CropPlan(list(reads_past["start"]), list(reads_past["end"]))
    along = [
        [
            exact_along(plan, axis, i, native[axis], total[axis], step[axis], phases[axis])
            for i in range(counts[axis])
        ]
        for axis in range(2)
    ]
    return [[along[0][p] and along[1][q] for q in range(counts[1])] for p in range(counts[0])]


@dataclass
class MapGrid:
    """One channel of one output of a dense map, on the image.

    Attributes:
        values: ``[rows][columns]`` floats.
        cells: the coordinate map (input pixels).
        crop_exact: per cell, whether it equals the model on its crop (None: unknown).
    """

    values: list[list[float]]
    cells: CellGeometry
    crop_exact: list[list[bool]] | None

    @property
    def size(self) -> tuple[int, int]:
        return len(self.values), len(self.values[0]) if self.values else 0

    def extremes(self) -> tuple[float, float]:
        flat = [v for row in self.values for v in row]
        return (min(flat), max(flat)) if flat else (0.0, 0.0)

    def exact_count(self) -> int | None:
        if self.crop_exact is None:
            return None
        return sum(sum(row) for row in self.crop_exact)

    def cell_list(self) -> list[dict[str, Any]]:
        """Every cell with its index, box, tile, value and crop-exactness (row by row)."""
        rows, columns = self.size
        return [
            {
                "cell": [p, q],
                "box": [list(span) for span in self.cells.box(p, q)],
                "tile": [list(span) for span in tile(self.cells, p, q)],
                "value": self.values[p][q],
                "crop_exact": None if self.crop_exact is None else self.crop_exact[p][q],
            }
            for p in range(rows)
            for q in range(columns)
        ]
