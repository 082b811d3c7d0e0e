"""Rewrite a ``torch.save`` checkpoint in bounded memory, its storages copied in the kernel.

A ``.pt`` written by ``torch.save`` is a zip archive of stored (uncompressed)
records: ``data.pkl``, the pickled object, whose tensors name storage
records by key; a few small records; and one ``data/<key>`` record per
storage, 64-byte aligned. Converting a Linear weight changes only the pickle
(that tensor's shape, stride and storage) and permutes the weight's bytes;
every other storage keeps its bytes. So the rewrite:

1. loads the checkpoint onto the ``meta`` device (``weights_only`` unless
   trusted): the whole object without tensor data, each storage knowing
   where its record starts, checked against the zip's own directory
   (:func:`open_archive`);
2. lets ``torch.save`` write the new archive under
   ``torch.serialization.skip_data()``: every record in torch's own layout,
   the storage records reserved but not written. A pickler stands a CPU
   placeholder of the same size in for each meta tensor (allocated, never
   touched), so torch pickles the object exactly as it would the real one;
3. fills each storage record: copied from the input's record in the kernel,
   or, for a converted weight, permuted a block of rows at a time
   (:class:`fcconv.io.streaming.Move`);
4. writes each record's CRC-32 into its data descriptor and central
   directory entry: the input's own for a copied record, computed while
   permuting for a converted weight. torch never checks them; zip tools do.

Memory stays at a few blocks plus torch; the input is never mapped. What this
cannot do exactly (a legacy-format file, a torch without ``skip_data``, a
weight that is a view into a larger storage) raises :class:`Unsupported`,
leaving no file behind, and the caller converts in memory instead.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import types
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcconv import dtypes
from fcconv.errors import CheckpointError, UnsafeCheckpointError
from fcconv.io.atomic import atomic_output, check_output_path
from fcconv.io.checkpoint import TORCH, Checkpoint, load_torch_meta
from fcconv.io.streaming import DEFAULT_BLOCK_BYTES, Move, ProgressCallback, _Writer
from fcconv.patches import AnyPatch, as_nd
from fcconv.plan import describe

if TYPE_CHECKING:
    import torch

    from fcconv.io.sources import Source


class Unsupported(Exception):
    """This checkpoint cannot be rewritten record by record; convert it in memory."""


@dataclass(frozen=True)
class Record:
    """One stored zip record: where its bytes are, how many, and their CRC-32."""

    name: str
    offset: int  # of its first data byte
    size: int
    crc: int


@dataclass
class TorchArchive:
    """A torch zip checkpoint described without its data."""

    path: Path
    checkpoint: Checkpoint  # every tensor on the meta device
    records: dict[int, Record]  # storage records by the offset of their data

    def span(self, key: str) -> tuple[Path, int, int]:
        """(file, offset, length) of the bytes of the tensor ``key`` of the state dict."""
        tensor = self.checkpoint.tensors[key]
        if not _dense(tensor):
            raise Unsupported(f"{key} is a strided view, not a dense tensor")
        start = _record_of(self, tensor).offset
        return self.path, start + tensor.storage_offset() * tensor.element_size(), _nbytes(tensor)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _dense(tensor: torch.Tensor) -> bool:
    """Row-major with no gaps: its bytes are one range of its storage."""
    import torch

    return tensor.layout == torch.strided and tensor.is_contiguous()


def _record_of(archive: TorchArchive, tensor: torch.Tensor) -> Record:
    offset = getattr(tensor.untyped_storage(), "_checkpoint_offset", None)
    record = archive.records.get(offset) if offset is not None else None
    if record is None:
        raise Unsupported(f"a storage of {archive.path} is not at a record torch wrote")
    return record


# ------------------------------------------------------------------- reading


def open_archive(path: str | Path, *, trust_pickle: bool = False) -> TorchArchive:
    """Describe the torch zip checkpoint ``path`` without reading its tensor data.

    Raises:
        Unsupported: not a zip written the way ``torch.save`` writes it, or a
            torch too old to say where each storage is.
        CheckpointError, UnsafeCheckpointError: as for loading it.
    """
    import torch

    file = Path(path)
    if not hasattr(torch.serialization, "skip_data"):
        raise Unsupported("this torch cannot write an archive without its data")
    with open(file, "rb") as handle:
        if handle.read(4) != b"PK\x03\x04":
            raise Unsupported(f"{file} is not in torch's zip format")
    try:
        # What the meta device cannot hold (sparse, quantized tensors) loads in memory,
        # where it is refused or carried through with a one-line reason.
        checkpoint = load_torch_meta(file, trust_pickle=trust_pickle)
    except UnsafeCheckpointError:
        raise
    except (CheckpointError, NotImplementedError, RuntimeError) as error:
        raise Unsupported(f"{file} does not load onto the meta device ({error})") from None
    archive = TorchArchive(file, checkpoint, _storage_records(file))
    try:
        records = [_record_of(archive, tensor) for _, tensor in tensors_in(_root(archive))]
    except (NotImplementedError, RuntimeError) as error:  # a sparse or quantized tensor
        raise Unsupported(f"{file} holds a tensor without one plain storage ({error})") from None
    storages = {record.offset for record in records}
    if storages != set(archive.records):
        # a tensor the walk cannot see (inside an object that is not a container)
        raise Unsupported(f"{file} holds storages outside plain containers")
    return archive


def _root(archive: TorchArchive) -> Any:
    checkpoint = archive.checkpoint
    return checkpoint.container if checkpoint.location else checkpoint.tensors


def _storage_records(file: Path) -> dict[int, Record]:
    """The ``<archive>/data/<key>`` records of a zip by data offset; all stored ones."""
    records = {}
    try:
        with zipfile.ZipFile(file) as archive, open(file, "rb") as raw:
            for info in _storage_infos(archive):
                if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
                    raise Unsupported(f"{file} has a compressed storage record")
                offset = _data_offset(raw, info.header_offset)
                records[offset] = Record(info.filename, offset, info.file_size, info.CRC)
    except (zipfile.BadZipFile, OSError, struct.error) as error:
        raise Unsupported(f"{file}: {error}") from None
    return records


def _storage_infos(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """torch names every record ``<archive>/…`` and a storage's ``<archive>/data/<key>``."""
    infos = archive.infolist()
    if not infos:
        return []
    prefix = infos[0].filename.split("/")[0] + "/data/"
    return [
        info
        for info in infos
        if info.filename.startswith(prefix) and info.filename[len(prefix) :].isdigit()
    ]


def _data_offset(raw: Any, header_offset: int) -> int:
    """Where a record's data starts: after its local header, name and extra field."""
    raw.seek(header_offset)
    header = raw.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise Unsupported("a zip record has no local header where its directory says")
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return header_offset + 30 + name_length + extra_length


def tensors_in(value: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in nested dicts, lists and tuples, with where it is (``[key]…``)."""
    import torch

    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from tensors_in(item, f"{path}[{key!r}]")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from tensors_in(item, f"{path}[{index}]")


def archive_source(archive: TorchArchive) -> Source:
    """The archive as a :class:`~fcconv.io.sources.Source`: described, and read by byte range."""
    from fcconv.io.sources import DiskTensors, Source

    source = Source(
        path=str(archive.path),
        format=TORCH,
        info=describe(archive.checkpoint.tensors),
        metadata=None,
        read=lambda names: {name: DiskTensors(source).tensor(name) for name in names},
        span=archive.span,
    )
    return source


# ------------------------------------------------------------------- writing


@dataclass
class Rewrite:
    """What :func:`stream_convert_torch` put in each storage record of the new archive."""

    origins: dict[int, int | str] = field(default_factory=dict)
    """New record's data offset → the input record's data offset it copies, or the
    converted weight's key."""


def stream_convert_torch(
    archive: TorchArchive,
    dst: str | Path,
    layers: Mapping[str, tuple[AnyPatch, str]],
    *,
    force: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: ProgressCallback | None = None,
    check: Callable[[Path, Rewrite], None] | None = None,
) -> Rewrite:
    """Write ``archive`` to ``dst`` with each named Linear weight rewritten as its conv kernel.

    Args:
        archive: the input, from :func:`open_archive`; never modified.
        dst: the output file, written atomically like
            :func:`fcconv.io.streaming.stream_convert`.
        layers: state-dict key of a Linear weight → ``(patch, order)``.
        force: replace an existing ``dst``.
        block_bytes: bytes of rows permuted at once.
        progress: ``progress(bytes_done, bytes_total)``, from any thread.
        check: called with the complete temporary file and what went into its
            records, before the rename; whatever it raises aborts the write.

    Raises:
        Unsupported: a weight or tensor this cannot rewrite record by record;
            the target is left as it was and no temporary file remains.
        CheckpointError: a failed write; the same holds.
    """
    import torch

    target = Path(dst)
    moves = _planned_moves(archive, layers)
    tensors = dict(archive.checkpoint.tensors)
    kernels = {}
    for key, (patch, _) in layers.items():
        weight = tensors[key]
        shape = (weight.shape[0], *as_nd(patch).kernel_shape)
        tensors[key] = kernels[key] = torch.empty(shape, dtype=weight.dtype, device="meta")
    payload = archive.checkpoint.with_tensors(tensors).payload()
    stand_ins = _StandIns(archive, {id(kernel): key for key, kernel in kernels.items()})
    check_output_path(target, force, (archive.path,))
    with atomic_output(target, force=force, sources=(archive.path,)) as temporary:
        rewrite = _write(archive, payload, stand_ins, moves, temporary, block_bytes, progress)
        if check is not None:
            check(temporary, rewrite)
    return rewrite


def _planned_moves(
    archive: TorchArchive, layers: Mapping[str, tuple[AnyPatch, str]]
) -> dict[str, Move]:
    """Where each weight's rows come from (``dst_offset`` is filled in once torch has laid out)."""
    moves = {}
    for key, (patch, order) in layers.items():
        weight = archive.checkpoint.tensors[key]
        if weight.dim() != 2 or weight.shape[1] != patch.features or not _dense(weight):
            raise Unsupported(f"{key} is not a dense [out, {patch.features}] weight")
        known = dtypes.by_name(dtypes.name_of(weight.dtype))
        if known is None or not known.convertible:
            raise Unsupported(f"{key} is not a floating-point weight")
        _, start, _ = archive.span(key)
        moves[key] = Move(start, -1, weight.shape[0], weight.shape[1], known.itemsize, patch, order)
    return moves


def _write(
    archive: TorchArchive,
    payload: Any,
    stand_ins: _StandIns,
    moves: dict[str, Move],
    temporary: Path,
    block_bytes: int,
    progress: ProgressCallback | None,
) -> Rewrite:
    """torch writes the archive with its storage records reserved; then they are filled."""
    import torch

    try:
        with torch.serialization.skip_data():
            torch.save(payload, str(temporary), pickle_module=stand_ins.module())
    except RuntimeError as error:
        # torch's writer reports a full disk or a file-size limit in its own words; the
        # in-memory path writes through a handle that keeps the OSError, and says so.
        raise Unsupported(f"torch.save could not lay out {temporary} ({error})") from None
    records = _written_records(temporary)
    if [record.size for record in records] != stand_ins.sizes:
        raise AssertionError("torch.save reserved other storage records than were pickled")
    rewrite, copies, moved, crcs = Rewrite(), [], [], {}
    for record, origin in zip(records, stand_ins.origins, strict=True):
        rewrite.origins[record.offset] = origin
        if isinstance(origin, str):
            moved.append(dataclasses.replace(moves[origin], dst_offset=record.offset))
        elif record.size:
            copies.append((origin, record.offset, record.size))
            crcs[record.offset] = archive.records[origin].crc
    computed = _fill(archive.path, temporary, copies, moved, block_bytes, progress)
    crcs.update({move.dst_offset: crc for move, crc in zip(moved, computed, strict=True)})
    _set_crcs(temporary, records, crcs)
    return rewrite


class _StandIns:
    """CPU placeholders for meta tensors while torch pickles the new checkpoint.

    torch keys storages in the order it first pickles them; the placeholders
    are made in that same order, so ``origins[k]`` is what record ``data/k``
    must hold: the input record it copies (its data offset) or the key of a
    converted weight. The sizes are checked against what torch reserved, and
    the finished file against the input tensor by tensor (:func:`differences`).
    """

    def __init__(self, archive: TorchArchive, converted: dict[int, str]) -> None:
        self.archive = archive
        self.converted = converted  # id of a new meta tensor → its weight key
        self.storages: dict[int | str, Any] = {}  # by origin
        self.origins: list[int | str] = []
        self.sizes: list[int] = []
        self.alive: list[Any] = []

    def module(self) -> types.ModuleType:
        import pickle

        stand_ins = self

        class Pickler(pickle.Pickler):
            def reducer_override(self, obj: Any) -> Any:
                return stand_ins.reduce(obj)

        module = types.ModuleType("fcconv_pickle")
        module.Pickler = Pickler  # type: ignore[attr-defined]
        return module

    def reduce(self, obj: Any) -> Any:
        import torch

        if not isinstance(obj, torch.Tensor) or obj.device.type != "meta":
            return NotImplemented
        if type(obj) not in (torch.Tensor, torch.nn.Parameter) or obj.layout != torch.strided:
            raise Unsupported(f"a {type(obj).__name__} ({obj.layout}) in the checkpoint")
        if obj.is_conj() or obj.is_neg():  # lazy bits a placeholder would not carry
            raise Unsupported("a tensor with a lazy conjugate or negative bit")
        # Tensors that share a storage in the file share one here: a meta load gives
        # each its own meta storage, but they start at the same record.
        origin = self._origin(obj)
        if origin not in self.storages:
            nbytes = obj.untyped_storage().nbytes()
            self.storages[origin] = torch.empty(nbytes, dtype=torch.uint8).untyped_storage()
            self.origins.append(origin)
            self.sizes.append(nbytes)
        stand_in = torch.empty(0, dtype=obj.dtype).set_(
            self.storages[origin], obj.storage_offset(), obj.shape, obj.stride()
        )
        if isinstance(obj, torch.nn.Parameter):
            stand_in = torch.nn.Parameter(stand_in, requires_grad=obj.requires_grad)
        elif obj.requires_grad:
            stand_in.requires_grad_(True)
        stand_in.__dict__.update(obj.__dict__)
        self.alive.append(stand_in)
        return stand_in.__reduce_ex__(2)

    def _origin(self, tensor: torch.Tensor) -> int | str:
        if id(tensor) in self.converted:
            return self.converted[id(tensor)]
        return _record_of(self.archive, tensor).offset


def _written_records(path: Path) -> list[Record]:
    """The storage records torch reserved in a new archive, in key order."""
    found = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for info in _storage_infos(archive):
            key = int(info.filename.rpartition("/")[2])
            offset = _data_offset(raw, info.header_offset)
            found[key] = Record(info.filename, offset, info.file_size, info.CRC)
    if sorted(found) != list(range(len(found))):
        raise AssertionError(f"torch.save wrote storage keys {sorted(found)}")
    return [found[key] for key in range(len(found))]


def _fill(
    src: Path,
    dst: Path,
    copies: list[tuple[int, int, int]],
    moves: list[Move],
    block_bytes: int,
    progress: ProgressCallback | None,
) -> list[int]:
    """Copy and permute every storage's bytes into its reserved record; CRC-32s of the moves."""
    total = sum(length for *_, length in copies) + sum(move.nbytes for move in moves)
    source = os.open(src, os.O_RDONLY)
    try:
        output = os.open(dst, os.O_WRONLY)
        try:
            writer = _Writer(source, output, src, total, progress, block_bytes)
            return writer.run(copies, moves, checksum=True)
        finally:
            os.close(output)
    finally:
        os.close(source)


_DESCRIPTOR = b"PK\x07\x08"
_CENTRAL = b"PK\x01\x02"


def _set_crcs(path: Path, records: list[Record], crcs: Mapping[int, int]) -> None:
    """Write each storage record's CRC-32 into its data descriptor and directory entry."""
    with open(path, "r+b") as handle, zipfile.ZipFile(path) as archive:
        entries = _central_entries(handle, archive)
        if {record.name for record in records} - set(entries):
            raise AssertionError("storage records missing from the central directory")
        for record in records:
            if not record.size:
                continue  # torch writes no descriptor after an empty record; its CRC is 0
            crc = struct.pack("<I", crcs[record.offset])
            handle.seek(record.offset + record.size)
            if handle.read(4) != _DESCRIPTOR:
                raise AssertionError(f"no data descriptor after {record.name}")
            handle.write(crc)
            handle.seek(entries[record.name] + 16)
            handle.write(crc)


def _central_entries(handle: Any, archive: zipfile.ZipFile) -> dict[str, int]:
    """Offset of each central directory entry, by name."""
    entries, position = {}, archive.start_dir  # type: ignore[attr-defined]
    for info in archive.infolist():
        handle.seek(position)
        fixed = handle.read(46)
        if len(fixed) != 46 or fixed[:4] != _CENTRAL:
            raise AssertionError("the central directory is not where the zip says")
        name_length, extra_length, comment_length = struct.unpack("<HHH", fixed[28:34])
        entries[info.filename] = position
        position += 46 + name_length + extra_length + comment_length
    return entries


# ------------------------------------------------------------------- checking


def differences(before: TorchArchive, after: TorchArchive, rewrite: Rewrite) -> list[str]:
    """Where the new archive, as torch reads it, is not the input with the weights converted.

    Walks both objects side by side: the same containers and keys, the same
    values, and every tensor the same type, dtype, shape, stride and offset,
    its record filled from the same tensor's record of the input. A converted
    weight's bytes are judged by the layer checks instead.
    """
    walk = _SideBySide(before, after, rewrite)
    walk.compare(_root(before), _root(after), "")
    return walk.found


@dataclass
class _SideBySide:
    before: TorchArchive
    after: TorchArchive
    rewrite: Rewrite
    found: list[str] = field(default_factory=list)

    def compare(self, a: Any, b: Any, path: str) -> None:
        import torch

        where = path or "the checkpoint"
        if type(a) is not type(b):
            self.found.append(f"{where} changed type: {type(a).__name__} → {type(b).__name__}")
        elif isinstance(a, torch.Tensor):
            self.tensor(a, b, path)
        elif isinstance(a, Mapping):
            if list(a) != list(b):
                self.found.append(f"{where} has other keys: {list(a)[:5]} → {list(b)[:5]}")
                return
            for key in a:
                self.compare(a[key], b[key], f"{path}[{key!r}]")
        elif isinstance(a, list | tuple):
            if len(a) != len(b):
                self.found.append(f"{where} changed length: {len(a)} → {len(b)}")
                return
            for index, (x, y) in enumerate(zip(a, b, strict=True)):
                self.compare(x, y, f"{path}[{index}]")
        elif not _same_value(a, b):
            self.found.append(f"{where} changed: {a!r} → {b!r}"[:200])

    def tensor(self, a: torch.Tensor, b: torch.Tensor, path: str) -> None:
        origin = self.rewrite.origins.get(_record_of(self.after, b).offset)
        if isinstance(origin, str):  # a converted weight: the layer checks judge its bytes
            if a is not self.before.checkpoint.tensors.get(origin):
                self.found.append(f"{path} reads the converted {origin}")
            return
        layout_a = (a.dtype, tuple(a.shape), a.stride(), a.storage_offset(), a.requires_grad)
        layout_b = (b.dtype, tuple(b.shape), b.stride(), b.storage_offset(), b.requires_grad)
        if layout_a != layout_b:
            self.found.append(f"{path} changed: {layout_a} → {layout_b}")
        elif origin != _record_of(self.before, a).offset:
            self.found.append(f"{path} reads another storage than the original's")


def _same_value(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) or (isinstance(a, float) and math.isnan(a) and math.isnan(b))
    except Exception:  # an object whose == does not answer a bool: compare what it shows
        return repr(a) == repr(b)


def read_back(path: Path, trust_pickle: bool) -> TorchArchive:
    """The archive just written, described the way :func:`open_archive` describes an input."""
    try:
        return open_archive(path, trust_pickle=trust_pickle)
    except Unsupported as error:
        raise CheckpointError(f"the rewritten {path} cannot be read back ({error})") from None
