"""Load and save checkpoints: torch pickles and safetensors, plain or nested.

Reading never unpickles arbitrary code unless the caller says the file is
trusted. Writing is atomic and keeps everything that was not converted:
untouched tensors, their order and dtype, the training state around the
weights, and safetensors metadata.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from fcconv.errors import CheckpointError, UnsafeCheckpointError
from fcconv.io import stdio
from fcconv.io.atomic import STDIO, atomic_output, check_output_path, check_stdout
from fcconv.io.files import open_regular
from fcconv.progress import phased

if TYPE_CHECKING:
    import torch

SAFETENSORS = "safetensors"
KERAS = "keras"
KERAS_WEIGHTS = "keras-weights"
KERAS_H5 = "keras-h5"
KERAS_FORMATS = (KERAS, KERAS_WEIGHTS, KERAS_H5)
"""Keras files by kind: a ``.keras`` model, Keras 3 ``.weights.h5``, a legacy ``.h5``
(read and written by :mod:`fcconv.io.keras`)."""
TORCH = "torch"
FORMATS = (SAFETENSORS, TORCH)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# What torch.load raises on bytes that are not a well-formed checkpoint. Truncated
# and bit-flipped files, fuzzed, reach the unpickler in all of these ways.
_UNREADABLE = (
    pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError,
    KeyError, IndexError, TypeError, AssertionError, ImportError, struct.error,
    OverflowError, MemoryError, ZeroDivisionError,
)  # fmt: skip
# How the weights_only unpickler refuses code, as opposed to bytes it cannot parse
# ("Unsupported operand 177", which --trust-pickle would not cure).
_REFUSES_CODE = re.compile(r"GLOBAL|call reduce|create new object|Can only build")

# Where training scripts keep the weights inside a nested checkpoint, most common first.
STATE_DICT_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "model_state",
    "weights",
    "params",
    "ema",
    "ema_state_dict",
)


@dataclass
class Checkpoint:
    """A loaded checkpoint: its tensor mapping plus everything around it.

    Attributes:
        tensors: the state dict (name → tensor), in file order.
        format: ``"torch"`` or ``"safetensors"``.
        source: where it came from, for messages.
        container: for torch files, the whole loaded object (``tensors`` lives
            inside it at ``location``); ``None`` when the file is the mapping.
        location: the keys leading from ``container`` to the tensor mapping.
        metadata: safetensors ``__metadata__`` (strings only), if any.
        extras: entries of the mapping that are not tensors (a step counter,
            a version), kept in place when the checkpoint is written.
    """

    tensors: dict[str, torch.Tensor]
    format: str
    source: str
    container: Any = None
    location: tuple[Any, ...] = ()
    metadata: dict[str, str] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    _mapping_type: type = field(default=dict, repr=False)
    _mapping_attrs: dict[str, Any] = field(default_factory=dict, repr=False)
    _keys: tuple[str, ...] = field(default=(), repr=False)

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> Checkpoint:
        """The same checkpoint with a new tensor mapping (same container and metadata)."""
        return replace(self, tensors=tensors)

    def payload(self) -> Any:
        """The object to pickle: the container with the new mapping put back in place."""
        keys = [k for k in self._keys if k in self.tensors or k in self.extras]
        keys += [k for k in self.tensors if k not in keys]
        values = {**self.extras, **self.tensors}
        mapping = self._mapping_type({k: values[k] for k in keys})
        for name, value in self._mapping_attrs.items():
            setattr(mapping, name, value)
        if not self.location:
            return mapping
        return _replace_at(self.container, self.location, mapping)

    def surroundings(self) -> Any:
        """Everything of the checkpoint but the tensors of its state dict, to compare.

        The container with the state dict replaced by its non-tensor entries,
        its type and its attributes (``_metadata`` of a module's
        ``state_dict()``): what a conversion must leave exactly as it was.
        """
        state: dict[str, Any] = {**self.extras, "(type)": self._mapping_type.__name__}
        if self._mapping_attrs:
            state["(attributes)"] = self._mapping_attrs
        return _replace_at(self.container, self.location, state) if self.location else state


def _replace_at(container: Any, location: tuple[Any, ...], value: Any) -> Any:
    head, *rest = location
    copy = type(container)(container)
    copy.update({head: _replace_at(container[head], tuple(rest), value) if rest else value})
    return copy


# --------------------------------------------------------------------- reading


@phased("reading")
def load_checkpoint(
    path: str | Path, *, trust_pickle: bool = False, mmap: bool = False
) -> Checkpoint:
    """Read a checkpoint from ``path`` (or stdin for ``-``), refusing unsafe pickles.

    The format is told by the file's content, not its name. Only regular
    files are read (a FIFO or a device is refused without blocking on it),
    and a pipe on stdin is read up to :data:`fcconv.io.stdio.MAX_STDIN_BYTES`.

    Torch files are read into memory, not memory-mapped: another process
    truncating the file meanwhile then makes a read fail (one line), where a
    mapping would kill fcconv with ``SIGBUS``. ``mmap=True`` maps a zip
    checkpoint instead, for callers that only describe it and never touch
    its tensors' bytes (``inspect``).

    Raises:
        CheckpointError: the file is missing, empty, corrupt or not a checkpoint.
        UnsafeCheckpointError: it needs arbitrary unpickling and ``trust_pickle``
            is false.
    """
    if str(path) == STDIO:
        return _load_bytes(stdio.read_stdin(), "<stdin>", trust_pickle)
    file = Path(path)
    with open_regular(file) as descriptor:
        size = os.fstat(descriptor).st_size
        if size == 0:
            raise CheckpointError(f"{file} is empty (0 bytes); it is not a checkpoint")
        kind = _sniff(os.pread(descriptor, 16, 0), size, str(file))
        if kind == SAFETENSORS:
            return _load_safetensors_file(file)
        if mmap and kind == "zip":
            return _load_torch(file, str(file), trust_pickle, zipped=True)
        with os.fdopen(os.dup(descriptor), "rb") as handle:
            return _load_torch(handle, str(file), trust_pickle, zipped=False)


def load_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, Any]:
    """Just the tensor mapping of a checkpoint (see :func:`load_checkpoint`)."""
    return load_checkpoint(path, trust_pickle=trust_pickle).tensors


def _sniff(head: bytes, size: int, source: str) -> str:
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    # Before the pickle test: a safetensors header length whose low byte is 0x80
    # (one file in 32) would otherwise pass for a pickle.
    if len(head) >= 9 and head[8:9] == b"{":
        return SAFETENSORS
    if head[:1] == b"\x80":  # pickle protocol 2+: the legacy torch.save format
        return "legacy"
    raise CheckpointError(
        f"{source} is not a PyTorch or safetensors checkpoint (unrecognised first "
        f"bytes {head[:8]!r}); give a file written by torch.save or safetensors"
    )


def _load_bytes(data: bytes, source: str, trust_pickle: bool) -> Checkpoint:
    if not data:
        raise CheckpointError(f"{source} is empty (0 bytes); it is not a checkpoint")
    kind = _sniff(data[:16], len(data), source)
    if kind == SAFETENSORS:
        return _load_safetensors_bytes(data, source)
    return _load_torch(io.BytesIO(data), source, trust_pickle, zipped=False)


def load_torch_meta(path: str | Path, *, trust_pickle: bool = False) -> Checkpoint:
    """A torch zip checkpoint's structure without its data: every tensor on the meta device.

    Each storage records where its bytes start in the file
    (``untyped_storage()._checkpoint_offset``), as torch's meta loading
    computes it. Raises like :func:`load_checkpoint`.
    """
    file = Path(path)
    with open_regular(file):  # a regular file, readable: refused in one line otherwise
        pass
    return _load_torch(file, str(file), trust_pickle, zipped=True, meta=True)


def _load_torch(
    file: Path | BinaryIO, source: str, trust_pickle: bool, zipped: bool, meta: bool = False
) -> Checkpoint:
    try:
        loaded = _torch_load(file, trust_pickle, zipped, meta)
    except pickle.UnpicklingError as error:
        if not trust_pickle and _REFUSES_CODE.search(str(error)):
            raise UnsafeCheckpointError(_unsafe_message(source, str(error))) from None
        raise CheckpointError(_corrupt_message(source, error)) from None
    except _UNREADABLE as error:
        raise CheckpointError(_corrupt_message(source, error)) from None
    return checkpoint_of(loaded, source)


IN_MEMORY = "<state dict>"
"""The name of a checkpoint given as an object in memory (a state dict), in messages."""


def checkpoint_of(loaded: Any, source: str = IN_MEMORY) -> Checkpoint:
    """A checkpoint already in memory (a state dict, or a training checkpoint around
    one) as a :class:`Checkpoint`, exactly as if ``torch.load`` had returned it.

    Raises:
        CheckpointError: ``loaded`` holds no mapping of names to tensors.
    """
    location = find_state_dict(loaded, source)
    mapping = loaded
    for key in location:
        mapping = mapping[key]
    tensors, extras = _split(mapping)
    return Checkpoint(
        tensors=tensors,
        format=TORCH,
        source=source,
        container=loaded if location else None,
        location=location,
        extras=extras,
        _mapping_type=type(mapping),
        _mapping_attrs=dict(getattr(mapping, "__dict__", {})),
        _keys=tuple(mapping),
    )


def _split(mapping: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a state dict, and its other entries."""
    import torch

    tensors = {k: v for k, v in mapping.items() if isinstance(v, torch.Tensor)}
    return tensors, {k: v for k, v in mapping.items() if k not in tensors}


def _torch_load(file: Path | BinaryIO, trust_pickle: bool, zipped: bool, meta: bool = False) -> Any:
    import torch

    if isinstance(file, Path) and str(file).endswith(".safetensors"):
        # torch.load hands any path named *.safetensors to safetensors, whatever the
        # bytes are; the content said torch, so give it an open file instead.
        with open_regular(file) as descriptor, os.fdopen(os.dup(descriptor), "rb") as handle:
            return _torch_load(handle, trust_pickle, zipped=False, meta=meta)
    where = "meta" if meta else "cpu"
    with warnings.catch_warnings():
        # Legacy storages and pickle protocols make torch warn while loading: noise
        # the user cannot act on, and stderr must stay one line when we refuse.
        warnings.simplefilter("ignore")
        if trust_pickle:
            return torch.load(file, map_location=where, weights_only=False)
        # mmap (for describing only) keeps a zip checkpoint's bytes on disk; the
        # meta device reads none of them.
        return torch.load(file, map_location=where, weights_only=True, mmap=zipped and not meta)


def _unsafe_message(source: str, detail: str) -> str:
    found = re.search(r"(?:GLOBAL|global) ([\w.]+)", detail)
    what = f" (it references {found.group(1)})" if found else ""
    return (
        f"{source} needs arbitrary unpickling to load{what}, which can run code; "
        "refused. If you trust where it came from, rerun with {trust_pickle}"
    )


def _corrupt_message(source: str, error: BaseException) -> str:
    text = str(error).strip()
    # torch's weights_only failures open with advice to disable it; the cause is later.
    cause = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    detail = cause.group(1) if cause else text.splitlines()[0] if text else ""
    if not isinstance(error, RuntimeError | pickle.UnpicklingError | OSError):
        detail = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
    detail = detail or type(error).__name__
    return (
        f"{source} is truncated or corrupt and could not be read ({detail[:160]}); "
        "re-export or re-download the checkpoint"
    )


def _holds_tensors(value: Any) -> bool:
    """A mapping with string keys and at least one tensor: a state dict, maybe with extras."""
    import torch

    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) for k in value)
        and any(isinstance(v, torch.Tensor) for v in value.values())
    )


def _only_tensors(value: Any) -> bool:
    import torch

    return _holds_tensors(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def find_state_dict(loaded: Any, source: str = "checkpoint") -> tuple[Any, ...]:
    """The keys leading to the tensor mapping inside a (possibly nested) checkpoint.

    A plain state dict is its own mapping (``()``). A training checkpoint such
    as ``{"state_dict": ..., "optimizer": ..., "epoch": 3}`` gives
    ``("state_dict",)``: the well-known names are tried first, in order, and
    win even when their mapping holds a few non-tensor entries (which are
    kept). Otherwise the one mapping holding tensors (the top level, or up to
    two levels down) is the state dict; several are an error listing them,
    never a silent pick.

    Raises:
        CheckpointError: no mapping holds tensors, or several do.
    """
    if _only_tensors(loaded):
        return ()
    if not isinstance(loaded, Mapping):
        raise CheckpointError(
            f"{source} holds a {type(loaded).__name__}, not a state dict; save "
            "model.state_dict() instead of the model"
        )
    for key in STATE_DICT_KEYS:
        if key in loaded and _holds_tensors(loaded[key]):
            return (key,)
    found = [()] if _holds_tensors(loaded) else []
    for key, value in loaded.items():
        if _holds_tensors(value):
            found.append((key,))
        elif isinstance(value, Mapping):
            found += [(key, inner) for inner, nested in value.items() if _holds_tensors(nested)]
    if len(found) == 1:
        return found[0]
    if found:
        names = ", ".join(".".join(map(str, where)) or "(the top level)" for where in found[:6])
        raise CheckpointError(
            f"{source} holds several mappings of tensors ({names}) and none under a well-known "
            "name such as 'state_dict'; save the one to convert as its own state dict"
        )
    keys = ", ".join(map(str, list(loaded)[:8]))
    raise CheckpointError(
        f"{source} holds no mapping of tensors (top-level keys: {keys}); "
        "give a state dict or a training checkpoint with a 'state_dict' entry"
    )


def _load_safetensors_file(file: Path) -> Checkpoint:
    from fcconv.io.safetensors import read_header, read_tensors

    header = read_header(file)  # validated; tensors in the order of their bytes
    tensors = read_tensors(file, list(header.tensors))
    return Checkpoint(tensors, SAFETENSORS, str(file), metadata=header.metadata)


def _load_safetensors_bytes(data: bytes, source: str) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load

    from fcconv.io.safetensors import header_from_bytes

    header = header_from_bytes(data, source)
    try:
        loaded = load(data)
    except (SafetensorError, ValueError) as error:
        raise CheckpointError(f"{source} has a corrupt safetensors header ({error})") from None
    tensors = {name: loaded[name] for name in header.tensors}
    return Checkpoint(tensors, SAFETENSORS, source, metadata=header.metadata)


# --------------------------------------------------------------------- writing


def format_for(path: str | Path, override: str | None, fallback: str) -> str:
    """The output format: ``override``, else from the extension, else ``fallback``.

    Keras files are named by kind: ``.keras`` (a model), ``.weights.h5`` (Keras 3
    weights), ``.h5``/``.hdf5`` (a legacy model).
    """
    if override:
        return override
    name = Path(str(path)).name.lower()
    suffix = Path(name).suffix
    if suffix == ".safetensors":
        return SAFETENSORS
    if suffix in TORCH_SUFFIXES:
        return TORCH
    if suffix == ".keras":
        return KERAS
    if name.endswith(".weights.h5"):
        return KERAS_WEIGHTS
    if suffix in (".h5", ".hdf5"):
        return KERAS_H5
    return fallback


def serialize(checkpoint: Checkpoint, fmt: str) -> bytes:
    """The checkpoint as the bytes of a file in ``fmt``."""
    buffer = io.BytesIO()
    _write(checkpoint, fmt, buffer)
    return buffer.getvalue()


@phased("writing")
def save_checkpoint(
    checkpoint: Checkpoint,
    path: str | Path,
    *,
    fmt: str | None = None,
    force: bool = False,
    sources: tuple[str | Path, ...] = (),
) -> str:
    """Write ``checkpoint`` atomically to ``path`` (or stdout for ``-``).

    Returns the format written. ``sources`` are the input paths, which are
    never overwritten.
    """
    fmt = format_for(path, fmt, checkpoint.format)
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == SAFETENSORS and checkpoint.container is not None:
        raise CheckpointError(
            f"{checkpoint.source} is a training checkpoint with state around its "
            "weights, which safetensors cannot hold; write a .pt output instead"
        )
    if str(path) == STDIO:
        check_stdout(sources)
        stdio.write_stdout(serialize(checkpoint, fmt))
        return fmt
    target = Path(path)
    check_output_path(target, force, sources)
    with (
        atomic_output(target, force=force, sources=sources) as temporary,
        open(temporary, "wb") as handle,
    ):
        _write(checkpoint, fmt, handle)
    return fmt


class _RecordingWriter:
    """A file's ``write`` that remembers the ``OSError`` torch turns into a RuntimeError."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        self.handle.flush()


def _write(checkpoint: Checkpoint, fmt: str, handle: BinaryIO) -> None:
    if fmt == TORCH:
        import torch

        writer = _RecordingWriter(handle)
        try:
            torch.save(checkpoint.payload(), writer)
        except RecursionError:  # pickling recurses; the (iterative) unpickler did not
            raise CheckpointError(
                f"{checkpoint.source} nests its values too deeply for torch.save to write them "
                "back; save the state dict on its own and convert that"
            ) from None
        except RuntimeError:
            if writer.error is not None:  # disk full, file too large: say so, not torch's words
                raise writer.error from None
            raise
        return
    from safetensors.torch import save

    try:
        tensors = {name: tensor.contiguous() for name, tensor in checkpoint.tensors.items()}
        data = save(tensors, metadata=checkpoint.metadata)
    except Exception as error:  # a dtype, layout or device safetensors cannot hold
        detail = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        raise CheckpointError(
            f"cannot write {checkpoint.source} as safetensors ({type(error).__name__}"
            f"{': ' + detail if detail else ''}); write a .pt output instead"
        ) from None
    handle.write(data)
