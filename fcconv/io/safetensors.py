"""The safetensors format: read and validate a header, read tensors, encode a header.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes
of JSON naming every tensor's dtype, shape and byte range, then the data.
:func:`read_header` checks every declared size against the real file before
anything depends on it; nothing here imports torch until tensors are read.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcconv import dtypes
from fcconv.errors import CheckpointError, LayerError
from fcconv.io.files import describe_read_error, open_regular
from fcconv.plan import TensorInfo

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100_000_000
"""The largest header safetensors itself accepts."""

MAX_TENSORS = 1 << 18
"""The most tensors fcconv reads in one file (262,144; real checkpoints hold a few
thousand): a bound on the memory and time a header of up to 100 MB may take."""

MAX_JSON_DEPTH = 127
"""The deepest nesting of the header's JSON that safetensors' parser (serde_json) accepts."""

U64_LIMIT = 1 << 64
"""Shapes and offsets are ``usize`` to safetensors: each, and the running product of a
shape, must stay below this."""

TORCH_DIM_LIMIT = (1 << 63) - 1
"""The largest dimension torch can give a tensor (``int64``)."""

_DAMAGED = "the file is damaged or not safetensors; re-download or re-export it"
_TRUNCATED = "the file is truncated or its header is wrong; re-download or re-export it"
_TOO_MANY = "fcconv reads at most that many in one file; shard the checkpoint"
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor's header entry; ``begin``/``end`` are relative to the data section."""

    name: str
    dtype: str
    """safetensors' code (``F32``); :attr:`info` has torch's name."""
    shape: tuple[int, ...]
    begin: int
    end: int
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """Header keys besides dtype, shape and data_offsets, written back unchanged."""

    @property
    def nbytes(self) -> int:
        """Length of the tensor's byte range."""
        return self.end - self.begin

    @property
    def numel(self) -> int:
        """Number of elements, ``prod(shape)``."""
        return math.prod(self.shape)

    @property
    def info(self) -> TensorInfo:
        """What planning needs: the shape and torch's name of the dtype."""
        return TensorInfo(self.shape, dtypes.by_code(self.dtype).name)

    def entry(self, shape: tuple[int, ...] | None = None) -> dict[str, Any]:
        """The JSON header entry, optionally with another shape of the same size."""
        return {
            "dtype": self.dtype,
            "shape": list(self.shape if shape is None else shape),
            "data_offsets": [self.begin, self.end],
            **self.extra,
        }


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header: what lies where in the file."""

    path: Path
    header_bytes: int
    """``N``, the JSON header's length including any padding."""
    metadata: dict[str, str] | None
    """``__metadata__``, or None when the file has none."""
    tensors: dict[str, HeaderEntry]
    """Every tensor, in the order of its bytes in the file."""
    data_bytes: int

    @property
    def data_start(self) -> int:
        """File offset of the data section: ``8 + N``."""
        return 8 + self.header_bytes

    @property
    def file_bytes(self) -> int:
        """Total file size the header implies (and :func:`read_header` checked)."""
        return self.data_start + self.data_bytes


# ------------------------------------------------------------------- reading


def _bad(path: Path, problem: str, advice: str = _DAMAGED) -> CheckpointError:
    return CheckpointError(f"{path} has a corrupt safetensors header: {problem}; {advice}")


def read_error(path: Path, error: OSError) -> CheckpointError:
    if isinstance(error, IsADirectoryError):
        return CheckpointError(f"{path} is a folder, not a safetensors file; name the file")
    return describe_read_error(path, error)


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value < U64_LIMIT


def read_header(path: str | Path) -> SafetensorsHeader:
    """Read and validate the header of a ``.safetensors`` file without reading its data.

    Checks everything safetensors itself checks, and a little more: the header
    length fits the file, the header is a JSON object (without duplicate keys)
    whose ``__metadata__`` maps strings to strings, every dtype is known, every
    byte range is exactly ``prod(shape)`` elements of its dtype, and the ranges
    tile the data section without gap or overlap up to the end of the file.

    Raises:
        CheckpointError: one line naming the file and the problem, ending with
            what to do.

    Example:
        >>> header = read_header("model.safetensors")  # doctest: +SKIP
        >>> header.tensors["classifier.0.weight"].shape  # doctest: +SKIP
        (4096, 25088)
    """
    path = Path(path)
    with open_regular(path) as descriptor:
        return _header_of(path, descriptor)


def _header_of(path: Path, descriptor: int) -> SafetensorsHeader:
    """The validated header of the open file ``descriptor`` (named ``path`` in messages)."""
    try:
        size = os.fstat(descriptor).st_size
        prefix = os.pread(descriptor, 8, 0)
        if len(prefix) < 8:
            raise _bad(path, f"only {size} bytes long, shorter than the 8-byte header length")
        length = int.from_bytes(prefix, "little")
        if length > size - 8:
            problem = f"header length {length} runs past the end of the {size}-byte file"
            raise _bad(path, problem, _TRUNCATED)
        if length > MAX_HEADER_BYTES:
            raise _bad(path, f"header length {length} exceeds safetensors' 100 MB limit")
        raw = _pread_all(descriptor, length, 8)
    except OSError as error:
        raise read_error(path, error) from None
    if len(raw) != length:
        raise _bad(path, "the file changed size while being read", _TRUNCATED)
    return _parse_header(path, raw, size - 8 - length)


def _pread_all(descriptor: int, length: int, offset: int) -> bytes:
    chunks, done = [], 0
    while done < length:
        chunk = os.pread(descriptor, min(length - done, 1 << 24), offset + done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def header_from_bytes(data: bytes, source: str) -> SafetensorsHeader:
    """Validate the header of a safetensors file held in memory (read from stdin)."""
    path = Path(source)
    length = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if length < 0 or length > len(data) - 8:
        raise _bad(path, f"header length {length} runs past the end of {len(data)} bytes")
    return _parse_header(path, data[8 : 8 + length], len(data) - 8 - length)


class _NotStrictJson(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _NotStrictJson(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotStrictJson(f"number {text[:20]} is out of range")
    return value


class _NegativeZero(int):
    """``-0``, which safetensors reads as a float: valid JSON, never a size."""


def _integer(text: str) -> int:
    if text == "-0":
        return _NegativeZero(0)
    value = int(text)
    if value.bit_length() > 1000:  # serde_json reads it as a float: beyond f64 it refuses
        try:
            float(value)
        except OverflowError:
            raise _NotStrictJson(f"number {text[:20]}... is out of range") from None
    return value


def _load_json(path: Path, text: str) -> dict[str, Any]:
    """The header as strict JSON, refusing what safetensors' parser refuses.

    Before parsing, the count of objects bounds the work: Python holds each
    parsed entry in about 600 bytes, so 100 MB of tiny entries would take
    gigabytes and most of a minute; more than :data:`MAX_TENSORS` tensors are
    refused at once.
    """
    if text.count("{") > 2 * MAX_TENSORS + 64:  # every entry is an object
        raise _bad(path, f"header describes more than {MAX_TENSORS} tensors", _TOO_MANY)
    try:
        document = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_float=_finite_float,
            parse_int=_integer,
        )
    except _DuplicateKey as error:
        raise _bad(path, f"header names {error.args[0]!r} twice") from None
    except RecursionError:
        raise _bad(path, f"header nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as error:
        problem = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
        where = f" at byte {error.pos}" if isinstance(error, json.JSONDecodeError) else ""
        raise _bad(path, f"header is not valid JSON ({problem[:120]}{where})") from None
    if not isinstance(document, dict):
        raise _bad(path, "header is not a JSON object")
    if len(document) > MAX_TENSORS + 1:
        raise _bad(path, f"header describes more than {MAX_TENSORS} tensors", _TOO_MANY)
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH:  # else it cannot nest that deep
        _check_depth(path, document)
    if _SURROGATE_ESCAPE.search(text):  # decoded UTF-8 holds no surrogates: only escapes do
        _check_surrogates(path, document)
    return document


def _containers(document: Any) -> Iterator[tuple[Any, int]]:
    """Every list and dict in ``document`` with its depth, without recursion."""
    pending = [(document, 1)]
    while pending:
        value, depth = pending.pop()
        yield value, depth
        items = value.values() if isinstance(value, dict) else value
        pending += [(item, depth + 1) for item in items if isinstance(item, dict | list)]


def _check_depth(path: Path, document: Any) -> None:
    if any(depth > MAX_JSON_DEPTH for _, depth in _containers(document)):
        raise _bad(path, f"header nests deeper than {MAX_JSON_DEPTH} levels")


def _check_surrogates(path: Path, document: Any) -> None:
    for container, _ in _containers(document):
        texts = [*container, *container.values()] if isinstance(container, dict) else container
        for text in texts:
            if isinstance(text, str) and any("\ud800" <= c <= "\udfff" for c in text):
                raise _bad(
                    path, "header holds a lone UTF-16 surrogate (\\uD800-\\uDFFF) in a string"
                )


def _parse_header(path: Path, raw: bytes, data_bytes: int) -> SafetensorsHeader:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _bad(path, f"header is not UTF-8 text (byte {error.start})") from None
    if not text.lstrip().startswith("{"):
        raise _bad(path, "header does not start with a JSON object")
    document = _load_json(path, text)

    metadata = document.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(value, str) for value in metadata.values())
    ):
        raise _bad(path, "__metadata__ is not a mapping of strings to strings")

    tensors = [_parse_entry(path, name, entry) for name, entry in document.items()]
    tensors.sort(key=lambda info: (info.begin, info.end))
    position = 0
    for info in tensors:
        if info.end > data_bytes:
            raise _bad(
                path,
                f"tensor {info.name!r} ends at byte {info.end} of a {data_bytes}-byte data section",
                _TRUNCATED,
            )
        if info.begin != position:
            problem = "overlaps the previous tensor" if info.begin < position else "leaves a gap"
            raise _bad(
                path,
                f"tensor {info.name!r} starts at byte {info.begin} where the previous one ends "
                f"at {position} ({problem})",
            )
        position = info.end
    if position != data_bytes:
        raise _bad(
            path,
            f"the tensors cover {position} bytes but the data section holds {data_bytes}",
            _TRUNCATED,
        )
    return SafetensorsHeader(
        path=path,
        header_bytes=len(raw),
        metadata=dict(metadata) if metadata is not None else None,
        tensors={info.name: info for info in tensors},
        data_bytes=data_bytes,
    )


def _parse_entry(path: Path, name: str, entry: Any) -> HeaderEntry:
    if not isinstance(entry, dict):
        raise _bad(path, f"entry {name!r} is not a tensor description")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
    if missing:
        raise _bad(path, f"tensor {name!r} has no {', '.join(missing)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in dtypes.SAFETENSORS_CODES:
        raise _bad(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise _bad(path, f"tensor {name!r} has malformed shape {_short(shape)}")
    if any(n > TORCH_DIM_LIMIT for n in shape):
        raise _bad(path, f"tensor {name!r} has a dimension above 2**63-1, more than torch can hold")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(n) for n in offsets)
        or offsets[1] < offsets[0]
    ):
        raise _bad(path, f"tensor {name!r} has malformed data_offsets {_short(offsets)}")
    bits = _bits(shape, dtypes.by_code(dtype).bits)
    if bits is None:
        raise _bad(path, f"tensor {name!r}: the size of shape {_short(shape)} overflows 64 bits")
    begin, end = offsets
    if bits % 8 or bits // 8 != end - begin:
        raise _bad(
            path,
            f"tensor {name!r} of shape {_short(shape)} and dtype {dtype} needs {bits / 8:g} "
            f"bytes but its data_offsets span {end - begin}",
        )
    extra = {k: v for k, v in entry.items() if k not in ("dtype", "shape", "data_offsets")}
    return HeaderEntry(name, dtype, tuple(shape), begin, end, extra)


def _bits(shape: list[int], width: int) -> int | None:
    """``prod(shape) · width``, or None where safetensors' 64-bit arithmetic overflows.

    Like safetensors, the product is taken from the left, so ``[2**40, 2**40, 0]``
    overflows while ``[0, 2**40, 2**40]`` does not.
    """
    count = 1
    for n in shape:
        count *= n
        if count >= U64_LIMIT:
            return None
    bits = count * width
    return None if bits >= U64_LIMIT else bits


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_tensors(path: str | Path, names: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Read only the named tensors of a ``.safetensors`` file, for verification.

    The bytes are read with ``pread`` from the descriptor the header was
    validated on, never memory-mapped: a file truncated by another process
    meanwhile is a one-line error, not a ``SIGBUS``.

    Raises:
        LayerError: a name the file does not hold.
        CheckpointError: the file is not valid safetensors, or changed.
    """
    return _read(path, {name: None for name in names})


def read_rows(path: str | Path, name: str, rows: list[int]) -> torch.Tensor:
    """Rows of the 2-D tensor ``name``, reading only those rows' bytes."""
    return _read(path, {name: rows})[name]


def _read(path: str | Path, wanted: Mapping[str, list[int] | None]) -> dict[str, torch.Tensor]:
    path = Path(path)
    with open_regular(path) as descriptor:
        header = _header_of(path, descriptor)
        missing = [name for name in wanted if name not in header.tensors]
        if missing:
            raise LayerError(
                f"{header.path} has no tensor {', '.join(map(repr, missing))}; run fcconv "
                f"inspect {header.path} to list its tensors"
            )
        if sys.byteorder != "little" or any(
            dtypes.by_code(header.tensors[name].dtype).bits % 8 for name in wanted
        ):
            return _read_with_safetensors(header, wanted)
        return {
            name: _read_entry(descriptor, header, header.tensors[name], rows)
            for name, rows in wanted.items()
        }


def _read_entry(
    descriptor: int, header: SafetensorsHeader, entry: HeaderEntry, rows: list[int] | None
) -> torch.Tensor:
    import torch

    dtype = getattr(torch, dtypes.by_code(entry.dtype).name)
    start = header.data_start + entry.begin
    if rows is None:
        spans, shape = [(start, entry.nbytes)], entry.shape
    else:
        row_bytes = entry.nbytes // entry.shape[0] if entry.shape[0] else 0
        spans = [(start + row * row_bytes, row_bytes) for row in rows]
        shape = (len(rows), *entry.shape[1:])
    buffer = bytearray(sum(length for _, length in spans))
    view, done = memoryview(buffer), 0
    for offset, length in spans:
        try:
            got = os.preadv(descriptor, [view[done : done + length]], offset)
        except OSError as error:
            raise read_error(header.path, error) from None
        if got != length:
            raise _bad(header.path, "the file changed while being read", _TRUNCATED)
        done += length
    if not buffer:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def _read_with_safetensors(
    header: SafetensorsHeader, wanted: Mapping[str, list[int] | None]
) -> dict[str, torch.Tensor]:
    """Packed sub-byte dtypes (and big-endian hosts) go through safetensors itself."""
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(header.path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in wanted}
    except Exception as error:  # a foreign reader of an untrusted file: any failure is the file's
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"could not read tensors of {header.path} ({detail[:160]}); {_DAMAGED}"
        ) from None
    return {
        name: tensors[name] if rows is None else torch.stack([tensors[name][r] for r in rows])
        for name, rows in wanted.items()
    }


def encode_header(metadata: Mapping[str, str] | None, entries: dict[str, Any]) -> bytes:
    document: dict[str, Any] = {}
    if metadata:
        document["__metadata__"] = dict(metadata)
    document.update(entries)
    try:
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate in a name: only the escaped form is UTF-8
        return json.dumps(document, separators=(",", ":")).encode("ascii")


def layout_header(encoded: bytes, old_length: int) -> bytes:
    """Pad the header with spaces: to the old length if it fits, else to a multiple of 8."""
    if len(encoded) <= old_length:
        return encoded + b" " * (old_length - len(encoded))
    return encoded + b" " * (-len(encoded) % 8)


def check_metadata(metadata: Mapping[str, str]) -> None:
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"safetensors metadata maps strings to strings, not {key!r}: {value!r}")
