"""Rewrite a ``.safetensors`` file at the speed of a file copy, in bounded memory.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes
of JSON naming every tensor's dtype, shape and byte range, then the data. To
convert a Linear weight only its header entry's shape changes and its bytes
are permuted (for order ``chw`` not even that), so :func:`stream_convert`
writes a new header, copies every other byte range in the kernel
(``os.copy_file_range``, then ``os.sendfile``, then plain reads and writes),
and permutes each target tensor a block of rows at a time: rows of a Linear
weight are independent, ``K[o]`` is a permutation of ``W[o]`` alone.

When the new header fits in the old one's length it is padded with spaces
(which the format allows), so the data section keeps its offset and, apart
from the permuted tensors, copies as one stream.

Nothing here imports torch at import time: the rewrite needs only numpy, and
only when bytes must actually be permuted. Permuting opaque elements needs no
arithmetic, so every dtype is moved as unsigned integers of the same width
(bfloat16 as ``uint16``, float8 as ``uint8``): the bits are never touched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcconv.atomic import atomic_output, check_output_path
from fcconv.errors import CheckpointError, LayerError, SpecError
from fcconv.geometry import AXES, Patch, parse_order

if TYPE_CHECKING:
    import torch

MiB = 1 << 20
DEFAULT_BLOCK_BYTES = 64 * MiB
"""Rows of a permuted tensor read at once; the rewrite holds two such buffers."""

MAX_HEADER_BYTES = 100_000_000
"""The largest header safetensors itself accepts."""

DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
"""Every dtype safetensors knows, with its width in bits (F4 and F6 are packed)."""

CONVERTIBLE_DTYPES = frozenset(
    {"F64", "F32", "F16", "BF16", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
)
"""Real floating-point dtypes of whole bytes: the Linear weights fcconv converts."""

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(bytes_done, bytes_total)`` as the output is written."""

_DAMAGED = "the file is damaged or not safetensors; re-download or re-export it"
_TRUNCATED = "the file is truncated or its header is wrong; re-download or re-export it"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry; ``begin``/``end`` are relative to the data section."""

    name: str
    dtype: str
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
    tensors: dict[str, TensorInfo]
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


def _read_error(path: Path, error: OSError) -> CheckpointError:
    if isinstance(error, FileNotFoundError):
        return CheckpointError(f"{path} does not exist; check the path")
    if isinstance(error, IsADirectoryError):
        return CheckpointError(f"{path} is a folder, not a safetensors file; name the file")
    reason = error.strerror or str(error)
    return CheckpointError(f"could not read {path}: {reason}; check the path and its permissions")


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
    return type(value) is int and value >= 0


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
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _bad(path, f"only {size} bytes long, shorter than the 8-byte header length")
            length = int.from_bytes(prefix, "little")
            if length > size - 8:
                raise _bad(
                    path,
                    f"header length {length} runs past the end of the {size}-byte file",
                    _TRUNCATED,
                )
            if length > MAX_HEADER_BYTES:
                raise _bad(path, f"header length {length} exceeds safetensors' 100 MB limit")
            raw = handle.read(length)
    except OSError as error:
        raise _read_error(path, error) from None
    if len(raw) != length:
        raise _bad(path, "the file changed size while being read", _TRUNCATED)
    return _parse_header(path, raw, size - 8 - length)


def header_from_bytes(data: bytes, source: str) -> SafetensorsHeader:
    """Validate the header of a safetensors file held in memory (read from stdin)."""
    path = Path(source)
    length = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if length < 0 or length > len(data) - 8:
        raise _bad(path, f"header length {length} runs past the end of {len(data)} bytes")
    return _parse_header(path, data[8 : 8 + length], len(data) - 8 - length)


def _parse_header(path: Path, raw: bytes, data_bytes: int) -> SafetensorsHeader:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _bad(path, f"header is not UTF-8 text (byte {error.start})") from None
    if not text.lstrip().startswith("{"):
        raise _bad(path, "header does not start with a JSON object")
    try:
        document = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as error:
        raise _bad(path, f"header names {error.args[0]!r} twice") from None
    except ValueError as error:
        problem = error.msg if isinstance(error, json.JSONDecodeError) else str(error)
        where = f" at byte {error.pos}" if isinstance(error, json.JSONDecodeError) else ""
        raise _bad(path, f"header is not valid JSON ({problem}{where})") from None
    if not isinstance(document, dict):
        raise _bad(path, "header is not a JSON object")

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


def _parse_entry(path: Path, name: str, entry: Any) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _bad(path, f"entry {name!r} is not a tensor description")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
    if missing:
        raise _bad(path, f"tensor {name!r} has no {', '.join(missing)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _bad(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise _bad(path, f"tensor {name!r} has malformed shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(n) for n in offsets)
        or offsets[1] < offsets[0]
    ):
        raise _bad(path, f"tensor {name!r} has malformed data_offsets {offsets!r}")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    begin, end = offsets
    if bits % 8 or bits // 8 != end - begin:
        raise _bad(
            path,
            f"tensor {name!r} of shape {shape} and dtype {dtype} needs {bits / 8:g} bytes but "
            f"its data_offsets span {end - begin}",
        )
    extra = {k: v for k, v in entry.items() if k not in ("dtype", "shape", "data_offsets")}
    return TensorInfo(name, dtype, tuple(shape), begin, end, extra)


def read_tensors(path: str | Path, names: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Read only the named tensors of a ``.safetensors`` file, for verification.

    Raises:
        LayerError: a name the file does not hold.
        CheckpointError: the file is not valid safetensors.
    """
    header = read_header(path)
    missing = [name for name in names if name not in header.tensors]
    if missing:
        raise LayerError(
            f"{header.path} has no tensor {', '.join(map(repr, missing))}; run fcconv inspect "
            f"{header.path} to list its tensors"
        )
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(header.path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError, TypeError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"could not read tensors of {header.path} ({detail[:160]}); {_DAMAGED}"
        ) from None


# ------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _Target:
    info: TensorInfo
    patch: Patch
    order: str

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        return (self.info.shape[0], self.patch.channels, self.patch.height, self.patch.width)

    @property
    def moves_bytes(self) -> bool:
        """False when the permutation is the identity (``chw``, or axes of length 1)."""
        sizes = dict(zip(self.order, self.patch.sizes(self.order), strict=True))
        moving = [axis for axis in self.order if sizes[axis] > 1]
        return moving != [axis for axis in AXES if sizes[axis] > 1]


def _targets(
    header: SafetensorsHeader, layers: Mapping[str, tuple[Patch, str]]
) -> dict[str, _Target]:
    targets = {}
    for name, (patch, order) in layers.items():
        info = header.tensors.get(name)
        if info is None:
            raise LayerError(
                f"{header.path} has no tensor {name!r}; run fcconv inspect {header.path} to list "
                "its Linear weights"
            )
        order = parse_order(order)
        if len(info.shape) != 2:
            raise LayerError(
                f"{name} in {header.path} has shape {list(info.shape)}, not a Linear weight "
                "[out, in]; name a 2-D weight"
            )
        if info.shape[1] != patch.features:
            raise SpecError(
                f"patch {patch} has {patch.features} elements but {name} has in_features "
                f"{info.shape[1]}; give a patch whose H·W·C is {info.shape[1]}"
            )
        if info.dtype not in CONVERTIBLE_DTYPES:
            raise LayerError(
                f"{name} in {header.path} is {info.dtype}, not a floating-point weight; fcconv "
                "converts floating-point Linear weights only"
            )
        targets[name] = _Target(info, patch, order)
    return targets


def _encode_header(metadata: Mapping[str, str] | None, entries: dict[str, Any]) -> bytes:
    document: dict[str, Any] = {}
    if metadata:
        document["__metadata__"] = dict(metadata)
    document.update(entries)
    try:
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate in a name: only the escaped form is UTF-8
        return json.dumps(document, separators=(",", ":")).encode("ascii")


def _layout_header(encoded: bytes, old_length: int) -> bytes:
    """Pad the header with spaces: to the old length if it fits, else to a multiple of 8."""
    if len(encoded) <= old_length:
        return encoded + b" " * (old_length - len(encoded))
    return encoded + b" " * (-len(encoded) % 8)


def converted_header(
    header: SafetensorsHeader,
    layers: Mapping[str, tuple[Patch, str]],
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """The exact header bytes (length prefix included) :func:`stream_convert` writes.

    Raises the same errors for ``layers`` as :func:`stream_convert`, without writing.
    """
    return _new_header(header, _targets(header, layers), metadata)


def _new_header(
    header: SafetensorsHeader,
    targets: Mapping[str, _Target],
    metadata: Mapping[str, str] | None,
) -> bytes:
    if metadata is not None:
        _check_metadata(metadata)
    entries = {
        name: info.entry(targets[name].kernel_shape if name in targets else None)
        for name, info in header.tensors.items()
    }
    encoded = _encode_header(header.metadata if metadata is None else metadata, entries)
    padded = _layout_header(encoded, header.header_bytes)
    return len(padded).to_bytes(8, "little") + padded


def _check_metadata(metadata: Mapping[str, str]) -> None:
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"safetensors metadata maps strings to strings, not {key!r}: {value!r}")


def stream_convert(
    src: str | Path,
    dst: str | Path,
    layers: Mapping[str, tuple[Patch, str]],
    metadata: Mapping[str, str] | None = None,
    *,
    force: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: ProgressCallback | None = None,
    check: Callable[[Path], None] | None = None,
) -> None:
    """Write ``src`` to ``dst`` with each named Linear weight rewritten as its conv kernel.

    Args:
        src: the input ``.safetensors`` file; never modified.
        dst: the output file, written atomically (a temporary file beside it,
            fsynced, then renamed).
        layers: weight tensor name (``"classifier.0.weight"``, shape
            ``[O, N]``) to ``(patch, order)``; it becomes ``[O, C, kh, kw]``
            with ``K[o, c, i, j] = W[o, index_of(order, c, i, j)]``.
        metadata: the output's whole ``__metadata__``; None keeps the input's.
        force: replace an existing ``dst``.
        block_bytes: how many bytes of rows are permuted at once. Peak memory
            is about two such buffers (at least one row each), whatever the
            file size.
        progress: called as ``progress(bytes_done, bytes_total)``, possibly
            from a worker thread (never from two at once).
        check: called with the path of the complete temporary file before it
            is renamed onto ``dst``, to verify it (read it with
            :func:`read_tensors`); whatever it raises aborts the write.

    Raises:
        LayerError, SpecError: a layer the file does not hold or cannot convert.
        CheckpointError: an unreadable input or a failed write (one line); the
            target then keeps what it held before and no temporary file is left.
            The same holds for anything ``check`` raises, which propagates as is.

    Example:
        >>> stream_convert(  # doctest: +SKIP
        ...     "vgg16.safetensors", "vgg16.conv.safetensors",
        ...     {"classifier.0.weight": (Patch(7, 7, 512), "chw")},
        ... )
    """
    src, dst = Path(src), Path(dst)
    header = read_header(src)
    targets = _targets(header, layers)
    new_header = _new_header(header, targets, metadata)
    check_output_path(dst, force, (src,))
    # Only tensors whose bytes move pass through memory; every other byte range,
    # chw targets included, is copied in the kernel. The data section's layout is
    # the same in both files, so offsets within it carry over unchanged.
    moved = sorted((t for t in targets.values() if t.moves_bytes), key=lambda t: t.info.begin)
    old_start, new_start = header.data_start, len(new_header)
    copies, position = [], 0
    for target in [*moved, None]:
        end = target.info.begin if target else header.data_bytes
        if end > position:
            copies.append((old_start + position, new_start + position, end - position))
        position = target.info.end if target else end
    with atomic_output(dst) as temporary:
        try:
            source = os.open(src, os.O_RDONLY)
        except OSError as error:
            raise _read_error(src, error) from None
        try:
            # No O_TRUNC: atomic_output's file is new and empty, and truncating makes
            # ext4 (auto_da_alloc) flush the whole file synchronously on close.
            output = os.open(temporary, os.O_WRONLY)
            try:
                total = new_start + header.data_bytes
                writer = _Writer(source, output, src, total, progress, block_bytes)
                writer.write(new_header, 0)
                writer.run(copies, [(old_start, new_start, t) for t in moved])
                if os.fstat(output).st_size != total:
                    raise AssertionError("stream_convert wrote a file of the wrong size")
            finally:
                os.close(output)
        finally:
            os.close(source)
        if check is not None:
            check(temporary)


def copy_file(
    src: str | Path,
    dst: str | Path,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: ProgressCallback | None = None,
) -> None:
    """Copy ``src`` to the new file ``dst`` in the kernel and fsync it.

    Not atomic by itself: for callers that build their output somewhere
    temporary (as :func:`fcconv.sharded.convert_sharded` does). ``dst`` must
    not exist. ``OSError`` propagates for the caller to describe.
    """
    source = os.open(src, os.O_RDONLY)
    try:
        output = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            size = os.fstat(source).st_size
            writer = _Writer(source, output, Path(src), size, progress, block_bytes)
            writer.run([(0, 0, size)] if size else [], [])
            os.fsync(output)
        finally:
            os.close(output)
    finally:
        os.close(source)


# Errors after which the next copy method is tried instead of giving up.
_FALLBACK_ERRNOS = frozenset(
    code
    for code in (
        getattr(errno, name, None)
        for name in ("ENOSYS", "EXDEV", "EINVAL", "EOPNOTSUPP", "ENOTSUP", "EPERM", "EBADF")
    )
    if code is not None
)

WRITEBACK_BYTES = 128 * MiB
"""Dirty output handed to the disk at a time while writing, so the final fsync is short."""


def _sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux's sync_file_range(SYNC_FILE_RANGE_WRITE): start writeback, don't wait."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int

    def start_writeback(fd: int, offset: int, count: int) -> None:
        function(fd, offset, count, 2)  # a hint: errors show up again at fsync

    return start_writeback


class _Stopped(Exception):
    """The other half of an overlapped write failed; this half stops quietly."""


class _Writer:
    """Writes the output at explicit offsets: header, kernel copies, permuted blocks.

    The kernel copies of untouched ranges run in a worker thread while the
    main thread permutes the tensors that move (both release the GIL), and
    writeback to the disk is started as the file grows instead of all at the
    final fsync: together they make a permuting rewrite cost about what a
    durable copy costs.
    """

    def __init__(
        self,
        source: int,
        output: int,
        src: Path,
        total: int,
        progress: ProgressCallback | None,
        block_bytes: int,
    ) -> None:
        self.source, self.output, self.src = source, output, src
        self.total, self.done, self.progress = total, 0, progress
        self.block_bytes = max(1, block_bytes)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.failure: BaseException | None = None
        self.start_writeback = _sync_file_range()
        self.methods = [
            m
            for m in (
                self._copy_file_range if hasattr(os, "copy_file_range") else None,
                self._sendfile if hasattr(os, "sendfile") else None,
                self._read_write,
            )
            if m is not None
        ]

    def run(
        self, copies: list[tuple[int, int, int]], moves: list[tuple[int, int, _Target]]
    ) -> None:
        """Copy ``copies`` and permute ``moves``, overlapped when there are both."""
        if not moves or not copies:
            self._copy_all(copies)
            self._permute_all(moves)
            return
        worker = threading.Thread(target=self._guarded, args=(self._copy_all, copies))
        worker.start()
        failure: BaseException | None = None
        try:
            self._permute_all(moves)
        except BaseException as error:
            failure = error
        finally:
            if failure is not None:
                self.stop.set()
            worker.join()
        if failure is not None and not isinstance(failure, _Stopped):
            raise failure
        if self.failure is not None:
            raise self.failure

    def _guarded(self, function: Callable[..., None], *args: Any) -> None:
        try:
            function(*args)
        except _Stopped:
            pass
        except BaseException as error:  # handed to the main thread by run()
            self.failure = error
            self.stop.set()

    def _check(self) -> None:
        if self.stop.is_set():
            raise _Stopped

    def _copy_all(self, copies: list[tuple[int, int, int]]) -> None:
        for src_offset, dst_offset, length in copies:
            self.copy(src_offset, dst_offset, length)

    def _permute_all(self, moves: list[tuple[int, int, _Target]]) -> None:
        for old_start, new_start, target in moves:
            self.permute(old_start + target.info.begin, new_start + target.info.begin, target)

    def _advance(self, count: int) -> None:
        with self.lock:
            self.done += count
            if self.progress is not None:
                self.progress(self.done, self.total)

    def _flush(self, start: int, end: int) -> int:
        """Start writeback of ``[start, end)`` once it is large enough; return the new start."""
        if self.start_writeback is None or end - start < WRITEBACK_BYTES:
            return start
        self.start_writeback(self.output, start, end - start)
        return end

    def write(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data).cast("B")
        written = 0
        while written < len(view):
            written += os.pwrite(self.output, view[written:], offset + written)
        self._advance(len(view))

    def _read_into(self, view: memoryview, offset: int) -> None:
        got = 0
        while got < len(view):
            try:
                count = os.preadv(self.source, [view[got:]], offset + got)
            except OSError as error:
                raise _read_error(self.src, error) from None
            if count == 0:
                raise self._changed()
            got += count

    def _changed(self) -> CheckpointError:
        return CheckpointError(
            f"{self.src} ended early while being copied (did it change?); check the file and retry"
        )

    def copy(self, src_offset: int, dst_offset: int, length: int) -> None:
        """Copy ``length`` bytes in chunks of at most a block, for progress and interrupts."""
        pending = dst_offset
        while length > 0:
            self._check()
            count = self._copy_some(src_offset, dst_offset, min(length, self.block_bytes))
            if count == 0:
                raise self._changed()
            src_offset, dst_offset, length = src_offset + count, dst_offset + count, length - count
            self._advance(count)
            pending = self._flush(pending, dst_offset)

    def _copy_some(self, src_offset: int, dst_offset: int, length: int) -> int:
        while True:
            method = self.methods[0]
            try:
                return method(src_offset, dst_offset, length)
            except OSError as error:
                # A method the kernel or filesystem refuses; anything else (ENOSPC,
                # EFBIG, EIO) is the write failing and goes to atomic_output.
                if error.errno not in _FALLBACK_ERRNOS or len(self.methods) == 1:
                    raise
                self.methods.pop(0)

    def _copy_file_range(self, src_offset: int, dst_offset: int, length: int) -> int:
        return os.copy_file_range(self.source, self.output, length, src_offset, dst_offset)

    def _sendfile(self, src_offset: int, dst_offset: int, length: int) -> int:
        # sendfile writes at the output's file position; only one thread ever copies.
        os.lseek(self.output, dst_offset, os.SEEK_SET)
        return os.sendfile(self.output, self.source, src_offset, length)

    def _read_write(self, src_offset: int, dst_offset: int, length: int) -> int:
        try:
            data = os.pread(self.source, min(length, 8 * MiB), src_offset)
        except OSError as error:
            raise _read_error(self.src, error) from None
        if data:
            view = memoryview(data)
            written = 0
            while written < len(view):
                written += os.pwrite(self.output, view[written:], dst_offset + written)
        return len(data)

    def permute(self, src_offset: int, dst_offset: int, target: _Target) -> None:
        """Rewrite one Linear weight as its kernel, a block of whole rows at a time."""
        import numpy as np

        info, patch, order = target.info, target.patch, target.order
        rows, features = info.shape
        itemsize = DTYPE_BITS[info.dtype] // 8
        element = np.dtype(f"<u{itemsize}")  # the bits, never their value
        row_bytes = features * itemsize
        block_rows = max(1, min(rows, self.block_bytes // row_bytes))
        source = np.empty(block_rows * features, dtype=element)
        kernel = np.empty_like(source)
        axes = (0, *(1 + order.index(axis) for axis in AXES))
        pending = dst_offset
        for first in range(0, rows, block_rows):
            self._check()
            count = min(block_rows, rows - first)
            length = count * row_bytes
            offset = first * row_bytes
            self._read_into(memoryview(source).cast("B")[:length], src_offset + offset)
            grouped = source[: count * features].reshape(count, *patch.sizes(order))
            out = kernel[: count * features].reshape(count, *patch.sizes(AXES))
            np.copyto(out, grouped.transpose(axes))
            self.write(memoryview(kernel).cast("B")[:length], dst_offset + offset)
            pending = self._flush(pending, dst_offset + offset + length)


# ------------------------------------------------------------------ progress


@contextlib.contextmanager
def progress_bar(
    description: str, *, enabled: bool | None = None
) -> Iterator[ProgressCallback | None]:
    """A rich progress bar on stderr as a :data:`ProgressCallback`, or None when disabled.

    Enabled by default only when stderr is a terminal, so pipes and logs stay clean.

    Example:
        >>> with progress_bar("converting", enabled=False) as progress:
        ...     progress is None
        True
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
