"""Load and save checkpoints: torch pickles and safetensors, plain or nested.

Reading never unpickles arbitrary code unless the caller says the file is
trusted. Writing is atomic and keeps everything that was not converted:
untouched tensors, their order and dtype, the training state around the
weights, and safetensors metadata.
"""

from __future__ import annotations

import io
import pickle
import re
import struct
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from fcconv.errors import CheckpointError, UnsafeCheckpointError
from fcconv.io.atomic import STDIO, atomic_output, check_output_path

if TYPE_CHECKING:
    import torch

SAFETENSORS = "safetensors"
TORCH = "torch"
FORMATS = (SAFETENSORS, TORCH)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# What torch.load raises on bytes that are not a well-formed checkpoint. Truncated
# and bit-flipped files, fuzzed, reach the unpickler in all of these ways.
_UNREADABLE = (
    pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError,
    KeyError, IndexError, TypeError, AssertionError, ImportError, struct.error,
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
    """

    tensors: dict[str, torch.Tensor]
    format: str
    source: str
    container: Any = None
    location: tuple[Any, ...] = ()
    metadata: dict[str, str] | None = None
    _mapping_type: type = field(default=dict, repr=False)
    _mapping_attrs: dict[str, Any] = field(default_factory=dict, repr=False)

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> Checkpoint:
        """The same checkpoint with a new tensor mapping (same container and metadata)."""
        return replace(self, tensors=tensors)

    def payload(self) -> Any:
        """The object to pickle: the container with the new mapping put back in place."""
        mapping = self._mapping_type(self.tensors)
        for name, value in self._mapping_attrs.items():
            setattr(mapping, name, value)
        if not self.location:
            return mapping
        return _replace_at(self.container, self.location, mapping)


def _replace_at(container: Any, location: tuple[Any, ...], value: Any) -> Any:
    head, *rest = location
    copy = type(container)(container)
    copy.update({head: _replace_at(container[head], tuple(rest), value) if rest else value})
    return copy


# --------------------------------------------------------------------- reading


def load_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> Checkpoint:
    """Read a checkpoint from ``path`` (or stdin for ``-``), refusing unsafe pickles.

    The format is told by the file's content, not its name.

    Raises:
        CheckpointError: the file is missing, empty, corrupt or not a checkpoint.
        UnsafeCheckpointError: it needs arbitrary unpickling and ``trust_pickle``
            is false.
    """
    if str(path) == STDIO:
        data = sys.stdin.buffer.read()
        return _load_bytes(data, "<stdin>", trust_pickle)
    file = Path(path)
    _check_readable(file)
    with open(file, "rb") as handle:
        head = handle.read(16)
    kind = _sniff(head, file.stat().st_size, str(file))
    if kind == SAFETENSORS:
        return _load_safetensors_file(file)
    return _load_torch(file, str(file), trust_pickle, zipped=kind == "zip")


def load_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, Any]:
    """Just the tensor mapping of a checkpoint (see :func:`load_checkpoint`)."""
    return load_checkpoint(path, trust_pickle=trust_pickle).tensors


def _check_readable(file: Path) -> None:
    if not file.exists():
        raise CheckpointError(f"no such file: {file}; check the path")
    if file.is_dir():
        raise CheckpointError(
            f"{file} is a directory; give a checkpoint file (.pt, .pth, .bin, .ckpt "
            "or .safetensors)"
        )
    if file.stat().st_size == 0:
        raise CheckpointError(f"{file} is empty (0 bytes); it is not a checkpoint")


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
    _check_readable(file)
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
    location = find_state_dict(loaded, source)
    mapping = loaded
    for key in location:
        mapping = mapping[key]
    return Checkpoint(
        tensors=dict(mapping),
        format=TORCH,
        source=source,
        container=loaded if location else None,
        location=location,
        _mapping_type=type(mapping),
        _mapping_attrs=dict(getattr(mapping, "__dict__", {})),
    )


def _torch_load(file: Path | BinaryIO, trust_pickle: bool, zipped: bool, meta: bool = False) -> Any:
    import torch

    if isinstance(file, Path) and str(file).endswith(".safetensors"):
        # torch.load hands any path named *.safetensors to safetensors, whatever the
        # bytes are; the content said torch, so give it an open file instead.
        with open(file, "rb") as handle:
            return _torch_load(handle, trust_pickle, zipped=False, meta=meta)
    where = "meta" if meta else "cpu"
    with warnings.catch_warnings():
        # Legacy storages and pickle protocols make torch warn while loading: noise
        # the user cannot act on, and stderr must stay one line when we refuse.
        warnings.simplefilter("ignore")
        if trust_pickle:
            return torch.load(file, map_location=where, weights_only=False)
        # mmap keeps a large zip checkpoint out of memory until its bytes are used.
        mmap = zipped and not meta
        return torch.load(file, map_location=where, weights_only=True, mmap=mmap)


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


def _is_tensor_mapping(value: Any) -> bool:
    import torch

    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) for k in value)
        and all(isinstance(v, torch.Tensor) for v in value.values())
    )


def find_state_dict(loaded: Any, source: str = "checkpoint") -> tuple[Any, ...]:
    """The keys leading to the tensor mapping inside a (possibly nested) checkpoint.

    A plain state dict is its own mapping (``()``). A training checkpoint such
    as ``{"state_dict": ..., "optimizer": ..., "epoch": 3}`` gives
    ``("state_dict",)``; well-known names are tried first, then any nested
    mapping of tensors up to two levels down.
    """
    if _is_tensor_mapping(loaded):
        return ()
    if isinstance(loaded, Mapping):
        for key in STATE_DICT_KEYS:
            if key in loaded and _is_tensor_mapping(loaded[key]):
                return (key,)
        for key, value in loaded.items():
            if isinstance(value, Mapping):
                for inner, nested in value.items():
                    if _is_tensor_mapping(nested):
                        return (key, inner)
                if _is_tensor_mapping(value):
                    return (key,)
        keys = ", ".join(map(str, list(loaded)[:8]))
        raise CheckpointError(
            f"{source} holds no mapping of tensors (top-level keys: {keys}); "
            "give a state dict or a training checkpoint with a 'state_dict' entry"
        )
    raise CheckpointError(
        f"{source} holds a {type(loaded).__name__}, not a state dict; save "
        "model.state_dict() instead of the model"
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
    """The output format: ``override``, else from the extension, else ``fallback``."""
    if override:
        return override
    suffix = Path(str(path)).suffix.lower()
    if suffix == ".safetensors":
        return SAFETENSORS
    if suffix in TORCH_SUFFIXES:
        return TORCH
    return fallback


def serialize(checkpoint: Checkpoint, fmt: str) -> bytes:
    """The checkpoint as the bytes of a file in ``fmt``."""
    buffer = io.BytesIO()
    _write(checkpoint, fmt, buffer)
    return buffer.getvalue()


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
        data = serialize(checkpoint, fmt)
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return fmt
    target = Path(path)
    check_output_path(target, force, tuple(Path(s) for s in sources if str(s) != STDIO))
    with atomic_output(target) as temporary, open(temporary, "wb") as handle:
        _write(checkpoint, fmt, handle)
    return fmt


def _write(checkpoint: Checkpoint, fmt: str, handle: BinaryIO) -> None:
    if fmt == TORCH:
        import torch

        torch.save(checkpoint.payload(), handle)
        return
    from safetensors.torch import save

    tensors = {name: tensor.contiguous() for name, tensor in checkpoint.tensors.items()}
    try:
        handle.write(save(tensors, metadata=checkpoint.metadata))
    except (ValueError, RuntimeError) as error:
        raise CheckpointError(
            f"cannot write {checkpoint.source} as safetensors ({error}); write a .pt output instead"
        ) from None
