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

import errno
import os
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcconv import dtypes
from fcconv.errors import CheckpointError, LayerError, SpecError
from fcconv.geometry import kernel_transpose
from fcconv.io.atomic import atomic_output, check_output_path
from fcconv.io.files import open_regular
from fcconv.io.safetensors import (
    HeaderEntry,
    SafetensorsHeader,
    check_metadata,
    encode_header,
    layout_header,
    read_error,
    read_header,
)
from fcconv.patches import AnyPatch, as_nd, parse_order_nd

MiB = 1 << 20
DEFAULT_BLOCK_BYTES = 64 * MiB
"""Rows of a permuted tensor read at once; the rewrite holds two such buffers."""

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(bytes_done, bytes_total)`` as the output is written."""

# ------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _Target:
    info: HeaderEntry
    patch: AnyPatch
    order: str

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        return (self.info.shape[0], *as_nd(self.patch).kernel_shape)

    @property
    def moves_bytes(self) -> bool:
        """False when the permutation is the identity (``chw``, ``cl``, or axes of length 1)."""
        _, transpose = kernel_transpose(self.patch, self.order)
        return transpose != tuple(range(len(transpose)))


@dataclass(frozen=True)
class Move:
    """One Linear weight whose rows are permuted into its conv kernel on the way."""

    src_offset: int  # where its first byte is in the input
    dst_offset: int  # where the kernel's first byte goes in the output
    rows: int
    features: int
    itemsize: int
    patch: AnyPatch
    order: str

    @property
    def nbytes(self) -> int:
        return self.rows * self.features * self.itemsize


def _move(target: _Target, old_start: int, new_start: int) -> Move:
    rows, features = target.info.shape
    itemsize = dtypes.by_code(target.info.dtype).itemsize
    begin = target.info.begin
    return Move(
        old_start + begin, new_start + begin, rows, features, itemsize, target.patch, target.order
    )


def _targets(
    header: SafetensorsHeader, layers: Mapping[str, tuple[AnyPatch, str]]
) -> dict[str, _Target]:
    targets = {}
    for name, (patch, order) in layers.items():
        info = header.tensors.get(name)
        if info is None:
            raise LayerError(
                f"{header.path} has no tensor {name!r}; run fcconv inspect {header.path} to list "
                "its Linear weights"
            )
        order = parse_order_nd(order, as_nd(patch).ndim)
        if len(info.shape) != 2:
            raise LayerError(
                f"{name} in {header.path} has shape {list(info.shape)}, not a Linear weight "
                "[out, in]; name a 2-D weight"
            )
        if info.shape[1] != patch.features:
            raise SpecError(
                f"patch {patch} has {patch.features} elements but {name} has in_features "
                f"{info.shape[1]}; give a patch of {info.shape[1]} elements (H·W·C, L·C or D·H·W·C)"
            )
        if not dtypes.by_code(info.dtype).convertible:
            raise LayerError(
                f"{name} in {header.path} is {info.dtype}, not a floating-point weight; fcconv "
                "converts floating-point Linear weights only"
            )
        targets[name] = _Target(info, patch, order)
    return targets


def converted_header(
    header: SafetensorsHeader,
    layers: Mapping[str, tuple[AnyPatch, str]],
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
        check_metadata(metadata)
    entries = {
        name: info.entry(targets[name].kernel_shape if name in targets else None)
        for name, info in header.tensors.items()
    }
    encoded = encode_header(header.metadata if metadata is None else metadata, entries)
    padded = layout_header(encoded, header.header_bytes)
    return len(padded).to_bytes(8, "little") + padded


def stream_convert(
    src: str | Path,
    dst: str | Path,
    layers: Mapping[str, tuple[AnyPatch, str]],
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
            with ``K[o, c, i, j] = W[o, index_of(order, c, i, j)]`` (``[O, C, L]``
            or ``[O, C, D, H, W]`` for a 1-D or 3-D patch).
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
    with atomic_output(dst, force=force, sources=(src,)) as temporary:
        _write_converted(header, targets, new_header, temporary, progress, block_bytes)
        if check is not None:
            check(temporary)


def write_converted(
    src: str | Path,
    dst: str | Path,
    layers: Mapping[str, tuple[AnyPatch, str]],
    metadata: Mapping[str, str] | None = None,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: ProgressCallback | None = None,
) -> None:
    """What :func:`stream_convert` writes, into the new file ``dst``, not atomically.

    For callers that build their output somewhere temporary (as
    :func:`fcconv.io.sharded.convert_sharded` does). ``dst`` must not exist;
    it is fsynced. ``OSError`` from writing propagates for the caller to
    describe.
    """
    header = read_header(src)
    targets = _targets(header, layers)
    new_header = _new_header(header, targets, metadata)
    descriptor = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(descriptor)
    _write_converted(header, targets, new_header, Path(dst), progress, block_bytes)
    with open(dst, "rb+") as handle:
        os.fsync(handle.fileno())


def _write_converted(
    header: SafetensorsHeader,
    targets: Mapping[str, _Target],
    new_header: bytes,
    path: Path,
    progress: ProgressCallback | None,
    block_bytes: int,
) -> None:
    """Write header and data into the existing empty file ``path``."""
    # Only tensors whose bytes move pass through memory; every other byte range,
    # chw targets included, is copied in the kernel. The data section's layout is
    # the same in both files, so offsets within it carry over unchanged.
    src = header.path
    moved = sorted((t for t in targets.values() if t.moves_bytes), key=lambda t: t.info.begin)
    old_start, new_start = header.data_start, len(new_header)
    copies, position = [], 0
    for target in [*moved, None]:
        end = target.info.begin if target else header.data_bytes
        if end > position:
            copies.append((old_start + position, new_start + position, end - position))
        position = target.info.end if target else end
    with open_regular(src) as source:
        # No O_TRUNC: the file is new and empty, and truncating makes ext4
        # (auto_da_alloc) flush the whole file synchronously on close.
        output = os.open(path, os.O_WRONLY)
        try:
            total = new_start + header.data_bytes
            writer = _Writer(source, output, src, total, progress, block_bytes)
            writer.write(new_header, 0)
            writer.run(copies, [_move(t, old_start, new_start) for t in moved])
            if os.fstat(output).st_size != total:
                raise CheckpointError(f"{src} changed while being copied; check the file and retry")
        finally:
            os.close(output)


def copy_file(
    src: str | Path,
    dst: str | Path,
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: ProgressCallback | None = None,
) -> None:
    """Copy ``src`` to the new file ``dst`` in the kernel and fsync it.

    Not atomic by itself: for callers that build their output somewhere
    temporary (as :func:`fcconv.io.sharded.convert_sharded` does). ``dst`` must
    not exist. ``OSError`` propagates for the caller to describe.
    """
    with open_regular(src) as source:
        output = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            size = os.fstat(source).st_size
            writer = _Writer(source, output, Path(src), size, progress, block_bytes)
            writer.run([(0, 0, size)] if size else [], [])
            os.fsync(output)
        finally:
            os.close(output)


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
        self, copies: list[tuple[int, int, int]], moves: list[Move], *, checksum: bool = False
    ) -> list[int]:
        """Copy ``copies`` and permute ``moves``, overlapped when there are both.

        With ``checksum``, returns the CRC-32 of each move's output bytes (what
        a zip record of them needs), else an empty list.
        """
        if not moves or not copies:
            self._copy_all(copies)
            return self._permute_all(moves, checksum)
        worker = threading.Thread(target=self._guarded, args=(self._copy_all, copies))
        worker.start()
        failure: BaseException | None = None
        checksums: list[int] = []
        try:
            checksums = self._permute_all(moves, checksum)
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
        return checksums

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

    def _permute_all(self, moves: list[Move], checksum: bool) -> list[int]:
        checksums = [self.permute(move, checksum) for move in moves]
        return checksums if checksum else []

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
                raise read_error(self.src, error) from None
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
            raise read_error(self.src, error) from None
        if data:
            view = memoryview(data)
            written = 0
            while written < len(view):
                written += os.pwrite(self.output, view[written:], dst_offset + written)
        return len(data)

    def permute(self, move: Move, checksum: bool = False) -> int:
        """Rewrite one Linear weight as its kernel, a block of whole rows at a time.

        Returns the CRC-32 of the bytes written when ``checksum``, else 0.
        """
        import zlib

        import numpy as np

        features = move.features
        if move.rows == 0:  # nothing to move: never size a buffer by the row the file declares
            return 0
        element = np.dtype(f"<u{move.itemsize}")  # the bits, never their value
        row_bytes = features * move.itemsize
        block_rows = max(1, min(move.rows, self.block_bytes // row_bytes))
        source = np.empty(block_rows * features, dtype=element)
        kernel = np.empty_like(source)
        sizes, axes = kernel_transpose(move.patch, move.order)
        pending, crc = move.dst_offset, 0
        for first in range(0, move.rows, block_rows):
            self._check()
            count = min(block_rows, move.rows - first)
            length = count * row_bytes
            offset = first * row_bytes
            self._read_into(memoryview(source).cast("B")[:length], move.src_offset + offset)
            grouped = source[: count * features].reshape(count, *sizes)
            out = kernel[: count * features].reshape(count, *(sizes[a] for a in axes))
            np.copyto(out, grouped.transpose(0, *(1 + a for a in axes)))
            written = memoryview(kernel).cast("B")[:length]
            self.write(written, move.dst_offset + offset)
            if checksum:
                crc = zlib.crc32(written, crc)
            pending = self._flush(pending, move.dst_offset + offset + length)
        return crc
