"""The functional check of SPEC §4: the conv against the Linear on every window, any rank.

On a random input, every cell of the conv output (the converted kernel
slid over the input in its own ``[C, *sizes]`` layout) is compared with "cut
the window, flatten it in ORDER, apply the Linear", computed here
independently from the *original* weight: the windows are cut along every
spatial axis, flattened in the order, and multiplied by the weight. Both run
in numpy in float64 (bfloat16 and float8 widened exactly through
``ml_dtypes``), so a verified safetensors conversion never imports torch.

It runs on :func:`functional_rows` output channels: all of them in a layer of
up to ``FUNCTIONAL_ELEMENTS`` weight elements, else evenly spaced rows, the
first and last included. Every row goes through the same permutation, which
the exact check has proved element by element, so a subset of rows is enough
to prove that the permutation is the convolution's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fcconv.errors import SpecError
from fcconv.patches import SPATIAL_AXES, AnyPatch, PatchNd, as_nd
from fcconv.verify.arrays import as_array
from fcconv.verify.judge import Comparison, compare, rounding_bound
from fcconv.windows import default_input, make_grid

if TYPE_CHECKING:
    import numpy as np

BLOCK_ELEMENTS = 1 << 24
"""Weight elements converted to float64 at a time by the functional check (128 MB)."""

FUNCTIONAL_ELEMENTS = 1 << 22
"""Weight elements the functional check reads at most (whole rows; at least two rows).

VGG-16's fc6 (4096 × 25088) is checked on 167 evenly spaced output channels.
"""

MAX_CHECK_ELEMENTS = 1 << 24
"""The most elements the functional check holds in one float64 tensor (128 MB): the
input, the window vectors, or one map of the output."""

MAX_CHECK_MACS = 1 << 33
"""The most multiply-adds one pass of the functional check may take (a few seconds)."""

_IN_DTYPE = ("float64", "float32", "float16", "bfloat16")
"""Dtypes the conv is also run in and judged against the rounding bound; float8 is judged
in float64 only."""


@dataclass
class FunctionalCheck:
    """Conv output vs. Linear-on-every-window, on one random input.

    ``input_size`` and ``output_grid`` have one number per spatial axis
    (``[H, W]`` for a 2-D layer, ``[T]`` for a 1-D one). ``float64`` is the
    sharp judge (rule ``float64-sharp``); ``in_dtype`` the conv run in the
    layer's own dtype against the rounding bound (rule ``rounding-bound``),
    None when it could not run (float8) or the bound is vacuous (N·u ≥ 1).
    """

    input_size: tuple[int, ...]
    output_grid: tuple[int, ...]
    cells: int
    dtype: str
    float64: Comparison
    in_dtype: Comparison | None = None
    notes: list[str] = field(default_factory=list)
    channels_checked: int | None = None  # output channels compared (see functional_rows)

    @property
    def passed(self) -> bool:
        """The float64 judge passed, and the dtype's bound where it could judge."""
        in_dtype = self.in_dtype
        return self.float64.passed and (in_dtype is None or not in_dtype.judged or in_dtype.passed)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": list(self.input_size),
            "output_grid": list(self.output_grid),
            "cells": self.cells,
            "channels_checked": self.channels_checked,
            "dtype": self.dtype,
            "passed": self.passed,
            "float64": self.float64.to_dict(),
            "in_dtype": None if self.in_dtype is None else self.in_dtype.to_dict(),
            "notes": list(self.notes),
        }


def check_work(
    patch: AnyPatch,
    out_features: int,
    stride: tuple[int, ...],
    input_size: tuple[int, ...] | None,
    layer: str = "layer",
    skippable: bool = False,
) -> None:
    """Refuse a functional check too large to run, before anything is allocated.

    The check holds the input, every window's vector and a few maps of the
    output in float64, and computes ``out_features · cells · N`` products
    several times: each is bounded (:data:`MAX_CHECK_ELEMENTS`,
    :data:`MAX_CHECK_MACS`), so no input size, stride or declared shape can
    make it run for hours or exhaust memory, whatever the rank.

    Raises:
        SpecError: naming the sizes and what to change.
    """
    if out_features == 0:
        return  # nothing to compare, nothing is allocated
    size = input_size or default_input(patch, stride)
    grid = make_grid(size, patch, stride)
    cells = grid.cells
    measures = (
        ("input values", patch.channels * math.prod(size), MAX_CHECK_ELEMENTS),
        ("window values", cells * patch.features, MAX_CHECK_ELEMENTS),
        ("output values", cells * out_features, MAX_CHECK_ELEMENTS),
        ("products", cells * patch.features * out_features, MAX_CHECK_MACS),
    )
    over = [(what, count, limit) for what, count, limit in measures if count > limit]
    if not over:
        return
    what, count, limit = over[0]
    skip = " or skip the checks with {no_verify}" if skippable else ""
    raise SpecError(
        f"the functional check of {layer} on a {_x(size)} input ({cells} windows at "
        f"stride {_x(stride)}) is too large to run: {count:.3g} {what}, at most "
        f"{limit:.3g}; give a smaller {{input_size}} or {{stride}}{skip}",
        layer=layer,
    )


def _x(numbers: Sequence[int]) -> str:
    return "x".join(map(str, numbers))


def functional_rows(out_features: int, in_features: int) -> list[int]:
    """The output rows the functional check compares: all, or evenly spaced ones.

    Every row of a layer of at most ``FUNCTIONAL_ELEMENTS`` weight elements;
    else as many rows as that budget holds (at least 2), evenly spaced, the
    first and the last included.

    >>> functional_rows(5, 100)
    [0, 1, 2, 3, 4]
    >>> len(functional_rows(4096, 25088)), functional_rows(4096, 25088)[-1]
    (167, 4095)
    """
    count = max(2, FUNCTIONAL_ELEMENTS // max(1, in_features))
    if out_features <= count:
        return list(range(out_features))
    step = (out_features - 1) / (count - 1)
    return sorted({round(k * step) for k in range(count)})


def functional_check(
    weight: Any,
    bias: Any | None,
    kernel: Any,
    kernel_bias: Any | None,
    patch: AnyPatch,
    order: str,
    stride: tuple[int, ...],
    input_size: tuple[int, ...] | None = None,
    seed: int = 0,
    *,
    rows: Sequence[int] | None = None,
    flip: bool = False,
) -> FunctionalCheck:
    """Compare the conv with the Linear applied to every window of a random input.

    ``weight``/``bias`` are the original Linear's; ``kernel``/``kernel_bias``
    the converted conv's (``[O, C, *sizes]`` of any rank), as numpy arrays
    (bfloat16 and float8 as ``ml_dtypes``) or torch tensors. Everything runs
    in numpy: torch is never imported for it. The reference never touches
    ``kernel``: it cuts each window, flattens it in ``order`` and applies the
    Linear; the conv slides the kernel over the input in its own ``[C, *sizes]``
    layout, with no order at all. By default the tensors hold every output row
    and the check compares :func:`functional_rows` of them; ``rows`` says
    which output rows they hold when they hold only some (read that way from
    disk). With ``flip`` the kernel is run as a framework that convolves runs
    it (every spatial axis reversed as it slides). Cells whose reference is
    not finite (the weight holds NaN or ±inf) must be the same kind in the
    conv (NaN, +inf or −inf); the others are judged by the tolerances.
    """
    weight, kernel = as_array(weight), as_array(kernel)
    bias = None if bias is None else as_array(bias)
    kernel_bias = None if kernel_bias is None else as_array(kernel_bias)
    if rows is None:
        rows = functional_rows(kernel.shape[0], patch.features)
        if len(rows) < kernel.shape[0]:
            weight, kernel = weight[rows], kernel[rows]
            bias = bias[rows] if bias is not None else None
            kernel_bias = kernel_bias[rows] if kernel_bias is not None else None
    check = _compare_on_windows(
        weight, bias, kernel, kernel_bias, as_nd(patch), order, stride, input_size, seed, flip
    )
    check.channels_checked = len(rows)
    return check


def random_input(channels: int, size: Sequence[int], dtype: np.dtype, seed: int) -> np.ndarray:
    """A standard normal input ``[1, C, *size]``, rounded to ``dtype`` (so it holds it exactly)."""
    import numpy as np

    generator = np.random.default_rng(seed % (1 << 64))
    x = generator.standard_normal((1, channels, *size))
    return x.astype(dtype).astype(np.float64) if dtype != np.float64 else x


def conv(
    x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None, stride: tuple[int, ...]
) -> np.ndarray:
    """Cross-correlation of ``x`` ``[B, C, *size]`` with ``kernel`` ``[O, C, *k]``.

    The kernel in its own layout against each window of the input in the
    same layout (no flatten order), computed in the arrays' dtype; the
    output is ``[B, O, *cells]``.
    """
    import numpy as np

    ndim = kernel.ndim - 2
    windows = _windows(x, kernel.shape[2:], stride)  # [B, C, *cells, *k]
    cells = windows.shape[2 : 2 + ndim]
    moved = np.moveaxis(windows, 1, 1 + ndim)  # [B, *cells, C, *k]
    flat = moved.reshape(x.shape[0], *cells, -1)
    out = flat @ kernel.reshape(kernel.shape[0], -1).T
    if bias is not None:
        out = out + bias
    return np.moveaxis(out, -1, 1)


def _windows(x: np.ndarray, sizes: Sequence[int], stride: Sequence[int]) -> np.ndarray:
    """Every window of ``x`` ``[B, C, *size]`` at ``stride``: a view ``[B, C, *cells, *sizes]``."""
    from numpy.lib.stride_tricks import sliding_window_view

    ndim = len(sizes)
    axes = tuple(range(2, 2 + ndim))
    view = sliding_window_view(x, tuple(sizes), axis=axes)
    return view[(slice(None), slice(None), *(slice(None, None, s) for s in stride))]


def _compare_on_windows(
    weight: np.ndarray,
    bias: np.ndarray | None,
    kernel: np.ndarray,
    kernel_bias: np.ndarray | None,
    patch: PatchNd,
    order: str,
    stride: tuple[int, ...],
    input_size: tuple[int, ...] | None,
    seed: int,
    flip: bool,
) -> FunctionalCheck:
    import numpy as np

    if flip:  # true convolution = cross-correlation with every spatial axis reversed
        kernel = np.flip(kernel, tuple(range(2, kernel.ndim)))
    size = input_size or default_input(patch, stride)
    grid = make_grid(size, patch, stride)
    dtype_name = str(kernel.dtype)
    notes = grid.warnings()
    if kernel.shape[0] == 0:
        notes.append("the layer has no outputs: there is nothing to compare")
        empty = compare([], [], "float64-sharp")
        return FunctionalCheck(tuple(size), grid.counts, grid.cells, dtype_name, empty, None, notes)
    check_work(patch, kernel.shape[0], stride, size)
    x64 = random_input(patch.channels, size, kernel.dtype, seed)

    # float64 copies of the weight are made a block of output rows at a time, so
    # a VGG-sized layer is checked in ~100 MB instead of three 800 MB copies.
    vectors = window_vectors(x64, patch, order, stride)
    bias64, kernel_bias64 = _bias64(bias, weight), _bias64(kernel_bias, kernel)
    step = max(1, BLOCK_ELEMENTS // patch.features)
    blocks = []
    with np.errstate(all="ignore"):  # NaN/inf weights are judged by kind
        for rows in (slice(s, s + step) for s in range(0, kernel.shape[0], step)):
            reference, scale = _linear_on_windows(
                vectors, weight[rows].astype(np.float64), bias64[rows]
            )
            dense64 = conv(x64, kernel[rows].astype(np.float64), kernel_bias64[rows], stride)
            blocks.append((reference, scale, dense64))
    reference, scale, dense64 = (
        np.concatenate(parts, axis=1) for parts in zip(*blocks, strict=True)
    )
    float64 = compare(dense64, reference, "float64-sharp", scale=scale)
    if float64.nonfinite:
        notes.append(
            f"{float64.nonfinite} output value(s) are NaN or infinite (the weights hold such "
            f"values); {float64.nonfinite - float64.nonfinite_mismatches} of them match the "
            "reference in kind"
        )
    result = FunctionalCheck(tuple(size), grid.counts, grid.cells, dtype_name, float64, None, notes)
    if dtype_name not in _IN_DTYPE:
        notes.append(
            f"{dtype_name} is judged in float64 from the same {dtype_name} values, without "
            f"the {dtype_name} rounding bound"
        )
        return result
    with np.errstate(all="ignore"):
        dense = conv(x64.astype(kernel.dtype), kernel, kernel_bias, stride)
        dense = dense.astype(kernel.dtype)  # bfloat16 products accumulate in float32
    result.in_dtype = _judge_in_dtype(result, dense, reference, scale, _finfo(kernel.dtype), patch)
    return result


def _finfo(dtype: np.dtype) -> Any:
    import numpy as np

    if dtype.name in ("float16", "float32", "float64"):
        return np.finfo(dtype)
    import ml_dtypes

    return ml_dtypes.finfo(dtype)


def _judge_in_dtype(
    result: FunctionalCheck,
    dense: np.ndarray,
    reference: np.ndarray,
    scale: np.ndarray,
    info: Any,
    patch: PatchNd,
) -> Comparison | None:
    """The conv run in the layer's own dtype, against the rigorous rounding bound."""
    import numpy as np

    rule = rounding_bound(float(info.eps), float(info.tiny), patch.features)
    if rule is None:
        result.notes.append(
            f"the rigorous {result.dtype} bound is vacuous for N={patch.features} "
            "(N·u ≥ 1); the float64 check is the judge"
        )
        return None
    finite = np.isfinite(reference)
    # Where |W|·|x| + |b| exceeds the dtype's range the rounding bound says nothing.
    in_range = finite & (scale <= float(info.max))
    out_of_range = int(np.count_nonzero(finite & ~in_range))
    if out_of_range:
        result.notes.append(
            f"{out_of_range} output value(s) exceed the range of {result.dtype}; judged in "
            "float64 only"
        )
    # Non-finite values were judged by kind in float64; here only sizes count.
    got = np.where(finite, dense.astype(np.float64), reference)
    return compare(got, reference, rule, scale=scale, where=in_range)


def _bias64(bias: np.ndarray | None, weight: np.ndarray) -> np.ndarray:
    import numpy as np

    if bias is None:
        return np.zeros(weight.shape[0], dtype=np.float64)
    return bias.astype(np.float64)


def window_vectors(x: Any, patch: AnyPatch, order: str, stride: tuple[int, ...]) -> np.ndarray:
    """Every window of ``x`` ``[B, C, *size]`` flattened in ``order``: ``[B, *cells, N]``.

    Cut along each spatial axis, the window's axes put in ``order`` (``c``
    and the spatial letters), then flattened.
    """
    nd = as_nd(patch)
    windows = _windows(as_array(x), nd.sizes, stride)  # [B, C, *cells, *window]
    batch, cells = windows.shape[0], windows.shape[2 : 2 + nd.ndim]
    where = {"c": 1} | {a: 2 + nd.ndim + i for i, a in enumerate(SPATIAL_AXES[nd.ndim])}
    vectors = windows.transpose(0, *range(2, 2 + nd.ndim), *(where[a] for a in order))
    return vectors.reshape(batch, *cells, nd.features)


def _linear_on_windows(
    vectors: np.ndarray, weight: np.ndarray, bias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The Linear on every window vector and the error scale |W||x|+|b|, as ``[B, O, *cells]``."""
    import numpy as np

    output = vectors @ weight.T + bias
    scale = np.abs(vectors) @ np.abs(weight).T + np.abs(bias)
    return np.moveaxis(output, -1, 1), np.moveaxis(scale, -1, 1)
