"""One view of any input: a file in memory, a safetensors file on disk, or a shard folder.

Planning needs only names, shapes and dtypes; checks need a few tensors. A
:class:`Source` gives both without deciding how much of the file to read:
safetensors files and shard folders are described from their headers alone
(no torch import, no tensor bytes), torch pickles are loaded.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcconv import dtypes
from fcconv.errors import CheckpointError
from fcconv.geometry import unravel_index
from fcconv.io.atomic import STDIO
from fcconv.io.checkpoint import SAFETENSORS, Checkpoint, load_checkpoint
from fcconv.io.files import describe_read_error, open_regular, probe
from fcconv.io.provenance import PROVENANCE_KEY, layer_records
from fcconv.plan import TensorInfo

if TYPE_CHECKING:
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
    locate: Callable[[str], Path] | None = None  # the safetensors file holding a tensor
    span: Callable[[str], tuple[Path, int, int]] | None = (
        None  # (file, offset, length) of its bytes
    )
    inputs: tuple[str | Path, ...] = ()
    """Every file and folder the source reads (``-`` for stdin): never to be written."""
    surroundings: Any = None
    """Everything that is not a tensor and must survive a conversion (metadata, the
    training state around the weights), fcconv's provenance record excepted."""

    def read_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Rows of a 2-D tensor, reading only those rows' bytes when it is on disk."""
        if self.locate is None:
            return self.read([name])[name][rows]
        from fcconv.io.safetensors import read_rows

        return read_rows(self.locate(name), name, rows)

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
        locate=lambda name: Path(path),
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
        locate=lambda name: checkpoint.header_of(name).path,
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


def byte_differences(before: Source, after: Source, skip: set[str]) -> list[str]:
    """Untouched tensors of two on-disk sources compared by their bytes, a chunk at a time.

    The same facts as :func:`fcconv.verify.untouched_differences` without
    loading a tensor: memory stays at one chunk whatever the checkpoint's size.
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
        else:
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
    import numpy as np

    (path_a, start_a, length), (path_b, start_b, _) = a, b
    chunk = max(itemsize, _CHUNK // itemsize * itemsize)
    count, first = 0, -1
    with open_regular(path_a) as file_a, open_regular(path_b) as file_b:
        for done in range(0, length, chunk):
            size = min(chunk, length - done)
            left = np.frombuffer(_pread(file_a, size, start_a + done, path_a), np.uint8)
            right = np.frombuffer(_pread(file_b, size, start_b + done, path_b), np.uint8)
            differs = (left.reshape(-1, itemsize) != right.reshape(-1, itemsize)).any(axis=1)
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


def read_all(source: Source) -> dict[str, torch.Tensor]:
    """Every tensor of ``source``, in order (what a full comparison needs)."""
    if source.loaded is not None:
        return source.loaded.tensors
    return source.read(list(source.info))
