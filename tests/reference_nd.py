"""An independent reference for the one equation in 1-D, 2-D and 3-D (SPEC §1 in N-D).

Nothing here calls fcconv. A window is cut out of the input by slicing, its
elements are read one by one in the flatten order (the slowest axis first,
exactly as ``itertools.product`` enumerates them), and the Linear layer is
applied to that vector, one output cell at a time, in float64. The kernel a
conversion must produce is built tap by tap from the mixed-radix column
number. Slow and obvious, for small shapes.

    >>> import torch
    >>> x = torch.arange(6.0).reshape(1, 2, 3)  # C=2, L=3: one window of 3
    >>> linear_on_every_window_nd(x, torch.eye(6), None, (3,), (3,), "lc").flatten().tolist()
    [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
"""

from __future__ import annotations

import itertools
import math

import torch

SPATIAL = {1: "l", 2: "hw", 3: "dhw"}


def axes_of(ndim: int) -> str:
    """The kernel's axes after the output axis: ``cl``, ``chw``, ``cdhw``."""
    return "c" + SPATIAL[ndim]


def column_of(order: str, lengths: dict[str, int], coordinate: dict[str, int]) -> int:
    """The Linear column of a patch element: each axis's stride is the product of
    the lengths of the axes after it in ``order``.

    >>> column_of("lc", {"c": 2, "l": 3}, {"c": 1, "l": 2})  # l·C + c
    5
    """
    return sum(
        coordinate[axis] * math.prod(lengths[a] for a in order[position + 1 :])
        for position, axis in enumerate(order)
    )


def kernel_by_definition(
    weight: torch.Tensor, channels: int, sizes: tuple[int, ...], order: str, flip: bool = False
) -> torch.Tensor:
    """``K[o, c, *p] = W[o, column(c, *p)]``, tap by tap; ``flip`` reverses every spatial axis."""
    axes = axes_of(len(sizes))
    lengths = dict(zip(axes, (channels, *sizes), strict=True))
    kernel = torch.empty(weight.shape[0], channels, *sizes, dtype=weight.dtype)
    for tap in itertools.product(*(range(n) for n in (channels, *sizes))):
        coordinate = dict(zip(axes, tap, strict=True))
        if flip:
            for axis, n in zip(axes[1:], sizes, strict=True):
                coordinate[axis] = n - 1 - coordinate[axis]
        kernel[(slice(None), *tap)] = weight[:, column_of(order, lengths, coordinate)]
    return kernel


def flatten_window(window: torch.Tensor, order: str) -> torch.Tensor:
    """``window`` ``[C, *sizes]`` read element by element in ``order``, slowest axis first."""
    axes = axes_of(window.dim() - 1)
    lengths = dict(zip(axes, window.shape, strict=True))
    values = []
    for digits in itertools.product(*(range(lengths[a]) for a in order)):
        coordinate = dict(zip(order, digits, strict=True))
        values.append(window[tuple(coordinate[a] for a in axes)])
    return torch.stack(values)


def linear_on_every_window_nd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    sizes: tuple[int, ...],
    stride: tuple[int, ...],
    order: str,
) -> torch.Tensor:
    """``y = W v + b`` on the window under every cell: ``[B, O, *cells]`` in float64.

    Cell ``[b, :, *p]`` is the Linear applied to
    ``x[b, :, p₀·s₀ : p₀·s₀+k₀, …]`` flattened in ``order``.
    """
    batch, ndim = x.shape[0], len(sizes)
    counts = [(n - k) // s + 1 for n, k, s in zip(x.shape[2:], sizes, stride, strict=True)]
    w64, x64 = weight.double(), x.double()
    out = torch.empty(batch, weight.shape[0], *counts, dtype=torch.float64)
    for b in range(batch):
        for cell in itertools.product(*(range(c) for c in counts)):
            cut = tuple(
                slice(p * s, p * s + k) for p, s, k in zip(cell, stride, sizes, strict=True)
            )
            vector = flatten_window(x64[(b, slice(None), *cut)], order)
            value = w64 @ vector
            out[(b, slice(None), *cell)] = value if bias is None else value + bias.double()
    assert len(counts) == ndim
    return out
