"""HDF5 reads only the file itself, within a budget: no other file's bytes reach an output.

Each hostile file is the sample ``.weights.h5`` with one object replaced:
the Dense kernel stored in a "secret" file (external storage), linked from
another HDF5 file (external link), mapped from another file (virtual
dataset), or declared gigabytes large and filled on read. The refusals are
one line, exit 2, and the secret's bytes appear in no output.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from fcconv.errors import CheckpointError
from fcconv.io.hdf5 import check_hdf5

CNN = "keras_cnn.weights.h5"
KERNEL = "layers/dense/vars/0"  # 288 × 32 float32
CONVERT = ("--layer", "fc6=8x6x6", "--no-verify")
SECRET = b"-----BEGIN PRIVATE KEY----- hunter2 "


def hostile(samples: Path, folder: Path, replace) -> Path:
    path = folder / "model.weights.h5"
    shutil.copyfile(samples / CNN, path)
    with h5py.File(path, "r+") as handle:
        del handle[KERNEL]
        replace(handle, folder)
    return path


def secret_file(folder: Path) -> Path:
    secret = folder / "id_rsa"
    secret.write_bytes((SECRET * 2000)[: 288 * 32 * 4])
    return secret


def external_storage(handle: h5py.File, folder: Path) -> None:
    secret = secret_file(folder)
    handle.create_dataset(KERNEL, (288, 32), "<f4", external=[(str(secret), 0, 288 * 32 * 4)])


def external_link(handle: h5py.File, folder: Path) -> None:
    with h5py.File(folder / "other.h5", "w") as other:
        data = np.frombuffer(secret_file(folder).read_bytes(), "<f4").reshape(288, 32)
        other.create_dataset("kernel", data=data)
    handle[KERNEL] = h5py.ExternalLink(str(folder / "other.h5"), "/kernel")


def virtual(handle: h5py.File, folder: Path) -> None:
    external_link(handle, folder)
    del handle[KERNEL]
    layout = h5py.VirtualLayout((288, 32), "<f4")
    layout[:] = h5py.VirtualSource(str(folder / "other.h5"), "kernel", shape=(288, 32))
    handle.create_virtual_dataset(KERNEL, layout)


def filled_on_read(handle: h5py.File, folder: Path) -> None:
    """A kernel declaring 2.5 GB in chunks that were never written."""
    handle.create_dataset(KERNEL, (288, 2_170_000), "<f4", chunks=(288, 1024))


def output_bytes(folder: Path) -> bytes:
    return b"".join(
        p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name.startswith("out")
    )


@pytest.mark.parametrize("replace", [external_storage, external_link, virtual])
def test_other_files_bytes_never_reach_the_output(invoke, samples, tmp_path, replace) -> None:
    model = hostile(samples, tmp_path, replace)
    for output in ("out.safetensors", "out.weights.h5"):
        result = invoke("convert", model, "-o", tmp_path / output, *CONVERT, "--force", exit=2)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("fcconv: error:"), result.stderr
        assert SECRET not in output_bytes(tmp_path)
        assert not (tmp_path / output).exists()
    invoke("inspect", model, exit=2)


def test_the_secret_would_be_read_without_the_guard(samples, tmp_path) -> None:
    """h5py itself follows external storage: the guard is what stops it."""
    model = hostile(samples, tmp_path, external_storage)
    with h5py.File(model, "r") as handle:
        assert SECRET in handle[KERNEL][()].tobytes()
        with pytest.raises(CheckpointError, match="another file"):
            check_hdf5(handle, str(model))


def test_a_kernel_declaring_gigabytes_is_refused_within_the_memory_bound(samples, tmp_path) -> None:
    """Under a 2 GB address-space limit: refused in one line, never allocated."""
    model = hostile(samples, tmp_path, filled_on_read)
    assert model.stat().st_size < 1 << 20
    script = textwrap.dedent(
        f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from fcconv.cli import main
        out = {str(tmp_path / "out.safetensors")!r}
        sys.argv = ["fcconv", "convert", {str(model)!r}, "-o", out, "--layer", "fc6=8x6x6"]
        main()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "declares" in lines[0], done.stderr


def test_a_plain_file_passes(samples) -> None:
    with h5py.File(samples / CNN, "r") as handle:
        check_hdf5(handle, CNN)
