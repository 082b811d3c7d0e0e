"""Exact tiles of a dense map: which input pixels each block of cells needs.

A cell depends only on the input pixels in its box (its receptive window,
``offset + j·S … + window`` per axis). Run on a tile of the image that
starts at a multiple of the trunk's stride ``M``, the dense program lays its
cells on the same grid as on the whole image (every layer's stride divides
``M``), so every cell whose box lies inside the tile, or leaves it only
where the tile's border is the image's, has exactly its one-pass value:
cell ``j`` of the whole map is cell ``j − a/S`` of the tile starting at
pixel ``a``. Neighbouring tiles overlap by about ``window − stride`` pixels,
their starts aligned to ``M`` (a multiple of the map's stride ``S``).

The map's size comes from the program itself, run once on a small probe:
along an axis, ``M`` more input pixels give every shifted run one more
cell, so the map of ``n`` pixels has ``J(L) + f·(n − L)/M`` cells for a
probe ``L ≡ n (mod M)`` at least ``native + M`` (``f = M / S`` runs).

>>> plan = plan_axis(length=100, cells=23, offset=0, step=4, window=16, coarse=4,
...                  native=16, per_tile=10)
>>> [(t.cells, t.pixels) for t in plan]
[((0, 10), (0, 52)), ((10, 20), (40, 92)), ((20, 23), (80, 100))]
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """One tile along one axis: the map's cells ``[cells)`` from the input's ``[pixels)``."""

    cells: tuple[int, int]
    pixels: tuple[int, int]
    step: int

    @property
    def local(self) -> tuple[int, int]:
        """Those cells in the tile's own map (its first cell is the whole map's ``a/S``)."""
        first = self.pixels[0] // self.step
        return self.cells[0] - first, self.cells[1] - first


@dataclass(frozen=True)
class Tile:
    """A tile of the image: its index in the tile grid and one :class:`Span` per axis."""

    index: tuple[int, ...]
    spans: tuple[Span, ...]

    @property
    def cells(self) -> tuple[slice, ...]:
        return tuple(slice(*s.cells) for s in self.spans)

    @property
    def pixels(self) -> tuple[slice, ...]:
        return tuple(slice(*s.pixels) for s in self.spans)

    @property
    def local(self) -> tuple[slice, ...]:
        return tuple(slice(*s.local) for s in self.spans)

    @property
    def size(self) -> tuple[int, ...]:
        return tuple(s.pixels[1] - s.pixels[0] for s in self.spans)


def plan_axis(
    *,
    length: int,
    cells: int,
    offset: int,
    step: int,
    window: int,
    coarse: int,
    native: int,
    per_tile: int,
) -> list[Span]:
    """The tiles along one axis of ``length`` pixels whose map holds ``cells`` cells.

    Each tile gives ``per_tile`` cells (the last fewer) and reads from a
    multiple of ``coarse`` to its last cell's box end (clipped to the image),
    at least ``native`` pixels. A stitched map's cell ``j`` comes from the
    run that starts ``(j mod f)·S`` after the tile does, and a trunk that
    pads reads that run's start border: the tile starts at or before
    ``offset + M·⌊j/f⌋`` for its first cell, so every cell's box lies inside
    its own run.
    """
    spans = []
    runs = coarse // step
    for first in range(0, cells, max(1, per_tile)):
        last = min(cells, first + max(1, per_tile))
        # cell j comes from the run that starts at pixel a + (j mod f)·S of the tile and
        # reads that run's border where it pads: its box must start at or after it
        start = max(0, ((offset + coarse * (first // runs)) // coarse) * coarse)
        stop = min(length, offset + (last - 1) * step + window)
        # every run of the tile is at least the program's smallest input: the last run
        # starts (f − 1)·S into the tile, and the tile's map ends where any run does
        # (a padded trunk's native size can exceed its cells' boxes)
        need = native + (runs - 1) * step
        if stop - start < need:
            stop = min(length, start + need)
            if stop - start < need:
                start = max(0, ((stop - need) // coarse) * coarse)
        spans.append(Span((first, last), (start, stop), step))
    return spans


def plan_tiles(
    image: Sequence[int],
    cells: Sequence[int],
    offset: Sequence[int],
    step: Sequence[int],
    window: Sequence[int],
    coarse: Sequence[int],
    native: Sequence[int],
    per_tile: Sequence[int],
) -> list[Tile]:
    """Every tile of the image, row by row (the last axis fastest)."""
    axes = [
        plan_axis(
            length=image[a],
            cells=cells[a],
            offset=offset[a],
            step=step[a],
            window=window[a],
            coarse=coarse[a],
            native=native[a],
            per_tile=per_tile[a],
        )
        for a in range(len(image))
    ]
    grid = itertools.product(*(range(len(spans)) for spans in axes))
    return [Tile(index, tuple(axes[a][i] for a, i in enumerate(index))) for index in grid]


def probe_size(length: int, native: int, coarse: int) -> int:
    """A probe length ``≡ length (mod coarse)`` of at least ``native + coarse`` (or ``length``).

    >>> probe_size(1000, 22, 4), probe_size(30, 22, 4)
    (28, 30)
    """
    least = native + coarse
    if length <= least + coarse:
        return length
    return least + (length - least) % coarse


def cells_from_probe(length: int, probe: int, probe_cells: int, coarse: int, runs: int) -> int:
    """The map's cells along an axis of ``length`` pixels from a probe's (see the module).

    >>> cells_from_probe(46, 26, 3, 4, 2)  # BarNet at stride 2: 3 cells on 26, 13 on 46
    13
    """
    return probe_cells + runs * (length - probe) // coarse


def tile_cells_for(budget_pixels: int, step: Sequence[int], window: Sequence[int]) -> list[int]:
    """Cells per tile side so that a square-ish tile reads about ``budget_pixels`` pixels.

    >>> tile_cells_for(1000 * 1000, (32, 32), (224, 224))
    [25, 25]
    """
    side = math.isqrt(max(1, budget_pixels))
    return [
        max(1, (side - w) // s + 1) if side > w else 1 for s, w in zip(step, window, strict=True)
    ]
