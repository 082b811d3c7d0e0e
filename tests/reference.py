"""An independent reference for the one equation of SPEC section 1.

Nothing here calls fcconv: the window is cut out of the input by explicit
slicing, flattened in the requested order, and fed to the Linear layer, one
output cell at a time, in float64. Tests compare fcconv's converted kernels,
run through ``F.conv2d``, against this slow but obvious definition.

    >>> import torch
    >>> x = torch.arange(8.0).reshape(1, 2, 2, 2)  # one 2x2 window, 2 channels
    >>> w = torch.eye(8)
    >>> linear_on_every_window(x, w, None, (2, 2), (2, 2), "hwc").flatten().tolist()
    [0.0, 4.0, 1.0, 5.0, 2.0, 6.0, 3.0, 7.0]
"""

from __future__ import annotations

import math

import torch

_AXES = "chw"


def _check_order(order: str) -> str:
    order = order.lower()
    if sorted(order) != sorted(_AXES):
        raise ValueError(f"order {order!r} is not a permutation of c, h, w")
    return order


def flat_index(order: str, sizes: tuple[int, int, int], c: int, i: int, j: int) -> int:
    """The Linear input column that pixel ``(c, i, j)`` of a patch lands in.

    Args:
        order: the flatten order, slowest axis first (``"chw"``, ``"hwc"``, ...).
        sizes: the patch as ``(C, kh, kw)``.
        c: the channel.
        i: the row inside the patch.
        j: the column inside the patch.

    Returns:
        The mixed-radix number whose digits are the coordinates in ``order``:
        each axis's stride is the product of the lengths of the faster axes.

    >>> flat_index("chw", (10, 20, 20), 1, 0, 0)
    400
    >>> flat_index("hwc", (10, 20, 20), 1, 0, 0)
    1
    """
    order = _check_order(order)
    length = dict(zip(_AXES, sizes, strict=True))
    coordinate = {"c": c, "h": i, "w": j}
    index = 0
    for position, axis in enumerate(order):
        faster = order[position + 1 :]
        index += coordinate[axis] * math.prod(length[a] for a in faster)
    return index


def index_table(order: str, sizes: tuple[int, int, int]) -> torch.Tensor:
    """``table[c, i, j] = flat_index(order, sizes, c, i, j)`` as an int64 tensor.

    >>> index_table("hwc", (2, 1, 2)).tolist()
    [[[0, 2]], [[1, 3]]]
    """
    channels, height, width = sizes
    table = torch.empty(sizes, dtype=torch.int64)
    for c in range(channels):
        for i in range(height):
            for j in range(width):
                table[c, i, j] = flat_index(order, sizes, c, i, j)
    return table


def linear_on_every_window(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_hw: tuple[int, int],
    stride: tuple[int, int],
    order: str,
) -> torch.Tensor:
    """Apply ``y = W v + b`` to the flattened patch under every window of ``x``.

    Args:
        x: the input, ``[B, C, H, W]``.
        weight: the Linear weight, ``[O, C·kh·kw]``.
        bias: the Linear bias ``[O]``, or ``None``.
        patch_hw: ``(kh, kw)``; ``C`` is read from ``x``.
        stride: ``(sh, sw)``.
        order: the order the Linear layer's training patches were flattened in.

    Returns:
        ``[B, O, H', W']`` in float64, ``H' = (H - kh) // sh + 1`` and likewise
        for ``W'``; cell ``[b, :, p, q]`` is the Linear layer applied to
        ``x[b, :, p·sh : p·sh+kh, q·sw : q·sw+kw]`` flattened in ``order``.
    """
    order = _check_order(order)
    batch, channels, height, width = x.shape
    kh, kw = patch_hw
    sh, sw = stride
    if weight.shape[1] != channels * kh * kw:
        raise ValueError(f"weight {tuple(weight.shape)} does not take {channels}x{kh}x{kw} patches")
    rows = (height - kh) // sh + 1
    cols = (width - kw) // sw + 1
    w64 = weight.to(torch.float64)
    b64 = None if bias is None else bias.to(torch.float64)
    x64 = x.to(torch.float64)
    dims = tuple(_AXES.index(axis) for axis in order)
    out = torch.empty(batch, weight.shape[0], rows, cols, dtype=torch.float64)
    for b in range(batch):
        for p in range(rows):
            for q in range(cols):
                window = x64[b, :, p * sh : p * sh + kh, q * sw : q * sw + kw]
                assert window.shape == (channels, kh, kw)
                vector = window.permute(dims).reshape(-1)
                cell = w64 @ vector
                out[b, :, p, q] = cell if b64 is None else cell + b64
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` in logical (row-major) order, as a uint8 tensor.

    Two tensors have equal ``bits`` exactly when they hold the same bit
    patterns, so NaN payloads and ``-0.0`` count, unlike ``torch.equal``.
    """
    # A fresh buffer, because .contiguous() keeps odd strides on tensors of
    # one element, and .view(uint8) needs a unit stride.
    flat = torch.empty(t.numel(), dtype=t.dtype)
    flat.copy_(t.detach().reshape(-1))
    return flat.view(torch.uint8)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, same dtype, and the same bits element for element.

    >>> bitwise_equal(torch.tensor([0.0]), torch.tensor([-0.0]))
    False
    >>> nan = torch.tensor([float("nan")])
    >>> bitwise_equal(nan, nan.clone()), torch.equal(nan, nan.clone())
    (True, False)
    """
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def same_object(a: object, b: object) -> bool:
    """Deep equality: tensors by bits and dtype, containers by type, keys (in order) and values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and bitwise_equal(a, b)
    if isinstance(a, dict):
        return type(a) is type(b) and list(a) == list(b) and all(same_object(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(same_object(x, y) for x, y in zip(a, b, strict=True))
        )
    return type(a) is type(b) and a == b


def kernel_of(weight: torch.Tensor, channels: int, kh: int, kw: int, order: str) -> torch.Tensor:
    """SPEC §1 by hand: group the columns by the order's axis lengths, then put c, h, w first."""
    sizes = {"c": channels, "h": kh, "w": kw}
    grouped = weight.reshape(weight.shape[0], *(sizes[a] for a in order))
    return grouped.permute(0, *(1 + order.index(a) for a in "chw"))
