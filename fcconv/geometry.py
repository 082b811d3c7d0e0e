"""The weight permutation both ways, and receptive-field arithmetic.

This module knows tensors and arithmetic only: no ``nn.Module``, no files.

A Linear weight ``W[O, N]`` that was fed patches flattened in ``order`` (the
axes ``c``, ``h``, ``w`` from slowest to fastest) is the conv kernel
``K[O, C, kh, kw]`` with ``K[o, c, i, j] = W[o, index_of(order, c, i, j)]``.
Both directions are a reshape and a permute: nothing is recomputed or cast.
The same holds in 1-D and 3-D (``K[O, C, l]``, ``K[O, C, d, h, w]``): one
core (:func:`kernel_transpose`) serves every rank, in memory and in the
streamed rewrites.

Patches and orders are :mod:`fcconv.patches`', where windows fall
:mod:`fcconv.windows`' (their names are importable from here too).
:class:`AxisField` / :class:`CellGeometry` carry the receptive-field
arithmetic that says where each cell of a dense map lies on the input.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fcconv.errors import SpecError
from fcconv.patches import AXES as AXES
from fcconv.patches import CANDIDATE_SIDE_LIMIT as CANDIDATE_SIDE_LIMIT
from fcconv.patches import DEFAULT_ORDER as DEFAULT_ORDER
from fcconv.patches import MAX_NUMBER as MAX_NUMBER
from fcconv.patches import ORDERS as ORDERS
from fcconv.patches import SPATIAL_AXES as SPATIAL_AXES
from fcconv.patches import AnyPatch as AnyPatch
from fcconv.patches import Patch as Patch
from fcconv.patches import PatchNd as PatchNd
from fcconv.patches import PatchSpec as PatchSpec
from fcconv.patches import PatchSpecNd as PatchSpecNd
from fcconv.patches import as_nd as as_nd
from fcconv.patches import candidate_patches as candidate_patches
from fcconv.patches import kernel_axes as kernel_axes
from fcconv.patches import orders_for as orders_for
from fcconv.patches import parse_extent as parse_extent
from fcconv.patches import parse_order as parse_order
from fcconv.patches import parse_order_nd as parse_order_nd
from fcconv.patches import parse_patch as parse_patch
from fcconv.patches import parse_size as parse_size
from fcconv.patches import parse_stride as parse_stride
from fcconv.patches import plain as plain
from fcconv.patches import resolve_patch as resolve_patch
from fcconv.patches import spec_from
from fcconv.windows import Grid as Grid
from fcconv.windows import conv2d_line as conv2d_line
from fcconv.windows import conv_line as conv_line
from fcconv.windows import default_input as default_input
from fcconv.windows import make_grid as make_grid

if TYPE_CHECKING:
    import torch


def index_map(patch: Patch, order: str) -> torch.Tensor:
    """``index_map[c, i, j]``: which Linear input column feeds kernel tap ``(c, i, j)``.

    Two orders are the same permutation for this patch exactly when their
    index maps are equal (e.g. every order when the patch is 1×1).
    """
    return _columns(patch.features, patch.sizes(order), order, AXES)


def linear_weight_to_conv(
    weight: torch.Tensor, patch: Patch | str | tuple[int, ...], order: str, *, flip: bool = False
) -> torch.Tensor:
    """Rearrange a Linear weight ``[O, N]`` into the conv kernel ``[O, C, kh, kw]``.

    The result is a new tensor (never a view of ``weight``) with row-major
    strides, the same dtype and exactly the same element bits; ``weight`` may
    be non-contiguous. ``flip=True`` also reverses the kernel's spatial axes,
    for a framework that convolves (Theano, textbook convolution) instead of
    cross-correlating as PyTorch, Keras 3 and ONNX do (see :func:`flip_kernel`).

    >>> import torch
    >>> k = linear_weight_to_conv(torch.arange(8.).reshape(1, 8), Patch(2, 2, 2), "hwc")
    >>> k[0, 1].tolist()  # channel 1 sits at the odd columns when flattened HWC
    [[1.0, 3.0], [5.0, 7.0]]

    ``patch`` may also be text (``"2x2x2"``) or a tuple (``(2, 2, 2)``; ``(2, 2)``
    infers C from the weight).
    """
    order = parse_order(order)
    if not isinstance(patch, Patch):
        if not hasattr(weight, "dim"):
            raise SpecError(f"expected a Linear weight tensor, got {type(weight).__name__}")
        spec = spec_from(patch)
        patch = resolve_patch(spec, weight.shape[-1]) if weight.dim() == 2 else patch
        if not isinstance(patch, Patch):
            raise SpecError(f"patch {spec} is not 2-D; linear_weight_to_conv_nd takes others")
    if weight.dim() != 2 or weight.shape[1] != patch.features:
        raise SpecError(
            f"weight of shape {tuple(weight.shape)} is not a Linear weight for patch "
            f"{patch} (expected [out, {patch.features}])"
        )
    kernel = _to_kernel(weight, as_nd(patch), order)
    return _flip_spatial(kernel) if flip else kernel


def conv_weight_to_linear(kernel: torch.Tensor, order: str, *, flip: bool = False) -> torch.Tensor:
    """Inverse of :func:`linear_weight_to_conv`: ``[O, C, kh, kw]`` back to ``[O, N]``."""
    order = parse_order(order)
    if kernel.dim() != 4:
        raise SpecError(
            f"kernel of shape {tuple(kernel.shape)} is not a Conv2d weight "
            "(expected [out, C, kh, kw])"
        )
    if flip:
        kernel = _flip_spatial(kernel)
    return _to_linear(kernel, order, AXES)


def _flip_spatial(kernel: torch.Tensor) -> torch.Tensor:
    """``kernel`` with its spatial axes reversed: a permutation of the elements' bits.

    Done on an integer view of the same width, since ``flip`` has no kernel
    for some dtypes (float8) and bits must never pass through arithmetic.
    """
    import torch

    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(
        kernel.element_size()
    )
    spatial = tuple(range(2, kernel.dim()))
    if bits is None:
        return _fresh(kernel.flip(spatial))
    return _fresh(kernel.contiguous().view(bits).flip(spatial).view(kernel.dtype))


def _columns(features: int, sizes: tuple[int, ...], order: str, axes: str) -> torch.Tensor:
    """Which Linear column feeds each kernel tap, the taps in ``axes`` order."""
    import torch

    columns = torch.arange(features).reshape(sizes)
    return columns.permute(*(order.index(axis) for axis in axes))


def kernel_transpose(patch: AnyPatch, order: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """How one row of the Linear weight becomes one row of the conv kernel.

    Returns ``sizes``, the lengths to group the row by (the patch's axes in
    ``order``), and ``transpose``, the axis order that puts those groups in
    the kernel's order (``c`` then the spatial axes). Axes of length 1 are
    left out (they add nothing to an index), and axes that stay neighbours in
    both orders are merged (``hwc`` → ``chw`` is a 2-D transpose of ``(H·W,
    C)``): fewer, longer runs copy about twice as fast. ``transpose`` is the
    identity exactly when no byte moves. The one core of every rank and of
    every writer: :func:`linear_weight_to_conv_nd` in memory, and
    :mod:`fcconv.io.streaming` on rows read from disk.

    >>> kernel_transpose(Patch(7, 7, 512), "hwc"), kernel_transpose(Patch(7, 7, 512), "whc")
    (((49, 512), (1, 0)), ((7, 7, 512), (2, 1, 0)))
    >>> kernel_transpose(PatchNd((16,), 1), "lc"), kernel_transpose(PatchNd((2, 3, 3), 8), "dhwc")
    (((16,), (0,)), ((18, 8), (1, 0)))
    """
    nd = as_nd(patch)
    order = parse_order_nd(order, nd.ndim)
    length = dict(zip(order, nd.lengths(order), strict=True))
    kernel = [axis for axis in kernel_axes(nd.ndim) if length[axis] > 1]
    groups: list[str] = []
    for axis in (axis for axis in order if length[axis] > 1):
        if groups and kernel.index(axis) == kernel.index(groups[-1][-1]) + 1:
            groups[-1] += axis  # the next kernel axis follows this one in both orders
        else:
            groups.append(axis)
    if not groups:
        return (nd.features,), (0,)
    sizes = tuple(math.prod(length[axis] for axis in group) for group in groups)
    transpose = tuple(sorted(range(len(groups)), key=lambda g: kernel.index(groups[g][0])))
    return sizes, transpose


def _to_kernel(weight: torch.Tensor, patch: PatchNd, order: str) -> torch.Tensor:
    """``[O, N]`` rearranged into ``[O, C, *sizes]`` through :func:`kernel_transpose`."""
    sizes, transpose = kernel_transpose(patch, order)
    grouped = weight.reshape(weight.shape[0], *sizes)
    moved = _fresh(grouped.permute(0, *(1 + axis for axis in transpose)))
    return moved.view(weight.shape[0], *patch.kernel_shape)


def _to_linear(kernel: torch.Tensor, order: str, axes: str) -> torch.Tensor:
    """A kernel whose axes after the first are ``axes``, flattened in ``order``: ``[O, N]``."""
    flat = kernel.permute(0, *(1 + axes.index(axis) for axis in order))
    # explicit sizes: reshape(O, -1) is ambiguous for a kernel with no output rows
    return _fresh(flat.reshape(kernel.shape[0], math.prod(kernel.shape[1:])))


def flip_kernel(kernel: torch.Tensor) -> torch.Tensor:
    """``K[o, c, kh-1-i, kw-1-j]``: the kernel a convolving framework needs for ``K``.

    A framework that convolves (Theano, textbook convolution) reverses the
    kernel's spatial axes as it slides it; PyTorch, Keras 3 and ONNX
    cross-correlate and never do. Running the flipped kernel there computes
    what ``kernel`` computes here. Flipping twice gives ``kernel`` back.
    Every spatial axis is reversed, whatever the rank (``K[o, c, L-1-l]`` in 1-D).

    >>> import torch
    >>> flip_kernel(torch.arange(4.).reshape(1, 1, 2, 2))[0, 0].tolist()
    [[3.0, 2.0], [1.0, 0.0]]
    """
    return _flip_spatial(kernel)


# Keras stores a Dense kernel as [N, O] and a Conv2D kernel as [kh, kw, C, O]:
# the same elements as PyTorch's Linear weight [O, N] and Conv2d weight
# [O, C, kh, kw], only in another axis order.
_KERAS_CONV_FROM_OIHW = (2, 3, 1, 0)
_OIHW_FROM_KERAS_CONV = (3, 2, 0, 1)


def keras_dense_to_linear(kernel: torch.Tensor) -> torch.Tensor:
    """A Keras Dense kernel ``[N, O]`` as the Linear weight ``[O, N]`` (its transpose)."""
    _expect_dims(kernel, 2, "Keras Dense kernel [in, out]")
    return _fresh(kernel.T)


def linear_to_keras_dense(weight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`keras_dense_to_linear`: ``[O, N]`` back to ``[N, O]``."""
    _expect_dims(weight, 2, "Linear weight [out, in]")
    return _fresh(weight.T)


def keras_conv_to_oihw(kernel: torch.Tensor) -> torch.Tensor:
    """A Keras Conv2D kernel ``[kh, kw, C, O]`` as PyTorch's ``[O, C, kh, kw]``.

    >>> import torch
    >>> tuple(keras_conv_to_oihw(torch.zeros(3, 2, 5, 7)).shape)
    (7, 5, 3, 2)
    """
    _expect_dims(kernel, 4, "Keras Conv2D kernel [kh, kw, C, out]")
    return _fresh(kernel.permute(*_OIHW_FROM_KERAS_CONV))


def oihw_to_keras_conv(kernel: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`keras_conv_to_oihw`: ``[O, C, kh, kw]`` to ``[kh, kw, C, O]``."""
    _expect_dims(kernel, 4, "Conv2d weight [out, C, kh, kw]")
    return _fresh(kernel.permute(*_KERAS_CONV_FROM_OIHW))


def _expect_dims(tensor: torch.Tensor, dims: int, what: str) -> None:
    if tensor.dim() != dims:
        raise SpecError(f"a tensor of shape {tuple(tensor.shape)} is not a {what}")


def _fresh(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in new memory with canonical row-major strides.

    ``.contiguous()`` would return the input itself when the permutation is the
    identity (order ``chw``), so the result would alias the caller's weight, and
    it keeps odd strides on size-1 axes, which some conv kernels mishandle.
    """
    import torch

    out = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
    return out.copy_(tensor)


def unravel_index(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The row-major index of element number ``flat`` in a tensor of ``shape``.

    >>> unravel_index(7, (2, 4))
    (1, 3)
    """
    index = []
    for size in reversed(shape):
        flat, rest = divmod(flat, size)
        index.append(rest)
    return tuple(reversed(index))


def patch_of_kernel(kernel_shape: tuple[int, ...]) -> AnyPatch:
    """The patch a conv kernel of shape ``[O, C, *sizes]`` reads (a :class:`Patch` in 2-D)."""
    _, channels, *sizes = kernel_shape
    return plain(PatchNd(tuple(sizes), channels))


def moving_axes(patch: AnyPatch, order: str) -> str:
    """The axes of ``order`` longer than 1: orders agreeing on them are one permutation.

    Axes of length 1 add nothing to an index, and among the others the
    order fixes every stride; so two orders give the same permutation
    exactly when these agree. Computed from the patch alone: no index map
    is built, whatever size the patch declares.

    >>> moving_axes(Patch(1, 5, 3), "hcw"), moving_axes(Patch(1, 5, 3), "chw")
    ('cw', 'cw')
    """
    nd = as_nd(patch)
    sizes = dict(zip(order, nd.lengths(order), strict=True))
    return "".join(axis for axis in order if sizes[axis] > 1)


def same_permutation(patch: AnyPatch, first: str, second: str) -> bool:
    """Whether two orders give the same permutation of this patch (equal index maps)."""
    return moving_axes(patch, first) == moving_axes(patch, second)


def coinciding_orders(patch: AnyPatch, order: str) -> list[str]:
    """Every order whose permutation equals ``order``'s for this patch (itself included)."""
    ndim = as_nd(patch).ndim
    return [other for other in orders_for(ndim) if same_permutation(patch, other, order)]


def spatial_relabellings(patch: AnyPatch) -> list[dict[int, int]]:
    """The ways to rename the spatial axes among those of equal length (the identity aside).

    Reading a patch through one of them is a transpose of the window: each
    column keeps its neighbours, only the direction changes name (``h`` and
    ``w`` of a square patch). Translation tables for :meth:`str.translate`.

    >>> [t == str.maketrans("hw", "wh") for t in spatial_relabellings(Patch(3, 3, 2))]
    [True]
    >>> len(spatial_relabellings(PatchNd((2, 2, 2), 1))), spatial_relabellings(Patch(3, 4, 2))
    (5, [])
    """
    nd = as_nd(patch)
    axes = SPATIAL_AXES[nd.ndim]
    size = dict(zip(axes, nd.sizes, strict=True))
    tables = []
    for renamed in itertools.permutations(axes):
        if renamed != tuple(axes) and all(
            size[a] == size[b] for a, b in zip(axes, renamed, strict=True)
        ):
            tables.append(str.maketrans(axes, "".join(renamed)))
    return tables


def index_map_nd(patch: PatchNd, order: str) -> torch.Tensor:
    """``index_map_nd[c, *position]``: the Linear column that feeds each kernel tap.

    >>> index_map_nd(PatchNd((3,), 2), "lc").tolist()
    [[0, 2, 4], [1, 3, 5]]
    """
    order = parse_order_nd(order, patch.ndim)
    return _columns(patch.features, patch.lengths(order), order, kernel_axes(patch.ndim))


def linear_weight_to_conv_nd(
    weight: torch.Tensor, patch: AnyPatch, order: str, *, flip: bool = False
) -> torch.Tensor:
    """Rearrange a Linear weight ``[O, N]`` into the kernel ``[O, C, *patch.sizes]``.

    The 1-D and 3-D counterpart of :func:`linear_weight_to_conv` (which it
    equals for 2-D patches): a new tensor with the same element bits;
    ``flip`` reverses every spatial axis (see :func:`flip_kernel`).

    >>> import torch
    >>> linear_weight_to_conv_nd(torch.arange(6.).reshape(1, 6), PatchNd((3,), 2), "lc")[0]
    tensor([[0., 2., 4.],
            [1., 3., 5.]])
    """
    patch = as_nd(patch)
    order = parse_order_nd(order, patch.ndim)
    if weight.dim() != 2 or weight.shape[1] != patch.features:
        raise SpecError(
            f"weight of shape {tuple(weight.shape)} is not a Linear weight for the patch "
            f"{patch.describe()} (expected [out, {patch.features}])"
        )
    kernel = _to_kernel(weight, patch, order)
    return _flip_spatial(kernel) if flip else kernel


def conv_weight_to_linear_nd(
    kernel: torch.Tensor, order: str, *, flip: bool = False
) -> torch.Tensor:
    """Inverse of :func:`linear_weight_to_conv_nd`: ``[O, C, *sizes]`` back to ``[O, N]``."""
    if kernel.dim() not in (3, 4, 5):
        raise SpecError(
            f"kernel of shape {tuple(kernel.shape)} is not a Conv1d, Conv2d or Conv3d weight"
        )
    ndim = kernel.dim() - 2
    if flip:
        kernel = _flip_spatial(kernel)
    return _to_linear(kernel, parse_order_nd(order, ndim), kernel_axes(ndim))


# ------------------------------------------------------------- receptive fields


@dataclass(frozen=True)
class AxisField:
    """Where the cells of a feature map lie along one input axis.

    Cell ``i`` reads input positions ``[offset + i·stride, offset + i·stride + window)``;
    positions below 0 or past the input's end are padding.
    """

    offset: int = 0
    stride: int = 1
    window: int = 1


def through_layer(
    field: AxisField, kernel: int = 1, stride: int = 1, padding: int = 0, dilation: int = 1
) -> AxisField:
    """The field after a sliding window (conv, pool, pad) along this axis.

    ``padding`` is what the layer adds before position 0 (negative: it crops).
    Output cell ``i`` reads the layer's input cells ``i·s − p … i·s − p + (k−1)·d``.

    >>> through_layer(AxisField(), kernel=3, stride=2, padding=1)
    AxisField(offset=-1, stride=2, window=3)
    >>> through_layer(AxisField(-1, 2, 3), kernel=2, stride=2)
    AxisField(offset=-1, stride=4, window=5)
    """
    return AxisField(
        offset=field.offset - padding * field.stride,
        stride=field.stride * stride,
        window=field.window + (kernel - 1) * dilation * field.stride,
    )


def merge_fields(first: AxisField, second: AxisField) -> AxisField | None:
    """The field of a cell computed from both (``a + b``), or None if their strides differ.

    >>> merge_fields(AxisField(-1, 2, 3), AxisField(0, 2, 1))
    AxisField(offset=-1, stride=2, window=3)
    """
    if first.stride != second.stride:
        return None
    start = min(first.offset, second.offset)
    end = max(first.offset + first.window, second.offset + second.window)
    return AxisField(start, first.stride, end - start)


@dataclass(frozen=True)
class CellGeometry:
    """The input box of every cell of a dense map: one entry per input axis.

    ``offset`` is the input coordinate of the first corner of cell ``(0, 0)``'s
    receptive field (negative where padding reaches outside the input),
    ``stride`` the input distance between neighbouring cells, ``window`` the
    span of input that can change one cell.

    >>> cells = CellGeometry(offset=(-2, -2), stride=(4, 4), window=(12, 12))
    >>> cells.box(1, 2)
    ((2, 14), (6, 18))
    """

    offset: tuple[int, ...]
    stride: tuple[int, ...]
    window: tuple[int, ...]

    @classmethod
    def from_fields(cls, fields: tuple[AxisField, ...]) -> CellGeometry:
        return cls(
            tuple(f.offset for f in fields),
            tuple(f.stride for f in fields),
            tuple(f.window for f in fields),
        )

    @property
    def fields(self) -> tuple[AxisField, ...]:
        return tuple(map(AxisField, self.offset, self.stride, self.window))

    def box(self, *cell: int) -> tuple[tuple[int, int], ...]:
        """``(start, stop)`` along each input axis of the cell at index ``cell``."""
        if len(cell) != len(self.offset):
            raise SpecError(f"a cell of this map has {len(self.offset)} indices, got {cell}")
        return tuple(
            (o + i * s, o + i * s + w)
            for o, s, i, w in zip(self.offset, self.stride, cell, self.window, strict=True)
        )

    def to_dict(self) -> dict[str, list[int]]:
        return {
            "offset": list(self.offset),
            "stride": list(self.stride),
            "window": list(self.window),
        }
