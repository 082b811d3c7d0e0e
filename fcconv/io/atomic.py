"""Atomic file output: a temporary file beside the target, then a rename.

The target is either absent or complete: never a partial checkpoint under its
name. A handled failure leaves no temporary file behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fcconv.errors import CheckpointError

TEMP_SUFFIX = ".fcconv-tmp"
STDIO = "-"
"""The path that means stdin (for an input) or stdout (for an output)."""


def default_output(path: str | Path) -> str:
    """Where a conversion of ``path`` goes when no output is given: beside the input.

    ``model.pt`` → ``model.conv.pt``; a sharded checkpoint's folder (or its
    ``*.index.json``) ``models/vgg16`` → the folder ``models/vgg16.conv``;
    stdin → stdout.

    >>> default_output("models/model.safetensors")
    'models/model.conv.safetensors'
    """
    if str(path) == STDIO:
        return STDIO
    source = Path(path)
    if source.is_dir() or source.name.endswith(".index.json"):
        folder = (source if source.is_dir() else source.parent).resolve()
        return str(folder.with_name(f"{folder.name}.conv"))
    return str(source.with_name(f"{source.stem}.conv{source.suffix}"))


def check_output_path(target: Path, force: bool, sources: tuple[Path, ...] = ()) -> None:
    """Refuse outputs that would clobber an input or an existing file without ``force``."""
    for source in sources:
        if _same_file(source, target):
            raise CheckpointError(
                f"output {target} is the input file; fcconv never overwrites its "
                "input, choose another {output}"
            )
    if target.is_dir():
        raise CheckpointError(f"output {target} is a directory; give a file name as {{output}}")
    if target.exists() and not force:
        raise CheckpointError(
            f"output {target} already exists; pass {{force}} to replace it or choose "
            "another {output}"
        )
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        problem = "is a file, not a folder" if folder.exists() else "does not exist"
        fix = (
            "choose another {output}" if folder.exists() else "create it or choose another {output}"
        )
        raise CheckpointError(f"output folder {folder} {problem}; {fix}")
    if not os.access(folder, os.W_OK):
        raise CheckpointError(
            f"cannot write to folder {folder}: permission denied; choose a folder you "
            "can write to as {output}"
        )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def describe_os_error(error: OSError, target: Path) -> str:
    """A one-line explanation of a failed write, ending with what to do."""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        advice = "free some space or choose another {output}"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "choose a folder you can write to as {output}"
    else:
        advice = "check the output path"
    return f"could not write {target}: {reason}; {advice}"


@contextlib.contextmanager
def atomic_output(target: Path) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; rename it onto ``target`` on success.

    The caller writes the whole file to the yielded path. On success it is
    flushed to disk and renamed over ``target`` in one step; on any failure it
    is removed and ``target`` keeps whatever it held before. ``OSError`` (disk
    full, permission denied, file too large) becomes a one-line
    :class:`CheckpointError`.

    Example:
        >>> with atomic_output(Path(tmp) / "out.bin") as path:  # doctest: +SKIP
        ...     path.write_bytes(b"...")
    """
    folder = target.parent if str(target.parent) else Path(".")
    try:
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=folder)
    except OSError as error:
        raise CheckpointError(describe_os_error(error, target)) from error
    os.close(handle)
    temporary = Path(name)
    try:
        # mkstemp creates 0600; give the result the permissions a plain open() would.
        os.chmod(temporary, 0o666 & ~_umask())
        yield temporary
        _fsync(temporary)
        os.replace(temporary, target)
        fsync_folder(folder)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise CheckpointError(describe_os_error(error, target)) from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def fsync_folder(folder: Path) -> None:
    """Make renames and new names in ``folder`` durable (where a folder can be opened)."""
    with contextlib.suppress(OSError):
        handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
