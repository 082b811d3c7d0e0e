"""The one dtype table: torch's names, safetensors' codes, widths, and what fcconv converts.

Converting is a permutation of whole elements, so any real floating-point
dtype of whole bytes converts (float8 included: its bits are only moved).
Integer, boolean, complex and packed sub-byte dtypes are never Linear weights
fcconv converts; they are carried through untouched.

>>> by_code("BF16").name, by_code("BF16").bits
('bfloat16', 16)
>>> by_name("float8_e4m3fn").convertible, by_name("int8").convertible
(True, False)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    """One element type as every layer of fcconv names it."""

    name: str
    """torch's name without the prefix: ``float32``, ``bfloat16``, ``float8_e4m3fn``."""
    code: str | None
    """safetensors' code (``F32``), or None where safetensors has none."""
    bits: int
    """Width of one element in bits (4 and 6 for packed types)."""
    convertible: bool = False
    """A real floating-point type of whole bytes: a Linear weight fcconv converts."""

    @property
    def itemsize(self) -> int:
        """Bytes per element (1 for packed sub-byte types, which are never permuted)."""
        return max(1, self.bits // 8)


_TABLE = (
    DType("float64", "F64", 64, True),
    DType("float32", "F32", 32, True),
    DType("float16", "F16", 16, True),
    DType("bfloat16", "BF16", 16, True),
    DType("float8_e5m2", "F8_E5M2", 8, True),
    DType("float8_e4m3fn", "F8_E4M3", 8, True),
    DType("float8_e8m0fnu", "F8_E8M0", 8, True),
    DType("float8_e4m3fnuz", "F8_E4M3FNUZ", 8, True),
    DType("float8_e5m2fnuz", "F8_E5M2FNUZ", 8, True),
    DType("float4_e2m1fn_x2", "F4", 4),
    DType("float6_e2m3", "F6_E2M3", 6),
    DType("float6_e3m2", "F6_E3M2", 6),
    DType("complex64", "C64", 64),
    DType("complex128", None, 128),
    DType("int64", "I64", 64),
    DType("int32", "I32", 32),
    DType("int16", "I16", 16),
    DType("int8", "I8", 8),
    DType("uint64", "U64", 64),
    DType("uint32", "U32", 32),
    DType("uint16", "U16", 16),
    DType("uint8", "U8", 8),
    DType("bool", "BOOL", 8),
)

_BY_NAME = {dtype.name: dtype for dtype in _TABLE}
_BY_CODE = {dtype.code: dtype for dtype in _TABLE if dtype.code is not None}

SAFETENSORS_CODES = frozenset(_BY_CODE)
"""Every dtype code a safetensors header may use."""


def by_code(code: str) -> DType:
    """The dtype of a safetensors code; ``KeyError`` for an unknown one."""
    return _BY_CODE[code]


def by_name(name: str) -> DType | None:
    """The dtype of a torch name (``float32``), or None for one fcconv does not know."""
    return _BY_NAME.get(name)


def name_of(dtype: torch.dtype) -> str:
    """torch's name of ``dtype`` without the ``torch.`` prefix."""
    return str(dtype).removeprefix("torch.")


def is_convertible(name: str) -> bool:
    """Whether a tensor of dtype ``name`` can be a Linear weight that fcconv converts."""
    known = by_name(name)
    return known is not None and known.convertible
