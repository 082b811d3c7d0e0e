"""Sharded safetensors checkpoints: a ``*.safetensors.index.json`` and its shards.

The index's ``weight_map`` says which shard file holds each tensor; it is the
only source of truth (shards are never globbed). :func:`load_index` checks it
against every shard's header, and :func:`convert_sharded` writes a new folder
in which the shards holding a converted layer are rewritten by
:func:`fcconv.io.streaming.stream_convert`, the others copied in the kernel (or
hard-linked), and the index copied unchanged: tensor names and byte counts
do not change, so neither does anything the index records.

The new folder appears at once or not at all: it is built in a temporary
sibling folder (``.NAME.*.fcconv-tmp``), then renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from fcconv.errors import CheckpointError, LayerError
from fcconv.geometry import Patch
from fcconv.io.atomic import (
    TEMP_SUFFIX,
    check_output_folder,
    describe_os_error,
    fsync_folder,
    install_folder,
    mark_folder,
    temp_prefix,
)
from fcconv.io.files import (
    MAX_INDEX_BYTES,
    describe_read_error,
    is_folder,
    probe,
    read_regular,
)
from fcconv.io.safetensors import (
    MAX_TENSORS,
    HeaderEntry,
    SafetensorsHeader,
    read_header,
    read_tensors,
)
from fcconv.io.streaming import (
    DEFAULT_BLOCK_BYTES,
    ProgressCallback,
    converted_header,
    copy_file,
    write_converted,
)
from fcconv.progress import phased

if TYPE_CHECKING:
    import torch

INDEX_SUFFIX = ".safetensors.index.json"

ShardMetadata = (
    Mapping[str, str]
    | Callable[[SafetensorsHeader, Mapping[str, tuple[Patch, str]]], Mapping[str, str]]
)
"""Entries merged into each rewritten shard's ``__metadata__``, or a function of
the shard's header and its layers that returns the whole ``__metadata__``."""

_MISMATCH = (
    "the index does not match the shards; re-download the checkpoint or regenerate its index"
)


@dataclass(frozen=True)
class ShardedCheckpoint:
    """A validated index and the headers of the shards it names."""

    index_path: Path
    metadata: dict[str, Any]
    """The index's own ``metadata`` (``total_size`` and the like), as written."""
    weight_map: dict[str, str]
    """Tensor name to shard file name (relative to the index's folder), in index order."""
    shards: dict[str, SafetensorsHeader]
    """Shard file name to its header, in order of first appearance in the index."""

    @property
    def folder(self) -> Path:
        """The folder holding the index and its shards."""
        return self.index_path.parent

    @property
    def tensors(self) -> dict[str, HeaderEntry]:
        """Every tensor's header entry, in index order."""
        return {name: self.shards[shard].tensors[name] for name, shard in self.weight_map.items()}

    @property
    def file_bytes(self) -> int:
        """Size of the index and all its shards together."""
        return self.index_path.stat().st_size + sum(h.file_bytes for h in self.shards.values())

    def header_of(self, name: str) -> SafetensorsHeader:
        """The header of the shard that holds tensor ``name``."""
        return self.shards[self.weight_map[name]]


def is_sharded(path: str | Path) -> bool:
    """True for a folder or an ``*.index.json`` file: inputs :func:`load_index` takes."""
    path = Path(path)
    return path.name.endswith(".index.json") or is_folder(path)


def find_index(path: str | Path) -> Path:
    """The index file itself, or the one ``*.safetensors.index.json`` in a folder."""
    path = Path(path)
    if not is_folder(path):
        if probe(path) is None:
            raise CheckpointError(f"{path} does not exist; check the path")
        return path
    try:
        names = [p for p in path.iterdir() if p.name.endswith(INDEX_SUFFIX)]
    except OSError as error:
        raise describe_read_error(path, error) from None
    found = sorted(p for p in names if _is_regular(p))
    if not found:
        raise CheckpointError(
            f"{path} is a directory with no *{INDEX_SUFFIX}; give a checkpoint file (.pt, "
            ".pth, .bin, .ckpt, .safetensors) or a sharded checkpoint's folder"
        )
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise CheckpointError(f"{path} holds several indexes ({names}); give the one you mean")
    return found[0]


def _is_regular(path: Path) -> bool:
    found = probe(path)
    return found is not None and stat.S_ISREG(found.st_mode)


def load_index(path: str | Path) -> ShardedCheckpoint:
    """Read a sharded checkpoint's index and check it against every shard's header.

    Args:
        path: the folder holding exactly one ``*.safetensors.index.json``, or
            the index file itself.

    Raises:
        CheckpointError: one line for a malformed index, a missing or invalid
            shard, a tensor the index names that its shard does not hold, or a
            shard holding a tensor the index does not map to it.

    Example:
        >>> checkpoint = load_index("llava/")  # doctest: +SKIP
        >>> checkpoint.header_of("classifier.0.weight").path.name  # doctest: +SKIP
        'model-00002-of-00002.safetensors'
    """
    index_path = find_index(path)
    raw = read_regular(index_path, MAX_INDEX_BYTES, "index")
    try:
        document = json.loads(raw)
    except (ValueError, RecursionError) as error:
        detail = (str(error).splitlines() or [type(error).__name__])[0][:120]
        raise CheckpointError(
            f"{index_path} is not a valid index: not JSON ({detail}); re-download it"
        ) from None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(shard, str) and shard for shard in weight_map.values()
    ):
        raise CheckpointError(
            f"{index_path} is not a valid index: no weight_map of tensor names to shard files; "
            "give a *.safetensors.index.json"
        )
    metadata = document.get("metadata", {})
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{index_path} is not a valid index: its metadata is not an object")

    if len(weight_map) > MAX_TENSORS:
        raise CheckpointError(
            f"{index_path} maps more than {MAX_TENSORS} tensors, more than fcconv reads in one "
            "checkpoint; check that it is the right index"
        )
    folder = index_path.parent
    shards: dict[str, SafetensorsHeader] = {}
    described = 0  # tensors the shards' headers describe: bounded like the index
    for name, shard in weight_map.items():
        if shard in shards:
            continue
        relative = PurePosixPath(shard)
        if relative.is_absolute() or ".." in relative.parts or "\\" in shard:
            raise CheckpointError(
                f"{index_path} maps {name!r} to {shard!r}, outside the index's folder; "
                "refusing to read it"
            )
        file = folder / relative
        if probe(file) is None:
            raise CheckpointError(
                f"{index_path} names shard {shard}, which is not in {folder}; the download is "
                "incomplete: fetch the missing shard"
            )
        shards[shard] = read_header(file)  # refuses anything but a regular file
        described += len(shards[shard].tensors)
        if described > MAX_TENSORS:
            raise CheckpointError(
                f"the shards of {index_path} describe more than {MAX_TENSORS} tensors, more "
                f"than it maps ({len(weight_map)}); {_MISMATCH}"
            )

    holders: dict[str, list[str]] = {}
    for shard, header in shards.items():
        for tensor in header.tensors:
            holders.setdefault(tensor, []).append(shard)
    for name, shard in weight_map.items():
        if name not in shards[shard].tensors:
            where = holders.get(name)
            found = f"it is in {', '.join(where)}" if where else "no shard holds it"
            raise CheckpointError(
                f"{index_path} maps {name!r} to {shard}, but {found}; {_MISMATCH}"
            )
    for tensor, owners in holders.items():
        for shard in owners:
            if weight_map.get(tensor) != shard:
                expected = weight_map.get(tensor)
                listed = f"maps it to {expected}" if expected else "does not list it"
                raise CheckpointError(
                    f"shard {shard} holds {tensor!r} but {index_path.name} {listed}; {_MISMATCH}"
                )
    return ShardedCheckpoint(index_path, dict(metadata), dict(weight_map), shards)


def read_sharded_tensors(
    checkpoint: ShardedCheckpoint, names: list[str] | tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Read only the named tensors, each from its shard, for verification."""
    missing = [name for name in names if name not in checkpoint.weight_map]
    if missing:
        raise LayerError(
            f"{checkpoint.index_path} has no tensor {', '.join(map(repr, missing))}; run fcconv "
            f"inspect {checkpoint.folder} to list its tensors"
        )
    by_shard: dict[str, list[str]] = {}
    for name in names:
        by_shard.setdefault(checkpoint.weight_map[name], []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for shard, wanted in by_shard.items():
        tensors.update(read_tensors(checkpoint.shards[shard].path, wanted))
    return {name: tensors[name] for name in names}


def _shard_metadata(
    metadata: ShardMetadata | None,
    header: SafetensorsHeader,
    layers: Mapping[str, tuple[Patch, str]],
) -> Mapping[str, str] | None:
    if metadata is None:
        return None
    if callable(metadata):
        return metadata(header, layers)
    return {**(header.metadata or {}), **metadata}


@phased("writing")
def convert_sharded(
    src: str | Path,
    dst: str | Path,
    layers: Mapping[str, tuple[Patch, str]],
    metadata: ShardMetadata | None = None,
    *,
    force: bool = False,
    link: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: ProgressCallback | None = None,
    check: Callable[[ShardedCheckpoint], None] | None = None,
) -> ShardedCheckpoint:
    """Write a new sharded checkpoint folder with the named Linear weights converted.

    Args:
        src: the input folder or its ``*.safetensors.index.json``; never modified.
        dst: the output folder, created whole or not at all. Only the index and
            the shards it names are written there (no config or tokenizer files).
        layers: weight tensor name to ``(patch, order)``, as for
            :func:`fcconv.io.streaming.stream_convert`.
        metadata: for each rewritten shard, entries merged into its
            ``__metadata__``, or a function ``(header, shard_layers)`` returning
            the whole ``__metadata__``; None keeps each shard's own.
        force: replace an existing output folder.
        link: hard-link the untouched shards instead of copying them. They
            then share their bytes with the input: editing one edits both.
        block_bytes: as for :func:`fcconv.io.streaming.stream_convert`.
        progress: called as ``progress(bytes_done, bytes_total)`` over all files.
        check: called with the complete output, still in its temporary folder,
            before it is renamed into place (read it with
            :func:`read_sharded_tensors`); whatever it raises aborts the write.

    Returns:
        The output checkpoint, loaded and checked like any input.

    Raises:
        LayerError, SpecError: a layer no shard holds or that cannot be converted.
        CheckpointError: a bad input or a failed write (one line); the output
            folder then keeps what it held before and no temporary folder is left.
    """
    checkpoint = load_index(src)
    target = Path(dst)
    by_shard: dict[str, dict[str, tuple[Patch, str]]] = {}
    for name, spec in layers.items():
        if name not in checkpoint.weight_map:
            raise LayerError(
                f"{checkpoint.index_path} has no tensor {name!r}; run fcconv inspect "
                f"{checkpoint.folder} to list its Linear weights"
            )
        by_shard.setdefault(checkpoint.weight_map[name], {})[name] = spec
    shard_metadata = {}
    sizes = {shard: header.file_bytes for shard, header in checkpoint.shards.items()}
    for shard, shard_layers in by_shard.items():  # every layer checked before writing
        header = checkpoint.shards[shard]
        shard_metadata[shard] = _shard_metadata(metadata, header, shard_layers)
        new_header = converted_header(header, shard_layers, shard_metadata[shard])
        sizes[shard] = len(new_header) + header.data_bytes
    inputs = (checkpoint.folder, checkpoint.index_path)
    check_output_folder(target, force, inputs)
    existed = probe(target, follow=False) is not None

    total = sum(sizes.values()) + checkpoint.index_path.stat().st_size
    done = 0

    def advance(count: int, _: int) -> None:
        if progress is not None:
            progress(done + count, total)

    try:
        prefix = temp_prefix(target.name)
        building = Path(tempfile.mkdtemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=target.parent))
    except OSError as error:
        raise CheckpointError(describe_os_error(error, target)) from error
    try:
        for shard, header in checkpoint.shards.items():
            output = building / shard
            output.parent.mkdir(parents=True, exist_ok=True)
            if shard in by_shard:
                write_converted(
                    header.path,
                    output,
                    by_shard[shard],
                    shard_metadata[shard],
                    block_bytes=block_bytes,
                    progress=advance,
                )
            elif link:
                _link(header.path, output, target)
            else:
                copy_file(header.path, output, block_bytes=block_bytes, progress=advance)
            done += sizes[shard]
            advance(0, total)
        index = building / checkpoint.index_path.name
        copy_file(checkpoint.index_path, index, progress=advance)
        if check is not None:
            check(load_index(index))
        mark_folder(building, [*checkpoint.shards, checkpoint.index_path.name])
        _fsync_folders(building, {p.parent for p in building.rglob("*")})
        install_folder(building, target, force, inputs, existed)
    except OSError as error:
        shutil.rmtree(building, ignore_errors=True)
        raise CheckpointError(describe_os_error(error, target)) from error
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return load_index(target / checkpoint.index_path.name)


def _link(source: Path, output: Path, target: Path) -> None:
    try:
        os.link(source, output)
    except OSError as error:
        reason = error.strerror or str(error)
        raise CheckpointError(
            f"could not hard-link {source} into {target}: {reason}; drop {{link}} to copy it"
        ) from error


def _fsync_folders(root: Path, folders: set[Path]) -> None:
    # The files are fsynced as written; this makes their names durable too.
    for folder in sorted(folders | {root}, key=lambda p: -len(p.parts)):
        fsync_folder(folder)
