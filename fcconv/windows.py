"""Where the windows of a strided conv fall on an input, of any rank, and the module to build.

Pure arithmetic, no tensors: the output grid, what the windows leave
uncovered (in words), the smallest input with two windows per axis, and the
``nn.Conv1d/2d/3d(...)`` line a report prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fcconv.errors import SpecError
from fcconv.patches import SPATIAL_AXES, AnyPatch, Patch, PatchNd, as_nd

AXIS_NOUNS = {"l": ("length", "position"), "d": ("depth", "frame"), "h": ("height", "row")}
AXIS_NOUNS["w"] = ("width", "column")
"""How reports name each spatial axis: its extent, and one step along it."""


@dataclass(frozen=True)
class Grid:
    """Where the windows of a strided conv fall on an input of ``size`` (one number per axis).

    ``rows``, ``cols``, ``height``, ``width`` and ``uncovered_rows``/``_cols``
    name the axes of a 2-D grid.
    """

    size: tuple[int, ...]
    patch: PatchNd
    stride: tuple[int, ...]

    @property
    def counts(self) -> tuple[int, ...]:
        """Windows along each axis: ``(n − k) // s + 1``."""
        return tuple(
            (n - k) // s + 1
            for n, k, s in zip(self.size, self.patch.sizes, self.stride, strict=True)
        )

    @property
    def cells(self) -> int:
        return math.prod(self.counts)

    @property
    def uncovered(self) -> tuple[int, ...]:
        """Input positions at the end of each axis that no window reads."""
        return tuple(
            n - ((c - 1) * s + k)
            for n, c, s, k in zip(
                self.size, self.counts, self.stride, self.patch.sizes, strict=True
            )
        )

    height = property(lambda self: self.size[0])
    width = property(lambda self: self.size[1])
    rows = property(lambda self: self.counts[0])
    cols = property(lambda self: self.counts[1])
    uncovered_rows = property(lambda self: self.uncovered[0])
    uncovered_cols = property(lambda self: self.uncovered[1])

    def window(self, *cell: int) -> tuple[slice, ...]:
        """The input positions along each axis that output cell ``cell`` sees."""
        return tuple(
            slice(i * s, i * s + k)
            for i, s, k in zip(cell, self.stride, self.patch.sizes, strict=True)
        )

    def warnings(self) -> list[str]:
        """Plain-words notes about input the windows leave out."""
        notes = []
        letters = SPATIAL_AXES[self.patch.ndim]
        for axis, n, left, k, s in zip(
            letters, self.size, self.uncovered, self.patch.sizes, self.stride, strict=True
        ):
            extent, step = AXIS_NOUNS[axis]
            if left:
                notes.append(
                    f"input {extent} {n} leaves the last {left} {step}(s) uncovered by "
                    f"{k}-{step} windows at stride {s}"
                )
        return notes


def make_grid(
    size: tuple[int, ...], patch: AnyPatch, stride: tuple[int, ...] | None = None
) -> Grid:
    """Lay windows of ``patch`` at ``stride`` (default: the patch size) over ``size``."""
    nd = as_nd(patch)
    stride = tuple(stride or nd.sizes)
    if min(stride) < 1:
        raise SpecError(f"stride {'x'.join(map(str, stride))} must be positive, e.g. 1x1")
    if any(n < k for n, k in zip(size, nd.sizes, strict=True)):
        raise SpecError(
            f"input {'x'.join(map(str, size))} is smaller than one "
            f"{'x'.join(map(str, nd.sizes))} patch; give an {{input_size}} at least as large as "
            "the patch"
        )
    return Grid(tuple(size), nd, stride)


def default_input(patch: AnyPatch, stride: tuple[int, ...]) -> tuple[int, ...]:
    """The smallest input that yields two windows along every axis (a 2×2 grid in 2-D)."""
    return tuple(k + s for k, s in zip(as_nd(patch).sizes, stride, strict=True))


def conv2d_line(patch: Patch, out_features: int, stride: tuple[int, int], bias: bool = True) -> str:
    """The ``nn.Conv2d(...)`` call that builds the module the new weights load into."""
    return conv_line(as_nd(patch), out_features, stride, bias)


def conv_line(patch: PatchNd, out_features: int, stride: tuple[int, ...], bias: bool = True) -> str:
    """The ``nn.Conv1d/2d/3d(...)`` call that builds the module the new weights load into.

    >>> conv_line(PatchNd((16,), 32), 24, (16,))
    'nn.Conv1d(32, 24, kernel_size=(16,), stride=(16,), padding=0, bias=True)'
    """
    return (
        f"nn.Conv{patch.ndim}d({patch.channels}, {out_features}, "
        f"kernel_size={tuple(patch.sizes)}, stride={tuple(stride)}, padding=0, bias={bias})"
    )
