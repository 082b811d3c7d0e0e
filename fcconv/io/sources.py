"""One view of any input: a file in memory, a safetensors file on disk, or a shard folder.

Planning needs only names, shapes and dtypes; checks need a few tensors. A
:class:`Source` gives both without deciding how much of the file to read:
safetensors files and shard folders are described from their headers alone
(no torch import, no tensor bytes), torch pickles are loaded.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcconv import dtypes
from fcconv.errors import CheckpointError
from fcconv.geometry import unravel_index
from fcconv.io.atomic import STDIO
from fcconv.io.checkpoint import (
    IN_MEMORY,
    SAFETENSORS,
    Checkpoint,
    checkpoint_of,
    load_checkpoint,
)
from fcconv.io.files import describe_read_error, open_regular, probe
from fcconv.io.provenance import PROVENANCE_KEY, layer_records
from fcconv.plan import TensorInfo
from fcconv.progress import phased
from fcconv.verify.bits import bits_dtype

if TYPE_CHECKING:
    import numpy as np
    import torch

SHARDED = "sharded"


@dataclass
class Source:
    """What a command needs of an input: its tensors' descriptions and a way to read some."""

    path: str
    format: str  # "torch", "safetensors" or "sharded"
    info: dict[str, TensorInfo]
    metadata: dict[str, str] | None
    read: Callable[[list[str]], dict[str, torch.Tensor]]
    loaded: Checkpoint | None = None  # set when the whole file is in memory
    span: Callable[[str], tuple[Path, int, int]] | None = (
        None  # (file, offset, length) of its bytes
    )
    inputs: tuple[str | Path, ...] = ()
    """Every file and folder the source reads (``-`` for stdin): never to be written."""
    surroundings: Any = None
    """Everything that is not a tensor and must survive a conversion (metadata, the
    training state around the weights), fcconv's provenance record excepted."""

    def read_rows(self, name: str, rows: list[int]) -> np.ndarray:
        """Rows of a 2-D tensor as a numpy array of its dtype, reading only those rows' bytes
        when it is on disk (then without torch)."""
        if self.span is None:
            from fcconv.verify.arrays import as_array

            return as_array(self.read([name])[name][rows])
        return DiskTensors(self).array_rows(name, rows)

    @property
    def records(self) -> dict[str, dict[str, Any]]:
        """fcconv's provenance: layer name → what it recorded of that conversion."""
        return layer_records(self.metadata)

    @property
    def on_disk(self) -> bool:
        """Whether tensors are read from disk on demand (streaming is possible)."""
        return self.loaded is None


def _info(entries: Mapping[str, Any]) -> dict[str, TensorInfo]:
    return {name: entry.info for name, entry in entries.items()}


def open_source(
    path: str, *, trust_pickle: bool = False, lazy: bool = True, describe_only: bool = False
) -> Source:
    """Describe ``path``: from headers when it is safetensors or sharded and ``lazy``.

    ``describe_only`` promises that no tensor's bytes will be read, which lets
    a zip torch checkpoint be memory-mapped instead of read whole.
    """
    from fcconv.io.sharded import is_sharded

    if path != STDIO and is_sharded(path):
        return _sharded_source(path)
    if lazy and path != STDIO and _is_safetensors_file(Path(path)):
        return _safetensors_source(path)
    if path != STDIO and _is_keras_file(Path(path)):
        return _keras_source(path)
    loaded = load_checkpoint(path, trust_pickle=trust_pickle, mmap=describe_only)
    return _loaded_source(path, loaded)


def source_of(
    value: Any, *, trust_pickle: bool = False, lazy: bool = True, describe_only: bool = False
) -> Source:
    """:func:`open_source` for a path, or a source in memory for a state dict (any
    mapping, or a training checkpoint around one) given as itself.

    Raises:
        CheckpointError: ``value`` is neither a path nor a mapping holding tensors.
    """
    if isinstance(value, Mapping):
        return _loaded_source(IN_MEMORY, checkpoint_of(value, IN_MEMORY))
    if not isinstance(value, str | os.PathLike):
        raise CheckpointError(
            f"expected a checkpoint's path or a state dict (a mapping of names to tensors), "
            f"got {type(value).__name__}"
        )
    return open_source(
        str(value), trust_pickle=trust_pickle, lazy=lazy, describe_only=describe_only
    )


def _loaded_source(path: str, loaded: Checkpoint) -> Source:
    """A source whose tensors are all in memory."""
    from fcconv.plan import describe

    surroundings = (
        loaded.surroundings() if loaded.format != SAFETENSORS else _metadata_of(loaded.metadata)
    )
    return Source(
        path=path,
        format=loaded.format,
        info=describe(loaded.tensors),
        metadata=loaded.metadata,
        read=lambda names: {name: loaded.tensors[name] for name in names},
        loaded=loaded,
        inputs=(path,),
        surroundings=surroundings,
    )


def _metadata_of(metadata: Mapping[str, str] | None) -> dict[str, Any]:
    """A safetensors file's surroundings: its metadata without fcconv's record."""
    return {"__metadata__": {k: v for k, v in (metadata or {}).items() if k != PROVENANCE_KEY}}


def _is_safetensors_file(file: Path) -> bool:
    found = probe(file)
    if found is None or not stat.S_ISREG(found.st_mode):
        return False  # loading it says what is wrong
    with open_regular(file) as descriptor:
        head = os.pread(descriptor, 9, 0)
    return len(head) == 9 and head[8:9] == b"{"


def _is_keras_file(file: Path) -> bool:
    from fcconv.io.keras import HDF5_MAGIC, kind_of

    if not file.is_file():
        return False
    with open(file, "rb") as handle:
        head = handle.read(8)
    return (head == HDF5_MAGIC or head.startswith(b"PK\x03\x04")) and kind_of(file) is not None


def _keras_source(path: str) -> Source:
    """A Keras file in PyTorch's terms (see :mod:`fcconv.io.keras`), loaded whole."""
    from fcconv.io.keras import read_keras

    return _loaded_source(path, read_keras(path).checkpoint())


def _safetensors_source(path: str) -> Source:
    from fcconv.io.safetensors import read_header, read_tensors

    header = read_header(path)
    return Source(
        path=path,
        format=SAFETENSORS,
        info=_info(header.tensors),
        metadata=header.metadata,
        read=lambda names: read_tensors(path, list(names)),
        span=lambda name: _span(header, name),
        inputs=(path,),
        surroundings=_metadata_of(header.metadata),
    )


def _sharded_source(path: str) -> Source:
    from fcconv.io.sharded import load_index, read_sharded_tensors

    checkpoint = load_index(path)
    metadata: dict[str, str] = {}
    layers: dict[str, Any] = {}
    for header in checkpoint.shards.values():
        layers.update(layer_records(header.metadata))
    if layers:
        metadata[PROVENANCE_KEY] = json.dumps({"layers": layers})
    surroundings = {
        "index": {"metadata": checkpoint.metadata, "weight_map": checkpoint.weight_map},
        "shards": {name: _metadata_of(h.metadata) for name, h in checkpoint.shards.items()},
    }
    return Source(
        path=path,
        format=SHARDED,
        info=_info(checkpoint.tensors),
        metadata=metadata or None,
        read=lambda names: read_sharded_tensors(checkpoint, list(names)),
        span=lambda name: _span(checkpoint.header_of(name), name),
        inputs=(checkpoint.folder, checkpoint.index_path),
        surroundings=surroundings,
    )


def _span(header: Any, name: str) -> tuple[Path, int, int]:
    entry = header.tensors[name]
    return header.path, header.data_start + entry.begin, entry.nbytes


class LazyTensors(Mapping):
    """A source's tensors, each read from disk the first time it is asked for."""

    def __init__(self, source: Source) -> None:
        self._source = source
        self._cache: dict[str, torch.Tensor] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._source.info:
            raise KeyError(key)
        if key not in self._cache:
            self._cache[key] = self._source.read([key])[key]
        return self._cache[key]

    def __contains__(self, key: object) -> bool:
        return key in self._source.info

    def __iter__(self) -> Iterator[str]:
        return iter(self._source.info)

    def __len__(self) -> int:
        return len(self._source.info)


def tensors_of(source: Source) -> Mapping[str, torch.Tensor]:
    """The tensors of ``source``: in memory when loaded, else read on demand."""
    return source.loaded.tensors if source.loaded is not None else LazyTensors(source)


@phased("comparing the other tensors")
def byte_differences(
    before: Source,
    after: Source,
    skip: set[str],
    *,
    only: Collection[str] | None = None,
) -> list[str]:
    """Untouched tensors of two on-disk sources compared by their bytes, a chunk at a time.

    The same facts as :func:`fcconv.verify.untouched_differences` without
    loading a tensor: memory stays at one chunk whatever the checkpoint's size.
    Names, dtypes and shapes of every tensor are compared; with ``only``, the
    bytes of just those tensors.
    """
    differences = [
        f"{k} is missing from the converted checkpoint" for k in before.info if k not in after.info
    ]
    differences += [
        f"{k} is new in the converted checkpoint" for k in after.info if k not in before.info
    ]
    for key, info in before.info.items():
        other = after.info.get(key)
        if key in skip or other is None:
            continue
        if info.dtype != other.dtype:
            differences.append(f"{key} differs: dtype {info.dtype} → {other.dtype}")
        elif info.shape != other.shape:
            differences.append(f"{key} differs: shape {info.shape} → {other.shape}")
        elif only is None or key in only:
            count, first = _compare_spans(before.span(key), after.span(key), _itemsize(info))
            if count:
                where = list(unravel_index(first, info.shape))
                differences.append(f"{key} differs: {count} element(s), first at {where}")
    return differences


_CHUNK = 16 << 20


def _itemsize(info: TensorInfo) -> int:
    known = dtypes.by_name(info.dtype)
    return known.itemsize if known is not None else 1


def _compare_spans(
    a: tuple[Path, int, int], b: tuple[Path, int, int], itemsize: int
) -> tuple[int, int]:
    """(count, first index) of the elements whose bytes differ between two byte ranges."""
    (path_a, start_a, length), (path_b, start_b, _) = a, b
    chunk = max(itemsize, _CHUNK // itemsize * itemsize)
    count, first = 0, -1
    with open_regular(path_a) as file_a, open_regular(path_b) as file_b:
        for done in range(0, length, chunk):
            size = min(chunk, length - done)
            ahead = min(chunk, length - done - size)  # the disk reads on while this is compared
            read_ahead(file_a, start_a + done + size, ahead)
            read_ahead(file_b, start_b + done + size, ahead)
            left = _pread(file_a, size, start_a + done, path_a)
            right = _pread(file_b, size, start_b + done, path_b)
            if left == right:  # memcmp: the common case costs no more than the reads
                continue
            differs = _element_differences(left, right, itemsize)
            found = int(differs.sum())
            if found and first < 0:
                first = done // itemsize + int(differs.argmax())
            count += found
    return count, first


def _pread(descriptor: int, size: int, offset: int, path: Path) -> bytes:
    try:
        data = os.pread(descriptor, size, offset)
    except OSError as error:
        raise describe_read_error(path, error) from None
    if len(data) != size:
        raise CheckpointError(
            f"{path} ended early while being compared (did it change?); check the file and retry"
        )
    return data


def _element_differences(left: bytes, right: bytes, itemsize: int) -> np.ndarray:
    """Which elements of two equally long byte strings differ, as booleans."""
    import numpy as np

    if itemsize in (1, 2, 4, 8):
        width = np.dtype(f"u{itemsize}")
        return np.frombuffer(left, width) != np.frombuffer(right, width)
    a, b = np.frombuffer(left, np.uint8), np.frombuffer(right, np.uint8)
    return (a.reshape(-1, itemsize) != b.reshape(-1, itemsize)).any(axis=1)


class DiskTensors:
    """:class:`fcconv.verify.exact.Tensors` of a source on disk: each read is a byte range.

    Rows are read with ``pread`` straight from the file (from the page cache
    when it was just written), never through a whole-tensor load.
    """

    def __init__(self, source: Source) -> None:
        if source.span is None:
            raise ValueError(f"{source.path} is not read from disk")
        self.source = source

    def describe(self, key: str) -> TensorInfo | None:
        return self.source.info.get(key)

    def _row_span(self, key: str) -> tuple[Path, int, int]:
        """(file, offset of the tensor's first byte, bytes per first-axis row)."""
        assert self.source.span is not None
        path, offset, length = self.source.span(key)
        rows = self.source.info[key].shape[0] if self.source.info[key].shape else 1
        return path, offset, length // rows if rows else 0

    def row_bits(self, key: str, start: int, stop: int) -> np.ndarray:
        path, offset, row_bytes = self._row_span(key)
        begin, length = offset + start * row_bytes, (stop - start) * row_bytes
        data = read_span(path, begin, length, ahead=length)  # blocks are read in order
        info = self.source.info[key]
        row = math.prod(info.shape[1:]) if info.shape else 1
        return data.view(bits_dtype(info.dtype)).reshape(stop - start, row)

    def rows(self, key: str, rows: Sequence[int]) -> torch.Tensor:
        import numpy as np

        path, offset, row_bytes = self._row_span(key)
        runs = _runs(list(rows))  # consecutive rows are read in one go
        parts = [read_span(path, offset + a * row_bytes, (b - a) * row_bytes) for a, b in runs]
        data = parts[0] if len(parts) == 1 else np.concatenate([np.empty(0, np.uint8), *parts])
        return self._as_tensor(key, data, len(rows))

    def array_rows(self, key: str, rows: Sequence[int]) -> np.ndarray:
        """The listed rows as a numpy array of the tensor's dtype: torch is never imported."""
        import numpy as np

        from fcconv.verify.arrays import numpy_dtype

        info = self.source.info[key]
        data = self._row_data(key, rows)
        shape = (len(rows), *info.shape[1:]) if info.shape else ()
        if data.size == 0:
            return np.empty(shape, numpy_dtype(info.dtype))
        return data.view(bits_dtype(info.dtype)).view(numpy_dtype(info.dtype)).reshape(shape)

    def _row_data(self, key: str, rows: Sequence[int]) -> np.ndarray:
        import numpy as np

        path, offset, row_bytes = self._row_span(key)
        runs = _runs(list(rows))  # consecutive rows are read in one go
        parts = [read_span(path, offset + a * row_bytes, (b - a) * row_bytes) for a, b in runs]
        if not parts:
            return np.empty(0, np.uint8)
        return parts[0] if len(parts) == 1 else np.concatenate([np.empty(0, np.uint8), *parts])

    def tensor(self, key: str) -> torch.Tensor:
        path, offset, length = self.source.span(key)  # type: ignore[misc]
        shape = self.source.info[key].shape
        return self._as_tensor(key, read_span(path, offset, length), shape[0] if shape else None)

    def _as_tensor(self, key: str, data: np.ndarray, rows: int | None) -> torch.Tensor:
        import torch

        info = self.source.info[key]
        dtype = getattr(torch, info.dtype)
        if data.size == 0:  # no elements (a weight without rows): nothing to view
            return torch.empty(() if rows is None else (rows, *info.shape[1:]), dtype=dtype)
        tensor = torch.from_numpy(data).view(dtype)
        return tensor.reshape(()) if rows is None else tensor.reshape(rows, *info.shape[1:])


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """``rows`` as half-open runs of consecutive indices, in order.

    >>> _runs([0, 1, 2, 5, 7, 8])
    [(0, 3), (5, 6), (7, 9)]
    """
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][1] == row:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return runs


def read_span(path: Path, offset: int, length: int, ahead: int = 0) -> np.ndarray:
    """``length`` bytes of ``path`` from ``offset``, as a new uint8 array (one ``preadv``).

    ``ahead`` bytes after them are asked of the disk too, to arrive while
    the caller works on these.
    """
    import numpy as np

    from fcconv.io.safetensors import read_error

    data = np.empty(length, np.uint8)
    view, got = memoryview(data), 0
    try:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            read_ahead(descriptor, offset + length, ahead)
            while got < length:
                count = os.preadv(descriptor, [view[got:]], offset + got)
                if count == 0:
                    raise CheckpointError(
                        f"{path} ended early while being read (did it change?); check the file"
                    )
                got += count
        finally:
            os.close(descriptor)
    except OSError as error:
        raise read_error(Path(path), error) from None
    return data


def read_ahead(descriptor: int, offset: int, length: int) -> None:
    """Ask the kernel to start reading a byte range that will be needed next (a hint)."""
    if length > 0 and hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(descriptor, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:  # a file system without read-ahead: the reads still work
            pass


def read_all(source: Source) -> dict[str, torch.Tensor]:
    """Every tensor of ``source``, in order (what a full comparison needs)."""
    if source.loaded is not None:
        return source.loaded.tensors
    return source.read(list(source.info))
