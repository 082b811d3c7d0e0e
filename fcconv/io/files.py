"""Opening inputs safely: regular files only, never blocking, every failure one line.

A path the user gives may name anything: a FIFO that blocks ``open()``
forever, ``/dev/zero`` that never ends, a name too long for the filesystem, a
loop of symlinks. :func:`open_regular` opens without blocking
(``O_NONBLOCK``), then checks with ``fstat`` on the open descriptor (so the
file cannot be swapped between the check and the read) that it is a regular
file. :func:`probe` stats a path and turns every ``OSError`` into a
:class:`~fcconv.errors.CheckpointError` instead of the traceback that
``Path.exists()`` and friends raise for ``ENAMETOOLONG`` or ``EACCES``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from fcconv.errors import CheckpointError

MAX_INDEX_BYTES = 64 << 20
"""The largest ``*.index.json`` fcconv reads (real indexes are well under 1 MB)."""


def kind_of(mode: int) -> str:
    """What a file of ``st_mode`` is, in words: ``a FIFO``, ``a character device``, …"""
    kinds = (
        (stat.S_ISREG, "a file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def describe_read_error(path: str | Path, error: OSError) -> CheckpointError:
    """One line for a failed stat/open/read of an input."""
    if error.errno == errno.ENOENT:
        return CheckpointError(
            f"no such file: {path} does not exist; check the path", path=str(path)
        )
    if error.errno == errno.ENAMETOOLONG:
        shown = str(path) if len(str(path)) <= 80 else f"{str(path)[:60]}…{str(path)[-16:]}"
        return CheckpointError(
            f"the path {shown} is too long for the filesystem; give a shorter path",
            path=str(path),
        )
    if error.errno == errno.ELOOP:
        return CheckpointError(
            f"{path} is a loop of symbolic links; give the real file", path=str(path)
        )
    reason = error.strerror or str(error)
    return CheckpointError(
        f"could not read {path}: {reason}; check the path and its permissions", path=str(path)
    )


def probe(path: str | Path, *, follow: bool = True) -> os.stat_result | None:
    """``os.stat`` (or ``lstat``) of ``path``, None when nothing is there.

    Raises:
        CheckpointError: any other failure (too long, permission denied, loop).
    """
    try:
        return os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None  # a component of the path is a file: nothing can be there
    except OSError as error:
        raise describe_read_error(path, error) from None


def is_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder (following symlinks); errors as :func:`probe`."""
    found = probe(path)
    return found is not None and stat.S_ISDIR(found.st_mode)


@contextlib.contextmanager
def open_regular(path: str | Path) -> Iterator[int]:
    """A read-only descriptor of ``path``, refused unless it is a regular file.

    Opening never blocks: a FIFO is opened with ``O_NONBLOCK`` and refused by
    the ``fstat`` that follows, before anything reads from it.

    Raises:
        CheckpointError: missing, not a regular file, or unreadable.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags)
    except IsADirectoryError:
        raise CheckpointError(
            f"{path} is a folder, not a checkpoint file; name the file", path=str(path)
        ) from None
    except OSError as error:
        raise describe_read_error(path, error) from None
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise CheckpointError(
                f"{path} is {kind_of(mode)}, not a checkpoint file; give a regular file",
                path=str(path),
            )
        os.set_blocking(descriptor, True)
        yield descriptor
    finally:
        os.close(descriptor)


def read_regular(path: str | Path, limit: int, what: str) -> bytes:
    """The whole content of the regular file ``path``, refused beyond ``limit`` bytes."""
    with open_regular(path) as descriptor:
        size = os.fstat(descriptor).st_size
        if size > limit:
            raise CheckpointError(
                f"{path} is {size} bytes, more than any real {what} ({limit} at most); "
                "check that it is the right file",
                path=str(path),
            )
        chunks, total = [], 0
        while total <= limit:
            try:
                chunk = os.read(descriptor, min(1 << 20, limit + 1 - total))
            except OSError as error:
                raise describe_read_error(path, error) from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise CheckpointError(
                f"{path} grew past {limit} bytes while being read; check that it is the right file",
                path=str(path),
            )
        return b"".join(chunks)


def identity(path: str | Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of what ``path`` names (following links), or None."""
    found = probe(path)
    return None if found is None else (found.st_dev, found.st_ino)
