"""The output guard: which paths may be written, and writing them atomically.

One place decides whether fcconv may write a path, for every command:

* **Never an input.** Outputs are compared with every input, and every file
  an input is made of (an ONNX model's external data, a shard index's
  shards: :mod:`fcconv.io.parts`), by device and inode, however either is
  reached: a hard link, a symlink, ``./x``, or the
  file behind stdin (``fcconv convert - -o model.pt < model.pt``). A job
  declares its inputs once with :func:`protect_inputs`; every check made
  while it runs includes them. Nothing is written inside an input folder,
  and stdout is refused when it is an input file (``>> model.pt``).
* **Never something that is not ours to replace.** An existing output is
  kept unless ``force``; even then only a regular file, or a folder that
  fcconv itself wrote (it holds :data:`MARKER` listing its files, and nothing
  else), is replaced. A symbolic link is neither followed nor replaced, nor
  is a device, a FIFO or a socket.
* **No-replace at the last moment.** The new file is built as a temporary
  file beside the target, then moved into place with
  ``renameat2(RENAME_NOREPLACE)`` (or ``link`` + ``unlink``), so that an
  output created by another program meanwhile, or by a second fcconv, is
  never clobbered without ``force``. The target is either absent, or the
  previous file, or complete; a handled failure leaves no temporary file.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import inspect
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from fcconv.errors import CheckpointError, OutputError
from fcconv.io import stdio
from fcconv.io.files import identity, kind_of, probe
from fcconv.io.parts import parts_of

TEMP_SUFFIX = ".fcconv-tmp"
STDIO = "-"
"""The path that means stdin (for an input) or stdout (for an output)."""

MARKER = ".fcconv-output.json"
"""The file in a folder fcconv wrote that lists what it wrote there."""

F = TypeVar("F", bound=Callable[..., Any])

_MAX_NAME_BYTES = 255
_TEMP_STEM_BYTES = 96  # leaves room for the random part and the suffix within 255 bytes


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
    found = probe(source)
    if (found is not None and stat.S_ISDIR(found.st_mode)) or source.name.endswith(".index.json"):
        folder = source if found is not None and stat.S_ISDIR(found.st_mode) else source.parent
        folder = folder.resolve()
        return str(folder.with_name(f"{folder.name}.conv"))
    return str(source.with_name(f"{source.stem}.conv{source.suffix}"))


# ------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class _Input:
    name: str
    identity: tuple[int, int]
    folder: bool
    path: Path | None = None  # None for stdin
    part_of: str | None = None  # the input this file is part of (external data, a shard)


_INPUTS: contextvars.ContextVar[tuple[_Input, ...]] = contextvars.ContextVar(
    "fcconv_inputs", default=()
)


def _identify(path: str | Path) -> tuple[_Input, ...]:
    """``path`` and every other file it is made of (an ONNX model's external data, shards)."""
    found = _identify_one(path)
    if found is None:
        return ()
    if found.folder or found.path is None:
        return (found,)
    parts = (_identify_one(part) for part in parts_of(path))
    return (found, *(replace(item, part_of=str(path)) for item in parts if item is not None))


def _identify_one(path: str | Path) -> _Input | None:
    if str(path) == STDIO:
        found = stdio.identity(stdio.STDIN)
        return None if found is None else _Input("stdin", found, folder=False)
    try:
        status = probe(path)
    except CheckpointError:
        return None  # an input that cannot even be stat'ed is refused when it is read
    if status is None:
        return None
    ident = (status.st_dev, status.st_ino)
    return _Input(str(path), ident, stat.S_ISDIR(status.st_mode), Path(path))


@contextlib.contextmanager
def protect_inputs(*paths: str | Path) -> Iterator[None]:
    """While the block runs, every output check refuses the files and folders of ``paths``.

    ``-`` stands for the file behind stdin. Identities are taken now, so the
    file that is read stays protected even if its name is moved meanwhile.

    Example:
        >>> with protect_inputs("model.pt"):  # doctest: +SKIP
        ...     check_output_path(Path("model.pt"), force=True)  # CheckpointError
    """
    found = tuple(item for path in paths for item in _identify(path))
    token = _INPUTS.set(_INPUTS.get() + found)
    try:
        yield
    finally:
        _INPUTS.reset(token)


def inputs_protected(*parameters: str) -> Callable[[F], F]:
    """Decorate a job so that its ``parameters`` are protected inputs while it runs.

    Example:
        >>> @inputs_protected("src")
        ... def convert(src, dst): ...
    """

    def decorate(function: F) -> F:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind_partial(*args, **kwargs)
            paths = [
                value
                for p in parameters
                if isinstance(value := bound.arguments.get(p), str | os.PathLike)
            ]  # a state dict given as itself is no file to protect
            with protect_inputs(*paths):
                return function(*args, **kwargs)

        return guarded  # type: ignore[return-value]

    return decorate


def _inputs(sources: Iterable[str | Path]) -> tuple[_Input, ...]:
    explicit = tuple(item for path in sources for item in _identify(path))
    return _INPUTS.get() + explicit


def _ancestors(path: Path) -> list[tuple[int, int]]:
    """Identities of the folder ``path`` would be created in, and of every folder above it."""
    found = []
    folder = _parent(path)
    with contextlib.suppress(OSError, RuntimeError):
        folder = folder.resolve()
    for candidate in (folder, *folder.parents):
        with contextlib.suppress(CheckpointError):
            ident = identity(candidate)
            if ident is not None:
                found.append(ident)
    return found


def _refuse_inputs(target: Path, inputs: tuple[_Input, ...]) -> None:
    if not inputs:
        return
    try:
        same = identity(target)
    except CheckpointError:
        same = None  # a target that cannot be stat'ed is no input; the write will say why
    for item in inputs:
        if same == item.identity:
            what = "is or holds the input folder" if item.folder else "is the input file"
            if item.part_of is not None:
                what = f"is a file the input {item.part_of} is made of"
            raise OutputError(
                f"output {target} {what} ({item.name}); fcconv never overwrites its "
                "input, choose another {output}",
                path=str(target),
            )
    above = set(_ancestors(target))
    for item in inputs:
        if item.folder and item.identity in above:
            raise OutputError(
                f"output {target} is inside the input folder {item.name}; fcconv writes nothing "
                "inside an input folder, choose another {output}",
                path=str(target),
            )


def _parent(target: Path) -> Path:
    return target.parent if str(target.parent) else Path(".")


# ------------------------------------------------------------------- checks


def check_stdout(sources: Iterable[str | Path] = ()) -> None:
    """Refuse stdout as an output when it is an input file (``fcconv … -o - >> model.pt``)."""
    if stdio.was_closed(stdio.STDOUT):
        raise OutputError(
            "stdout is closed; redirect it to a file, or write to a file with {output}"
        )
    behind = stdio.identity(stdio.STDOUT)
    for item in _inputs(sources):
        if behind == item.identity and item.name != "stdin":
            raise OutputError(
                f"stdout is the input file {item.name}; fcconv never overwrites its input, "
                "redirect stdout elsewhere or choose another {output}"
            )


def _check_name(target: Path) -> None:
    if not target.name or target.name in (".", ".."):
        raise OutputError(f"output {target} names no file; give a file name as {{output}}")
    if len(os.fsencode(target.name)) > _MAX_NAME_BYTES:
        raise OutputError(
            f"output name {target.name[:40]}… is {len(os.fsencode(target.name))} bytes, longer "
            f"than a file name may be ({_MAX_NAME_BYTES}); choose a shorter {{output}}",
            path=str(target),
        )


def _refuse_existing(target: Path, status: os.stat_result, force: bool, folder: bool) -> None:
    """Refuse what is at ``target`` unless ``force`` may replace it (a regular file)."""
    mode = status.st_mode
    if stat.S_ISLNK(mode):
        try:
            points = os.readlink(target)
        except OSError:
            points = "?"
        raise OutputError(
            f"output {target} is a symbolic link (to {points}); fcconv neither writes through "
            "a link nor replaces it: give the real path as {output}, or remove the link",
            path=str(target),
        )
    if folder and not stat.S_ISDIR(mode):
        raise OutputError(
            f"output {target} is {kind_of(mode)}; give a folder name as {{output}}",
            path=str(target),
        )
    if not folder and stat.S_ISDIR(mode):
        raise OutputError(
            f"output {target} is a directory; give a file name as {{output}}", path=str(target)
        )
    if not folder and not stat.S_ISREG(mode):
        raise OutputError(
            f"output {target} is {kind_of(mode)}; fcconv replaces only regular files, even "
            "with {force}: choose another {output}",
            path=str(target),
        )
    if not force:
        raise OutputError(
            f"output {target} already exists; pass {{force}} to replace it or choose "
            "another {output}",
            path=str(target),
        )
    if folder:
        _check_replaceable_folder(target)


def _check_folder_writable(target: Path) -> None:
    folder = _parent(target)
    status = probe(folder)
    if status is None or not stat.S_ISDIR(status.st_mode):
        problem = "is a file, not a folder" if status is not None else "does not exist"
        fix = "create it or " if status is None else ""
        fix += "choose another {output}"
        raise OutputError(f"output folder {folder} {problem}; {fix}", path=str(target))
    if not os.access(folder, os.W_OK):
        raise OutputError(
            f"cannot write to folder {folder}: permission denied; choose a folder you "
            "can write to as {output}",
            path=str(target),
        )


def check_output_path(target: str | Path, force: bool, sources: Iterable[str | Path] = ()) -> None:
    """Refuse an output file that fcconv may not write, before any work is done.

    ``sources`` are inputs besides those declared with :func:`protect_inputs`.
    ``-`` (stdout) is checked against the inputs too.

    Raises:
        OutputError: the output is an input or inside an input folder; exists
            and ``force`` is false; is a link, folder, device, FIFO or socket;
            or its folder is missing or not writable.
    """
    if str(target) == STDIO:
        check_stdout(sources)
        return
    target = Path(target)
    _check_name(target)
    _refuse_inputs(target, _inputs(sources))
    status = probe(target, follow=False)
    if status is not None:
        _refuse_existing(target, status, force, folder=False)
    _check_folder_writable(target)


def check_output_folder(
    target: str | Path, force: bool, sources: Iterable[str | Path] = ()
) -> None:
    """Refuse an output *folder* that fcconv may not write (a sharded checkpoint's).

    As :func:`check_output_path`, and: the output may not hold an input
    (replacing it would delete it), and ``force`` replaces only a folder
    fcconv wrote.
    """
    target = Path(target)
    _check_name(target)
    inputs = _inputs(sources)
    _refuse_inputs(target, inputs)
    _refuse_holding_inputs(target, inputs)
    status = probe(target, follow=False)
    if status is not None:
        _refuse_existing(target, status, force, folder=True)
    _check_folder_writable(target)


def _refuse_holding_inputs(target: Path, inputs: tuple[_Input, ...]) -> None:
    """Replacing a folder deletes what it holds: refuse one that holds an input."""
    try:
        mine = identity(target)
    except CheckpointError:
        return
    for item in inputs:
        if mine is not None and item.path is not None and mine in _ancestors(item.path):
            raise OutputError(
                f"output {target} is or holds the input {item.name}; fcconv never "
                "overwrites its input, choose another {output}",
                path=str(target),
            )


# ------------------------------------------------------------- fcconv folders


def mark_folder(folder: Path, files: Iterable[str]) -> None:
    """Record in ``folder`` that fcconv wrote it, and which files (relative POSIX paths)."""
    from fcconv import __version__

    names = sorted(PurePosixPath(name).as_posix() for name in files)
    record = {"written_by": "fcconv", "version": __version__, "files": names}
    with open(folder / MARKER, "x", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def _written_files(folder: Path) -> set[str] | None:
    """The files the marker of ``folder`` lists, or None when it is not a folder fcconv wrote."""
    marker = folder / MARKER
    status = probe(marker, follow=False)
    if status is None or not stat.S_ISREG(status.st_mode) or status.st_size > 16 << 20:
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    files = record.get("files") if isinstance(record, dict) else None
    if record.get("written_by") != "fcconv" or not isinstance(files, list):
        return None
    return {name for name in files if isinstance(name, str)}


def _check_replaceable_folder(target: Path) -> None:
    written = _written_files(target)
    if written is None:
        raise OutputError(
            f"output {target} is a folder fcconv did not write; {{force}} replaces only "
            "folders fcconv wrote: choose another {output}",
            path=str(target),
        )
    allowed = written | {MARKER}
    folders = {str(Path(name).parent) for name in written} | {"."}
    foreign = []
    for root, dirs, names in os.walk(target):
        relative = Path(root).relative_to(target)
        foreign += [
            str(relative / name) for name in names if (relative / name).as_posix() not in allowed
        ]
        foreign += [str(relative / d) for d in dirs if (relative / d).as_posix() not in folders]
        if len(foreign) > 3:
            break
    if foreign:
        raise OutputError(
            f"output {target} holds files fcconv did not write ({', '.join(foreign[:3])}); "
            "remove them or choose another {output}",
            path=str(target),
        )


# ------------------------------------------------------------------- writing


def describe_os_error(error: OSError, target: Path) -> str:
    """A one-line explanation of a failed write, ending with what to do."""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        advice = "free some space or choose another {output}"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "choose a folder you can write to as {output}"
    elif error.errno == errno.ENAMETOOLONG:
        advice = "choose a shorter {output}"
    else:
        advice = "check the output path"
    return f"could not write {target}: {reason}; {advice}"


def temp_prefix(name: str) -> str:
    """The start of a temporary name beside ``name``, short enough for any file system."""
    stem = name
    while len(os.fsencode(stem)) > _TEMP_STEM_BYTES:
        stem = stem[: len(stem) * 3 // 4]
    return f".{stem}."


def _appeared(target: Path) -> OutputError:
    return OutputError(
        f"output {target} appeared while fcconv was writing it (another program?); it was "
        "kept: pass {force} to replace it or choose another {output}",
        path=str(target),
    )


@contextlib.contextmanager
def atomic_output(
    target: Path, *, force: bool = False, sources: Iterable[str | Path] = ()
) -> Iterator[Path]:
    """Yield a temporary path in ``target``'s folder; move it onto ``target`` on success.

    The caller writes the whole file to the yielded path. On success it is
    flushed to disk and, after the output checks are made again, moved into
    place in one step: without ``force`` only if ``target`` still does not
    exist. On any failure it is removed and ``target`` keeps whatever it held.
    ``OSError`` (disk full, permission denied, file too large) becomes a
    one-line :class:`CheckpointError`.

    Example:
        >>> with atomic_output(Path(tmp) / "out.bin") as path:  # doctest: +SKIP
        ...     path.write_bytes(b"...")
    """
    target = Path(target)
    sources = tuple(sources)
    folder = _parent(target)
    existed = probe(target, follow=False) is not None
    try:
        handle, name = tempfile.mkstemp(
            prefix=temp_prefix(target.name), suffix=TEMP_SUFFIX, dir=folder
        )
    except OSError as error:
        raise CheckpointError(describe_os_error(error, target)) from error
    os.close(handle)
    temporary = Path(name)
    try:
        # mkstemp creates 0600; give the result the permissions a plain open() would.
        os.chmod(temporary, 0o666 & ~_umask())
        yield temporary
        _fsync(temporary)
        _check_again(target, force, sources, existed, folder=False)
        _move_into_place(temporary, target, force)
        fsync_folder(folder)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise CheckpointError(describe_os_error(error, target)) from error
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _check_again(
    target: Path, force: bool, sources: tuple[str | Path, ...], existed: bool, folder: bool
) -> None:
    """The output checks once more, just before the move: the target may have changed."""
    if not force and not existed and probe(target, follow=False) is not None:
        raise _appeared(target)
    (check_output_folder if folder else check_output_path)(target, force, sources)


def _move_into_place(source: Path, target: Path, force: bool) -> None:
    if force:
        os.replace(source, target)
        return
    try:
        rename_noreplace(source, target)
    except FileExistsError:
        raise _appeared(target) from None


def rename_noreplace(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target`` only if ``target`` does not exist, atomically.

    ``renameat2(RENAME_NOREPLACE)`` where the system has it; else a hard link
    (which fails on an existing name) and an unlink; else, on filesystems
    without either, a check followed by a rename.

    Raises:
        FileExistsError: ``target`` exists.
    """
    if _renameat2_noreplace(source, target):
        return
    if source.is_dir():
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "File exists", str(target))
        os.rename(source, target)
        return
    try:
        os.link(source, target, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "File exists", str(target)) from None
        os.rename(source, target)
        return
    os.unlink(source)


def _renameat2_noreplace(source: Path, target: Path) -> bool:
    """True when renamed; False when the system cannot do it (then the caller falls back)."""
    function = _renameat2()
    if function is None:
        return False
    import ctypes

    at_cwd, noreplace = -100, 1  # AT_FDCWD, RENAME_NOREPLACE
    result = function(at_cwd, os.fsencode(source), at_cwd, os.fsencode(target), noreplace)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code == errno.EEXIST:
        raise FileExistsError(code, os.strerror(code), str(target))
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # a filesystem without RENAME_NOREPLACE
    raise OSError(code, os.strerror(code), str(target))


_RENAMEAT2: list = []


def _renameat2():  # noqa: ANN202 - a ctypes function or None
    if not _RENAMEAT2:
        function = None
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                function = ctypes.CDLL(None, use_errno=True).renameat2
                function.argtypes = [
                    ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint,
                ]  # fmt: skip
                function.restype = ctypes.c_int
            except (OSError, AttributeError):
                function = None
        _RENAMEAT2.append(function)
    return _RENAMEAT2[0]


def install_folder(
    building: Path,
    target: Path,
    force: bool,
    sources: Iterable[str | Path] = (),
    existed: bool = True,
) -> None:
    """Move the finished folder ``building`` onto ``target``, checking the target again.

    Without ``force`` the target must still not exist. With it, an existing
    target (a folder fcconv wrote, checked again now) is first renamed
    aside, then removed once the new folder is in place. ``existed`` says
    whether the target was there when the work began.
    """
    _check_again(target, force, tuple(sources), existed, folder=True)
    if probe(target, follow=False) is None:
        try:
            rename_noreplace(building, target)
        except FileExistsError:
            raise _appeared(target) from None
    else:
        prefix = temp_prefix(target.name)
        aside = Path(tempfile.mkdtemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=_parent(target)))
        os.rename(target, aside / "previous")
        try:
            rename_noreplace(building, target)
        except BaseException as error:
            os.rename(aside / "previous", target)
            shutil.rmtree(aside, ignore_errors=True)
            if isinstance(error, FileExistsError):
                raise _appeared(target) from None
            raise
        shutil.rmtree(aside, ignore_errors=True)
    fsync_folder(_parent(target))


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
