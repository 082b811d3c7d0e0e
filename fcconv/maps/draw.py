"""Drawing a dense map over its image with matplotlib: tiles, hatching, the best box, a colour bar.

The picture is laid out in whole pixels so that anyone can find a cell in
it: image pixel ``(x, y)`` fills the ``scale × scale`` square whose top-left
corner is picture pixel ``(left + scale·x, top + scale·y)``
(:class:`Placement`). Each cell paints its tile (:func:`fcconv.maps.grid.tile`)
in its value's colour, blended over the image; cells that are not the model
run on their crop are hatched; the best cell's whole box is outlined.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, BinaryIO

from fcconv.extras import require
from fcconv.maps.grid import MapGrid, tile
from fcconv.progress import phased

ALPHA = 0.6
"""How much of a tile's colour covers the image under it."""
COLORMAP = "viridis"
MARGIN, TITLE, GAP, BAR, LABELS = 12, 36, 14, 18, 72
"""The picture's layout, in pixels: outer margin, title band, image–bar gap, bar, tick labels."""
DPI = 100


@dataclass(frozen=True)
class Placement:
    """Where the image lies in the picture: its top-left pixel and its magnification."""

    left: int
    top: int
    scale: int

    def to_dict(self) -> dict[str, int]:
        return {"left": self.left, "top": self.top, "scale": self.scale}


def scale_for(height: int, width: int, target: int = 480) -> int:
    """The whole-number magnification that brings the longer side near ``target`` pixels.

    >>> scale_for(240, 320), scale_for(2000, 3000)
    (2, 1)
    """
    longest = max(height, width)
    return math.ceil(target / longest) if longest < target else 1


def _overlay(grid: MapGrid, height: int, width: int, cmap: Any, norm: Any) -> Any:
    """An ``[H, W, 4]`` RGBA layer: each cell's colour on its tile, clipped to the image."""
    import numpy as np

    layer = np.zeros((height, width, 4))
    rows, columns = grid.size
    for p in range(rows):
        for q in range(columns):
            (top, bottom), (left, right) = tile(grid.cells, p, q)
            top, left = max(top, 0), max(left, 0)
            if bottom <= top or right <= left:
                continue
            colour = cmap(norm(grid.values[p][q]))
            layer[top:bottom, left:right] = (*colour[:3], ALPHA)
    return layer


@phased("drawing")
def draw_map(
    grid: MapGrid, rgb: Any, handle: BinaryIO, *, title: str, label: str, file_format: str = "png"
) -> Placement:
    """Draw ``grid`` over the ``[H, W, 3]`` image ``rgb`` into ``handle``; return its placement."""
    require("matplotlib", "map", purpose="to draw maps")
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    height, width = int(rgb.shape[0]), int(rgb.shape[1])
    scale = scale_for(height, width)
    shown_w, shown_h = scale * width, scale * height
    figure_w = MARGIN + shown_w + GAP + BAR + LABELS
    figure_h = TITLE + shown_h + MARGIN
    figure = Figure(figsize=(figure_w / DPI, figure_h / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    box = [MARGIN / figure_w, MARGIN / figure_h, shown_w / figure_w, shown_h / figure_h]
    axes = figure.add_axes(box)
    axes.set_axis_off()
    extent = (0, width, height, 0)
    axes.imshow(rgb, extent=extent, interpolation="nearest")
    low, high = grid.extremes()
    norm = Normalize(low, high if high > low else low + 1.0)
    cmap = colormaps[COLORMAP]
    axes.imshow(_overlay(grid, height, width, cmap, norm), extent=extent, interpolation="nearest")
    _hatch(axes, grid, Rectangle)
    _outline_best(axes, grid, Rectangle)
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    bar = figure.add_axes(
        [(MARGIN + shown_w + GAP) / figure_w, MARGIN / figure_h, BAR / figure_w, box[3]]
    )
    figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=bar, label=label)
    figure.text(MARGIN / figure_w, 1 - 8 / figure_h, title, va="top", fontsize=9, wrap=True)
    figure.savefig(handle, format=file_format, dpi=DPI)
    return Placement(MARGIN, TITLE, scale)


def _frame(axes: Any, rectangle: Any, spans: tuple[tuple[int, int], ...], **style: Any) -> None:
    """An unfilled rectangle over the image pixels ``((top, bottom), (left, right))``."""
    (top, bottom), (left, right) = spans
    axes.add_patch(rectangle((left, top), right - left, bottom - top, fill=False, **style))


def _hatch(axes: Any, grid: MapGrid, rectangle: Any) -> None:
    """Hatch the tiles of cells that differ from the model run on their crop."""
    if grid.crop_exact is None:
        return
    rows, columns = grid.size
    hatch = {"hatch": "//", "edgecolor": (1.0, 1.0, 1.0, 0.55), "linewidth": 0}
    for p in range(rows):
        for q in range(columns):
            if not grid.crop_exact[p][q]:
                _frame(axes, rectangle, tile(grid.cells, p, q), **hatch)


def _outline_best(axes: Any, grid: MapGrid, rectangle: Any) -> None:
    """Outline the whole input box (receptive window) of the highest cell."""
    rows, columns = grid.size
    if not rows or not columns:
        return
    cells = [(p, q) for p in range(rows) for q in range(columns)]
    best = max(cells, key=lambda cell: grid.values[cell[0]][cell[1]])
    style = {"edgecolor": "white", "linestyle": "--", "linewidth": 1.2}
    _frame(axes, rectangle, grid.cells.box(*best), **style)
