"""What must be identical after a conversion, compared bit for bit.

Everything but the converted layers and fcconv's own provenance record:
untouched tensors (of every kind: dense, quantized, sparse), the metadata
of a safetensors file, and the training state around the weights of a
torch checkpoint (optimizer state, epoch, learning rate, non-tensor entries
of the state dict). Differences come back as lines of text naming where.
"""

from __future__ import annotations

import math
import struct
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from fcconv import dtypes
from fcconv.errors import CheckpointError
from fcconv.geometry import unravel_index
from fcconv.verify.bits import bitwise_equal, first_mismatch, same_quantization

if TYPE_CHECKING:
    import torch

MAX_REPORTED = 20
"""Differences of non-tensor values listed at most (then a count of the rest)."""


def _dtype(tensor: torch.Tensor) -> str:
    return dtypes.name_of(tensor.dtype)


# ------------------------------------------------------------ untouched tensors


def untouched_differences(
    original: Mapping[str, torch.Tensor],
    converted: Mapping[str, torch.Tensor],
    converted_keys: Iterable[str],
) -> list[str]:
    """Every tensor other than the converted weights must be identical, bit for bit."""
    skip = set(converted_keys)
    differences = [
        f"{key} is missing from the converted checkpoint"
        for key in original
        if key not in converted
    ]
    differences += [
        f"{key} is new in the converted checkpoint" for key in converted if key not in original
    ]
    for key, tensor in original.items():
        if key in skip or key not in converted:
            continue
        other = converted[key]
        if other is tensor:  # the very object: nothing was done to it
            continue
        try:
            same = bitwise_equal(tensor, other)
        except CheckpointError as error:
            raise CheckpointError(f"{key}: {error.template}") from None
        if not same:
            differences.append(f"{key} differs: {_tensor_difference(tensor, other)}")
    return differences


def _tensor_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    import torch

    if a.dtype != b.dtype:
        return f"dtype {_dtype(a)} → {_dtype(b)}"
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} → {tuple(b.shape)}"
    if a.layout != b.layout:
        return f"layout {a.layout} → {b.layout}"
    if a.layout != torch.strided:
        return "its indices or values"
    if a.is_quantized and not same_quantization(a, b):
        return "its quantization parameters"
    count, first = first_mismatch(a, b)
    index = list(unravel_index(first, tuple(a.shape)))
    return f"{count} element(s), first at {index}"


# ------------------------------------------------------- everything else


def metadata_differences(
    original: Mapping[str, str] | None, converted: Mapping[str, str] | None, skip: str
) -> list[str]:
    """Safetensors ``__metadata__`` entries that differ, ``skip`` (fcconv's record) aside."""
    before = {k: v for k, v in (original or {}).items() if k != skip}
    after = {k: v for k, v in (converted or {}).items() if k != skip}
    return value_differences(before, after, "__metadata__")


def value_differences(original: Any, converted: Any, where: str) -> list[str]:
    """Where two nested values (mappings, lists, tuples, scalars, tensors) differ.

    Walks both at once without recursion (a hostile pickle may nest deeply or
    refer to itself); floats compare by their bits, so a NaN equals itself
    and ``0.0`` differs from ``-0.0``; tensors compare bit for bit.

    >>> value_differences({"lr": 0.1, "epoch": 3}, {"lr": 0.2, "epoch": 3}, "checkpoint")
    ['checkpoint.lr differs: 0.1 → 0.2']
    """
    found: list[str] = []
    pending = [(original, converted, where)]
    seen: set[tuple[int, int]] = set()
    while pending and len(found) <= MAX_REPORTED:
        a, b, path = pending.pop()
        if (id(a), id(b)) in seen:
            continue
        seen.add((id(a), id(b)))
        problem = _difference(a, b, path, pending)
        if problem:
            found.append(problem)
    if len(found) > MAX_REPORTED:
        found[MAX_REPORTED:] = ["and more non-tensor differences"]
    return found


def _difference(a: Any, b: Any, path: str, pending: list) -> str | None:
    """How ``a`` and ``b`` differ at ``path``, or None; containers queue their items."""
    torch = sys.modules.get("torch")  # not imported: nothing here can be a tensor

    if type(a) is not type(b):
        return f"{path} differs: {type(a).__name__} → {type(b).__name__}"
    if torch is not None and isinstance(a, torch.Tensor):
        return None if bitwise_equal(a, b) else f"{path} differs: {_tensor_difference(a, b)}"
    if isinstance(a, Mapping):
        return _mapping_difference(a, b, path, pending)
    if isinstance(a, list | tuple):
        if len(a) != len(b):
            return f"{path} differs: {len(a)} items → {len(b)}"
        items = enumerate(zip(a, b, strict=True))
        pending += [(x, y, f"{path}[{i}]") for i, (x, y) in reversed(list(items))]
        return None
    if _same_scalar(a, b):
        return None
    return f"{path} differs: {_short(a)} → {_short(b)}"


def _mapping_difference(a: Mapping, b: Mapping, path: str, pending: list) -> str | None:
    missing = [k for k in a if k not in b]
    new = [k for k in b if k not in a]
    if missing or new:
        parts = [f"{_short(k)} is missing" for k in missing[:3]]
        parts += [f"{_short(k)} is new" for k in new[:3]]
        return f"{path} differs: {', '.join(parts)}"
    pending += [(a[k], b[k], _member(path, k)) for k in reversed(list(a))]
    return None


def _same_scalar(a: Any, b: Any) -> bool:
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, complex):
        return _same_scalar(a.real, b.real) and _same_scalar(a.imag, b.imag)
    try:
        return bool(a == b)
    except Exception:  # an exotic value without a plain ==: compare what it shows
        return repr(a) == repr(b)


def _member(path: str, key: Any) -> str:
    if isinstance(key, str) and key.isidentifier():
        return f"{path}.{key}"
    return f"{path}[{_short(key)}]"


def _short(value: Any) -> str:
    text = repr(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = [
    "metadata_differences",
    "untouched_differences",
    "value_differences",
]
