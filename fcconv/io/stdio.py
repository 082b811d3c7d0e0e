"""The standard streams as fcconv uses them: stdin as a bounded input, stdout as a checked sink.

Three things go wrong with standard streams that do not go wrong with files:

* A stream may be **closed** when fcconv starts (``fcconv … >&-``). Python
  then sets ``sys.stdout`` to None, and the next file fcconv opens would get
  descriptor 1 and receive whatever is "printed". :func:`ensure_standard_fds`
  puts ``/dev/null`` there instead and remembers that the stream was closed,
  so that using it is a one-line error.
* **stdin may never end** (``/dev/zero``, ``yes |``). :func:`read_stdin`
  reads a regular file by its real size, refuses devices and terminals, and
  stops reading a pipe at :data:`MAX_STDIN_BYTES`.
* **stdout may stop taking data**: the reader exits early (``| head``), or
  the disk is full (``> /dev/full``). Python's buffered ``write`` can then
  return a short count without raising; :func:`write_stdout` writes every
  byte with ``os.write`` and raises :class:`~fcconv.errors.OutputError` for
  whatever stops it.
"""

from __future__ import annotations

import errno
import io
import os
import select
import stat
import sys
from collections.abc import Callable
from typing import Any

from fcconv.errors import CheckpointError, OutputError
from fcconv.io.files import kind_of

MAX_STDIN_BYTES = 1 << 30
"""The most fcconv reads from a pipe on stdin (1 GiB); give a larger checkpoint as a path."""

STDIN, STDOUT, STDERR = 0, 1, 2
_closed_at_start: set[int] = set()


def ensure_standard_fds() -> None:
    """Put ``/dev/null`` on standard descriptors that are closed, and remember which were.

    Called once when the command starts, before anything is opened.
    """
    for descriptor in (STDIN, STDOUT, STDERR):
        try:
            os.fstat(descriptor)
        except OSError:
            _closed_at_start.add(descriptor)
            null = os.open(os.devnull, os.O_RDWR)
            if null != descriptor:
                os.dup2(null, descriptor)
                os.close(null)


def was_closed(descriptor: int) -> bool:
    """Whether standard ``descriptor`` was closed when fcconv started."""
    return descriptor in _closed_at_start


def _stream(descriptor: int) -> Any:
    return (sys.stdin, sys.stdout, sys.stderr)[descriptor]


def _real_descriptor(descriptor: int) -> int | None:
    """The descriptor behind ``sys.stdin``/``sys.stdout``, None when Python's stream was
    replaced by one without a file (click's test runner, an embedding program)."""
    stream = _stream(descriptor)
    if was_closed(descriptor) or stream is None:
        return None
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return None


def identity(descriptor: int) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the file behind a standard stream, None when it has none."""
    real = _real_descriptor(descriptor)
    if real is None:
        return None
    try:
        found = os.fstat(real)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def is_terminal(descriptor: int) -> bool:
    """Whether a standard stream is a terminal (False when it was closed)."""
    stream = _stream(descriptor)
    try:
        return not was_closed(descriptor) and stream is not None and stream.isatty()
    except (OSError, ValueError):
        return False


# ------------------------------------------------------------------- stdin


def read_stdin(limit: int | None = None) -> bytes:
    """The checkpoint on stdin: a regular file whole, a pipe up to ``limit`` bytes.

    ``limit`` defaults to :data:`MAX_STDIN_BYTES`.

    Raises:
        CheckpointError: stdin is closed, a terminal or a device, or a pipe
            holding more than ``limit`` bytes.
    """
    limit = MAX_STDIN_BYTES if limit is None else limit
    if was_closed(STDIN) or sys.stdin is None:
        raise CheckpointError("stdin is closed; pipe a checkpoint into fcconv or give its path")
    real = _real_descriptor(STDIN)
    if real is None:
        return _read_bounded(sys.stdin.buffer.read, limit, limit)
    try:
        mode = os.fstat(real).st_mode
    except OSError as error:
        raise CheckpointError(f"cannot read stdin: {error.strerror}; give a path") from None
    if os.isatty(real):
        raise CheckpointError(
            "stdin is a terminal; pipe a checkpoint into fcconv (< model.pt) or give its path"
        )
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        raise CheckpointError(
            f"stdin is {kind_of(mode)}, not a checkpoint; pipe a checkpoint into fcconv or "
            "give its path"
        )
    bound = None if stat.S_ISREG(mode) else limit  # a regular file's size is real
    return _read_bounded(lambda size: _read_descriptor(real, size), bound, limit)


def _read_descriptor(descriptor: int, size: int) -> bytes:
    while True:
        try:
            return os.read(descriptor, size)
        except BlockingIOError:  # a non-blocking stdin inherited from the shell
            select.select([descriptor], [], [])
        except OSError as error:
            raise CheckpointError(f"cannot read stdin: {error.strerror}; give a path") from None


def _read_bounded(read: Callable[[int], bytes], bound: int | None, limit: int) -> bytes:
    """Everything ``read`` gives, refused once it passes ``bound`` (None: no bound)."""
    chunks: list[bytes] = []
    total = 0
    while bound is None or total <= bound:
        want = 8 << 20 if bound is None else min(8 << 20, bound + 1 - total)
        chunk = read(want)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
    raise CheckpointError(
        f"stdin holds more than {limit >> 20} MiB, the most fcconv reads from a pipe; save the "
        "checkpoint to a file and give its path"
    )


# ------------------------------------------------------------------ stdout


def write_stdout(data: bytes | str) -> None:
    """Write every byte of ``data`` to stdout, or raise :class:`OutputError` saying why not.

    Text is encoded as UTF-8. Anything Python had buffered for stdout is
    flushed first, so the bytes stay in order.
    """
    if was_closed(STDOUT):
        raise OutputError(
            "stdout is closed; redirect it to a file, or write to a file with {output}"
        )
    payload = data.encode("utf-8") if isinstance(data, str) else data
    real = _real_descriptor(STDOUT)
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
        if real is None and sys.stdout is not None:  # a replaced stdout: write through it
            sys.stdout.buffer.write(payload)
            sys.stdout.buffer.flush()
            return
        view = memoryview(payload)
        while view:
            try:
                written = os.write(STDOUT if real is None else real, view)
            except BlockingIOError:  # a non-blocking stdout inherited from the shell
                select.select([], [STDOUT], [])
                continue
            view = view[written:]
    except OSError as error:
        silence()
        raise _stdout_error(error) from None


def _stdout_error(error: OSError) -> OutputError:
    if error.errno == errno.EPIPE:
        return OutputError(
            "stdout was closed by the program reading it before fcconv finished writing "
            "(broken pipe); the output is incomplete"
        )
    reason = error.strerror or str(error)
    return OutputError(f"could not write to stdout: {reason}; the output is incomplete")


def silence(descriptor: int = STDOUT) -> None:
    """Point a stream at ``/dev/null`` after it failed, so Python's exit flush cannot fail again."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, descriptor)
        os.close(null)
    except OSError:
        pass


def flush_standard_streams() -> OutputError | None:
    """Flush ``sys.stdout`` and ``sys.stderr``; the stdout failure, if any, as an error.

    A stream that cannot be flushed is pointed at ``/dev/null``, so that the
    interpreter's own flush at exit neither fails nor changes the exit code.
    """
    failure = None
    for stream, descriptor in ((sys.stdout, STDOUT), (sys.stderr, STDERR)):
        if stream is None:
            continue
        try:
            stream.flush()
        except (OSError, ValueError) as error:
            if isinstance(error, OSError) and descriptor == STDOUT:
                failure = _stdout_error(error)
            silence(descriptor)
    return failure
