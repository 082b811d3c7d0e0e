"""The exact check of SPEC §4, a block of rows at a time: every element, bit for bit.

A converted kernel must hold ``K[o, c, i, j] == W[o, column(c, i, j)]``, where
``column`` is the mixed-radix number of ``(c, i, j)`` in the flatten order
(SPEC §1; ``(c, l)`` and ``(c, d, i, j)`` for 1-D and 3-D kernels).
:func:`linear_columns` computes that map from its definition with numpy,
independently of the reshape-and-permute that wrote the kernel
(:mod:`fcconv.geometry`, :mod:`fcconv.io.streaming`); the original rows are
gathered through it and compared with the kernel's rows as unsigned integers
of the element's width: bits, never values (NaN equals NaN, −0.0 differs
from 0.0).

Both sides are read through :class:`Tensors`: tensors in memory
(:class:`MemoryTensors`), or byte ranges of files
(:class:`fcconv.io.sources.DiskTensors`), whose blocks come from the page
cache right after they were written. Memory stays at a few blocks whatever
the layer's size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from fcconv.patches import AnyPatch, as_nd, kernel_axes, parse_order_nd
from fcconv.plan import TensorInfo, describe
from fcconv.verify.arrays import as_array
from fcconv.verify.bits import bits_dtype, differing, tensor_bits

if TYPE_CHECKING:
    import numpy as np
    import torch

BLOCK_BYTES = 32 << 20
"""Bytes of rows read from each side at once."""


@runtime_checkable
class Tensors(Protocol):
    """One side of a comparison: its tensors described, and read a part at a time."""

    def describe(self, key: str) -> TensorInfo | None:
        """Shape and dtype of ``key``, or None when this side has no such tensor."""

    def row_bits(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``key`` as unsigned ints of the element's width, ``[n, row]``."""

    def rows(self, key: str, rows: Sequence[int]) -> torch.Tensor:
        """The listed rows (first-axis indices) of ``key``, as a tensor."""

    def tensor(self, key: str) -> torch.Tensor:
        """All of ``key`` (for small tensors such as biases)."""

    def array_rows(self, key: str, rows: Sequence[int]) -> np.ndarray:
        """The listed rows of ``key`` as a numpy array of its dtype (``ml_dtypes`` for bfloat16)."""


class MemoryTensors:
    """:class:`Tensors` over a mapping of tensors in memory."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.mapping = tensors
        self._bits: dict[str, np.ndarray] = {}

    def describe(self, key: str) -> TensorInfo | None:
        tensor = self.mapping.get(key)
        return None if tensor is None else describe({key: tensor})[key]

    def row_bits(self, key: str, start: int, stop: int) -> np.ndarray:
        if key not in self._bits:
            self._bits[key] = tensor_bits(self.mapping[key])
        return self._bits[key][start:stop]

    def rows(self, key: str, rows: Sequence[int]) -> torch.Tensor:
        import torch

        tensor = self.mapping[key]
        if len(rows) == tensor.shape[0] and list(rows) == list(range(tensor.shape[0])):
            return tensor
        return tensor[torch.tensor(list(rows), dtype=torch.long)]

    def tensor(self, key: str) -> torch.Tensor:
        return self.mapping[key]

    def array_rows(self, key: str, rows: Sequence[int]) -> np.ndarray:
        return as_array(self.rows(key, rows))


def as_tensors(side: Tensors | Mapping[str, torch.Tensor]) -> Tensors:
    """``side`` as :class:`Tensors`: a mapping of tensors is wrapped, anything else kept."""
    return side if isinstance(side, Tensors) else MemoryTensors(side)


def linear_columns(patch: AnyPatch, order: str, flip: bool = False) -> np.ndarray:
    """For each kernel tap, in ``[C, *sizes]`` row-major order, the Linear column it holds.

    The column is the mixed-radix number of the tap's coordinates, the
    flatten order's first axis the most significant (SPEC §1), for a patch
    of any rank (taps ``(c, i, j)``, ``(c, l)`` or ``(c, d, i, j)``). A
    flipped kernel (for a framework that convolves) holds at each tap what
    the plain one holds with every spatial coordinate reversed.

    >>> from fcconv.patches import Patch, PatchNd
    >>> linear_columns(Patch(1, 2, 3), "hwc").tolist()  # C=3 fastest: tap (c, 0, j) reads 3j + c
    [0, 3, 1, 4, 2, 5]
    >>> linear_columns(Patch(1, 2, 3), "hwc", flip=True).tolist()
    [3, 0, 4, 1, 5, 2]
    >>> linear_columns(PatchNd((3,), 2), "lc").tolist()  # tap (c, l) reads 2l + c
    [0, 2, 4, 1, 3, 5]
    """
    import numpy as np

    nd = as_nd(patch)
    order = parse_order_nd(order, nd.ndim)
    axes = kernel_axes(nd.ndim)
    size = dict(zip(axes, nd.kernel_shape, strict=True))
    taps = np.indices(nd.kernel_shape).reshape(len(axes), -1)
    coordinate = dict(zip(axes, taps, strict=True))
    if flip:
        for axis in axes[1:]:
            coordinate[axis] = size[axis] - 1 - coordinate[axis]
    column = np.zeros(nd.features, dtype=np.int64)
    for axis in order:
        column = column * size[axis] + coordinate[axis]
    return column


@dataclass(frozen=True)
class Mismatch:
    """Where a kernel is not the permuted original: how many elements, and the first."""

    count: int
    row: int
    tap: int  # flat index in [C, *sizes]
    column: int  # the Linear column that tap should hold


def permuted_mismatch(
    original: Tensors,
    converted: Tensors,
    key: str,
    patch: AnyPatch,
    order: str,
    rows: int,
    *,
    flip: bool = False,
) -> Mismatch | None:
    """Compare every element of the kernel ``converted[key]`` with the permuted ``original[key]``.

    Both must already have the expected dtypes and shapes (``[rows, N]`` and
    ``[rows, C, *sizes]``). Returns None when every bit agrees.
    """
    import numpy as np

    if rows == 0:  # no elements: nothing can differ (and the patch may be only declared)
        return None
    columns = linear_columns(patch, order, flip)
    info = original.describe(key)
    itemsize = bits_dtype(info.dtype if info is not None else "uint8").itemsize
    block = max(1, BLOCK_BYTES // (patch.features * itemsize))
    count, first = 0, (-1, -1)
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        expected = np.take(original.row_bits(key, start, stop), columns, axis=1)
        differ = differing(expected, converted.row_bits(key, start, stop))
        found = int(np.count_nonzero(differ))
        if found and first[0] < 0:
            row, tap = divmod(int(np.flatnonzero(differ)[0]), patch.features)
            first = (start + row, tap)
        count += found
    if not count:
        return None
    return Mismatch(count, first[0], first[1], int(columns[first[1]]))
