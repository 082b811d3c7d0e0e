"""The one bit-equality: elements compared as unsigned integers of their width.

Bits, never values: NaN equals NaN, ``-0.0`` differs from ``0.0``. A tensor
becomes a numpy view of its memory (:func:`tensor_bits`), so the exact check
of a layer read from disk (:class:`fcconv.io.sources.DiskTensors`) and one of
tensors in memory compare the same integers. Quantized tensors compare their
stored integers and quantization parameters; sparse ones their indices and
values.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from fcconv import dtypes
from fcconv.errors import CheckpointError

if TYPE_CHECKING:
    import numpy as np
    import torch


def bits_dtype(dtype: str) -> np.dtype:
    """The numpy type as wide as one element of ``dtype``: ``u1``…``u8``, else raw bytes.

    >>> bits_dtype("bfloat16"), bits_dtype("complex128")
    (dtype('uint16'), dtype('V16'))
    """
    import numpy as np

    known = dtypes.by_name(dtype)
    width = known.itemsize if known is not None else 1
    return np.dtype(f"u{width}") if width in (1, 2, 4, 8) else np.dtype(f"V{width}")


def tensor_bits(tensor: torch.Tensor) -> np.ndarray:
    """The elements of a CPU tensor as integers of their width, ``[rows, row]``.

    A view of the tensor's memory when it is contiguous (no copy). A
    quantized tensor gives its stored integers; a conjugate or negative
    view is resolved first (its bits are what it means).
    """
    import numpy as np
    import torch

    if tensor.is_quantized:  # viewing a quantized tensor's bytes crashes torch
        tensor = tensor.int_repr()
    width = bits_dtype(dtypes.name_of(tensor.dtype))
    rows = tensor.shape[0] if tensor.dim() else 1
    if tensor.numel() == 0:
        return np.empty((rows, 0), dtype=width)
    flat = tensor.detach().resolve_conj().resolve_neg().contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy().view(width)
    return raw.reshape(rows, raw.size // rows if rows else 0)


def differing(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Which elements of two arrays of bits (same shape) differ: booleans."""
    return a != b


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and layout, and the same bits (so NaN == NaN and 0.0 != -0.0).

    Quantized tensors compare their stored integers and quantization
    parameters; sparse ones their indices and values. A tensor of a kind
    fcconv cannot compare raises :class:`~fcconv.errors.CheckpointError`
    (a difference it cannot judge is not a difference it found).
    """
    if a.dtype != b.dtype or a.shape != b.shape or a.layout != b.layout:
        return False
    if a.is_quantized != b.is_quantized or a.is_meta != b.is_meta:
        return False
    if a.is_meta:
        return True  # no data on either side
    if a.is_quantized:
        return same_quantization(a, b) and _equal_bits(a, b)
    parts_a, parts_b = _parts(a), _parts(b)
    return len(parts_a) == len(parts_b) and all(
        x.shape == y.shape and x.dtype == y.dtype and _equal_bits(x, y)
        for x, y in zip(parts_a, parts_b, strict=True)
    )


def _equal_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    import numpy as np

    return bool(np.array_equal(tensor_bits(a), tensor_bits(b)))


def _parts(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The dense tensors that hold a tensor's data: itself, or a sparse one's indices and values."""
    import torch

    layout = tensor.layout
    if layout == torch.strided:
        return (tensor,)
    if layout == torch.sparse_coo:
        return (tensor._indices(), tensor._values())
    if layout in (torch.sparse_csr, torch.sparse_bsr):
        return (tensor.crow_indices(), tensor.col_indices(), tensor.values())
    if layout in (torch.sparse_csc, torch.sparse_bsc):
        return (tensor.ccol_indices(), tensor.row_indices(), tensor.values())
    raise CheckpointError(
        f"fcconv cannot compare tensors of layout {layout}; convert them to dense tensors first"
    )


def same_quantization(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two quantized tensors have the same scheme, scales and zero points (bits)."""
    import torch

    if a.qscheme() != b.qscheme():
        return False
    if a.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        scales = struct.pack("<d", a.q_scale()) == struct.pack("<d", b.q_scale())
        return scales and a.q_zero_point() == b.q_zero_point()
    return (
        a.q_per_channel_axis() == b.q_per_channel_axis()
        and bitwise_equal(a.q_per_channel_scales(), b.q_per_channel_scales())
        and bitwise_equal(a.q_per_channel_zero_points(), b.q_per_channel_zero_points())
    )


def first_mismatch(expected: torch.Tensor, actual: torch.Tensor) -> tuple[int, int]:
    """(count, flat index of the first) of elements whose bits differ; same shape."""
    import numpy as np

    differ = np.flatnonzero(differing(tensor_bits(expected), tensor_bits(actual)))
    return len(differ), int(differ[0]) if len(differ) else -1


__all__ = [
    "bits_dtype",
    "bitwise_equal",
    "differing",
    "first_mismatch",
    "same_quantization",
    "tensor_bits",
]
