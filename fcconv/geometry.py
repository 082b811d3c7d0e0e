"""Patch, order and stride specs, and the weight permutation both ways.

This module knows tensors and arithmetic only: no ``nn.Module``, no files.

A Linear weight ``W[O, N]`` that was fed patches flattened in ``order`` (the
axes ``c``, ``h``, ``w`` from slowest to fastest) is the conv kernel
``K[O, C, kh, kw]`` with ``K[o, c, i, j] = W[o, index_of(order, c, i, j)]``.
Both directions are a reshape and a permute: nothing is recomputed or cast.

The same holds in 1-D and 3-D (:class:`PatchNd`, ``K[O, C, l]`` and
``K[O, C, d, h, w]``), and :class:`AxisField` / :class:`CellGeometry` carry
the receptive-field arithmetic that says where each cell of a dense map lies
on the input.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fcconv.errors import SpecError

if TYPE_CHECKING:
    import torch

AXES = "chw"
"""The conv kernel's own axis order after the output axis: ``K[o, c, i, j]``."""

ORDERS: tuple[str, ...] = tuple("".join(p) for p in itertools.permutations(AXES))
"""All six flatten orders, the PyTorch default first: chw, cwh, hcw, hwc, wch, whc."""

DEFAULT_ORDER = "chw"

_SEP = r"\s*[xX×]\s*"
_INT = r"(\d+)"

MAX_NUMBER = (1 << 31) - 1
"""The largest side, channel count, stride or input size fcconv accepts in a spec."""

CANDIDATE_SIDE_LIMIT = 1 << 16
"""Patch sides tried when listing the patches that fit: the search stays bounded
(``O(limit)``) whatever ``in_features`` a file declares."""


def parse_order(text: str) -> str:
    """Validate a flatten order such as ``chw`` or ``hwc`` and return it lower-cased."""
    order = text.strip().lower()
    if order not in ORDERS:
        raise SpecError(
            f"malformed order {text!r}: expected a permutation of c, h, w ({', '.join(ORDERS)})"
        )
    return order


@dataclass(frozen=True)
class PatchSpec:
    """A patch as the user wrote it: ``HxWxC``, or ``HxW`` with C to be inferred."""

    height: int
    width: int
    channels: int | None = None

    def __str__(self) -> str:
        text = f"{self.height}x{self.width}"
        return text if self.channels is None else f"{text}x{self.channels}"


@dataclass(frozen=True)
class Patch:
    """A fully known patch: ``kh × kw`` pixels of ``C`` channels."""

    height: int
    width: int
    channels: int

    @property
    def features(self) -> int:
        """``N = C·kh·kw``, the Linear layer's ``in_features``."""
        return self.height * self.width * self.channels

    def sizes(self, order: str) -> tuple[int, ...]:
        """The patch's axis lengths in ``order``, e.g. ``(H, W, C)`` for ``hwc``."""
        lengths = {"c": self.channels, "h": self.height, "w": self.width}
        return tuple(lengths[axis] for axis in order)

    def __str__(self) -> str:
        return f"{self.height}x{self.width}x{self.channels}"


def parse_patch(text: str) -> PatchSpec:
    """Parse ``HxWxC`` (``20x20x10``) or ``HxW`` (``20x20``).

    >>> parse_patch("20x20x10")
    PatchSpec(height=20, width=20, channels=10)
    """
    match = re.fullmatch(rf"\s*{_INT}{_SEP}{_INT}(?:{_SEP}{_INT})?\s*", text)
    numbers = [_number(g, "patch", text) for g in match.groups() if g is not None] if match else []
    if not match or 0 in numbers:
        raise SpecError(
            f"malformed patch {_quoted(text)}: expected HxWxC (e.g. 20x20x10) or HxW "
            "(C inferred from in_features), with positive integers"
        )
    return PatchSpec(*numbers)


def _quoted(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:37] + "...")


def _number(digits: str, what: str, text: str) -> int:
    """A number of a spec, refused above :data:`MAX_NUMBER` before Python converts it."""
    if len(digits.lstrip("0")) > len(str(MAX_NUMBER)) or int(digits) > MAX_NUMBER:
        raise SpecError(
            f"malformed {what} {_quoted(text)}: {digits[:12]}{'...' if len(digits) > 12 else ''} "
            f"is too large (at most {MAX_NUMBER}); expected positive integers"
        )
    return int(digits)


def _parse_pair(text: str, what: str, example: str) -> tuple[int, int]:
    match = re.fullmatch(rf"\s*{_INT}(?:{_SEP}{_INT})?\s*", text)
    numbers = [_number(g, what, text) for g in match.groups() if g is not None] if match else []
    if not match or 0 in numbers:
        raise SpecError(
            f"malformed {what} {_quoted(text)}: expected two positive integers like {example}"
        )
    return numbers[0], numbers[-1]


def parse_stride(text: str) -> tuple[int, int]:
    """Parse a stride ``SHxSW`` (``20x20``); a single number means both."""
    return _parse_pair(text, "stride", "20x20")


def parse_size(text: str) -> tuple[int, int]:
    """Parse an input size ``HxW`` (``100x60``); a single number means both."""
    return _parse_pair(text, "input size", "100x60")


def candidate_patches(features: int, channels: int | None = None, limit: int = 6) -> list[Patch]:
    """Patches whose ``C·kh·kw`` equals ``features``, the most plausible first.

    With ``channels`` known, every ``kh × kw`` that fits, squarest first.
    Without it, the square patches (what classifiers are trained on), largest
    first, since a 1×1 patch of ``features`` channels always fits and tells
    the user nothing new. Sides above :data:`CANDIDATE_SIDE_LIMIT` are not
    searched, so the time is bounded whatever ``features`` is.

    >>> [str(p) for p in candidate_patches(4000, 10, limit=3)]
    ['20x20x10', '25x16x10', '16x25x10']
    """
    if channels is not None:
        if channels <= 0 or features % channels:
            return []
        area = features // channels
        pairs = []
        for height in range(1, min(math.isqrt(area), CANDIDATE_SIDE_LIMIT) + 1):
            if area % height == 0:
                pairs += {(height, area // height), (area // height, height)}
        pairs.sort(key=lambda hw: (abs(hw[0] - hw[1]), -hw[0]))
        return [Patch(h, w, channels) for h, w in pairs[:limit]]
    squares = [
        Patch(side, side, features // (side * side))
        for side in range(1, min(math.isqrt(max(features, 0)), CANDIDATE_SIDE_LIMIT) + 1)
        if features % (side * side) == 0
    ]
    return sorted(squares, key=lambda p: -p.height)[:limit]


def _describe(patches: list[Patch]) -> str:
    return ", ".join(str(p) for p in patches) if patches else "none"


def resolve_patch(spec: PatchSpec, in_features: int, layer: str = "layer") -> Patch:
    """Complete ``spec`` against the layer's ``in_features``, or explain the mismatch."""
    area = spec.height * spec.width
    if spec.channels is None:
        if in_features % area:
            raise SpecError(
                f"patch {spec} does not fit {layer}: in_features {in_features} is not "
                f"a multiple of {spec.height}·{spec.width} = {area}; patches that fit: "
                f"{_describe(candidate_patches(in_features))}",
                layer=layer,
            )
        return Patch(spec.height, spec.width, in_features // area)
    patch = Patch(spec.height, spec.width, spec.channels)
    if patch.features != in_features:
        fits = candidate_patches(in_features, spec.channels) or candidate_patches(in_features)
        raise SpecError(
            f"patch {spec} has {patch.features} elements but {layer} has in_features "
            f"{in_features}; patches that fit: {_describe(fits)}",
            layer=layer,
        )
    return patch


def index_map(patch: Patch, order: str) -> torch.Tensor:
    """``index_map[c, i, j]``: which Linear input column feeds kernel tap ``(c, i, j)``.

    Two orders are the same permutation for this patch exactly when their
    index maps are equal (e.g. every order when the patch is 1×1).
    """
    return _columns(patch.features, patch.sizes(order), order, AXES)


def linear_weight_to_conv(
    weight: torch.Tensor, patch: Patch, order: str, *, flip: bool = False
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
    """
    order = parse_order(order)
    if weight.dim() != 2 or weight.shape[1] != patch.features:
        raise SpecError(
            f"weight of shape {tuple(weight.shape)} is not a Linear weight for patch "
            f"{patch} (expected [out, {patch.features}])"
        )
    kernel = _to_kernel(weight, patch.sizes(order), order, AXES)
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


def _to_kernel(weight: torch.Tensor, sizes: tuple[int, ...], order: str, axes: str) -> torch.Tensor:
    """``[O, N]`` grouped as ``sizes`` (the patch's lengths in ``order``), permuted to ``axes``."""
    grouped = weight.reshape(weight.shape[0], *sizes)
    return _fresh(grouped.permute(0, *(1 + order.index(axis) for axis in axes)))


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

    >>> import torch
    >>> flip_kernel(torch.arange(4.).reshape(1, 1, 2, 2))[0, 0].tolist()
    [[3.0, 2.0], [1.0, 0.0]]
    """
    return _fresh(kernel.flip(2, 3))


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


def patch_of_kernel(kernel_shape: tuple[int, ...]) -> Patch:
    """The patch a conv kernel of shape ``[O, C, kh, kw]`` reads."""
    _, channels, height, width = kernel_shape
    return Patch(height, width, channels)


@dataclass(frozen=True)
class Grid:
    """Where the windows of a strided conv fall on an input of ``height × width``."""

    height: int
    width: int
    patch: Patch
    stride: tuple[int, int]

    @property
    def rows(self) -> int:
        """``H' = (H − kh) // sh + 1``."""
        return (self.height - self.patch.height) // self.stride[0] + 1

    @property
    def cols(self) -> int:
        """``W' = (W − kw) // sw + 1``."""
        return (self.width - self.patch.width) // self.stride[1] + 1

    @property
    def uncovered_rows(self) -> int:
        """Bottom rows of the input that no window reads."""
        return self.height - ((self.rows - 1) * self.stride[0] + self.patch.height)

    @property
    def uncovered_cols(self) -> int:
        """Right-hand columns of the input that no window reads."""
        return self.width - ((self.cols - 1) * self.stride[1] + self.patch.width)

    def window(self, row: int, col: int) -> tuple[slice, slice]:
        """The input rows and columns that output cell ``(row, col)`` sees."""
        top, left = row * self.stride[0], col * self.stride[1]
        return (
            slice(top, top + self.patch.height),
            slice(left, left + self.patch.width),
        )

    def warnings(self) -> list[str]:
        """Plain-words notes about input the windows leave out."""
        notes = []
        if self.uncovered_rows:
            notes.append(
                f"input height {self.height} leaves the last {self.uncovered_rows} "
                f"row(s) uncovered by {self.patch.height}-row windows at stride "
                f"{self.stride[0]}"
            )
        if self.uncovered_cols:
            notes.append(
                f"input width {self.width} leaves the last {self.uncovered_cols} "
                f"column(s) uncovered by {self.patch.width}-column windows at stride "
                f"{self.stride[1]}"
            )
        return notes


def make_grid(size: tuple[int, int], patch: Patch, stride: tuple[int, int] | None = None) -> Grid:
    """Lay windows of ``patch`` at ``stride`` (default: the patch size) over ``size``."""
    stride = stride or (patch.height, patch.width)
    if min(stride) < 1:
        raise SpecError(f"stride {stride[0]}x{stride[1]} must be positive, e.g. 1x1")
    height, width = size
    if height < patch.height or width < patch.width:
        raise SpecError(
            f"input {height}x{width} is smaller than one {patch.height}x{patch.width} "
            "patch; give an {input_size} at least as large as the patch"
        )
    return Grid(height, width, patch, stride)


def default_input(patch: Patch, stride: tuple[int, int]) -> tuple[int, int]:
    """The smallest input that yields a 2×2 grid of windows."""
    return (patch.height + stride[0], patch.width + stride[1])


def conv2d_line(patch: Patch, out_features: int, stride: tuple[int, int], bias: bool = True) -> str:
    """The ``nn.Conv2d(...)`` call that builds the module the new weights load into."""
    return (
        f"nn.Conv2d({patch.channels}, {out_features}, "
        f"kernel_size=({patch.height}, {patch.width}), stride={tuple(stride)}, "
        f"padding=0, bias={bias})"
    )


def moving_axes(patch: Patch, order: str) -> str:
    """The axes of ``order`` longer than 1: orders agreeing on them are one permutation.

    Axes of length 1 add nothing to an index, and among the others the
    order fixes every stride; so two orders give the same permutation
    exactly when these agree. Computed from the patch alone: no index map
    is built, whatever size the patch declares.

    >>> moving_axes(Patch(1, 5, 3), "hcw"), moving_axes(Patch(1, 5, 3), "chw")
    ('cw', 'cw')
    """
    sizes = dict(zip(AXES, patch.sizes(AXES), strict=True))
    return "".join(axis for axis in order if sizes[axis] > 1)


def same_permutation(patch: Patch, first: str, second: str) -> bool:
    """Whether two orders give the same permutation of this patch (equal index maps)."""
    return moving_axes(patch, first) == moving_axes(patch, second)


def coinciding_orders(patch: Patch, order: str) -> list[str]:
    """Every order whose permutation equals ``order``'s for this patch (itself included)."""
    return [other for other in ORDERS if same_permutation(patch, other, order)]


# ------------------------------------------------------------- 1-D, 2-D, 3-D

SPATIAL_AXES = {1: "l", 2: "hw", 3: "dhw"}
"""The letters of a patch's spatial axes by dimension, as PyTorch names them:
``[N, C, L]`` for Conv1d, ``[N, C, H, W]`` for Conv2d, ``[N, C, D, H, W]`` for Conv3d."""


def kernel_axes(ndim: int) -> str:
    """The conv kernel's axis order after the output axis: ``cl``, ``chw`` or ``cdhw``."""
    if ndim not in SPATIAL_AXES:
        raise SpecError(f"patches have 1, 2 or 3 spatial axes, not {ndim}")
    return "c" + SPATIAL_AXES[ndim]


def orders_for(ndim: int) -> tuple[str, ...]:
    """Every flatten order of an ``ndim``-D patch, PyTorch's first (``cl``/``chw``/``cdhw``)."""
    return tuple("".join(p) for p in itertools.permutations(kernel_axes(ndim)))


def parse_order_nd(text: str, ndim: int) -> str:
    """Validate a flatten order of an ``ndim``-D patch (``lc``, ``hwc``, ``dhwc``, ...).

    >>> parse_order_nd("LC", 1)
    'lc'
    """
    order = text.strip().lower()
    if order not in orders_for(ndim):
        raise SpecError(
            f"malformed order {text!r} for a {ndim}-D patch: expected a permutation of "
            f"{', '.join(kernel_axes(ndim))} (e.g. {kernel_axes(ndim)} or "
            f"{SPATIAL_AXES[ndim]}c)"
        )
    return order


@dataclass(frozen=True)
class PatchNd:
    """A patch of ``sizes`` (``(L,)``, ``(H, W)`` or ``(D, H, W)``) positions of ``channels``."""

    sizes: tuple[int, ...]
    channels: int

    @property
    def ndim(self) -> int:
        return len(self.sizes)

    @property
    def features(self) -> int:
        """``N = C·∏sizes``, the Linear layer's ``in_features``."""
        return self.channels * math.prod(self.sizes)

    def lengths(self, order: str) -> tuple[int, ...]:
        """The patch's axis lengths in ``order``, e.g. ``(L, C)`` for ``lc``."""
        lengths = dict(zip(SPATIAL_AXES[self.ndim], self.sizes, strict=True), c=self.channels)
        return tuple(lengths[axis] for axis in order)

    def to_patch(self) -> Patch:
        """The 2-D :class:`Patch` of a 2-D patch."""
        if self.ndim != 2:
            raise SpecError(f"patch {self} is {self.ndim}-D, not 2-D")
        return Patch(*self.sizes, self.channels)

    def describe(self) -> str:
        """``16 × 4 × 4 (C × H × W)``: the feature map a conv kernel of this patch covers."""
        numbers = " × ".join(str(n) for n in (self.channels, *self.sizes))
        return f"{numbers} ({' × '.join(kernel_axes(self.ndim).upper())})"

    def __str__(self) -> str:
        """``HxWxC`` for 2-D patches; ``l=4,c=16`` or ``d=2,h=3,w=3,c=8`` otherwise."""
        if self.ndim == 2:
            return str(Patch(*self.sizes, self.channels))
        letters = SPATIAL_AXES[self.ndim] + "c"
        return ",".join(f"{a}={n}" for a, n in zip(letters, self.lengths(letters), strict=True))


def index_map_nd(patch: PatchNd, order: str) -> torch.Tensor:
    """``index_map_nd[c, *position]``: the Linear column that feeds each kernel tap.

    >>> index_map_nd(PatchNd((3,), 2), "lc").tolist()
    [[0, 2, 4], [1, 3, 5]]
    """
    order = parse_order_nd(order, patch.ndim)
    return _columns(patch.features, patch.lengths(order), order, kernel_axes(patch.ndim))


def linear_weight_to_conv_nd(weight: torch.Tensor, patch: PatchNd, order: str) -> torch.Tensor:
    """Rearrange a Linear weight ``[O, N]`` into the kernel ``[O, C, *patch.sizes]``.

    The 1-D and 3-D counterpart of :func:`linear_weight_to_conv` (which it
    equals for 2-D patches): a new tensor with the same element bits.

    >>> import torch
    >>> linear_weight_to_conv_nd(torch.arange(6.).reshape(1, 6), PatchNd((3,), 2), "lc")[0]
    tensor([[0., 2., 4.],
            [1., 3., 5.]])
    """
    order = parse_order_nd(order, patch.ndim)
    if weight.dim() != 2 or weight.shape[1] != patch.features:
        raise SpecError(
            f"weight of shape {tuple(weight.shape)} is not a Linear weight for the patch "
            f"{patch.describe()} (expected [out, {patch.features}])"
        )
    return _to_kernel(weight, patch.lengths(order), order, kernel_axes(patch.ndim))


def conv_weight_to_linear_nd(kernel: torch.Tensor, order: str) -> torch.Tensor:
    """Inverse of :func:`linear_weight_to_conv_nd`: ``[O, C, *sizes]`` back to ``[O, N]``."""
    if kernel.dim() not in (3, 4, 5):
        raise SpecError(
            f"kernel of shape {tuple(kernel.shape)} is not a Conv1d, Conv2d or Conv3d weight"
        )
    ndim = kernel.dim() - 2
    return _to_linear(kernel, parse_order_nd(order, ndim), kernel_axes(ndim))


def parse_extent(text: str, what: str = "input size") -> tuple[int, ...]:
    """Parse ``T``, ``HxW`` or ``DxHxW``: one to three positive integers.

    >>> parse_extent("1024"), parse_extent("24x24"), parse_extent("8 x 32 x 32")
    ((1024,), (24, 24), (8, 32, 32))
    """
    match = re.fullmatch(rf"\s*{_INT}(?:{_SEP}{_INT})?(?:{_SEP}{_INT})?\s*", text)
    numbers = [int(g) for g in match.groups() if g is not None] if match else []
    if not match or 0 in numbers:
        raise SpecError(
            f"malformed {what} {text!r}: expected T, HxW or DxHxW with positive integers "
            "(e.g. 1024, 24x24, 8x32x32)"
        )
    return tuple(numbers)


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
