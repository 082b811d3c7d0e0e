"""An HDF5 file read as itself only, within a memory budget: the guards for Keras files.

HDF5 can make a file's datasets out of other files: a dataset with
*external storage* reads its bytes from any path (``~/.ssh/id_rsa``), an
*external link* opens another HDF5 file, a *virtual dataset* maps regions of
other files. Read and copied into an output, those bytes leave the machine
with the model the user shares. A dataset may also declare gigabytes it does
not hold: a chunked dataset with no chunks written is "filled on read", so a
few-kilobyte file allocates whatever it declares.

:func:`check_hdf5` refuses all of these before any dataset is read: every
link is a hard link or a soft link inside the file, every dataset stores its
bytes in the file (contiguous, chunked or compact), and every dataset
declares at most :data:`MAX_DATASET_BYTES` and no more than
:data:`MAX_INFLATION` times what it stores (plus 16 MiB), so that memory
follows the file's real size.
"""

from __future__ import annotations

from typing import Any

from fcconv.errors import CheckpointError

MAX_DATASET_BYTES = 1 << 30
"""The most one dataset may declare (1 GiB): reading it and its converted copy stays under 2 GB."""
MAX_INFLATION = 16
"""A dataset may declare at most this many times the bytes it stores (compression), plus 16 MiB."""
MAX_OBJECTS = 1_000_000
"""Objects and links walked at most; a file with more is refused rather than walked for minutes."""


def _refuse(source: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{source}: {what}; fcconv reads only the file itself, within its memory budget: "
        "re-save the model with its weights stored in the file",
        path=source,
    )


def check_hdf5(handle: Any, source: str) -> None:
    """Refuse an open HDF5 file that reads other files or declares more than it holds.

    Args:
        handle: an open ``h5py.File`` (or group).
        source: the file's name for messages.

    Raises:
        CheckpointError: an external link, a user-defined link, a dataset
            with external storage, a virtual dataset, or a dataset declaring
            more bytes than the budget or than it stores.
    """
    import h5py

    _check_links(handle, source, h5py)
    datasets: list[str] = []

    def collect(name: bytes, info: Any) -> None:
        if info.type == h5py.h5o.TYPE_DATASET:
            datasets.append(name.decode("utf-8", "replace"))
        if len(datasets) > MAX_OBJECTS:
            raise _refuse(source, f"it holds more than {MAX_OBJECTS} datasets")

    h5py.h5o.visit(handle.id, collect, info=True)
    for name in datasets:
        check_dataset(handle[name], source, h5py)


def _check_links(handle: Any, source: str, h5py: Any) -> None:
    seen = 0
    problem: list[str] = []

    def visit(name: bytes) -> int | None:
        nonlocal seen
        seen += 1
        if seen > MAX_OBJECTS:
            problem.append(f"it holds more than {MAX_OBJECTS} links")
            return 1
        kind = handle.id.links.get_info(name).type
        shown = name.decode("utf-8", "replace")
        if kind == h5py.h5l.TYPE_EXTERNAL:
            link = handle.get(shown, getlink=True)
            problem.append(
                f"{shown} is an external link to {link.filename}:{link.path}, another file"
            )
            return 1
        if kind not in (h5py.h5l.TYPE_HARD, h5py.h5l.TYPE_SOFT):
            problem.append(f"{shown} is a user-defined link, which may lead out of the file")
            return 1
        return None

    handle.id.links.visit(visit)
    if problem:
        raise _refuse(source, problem[0])


def check_dataset(dataset: Any, source: str, h5py: Any = None) -> None:
    """Refuse one dataset whose bytes live elsewhere or that declares more than it holds."""
    if h5py is None:
        import h5py
    name = dataset.name
    plist = dataset.id.get_create_plist()
    if plist.get_external_count() > 0:
        target = plist.get_external(0)[0].decode("utf-8", "replace")
        raise _refuse(source, f"dataset {name} stores its bytes in another file ({target})")
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        raise _refuse(source, f"dataset {name} is a virtual dataset, made of other files")
    count = 1
    for extent in dataset.shape or ():
        count *= int(extent)
    declared = count * dataset.dtype.itemsize
    stored = dataset.id.get_storage_size()
    if declared > MAX_DATASET_BYTES:
        raise _refuse(
            source,
            f"dataset {name} declares {'×'.join(map(str, dataset.shape))} "
            f"{dataset.dtype} ({declared} bytes), more than fcconv's budget of "
            f"{MAX_DATASET_BYTES} bytes for one tensor",
        )
    if declared > MAX_INFLATION * stored + (16 << 20):
        raise _refuse(
            source,
            f"dataset {name} declares {declared} bytes but stores only {stored} (a dataset "
            "filled on read)",
        )


def checked(handle: Any, source: str) -> Any:
    """``handle`` once :func:`check_hdf5` passes it; closed and refused otherwise.

    Example:
        >>> handle = checked(h5py.File(path, "r"), path)  # doctest: +SKIP
    """
    try:
        check_hdf5(handle, source)
    except BaseException:
        handle.close()
        raise
    return handle
