"""Patches of 1, 2 or 3 spatial axes: as users write them, and what fits a layer.

Pure arithmetic on specs, no tensors. How a patch is written:

| rank | positional | labelled (``c=`` may be left out: C inferred) |
|---|---|---|
| 1-D | ``T`` (C inferred) | ``l=16,c=64`` (``t=`` is an alias of ``l=``) |
| 2-D | ``HxW`` (C inferred), ``HxWxC`` | ``h=20,w=20,c=10`` |
| 3-D | ``DxHxWxC`` | ``d=2,h=3,w=3`` |

What a count of numbers cannot tell apart (``LxC`` is ``HxW``, ``DxHxW`` is
``HxWxC``) is written labelled; ``str`` of a 1-D or 3-D patch prints that form.
The weight permutation itself is :mod:`fcconv.geometry`'s.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

from fcconv.errors import SpecError

AXES = "chw"
"""The conv kernel's own axis order after the output axis: ``K[o, c, i, j]``."""

ORDERS: tuple[str, ...] = tuple("".join(p) for p in itertools.permutations(AXES))
"""All six flatten orders, the PyTorch default first: chw, cwh, hcw, hwc, wch, whc."""

DEFAULT_ORDER = "chw"

SPATIAL_AXES = {1: "l", 2: "hw", 3: "dhw"}
"""The letters of a patch's spatial axes by dimension, as PyTorch names them:
``[N, C, L]`` for Conv1d, ``[N, C, H, W]`` for Conv2d, ``[N, C, D, H, W]`` for Conv3d."""

_SEP = r"\s*[xX×]\s*"
_INT = r"(\d+)"

MAX_NUMBER = (1 << 31) - 1
"""The largest side, channel count, stride or input size fcconv accepts in a spec."""

CANDIDATE_SIDE_LIMIT = 1 << 16
"""Patch sides tried when listing the patches that fit: the search stays bounded
(``O(limit)``) whatever ``in_features`` a file declares."""

MAX_CANDIDATE_DEPTH = 64
"""The deepest 3-D patch listed when the channels are known (bounds the search)."""

PATCH_FORMS = (
    "expected HxWxC (e.g. 20x20x10) or HxW (C inferred from in_features), T for a 1-D "
    "patch (C inferred), DxHxWxC for a 3-D one, or labelled: l=16,c=64 or d=2,h=3,w=3 "
    "(c= left out: inferred); positive integers"
)


def kernel_axes(ndim: int) -> str:
    """The conv kernel's axis order after the output axis: ``cl``, ``chw`` or ``cdhw``."""
    if ndim not in SPATIAL_AXES:
        raise SpecError(f"patches have 1, 2 or 3 spatial axes, not {ndim}")
    return "c" + SPATIAL_AXES[ndim]


def orders_for(ndim: int) -> tuple[str, ...]:
    """Every flatten order of an ``ndim``-D patch, PyTorch's first (``cl``/``chw``/``cdhw``)."""
    return tuple("".join(p) for p in itertools.permutations(kernel_axes(ndim)))


def order_text(value: object) -> str:
    """An order given to the library as it must be: text; anything else is refused.

    >>> order_text(3)
    Traceback (most recent call last):
    ...
    fcconv.errors.SpecError: an order is text such as 'chw' or 'hwc', not int
    """
    if not isinstance(value, str):
        raise SpecError(f"an order is text such as 'chw' or 'hwc', not {type(value).__name__}")
    return value


def parse_order(text: str) -> str:
    """Validate a flatten order such as ``chw`` or ``hwc`` and return it lower-cased."""
    order = order_text(text).strip().lower()
    if order not in ORDERS:
        raise SpecError(
            f"malformed order {text!r}: expected a permutation of c, h, w ({', '.join(ORDERS)})"
        )
    return order


def parse_order_nd(text: str, ndim: int) -> str:
    """Validate a flatten order of an ``ndim``-D patch (``lc``, ``hwc``, ``dhwc``, ...).

    >>> parse_order_nd("LC", 1)
    'lc'
    """
    order = order_text(text).strip().lower()
    if order not in orders_for(ndim):
        raise SpecError(
            f"malformed order {text!r} for a {ndim}-D patch: expected a permutation of "
            f"{', '.join(kernel_axes(ndim))} (e.g. {kernel_axes(ndim)} or "
            f"{SPATIAL_AXES[ndim]}c)"
        )
    return order


def order_rank(text: str) -> int:
    """The rank whose patches ``text`` orders: ``cl`` 1, ``hwc`` 2, ``dhwc`` 3.

    >>> order_rank("hwc"), order_rank(" LC ")
    (2, 1)
    """
    order = text.strip().lower()
    for ndim in SPATIAL_AXES:
        if order in orders_for(ndim):
            return ndim
    raise SpecError(
        f"malformed order {text!r}: expected a permutation of c, h, w ({', '.join(ORDERS)}), "
        "of c, l for a 1-D patch (cl, lc) or of c, d, h, w for a 3-D one (cdhw, dhwc, ...)"
    )


# ------------------------------------------------------------------ patches


@dataclass(frozen=True)
class PatchSpec:
    """A 2-D patch as the user wrote it: ``HxWxC``, or ``HxW`` with C to be inferred."""

    height: int
    width: int
    channels: int | None = None

    def __str__(self) -> str:
        text = f"{self.height}x{self.width}"
        return text if self.channels is None else f"{text}x{self.channels}"


@dataclass(frozen=True)
class PatchSpecNd:
    """A 1-D or 3-D patch as the user wrote it: its spatial ``sizes``, and C if given."""

    sizes: tuple[int, ...]
    channels: int | None = None

    @property
    def ndim(self) -> int:
        return len(self.sizes)

    def __str__(self) -> str:
        """The labelled form: ``l=16`` or ``d=2,h=3,w=3,c=8``."""
        pairs = list(zip(SPATIAL_AXES[self.ndim], self.sizes, strict=True))
        if self.channels is not None:
            pairs.append(("c", self.channels))
        return ",".join(f"{axis}={n}" for axis, n in pairs)


@dataclass(frozen=True)
class Patch:
    """A fully known 2-D patch: ``kh × kw`` pixels of ``C`` channels."""

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

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The conv kernel's shape after its output axis: ``(C, *sizes)``."""
        return (self.channels, *self.sizes)

    @property
    def pointwise(self) -> bool:
        """Every spatial side is 1: the follower of a head (``fc7`` after ``fc6``)."""
        return all(size == 1 for size in self.sizes)

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


AnyPatch = Patch | PatchNd
"""A resolved patch: 2-D plans keep :class:`Patch`, 1-D and 3-D ones hold :class:`PatchNd`."""

AnySpec = PatchSpec | PatchSpecNd


def as_nd(patch: AnyPatch) -> PatchNd:
    """Any resolved patch as a :class:`PatchNd`, the form rank-independent code works on.

    >>> as_nd(Patch(20, 16, 10))
    PatchNd(sizes=(20, 16), channels=10)
    """
    if isinstance(patch, Patch):
        return PatchNd((patch.height, patch.width), patch.channels)
    return patch


def plain(patch: PatchNd) -> AnyPatch:
    """The inverse of :func:`as_nd`: a 2-D patch as :class:`Patch`, others as they are."""
    return patch.to_patch() if patch.ndim == 2 else patch


def rank_of(spec: AnySpec | AnyPatch) -> int:
    """How many spatial axes a patch or spec has."""
    return 2 if isinstance(spec, Patch | PatchSpec) else spec.ndim


# ------------------------------------------------------------------ parsing


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


def _numbers(text: str, most: int, what: str) -> list[int] | None:
    """``AxBx…`` with one to ``most`` numbers (zeros included), or None when it is not that."""
    match = re.fullmatch(rf"\s*{_INT}" + rf"(?:{_SEP}{_INT})?" * (most - 1) + r"\s*", text)
    if not match:
        return None
    return [_number(g, what, text) for g in match.groups() if g is not None]


_LABELS = {"l": "l", "t": "l", "d": "d", "h": "h", "w": "w", "c": "c"}
_LABELLED = re.compile(r"\s*([a-zA-Z])\s*=\s*(\d+)\s*")


def _labelled(text: str) -> AnySpec | None:
    """``l=16,c=64`` or ``d=2,h=3,w=3``: the axes named, C optional; None if malformed."""
    found: dict[str, int] = {}
    for part in text.split(","):
        match = _LABELLED.fullmatch(part)
        axis = _LABELS.get(match.group(1).lower()) if match else None
        if match is None or axis is None or axis in found:
            return None
        found[axis] = _number(match.group(2), "patch", text)
    channels = found.pop("c", None)
    ndim = next((n for n, axes in SPATIAL_AXES.items() if set(found) == set(axes)), None)
    if ndim is None or 0 in found.values() or channels == 0:
        return None
    sizes = tuple(found[axis] for axis in SPATIAL_AXES[ndim])
    return PatchSpec(*sizes, channels) if ndim == 2 else PatchSpecNd(sizes, channels)


def parse_patch_spec(text: str) -> AnySpec:
    """Parse a patch of any rank (see the module's table).

    >>> parse_patch_spec("20x20x10"), parse_patch_spec("16"), parse_patch_spec("t=16,c=64")
    (PatchSpec(height=20, width=20, channels=10), PatchSpecNd(sizes=(16,), channels=None), \
PatchSpecNd(sizes=(16,), channels=64))
    >>> parse_patch_spec("2x3x3x8"), parse_patch_spec("d=2, h=3, w=3")
    (PatchSpecNd(sizes=(2, 3, 3), channels=8), PatchSpecNd(sizes=(2, 3, 3), channels=None))
    """
    spec: AnySpec | None
    if "=" in text:
        spec = _labelled(text)
    else:
        numbers = _numbers(text, 4, "patch")
        spec = None
        if numbers and 0 not in numbers:
            if len(numbers) == 1:
                spec = PatchSpecNd((numbers[0],))
            elif len(numbers) == 4:
                spec = PatchSpecNd(tuple(numbers[:3]), numbers[3])
            else:
                spec = PatchSpec(*numbers)
    if spec is None:
        raise SpecError(f"malformed patch {_quoted(text)}: {PATCH_FORMS}")
    return spec


def spec_from(value: object) -> AnySpec:
    """A patch given in any form the library takes, as a spec.

    Text of any rank (``"8x8x16"``, ``"l=16,c=64"``); a spec; a resolved
    :class:`Patch` or :class:`PatchNd`; or the numbers of the text form as a
    tuple or list (``(8, 8, 16)`` is ``8x8x16``, ``(8, 8)`` is ``8x8`` with C
    inferred, ``(16,)`` a length, four numbers ``DxHxWxC``).

    >>> spec_from((8, 8, 16)), spec_from(Patch(8, 8, 16)), spec_from([16])
    (PatchSpec(height=8, width=8, channels=16), PatchSpec(height=8, width=8, channels=16), \
PatchSpecNd(sizes=(16,), channels=None))

    Raises:
        SpecError: anything else (a number, a float, a tensor).
    """
    if isinstance(value, PatchSpec | PatchSpecNd):
        return value
    if isinstance(value, str):
        return parse_patch_spec(value)
    if isinstance(value, Patch | PatchNd):
        nd = as_nd(value)
        return (
            PatchSpec(*nd.sizes, nd.channels)
            if nd.ndim == 2
            else PatchSpecNd(nd.sizes, nd.channels)
        )
    if isinstance(value, tuple | list) and all(
        isinstance(n, int) and not isinstance(n, bool) for n in value
    ):
        return parse_patch_spec("x".join(map(str, value)))
    raise SpecError(
        f'a patch is text ("8x8x16", "l=16,c=64"), a Patch, or a tuple of ints '
        f"((8, 8, 16)), not {type(value).__name__} {_quoted(repr(value))}"
    )


def parse_patch(text: str) -> PatchSpec:
    """Parse a 2-D patch: ``HxWxC`` (``20x20x10``) or ``HxW`` (``20x20``).

    >>> parse_patch("20x20x10")
    PatchSpec(height=20, width=20, channels=10)
    """
    spec = parse_patch_spec(text)
    if not isinstance(spec, PatchSpec):
        raise SpecError(
            f"malformed patch {_quoted(text)}: expected a 2-D patch, HxWxC (e.g. 20x20x10) or "
            "HxW (C inferred from in_features); this one is "
            f"{spec.ndim}-D"
        )
    return spec


def _parse_pair(text: str, what: str, example: str) -> tuple[int, int]:
    numbers = _numbers(text, 2, what)
    if not numbers or 0 in numbers:
        raise SpecError(
            f"malformed {what} {_quoted(text)}: expected two positive integers like {example}"
        )
    return numbers[0], numbers[-1]


def parse_stride(text: str) -> tuple[int, int]:
    """Parse a 2-D stride ``SHxSW`` (``20x20``); a single number means both."""
    return _parse_pair(text, "stride", "20x20")


def parse_size(text: str) -> tuple[int, int]:
    """Parse a 2-D input size ``HxW`` (``100x60``); a single number means both."""
    return _parse_pair(text, "input size", "100x60")


_EXPECTED = {
    "input size": "T, HxW or DxHxW with positive integers (e.g. 1024, 24x24, 8x32x32)",
    "stride": "one positive integer for every axis or one per axis (e.g. 4, 2x2, 1x2x2)",
}


def parse_extent(text: str, what: str = "input size") -> tuple[int, ...]:
    """Parse ``T``, ``HxW`` or ``DxHxW``: one to three positive integers.

    >>> parse_extent("1024"), parse_extent("24x24"), parse_extent("8 x 32 x 32")
    ((1024,), (24, 24), (8, 32, 32))
    """
    numbers = _numbers(text, 3, what)
    if not numbers or 0 in numbers:
        expected = _EXPECTED.get(what, _EXPECTED["input size"])
        raise SpecError(f"malformed {what} {_quoted(text)}: expected {expected}")
    return tuple(numbers)


_EXTENT_FORMS = {1: "T (e.g. 1024)", 2: "HxW (e.g. 100x60)", 3: "DxHxW (e.g. 8x32x32)"}


def fit_extent(
    extent: tuple[int, ...], ndim: int, what: str = "input size", layer: str | None = None
) -> tuple[int, ...]:
    """``extent`` for an ``ndim``-D patch: one number stands for every axis.

    >>> fit_extent((20,), 2), fit_extent((4, 2, 2), 3)
    ((20, 20), (4, 2, 2))
    """
    if len(extent) == 1:
        return extent * ndim
    if len(extent) != ndim:
        whose = f"the patch of {layer}" if layer else "the patch"
        form = _EXTENT_FORMS[ndim] if what == "input size" else "S, or one number per axis"
        raise SpecError(
            f"{what} {'x'.join(map(str, extent))} has {len(extent)} numbers, but {whose} is "
            f"{ndim}-D; give {form}",
            layer=layer,
        )
    return extent


# ------------------------------------------------------------- what fits


def _divisor_pairs(area: int) -> list[tuple[int, int]]:
    """Every ``(a, area // a)`` with a side at most :data:`CANDIDATE_SIDE_LIMIT` searched."""
    pairs: set[tuple[int, int]] = set()
    for side in range(1, min(math.isqrt(max(area, 0)), CANDIDATE_SIDE_LIMIT) + 1):
        if area % side == 0:
            pairs |= {(side, area // side), (area // side, side)}
    return list(pairs)


def candidate_patches(features: int, channels: int | None = None, limit: int = 6) -> list[Patch]:
    """2-D patches whose ``C·kh·kw`` equals ``features``, the most plausible first.

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
        pairs = _divisor_pairs(features // channels)
        pairs.sort(key=lambda hw: (abs(hw[0] - hw[1]), -hw[0]))
        return [Patch(h, w, channels) for h, w in pairs[:limit]]
    squares = [
        Patch(side, side, features // (side * side))
        for side in range(1, min(math.isqrt(max(features, 0)), CANDIDATE_SIDE_LIMIT) + 1)
        if features % (side * side) == 0
    ]
    return sorted(squares, key=lambda p: -p.height)[:limit]


def candidate_patches_nd(
    features: int, ndim: int, channels: int | None = None, limit: int = 6
) -> list[AnyPatch]:
    """Patches of ``ndim`` spatial axes whose elements number ``features``.

    2-D: :func:`candidate_patches`. 1-D: every length that fits (one with
    ``channels``), longest first. 3-D without ``channels``: the cubes, largest
    first; with it, every ``D × H × W`` up to :data:`MAX_CANDIDATE_DEPTH`
    deep, squarest frames first, then larger frames. Bounded in time like
    :func:`candidate_patches`.

    >>> [str(p) for p in candidate_patches_nd(96, 1, limit=3)]
    ['l=96,c=1', 'l=48,c=2', 'l=32,c=3']
    >>> [str(p) for p in candidate_patches_nd(144, 3, channels=8, limit=2)]
    ['d=2,h=3,w=3,c=8', 'd=18,h=1,w=1,c=8']
    """
    if ndim == 2:
        return list(candidate_patches(features, channels, limit))
    kernel_axes(ndim)
    if channels is not None and (channels <= 0 or features % channels):
        return []
    if ndim == 1:
        lengths = sorted({a for pair in _divisor_pairs(features) for a in pair}, reverse=True)
        if channels is not None:
            lengths = [features // channels]
        return [PatchNd((n,), features // n) for n in lengths[:limit]]
    if channels is None:
        cubes = [
            side
            for side in range(1, min(round(features ** (1 / 3)) + 1, CANDIDATE_SIDE_LIMIT) + 1)
            if features % side**3 == 0
        ]
        return [PatchNd((s, s, s), features // s**3) for s in sorted(cubes, reverse=True)[:limit]]
    area = features // channels
    found = [
        (depth, h, w)
        for depth in range(1, min(area, MAX_CANDIDATE_DEPTH) + 1)
        if area % depth == 0
        for h, w in _divisor_pairs(area // depth)
    ]
    found.sort(key=lambda dhw: (abs(dhw[1] - dhw[2]), -dhw[1] * dhw[2], dhw[0], -dhw[1]))
    return [PatchNd(dhw, channels) for dhw in found[:limit]]


def _describe(patches: list[AnyPatch]) -> str:
    return ", ".join(str(p) for p in patches) if patches else "none"


def resolve_patch(spec: AnySpec, in_features: int, layer: str = "layer") -> AnyPatch:
    """Complete ``spec`` against the layer's ``in_features``, or explain the mismatch.

    A 2-D spec gives a :class:`Patch`, a 1-D or 3-D one a :class:`PatchNd`.
    """
    if isinstance(spec, PatchSpecNd):
        return _resolve_nd(spec, in_features, layer)
    area = spec.height * spec.width
    if spec.channels is None:
        if in_features % area:
            raise SpecError(
                f"patch {spec} does not fit {layer}: in_features {in_features} is not "
                f"a multiple of {spec.height}·{spec.width} = {area}; patches that fit: "
                f"{_describe(list(candidate_patches(in_features)))}",
                layer=layer,
            )
        return Patch(spec.height, spec.width, in_features // area)
    patch = Patch(spec.height, spec.width, spec.channels)
    if patch.features != in_features:
        fits = candidate_patches(in_features, spec.channels) or candidate_patches(in_features)
        raise SpecError(
            f"patch {spec} has {patch.features} elements but {layer} has in_features "
            f"{in_features}; patches that fit: {_describe(list(fits))}",
            layer=layer,
        )
    return patch


def _resolve_nd(spec: PatchSpecNd, in_features: int, layer: str) -> PatchNd:
    area = math.prod(spec.sizes)
    fits = candidate_patches_nd(in_features, spec.ndim, spec.channels)
    fits = fits or candidate_patches_nd(in_features, spec.ndim)
    if spec.channels is None:
        if in_features % area:
            raise SpecError(
                f"patch {spec} does not fit {layer}: in_features {in_features} is not "
                f"a multiple of {'·'.join(map(str, spec.sizes))} = {area}; {spec.ndim}-D "
                f"patches that fit: {_describe(fits)}",
                layer=layer,
            )
        return PatchNd(spec.sizes, in_features // area)
    patch = PatchNd(spec.sizes, spec.channels)
    if patch.features != in_features:
        raise SpecError(
            f"patch {spec} has {patch.features} elements but {layer} has in_features "
            f"{in_features}; {spec.ndim}-D patches that fit: {_describe(fits)}",
            layer=layer,
        )
    return patch
