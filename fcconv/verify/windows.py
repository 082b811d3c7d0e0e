"""The functional check of SPEC §4: the conv against the Linear on every window, any rank.

On a random input, every cell of the conv output (``F.conv1d``, ``conv2d``
or ``conv3d`` with the converted kernel) is compared with "cut the window,
flatten it in ORDER, apply the Linear", computed here independently from the
*original* weight: the windows are cut with ``unfold`` along every spatial
axis, flattened in the order, and multiplied by the weight.

It runs on :func:`functional_rows` output channels: all of them in a layer of
up to ``FUNCTIONAL_ELEMENTS`` weight elements, else evenly spaced rows, the
first and last included. Every row goes through the same permutation, which
the exact check has proved element by element, so a subset of rows is enough
to prove that the permutation is the convolution's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fcconv import dtypes
from fcconv.errors import SpecError
from fcconv.patches import SPATIAL_AXES, AnyPatch, PatchNd, as_nd
from fcconv.threads import torch_threads
from fcconv.verify.judge import Comparison, compare, rounding_bound
from fcconv.windows import default_input, make_grid

if TYPE_CHECKING:
    import torch

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

_NATIVE_CONV = ("float64", "float32", "float16", "bfloat16")
"""Dtypes torch convolves on the CPU; others (float8) are judged in float64 only."""


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
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kernel: torch.Tensor,
    kernel_bias: torch.Tensor | None,
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
    the converted conv's (``[O, C, *sizes]`` of any rank). The reference never
    touches ``kernel``. By default the tensors hold every output row and the
    check compares :func:`functional_rows` of them; ``rows`` says which output
    rows they hold when they hold only some (read that way from disk). With
    ``flip`` the kernel is run as a framework that convolves runs it (every
    spatial axis reversed as it slides), which is how a flipped kernel is
    used. Cells whose reference is not finite (the weight holds NaN or ±inf)
    must be the same kind in the conv (NaN, +inf or −inf); the others are
    judged by the tolerances. A dtype torch cannot convolve (float8) is judged
    in float64, from the same upcast values.
    """
    import torch

    if rows is None:
        rows = functional_rows(kernel.shape[0], patch.features)
        if len(rows) < kernel.shape[0]:
            index = torch.tensor(rows, dtype=torch.long)
            weight, kernel = weight[index], kernel[index]
            bias = bias[index] if bias is not None else None
            kernel_bias = kernel_bias[index] if kernel_bias is not None else None
    with torch_threads(len(rows) * patch.features):
        check = _compare_on_windows(
            weight, bias, kernel, kernel_bias, as_nd(patch), order, stride, input_size, seed, flip
        )
    check.channels_checked = len(rows)
    return check


def _conv(
    x: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, ...]
) -> torch.Tensor:
    """``F.conv1d``, ``conv2d`` or ``conv3d``, as the kernel's rank says."""
    import torch.nn.functional as F

    convolve = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[kernel.dim()]
    return convolve(x, kernel, bias, stride=stride)


def _compare_on_windows(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kernel: torch.Tensor,
    kernel_bias: torch.Tensor | None,
    patch: PatchNd,
    order: str,
    stride: tuple[int, ...],
    input_size: tuple[int, ...] | None,
    seed: int,
    flip: bool,
) -> FunctionalCheck:
    import torch

    if flip:  # true convolution = cross-correlation with every spatial axis reversed
        kernel = kernel.flip(tuple(range(2, kernel.dim())))
    size = input_size or default_input(patch, stride)
    grid = make_grid(size, patch, stride)
    dtype_name = dtypes.name_of(kernel.dtype)
    notes = grid.warnings()
    if kernel.shape[0] == 0:
        notes.append("the layer has no outputs: there is nothing to compare")
        empty = compare([], [], "float64-sharp")
        return FunctionalCheck(tuple(size), grid.counts, grid.cells, dtype_name, empty, None, notes)
    check_work(patch, kernel.shape[0], stride, size)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, patch.channels, *size, generator=generator, dtype=torch.float64)
    x = x.to(kernel.dtype)  # the input the layer's dtype can hold exactly
    x64 = x.double()

    # float64 copies of the weight are made a block of output rows at a time, so
    # a VGG-sized layer is checked in ~100 MB instead of three 800 MB copies.
    vectors = window_vectors(x64, patch, order, stride)
    bias64, kernel_bias64 = _bias64(bias, weight), _bias64(kernel_bias, kernel)
    step = max(1, BLOCK_ELEMENTS // patch.features)
    blocks = []
    for rows in (slice(s, s + step) for s in range(0, kernel.shape[0], step)):
        reference, scale = _linear_on_windows(vectors, weight[rows].double(), bias64[rows])
        dense64 = _conv(x64, kernel[rows].double(), kernel_bias64[rows], stride)
        blocks.append((reference, scale, dense64))
    reference, scale, dense64 = (torch.cat(parts, dim=1) for parts in zip(*blocks, strict=True))
    float64 = compare(dense64, reference, "float64-sharp", scale=scale)
    if float64.nonfinite:
        notes.append(
            f"{float64.nonfinite} output value(s) are NaN or infinite (the weights hold such "
            f"values); {float64.nonfinite - float64.nonfinite_mismatches} of them match the "
            "reference in kind"
        )
    result = FunctionalCheck(tuple(size), grid.counts, grid.cells, dtype_name, float64, None, notes)
    if dtype_name not in _NATIVE_CONV:
        notes.append(
            f"torch cannot convolve {dtype_name} on this machine: judged in float64 from the "
            f"same {dtype_name} values, without the {dtype_name} rounding bound"
        )
        return result
    with _reliable_conv(kernel.dtype):
        dense = _conv(x, kernel, kernel_bias, stride)
    result.in_dtype = _judge_in_dtype(
        result, dense, reference, scale, torch.finfo(kernel.dtype), patch
    )
    return result


def _judge_in_dtype(
    result: FunctionalCheck,
    dense: torch.Tensor,
    reference: torch.Tensor,
    scale: torch.Tensor,
    info: Any,
    patch: PatchNd,
) -> Comparison | None:
    """The conv run in the layer's own dtype, against the rigorous rounding bound."""
    import torch

    rule = rounding_bound(info.eps, info.tiny, patch.features)
    if rule is None:
        result.notes.append(
            f"the rigorous {result.dtype} bound is vacuous for N={patch.features} "
            "(N·u ≥ 1); the float64 check is the judge"
        )
        return None
    finite = torch.isfinite(reference)
    # Where |W|·|x| + |b| exceeds the dtype's range the rounding bound says nothing.
    in_range = finite & (scale <= info.max)
    out_of_range = int((finite & ~in_range).sum())
    if out_of_range:
        result.notes.append(
            f"{out_of_range} output value(s) exceed the range of {result.dtype}; judged in "
            "float64 only"
        )
    # Non-finite values were judged by kind in float64; here only sizes count.
    got = torch.where(finite, dense.double(), reference)
    return compare(got, reference, rule, scale=scale, where=in_range)


@contextlib.contextmanager
def _reliable_conv(dtype: torch.dtype) -> Iterator[None]:
    """Run a bfloat16 conv on torch's native CPU path instead of oneDNN.

    oneDNN's bfloat16 conv on CPU (torch 2.13) returns wrong numbers for some
    small shapes with one output column (pytorch/pytorch#169688, #163347);
    the check judges fcconv's kernel, not that backend.
    """
    import torch

    if dtype != torch.bfloat16:
        yield
        return
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # flags() would warn about Intel GPUs
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def _bias64(bias: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    import torch

    if bias is None:
        return torch.zeros(weight.shape[0], dtype=torch.float64)
    return bias.double()


def window_vectors(
    x: torch.Tensor, patch: AnyPatch, order: str, stride: tuple[int, ...]
) -> torch.Tensor:
    """Every window of ``x`` ``[B, C, *size]`` flattened in ``order``: ``[B, *cells, N]``.

    Cut by ``unfold`` along each spatial axis, the window's axes put in
    ``order`` (``c`` and the spatial letters), then flattened.
    """
    nd = as_nd(patch)
    windows = x
    for axis, (k, s) in enumerate(zip(nd.sizes, stride, strict=True)):
        windows = windows.unfold(2 + axis, k, s)  # [B, C, *cells, *window]
    batch, cells = windows.shape[0], windows.shape[2 : 2 + nd.ndim]
    where = {"c": 1} | {a: 2 + nd.ndim + i for i, a in enumerate(SPATIAL_AXES[nd.ndim])}
    vectors = windows.permute(0, *range(2, 2 + nd.ndim), *(where[a] for a in order))
    return vectors.reshape(batch, *cells, nd.features)


def _linear_on_windows(
    vectors: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Linear on every window vector and the error scale |W||x|+|b|, as ``[B, O, *cells]``."""
    output = vectors @ weight.T + bias
    scale = vectors.abs() @ weight.abs().T + bias.abs()
    last = output.dim() - 1
    return output.movedim(last, 1), scale.movedim(last, 1)
