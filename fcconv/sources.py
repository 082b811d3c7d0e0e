"""One view of any input: a file in memory, a safetensors file on disk, or a shard folder.

Planning needs only names, shapes and dtypes; checks need a few tensors. A
:class:`Source` gives both without deciding how much of the file to read:
safetensors files and shard folders are described from their headers alone
(no torch import, no tensor bytes), torch pickles are loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcconv.checkpoint import PROVENANCE_KEY, SAFETENSORS, STDIO, Checkpoint, load_checkpoint
from fcconv.errors import CheckpointError
from fcconv.layers import TensorInfo

if TYPE_CHECKING:
    import torch

SHARDED = "sharded"

# safetensors dtype codes → torch's names (what layers.TensorInfo speaks).
_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


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

    def read_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Rows of a 2-D tensor, reading only those rows' bytes when it is on disk."""
        import torch

        if self.locate is None:
            return self.read([name])[name][rows]
        from safetensors import safe_open

        with safe_open(str(self.locate(name)), framework="pt") as handle:
            block = handle.get_slice(name)
            return torch.cat([block[row : row + 1] for row in rows])

    @property
    def provenance(self) -> dict[str, Any]:
        """fcconv's record of converted layers (``{"layers": {...}}``), or ``{}``."""
        return _provenance(self.metadata)

    @property
    def on_disk(self) -> bool:
        """Whether tensors are read from disk on demand (streaming is possible)."""
        return self.loaded is None


def _provenance(metadata: Mapping[str, str] | None) -> dict[str, Any]:
    try:
        record = json.loads((metadata or {}).get(PROVENANCE_KEY) or "{}")
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def _info(entries: Mapping[str, Any]) -> dict[str, TensorInfo]:
    return {
        name: TensorInfo(tuple(entry.shape), _DTYPE_NAMES.get(entry.dtype, entry.dtype.lower()))
        for name, entry in entries.items()
    }


def open_source(path: str, *, trust_pickle: bool = False, lazy: bool = True) -> Source:
    """Describe ``path``: from headers when it is safetensors or sharded and ``lazy``."""
    from fcconv.sharded import is_sharded

    if path != STDIO and is_sharded(path):
        return _sharded_source(path)
    if lazy and path != STDIO and _is_safetensors_file(Path(path)):
        return _safetensors_source(path)
    loaded = load_checkpoint(path, trust_pickle=trust_pickle)
    from fcconv.layers import describe

    return Source(
        path=path,
        format=loaded.format,
        info=describe(loaded.tensors),
        metadata=loaded.metadata,
        read=lambda names: {name: loaded.tensors[name] for name in names},
        loaded=loaded,
    )


def _is_safetensors_file(file: Path) -> bool:
    if not file.is_file():
        return False
    with open(file, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def _safetensors_source(path: str) -> Source:
    from fcconv.streaming import read_header, read_tensors

    header = read_header(path)
    return Source(
        path=path,
        format=SAFETENSORS,
        info=_info(header.tensors),
        metadata=header.metadata,
        read=lambda names: read_tensors(path, list(names)),
        locate=lambda name: Path(path),
    )


def _sharded_source(path: str) -> Source:
    from fcconv.sharded import load_index, read_sharded_tensors

    try:
        checkpoint = load_index(path)
    except CheckpointError as error:
        if Path(path).is_dir() and "holds no" in str(error):
            raise CheckpointError(
                f"{path} is a directory with no *.safetensors.index.json; give a checkpoint "
                "file (.pt, .pth, .bin, .ckpt, .safetensors) or a sharded checkpoint's folder"
            ) from None
        raise
    metadata: dict[str, str] = {}
    layers: dict[str, Any] = {}
    for header in checkpoint.shards.values():
        layers.update(_provenance(header.metadata).get("layers", {}))
    if layers:
        metadata[PROVENANCE_KEY] = json.dumps({"layers": layers})
    return Source(
        path=path,
        format=SHARDED,
        info=_info(checkpoint.tensors),
        metadata=metadata or None,
        read=lambda names: read_sharded_tensors(checkpoint, list(names)),
        locate=lambda name: checkpoint.header_of(name).path,
    )


def read_all(source: Source) -> dict[str, torch.Tensor]:
    """Every tensor of ``source``, in order (what a full comparison needs)."""
    if source.loaded is not None:
        return source.loaded.tensors
    return source.read(list(source.info))
