"""Where a map's tiles go: memory, a ``.npy`` file through a memory map, or a ``.zarr`` store.

Every file goes through fcconv's output guard (:mod:`fcconv.io.atomic`):
written beside the target under a temporary name and moved into place when
complete, never over an input, an existing target kept unless ``force``.

A ``.zarr`` store is built in a partial folder beside the target
(``.NAME.fcconv-partial``), its chunks aligned with the tiles so that no two
tiles share a chunk; after each tile its index is added to the folder's
``fcconv-progress.json`` (written to a temporary file and renamed, so an
interruption leaves either the old or the new list). ``resume`` keeps the
tiles a partial folder of the same job already holds. The coordinate map
goes into the store's attributes (``fcconv``), and beside a ``.npy`` as
``NAME.npy.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fcconv.errors import OutputError
from fcconv.extras import require
from fcconv.io.atomic import (
    atomic_output,
    check_output_folder,
    check_output_path,
    install_folder,
    mark_folder,
)

PROGRESS = "fcconv-progress.json"
SUFFIXES = {".npy": "npy", ".zarr": "zarr"}


class MemoryWriter:
    """The whole map in memory (pictures, the Python API)."""

    def __init__(self, shape: tuple[int, ...], dtype: str = "float32") -> None:
        import numpy as np

        self.array = np.full(shape, np.nan, dtype=dtype)

    def write(self, cells: tuple[slice, ...], values: Any) -> None:
        self.array[(Ellipsis, *cells)] = values


class NpyWriter:
    """A ``.npy`` file written a tile at a time through a memory map of the temporary file.

    Each tile maps the file, writes its cells and unmaps it, so the pages it
    touched leave the process's memory with it.
    """

    def __init__(self, temporary: Path, shape: tuple[int, ...]) -> None:
        import numpy as np

        self.path = temporary
        mapped = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float32, shape=shape)
        mapped[...] = np.nan
        mapped.flush()
        del mapped

    def write(self, cells: tuple[slice, ...], values: Any) -> None:
        import numpy as np

        mapped = np.lib.format.open_memmap(self.path, mode="r+")
        mapped[(Ellipsis, *cells)] = values
        mapped.flush()
        del mapped


@contextmanager
def npy_output(
    target: Path, shape: tuple[int, ...], facts: dict[str, Any], *, force: bool, sources
) -> Iterator[NpyWriter]:
    """A :class:`NpyWriter` on a temporary file moved onto ``target`` when the map is done,
    then its coordinate map beside it (``NAME.npy.json``)."""
    sidecar = sidecar_of(target)
    check_output_path(sidecar, force, sources)
    with atomic_output(target, force=force, sources=sources) as temporary:
        yield NpyWriter(temporary, shape)
    write_json(sidecar, facts, force=force, sources=sources)


def sidecar_of(target: Path) -> Path:
    return target.with_name(target.name + ".json")


def write_json(target: Path, document: dict[str, Any], *, force: bool, sources) -> None:
    with atomic_output(target, force=force, sources=sources) as temporary:
        temporary.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


class ZarrWriter:
    """A zarr array in the partial folder, one chunk per tile, and the list of tiles done."""

    def __init__(self, folder: Path, array: Any, done: set[tuple[int, ...]]) -> None:
        self.folder = folder
        self.array = array
        self.done = done

    def write(self, cells: tuple[slice, ...], values: Any) -> None:
        self.array[(Ellipsis, *cells)] = values

    def finished(self, index: tuple[int, ...]) -> None:
        """Record tile ``index`` as written (after its chunk is on disk)."""
        self.done.add(tuple(index))
        record = {"job": self.array.attrs.get("fcconv_job"), "done": sorted(self.done)}
        handle, name = tempfile.mkstemp(prefix=".progress", dir=self.folder)
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(record, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(name, self.folder / PROGRESS)


def partial_of(target: Path) -> Path:
    return target.with_name(f".{target.name}.fcconv-partial")


def _done_tiles(folder: Path, job: dict[str, Any]) -> set[tuple[int, ...]] | None:
    """The tiles a partial folder of the same job holds; None when it is not one of ours."""
    try:
        record = json.loads((folder / PROGRESS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("job") != job:
        return None
    done = record.get("done")
    if not isinstance(done, list):
        return None
    return {tuple(int(i) for i in entry) for entry in done if isinstance(entry, list)}


@contextmanager
def zarr_output(
    target: Path,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    job: dict[str, Any],
    *,
    force: bool,
    resume: bool,
    sources,
) -> Iterator[ZarrWriter]:
    """A :class:`ZarrWriter` in ``target``'s partial folder, installed onto ``target`` at the end.

    With ``resume`` and a partial folder of the same ``job`` (model, image,
    output, tiles), the tiles it lists are kept; otherwise any partial folder
    of ours is started afresh. An interruption (Ctrl-C included) leaves the
    partial folder for ``resume``; any other failure removes it.
    """
    zarr = require("zarr", "tiff", purpose="to write .zarr maps")
    import numpy as np

    check_output_folder(target, force, sources)
    existed = target.exists() or target.is_symlink()
    folder = partial_of(target)
    done = _done_tiles(folder, job) if resume and folder.is_dir() else None
    if done is None:
        if folder.is_dir():
            if not (folder / PROGRESS).is_file() and any(folder.iterdir()):
                raise OutputError(
                    f"{folder} is in the way and is not a partial map of fcconv's; remove it",
                    path=str(folder),
                )
            shutil.rmtree(folder)
        folder.mkdir()
        array = zarr.create_array(
            store=str(folder), shape=shape, chunks=chunks, dtype="float32", fill_value=np.nan
        )
        array.attrs["fcconv_job"] = job
        done = set()
        writer = ZarrWriter(folder, array, done)
        _write_progress(folder, job, done)
    else:
        array = zarr.open_array(str(folder), mode="r+")
        writer = ZarrWriter(folder, array, done)
    try:
        yield writer
    except KeyboardInterrupt:
        raise
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    (folder / PROGRESS).unlink()
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    mark_folder(folder, files)
    install_folder(folder, target, force, sources, existed)


def _write_progress(folder: Path, job: dict[str, Any], done: set) -> None:
    (folder / PROGRESS).write_text(json.dumps({"job": job, "done": sorted(done)}), "utf-8")
