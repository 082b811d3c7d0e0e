"""Nothing lost: the output guard of issue 9.

Every refusal here leaves each file as it was (bytes, inode, kind) and no
temporary file behind. The cases: the input reached through stdin, a hard
link, a symlink or stdout; outputs that are links, devices, FIFOs or
folders fcconv did not write; outputs inside an input folder; an output
created by another program (or a second fcconv) while fcconv works; a
file-size limit hit while writing; and the whole-model command's outputs.
"""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fcconv.io.atomic
import fcconv.io.checkpoint
from fcconv import FcconvError, convert_checkpoint, convolutionalize_file
from fcconv.errors import OutputError
from fcconv.geometry import Patch
from fcconv.io.atomic import MARKER, TEMP_SUFFIX, atomic_output, rename_noreplace
from fcconv.io.safetensors import read_header
from fcconv.io.sharded import convert_sharded
from fcconv.io.streaming import stream_convert

CONVERT = ("--layer", "fc", "--patch", "3x4x2")


def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"fc.weight": torch.randn(5, 24, generator=g), "fc.bias": torch.randn(5, generator=g)}


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry below ``folder``: its kind, inode, link target, and bytes' digest."""
    found = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = Path(root, name)
            status = os.lstat(path)
            digest = None
            if stat.S_ISREG(status.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            link = os.readlink(path) if stat.S_ISLNK(status.st_mode) else None
            kind = stat.S_IFMT(status.st_mode)
            found[str(path.relative_to(folder))] = (kind, status.st_ino, link, digest)
    return found


def fcconv_process(*args: object, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fcconv", *map(str, args)],
        cwd=cwd, capture_output=True, timeout=120, **kwargs,
    )  # fmt: skip


def refused_once(stderr: bytes | str, *words: str) -> None:
    text = stderr.decode() if isinstance(stderr, bytes) else stderr
    assert text.count("\n") == 1 and text.startswith("fcconv: error: "), text
    assert "Traceback" not in text
    for word in words:
        assert word in text, text


@pytest.fixture
def work(tmp_path: Path) -> Path:
    torch.save(state(), tmp_path / "model.pt")
    save_file(state(), str(tmp_path / "model.safetensors"))
    return tmp_path


# ------------------------------------------------------------ the input, however reached


def test_the_file_behind_stdin_is_never_the_output(work: Path) -> None:
    before = snapshot(work)
    with open(work / "model.pt", "rb") as stdin:
        done = fcconv_process("convert", "-", "-o", "model.pt", "--force", *CONVERT, cwd=work,
                              stdin=stdin)  # fmt: skip
    assert done.returncode == 2
    refused_once(done.stderr, "is the input file (stdin)")
    assert snapshot(work) == before


def test_stdout_is_never_an_input(work: Path) -> None:
    before = snapshot(work)
    with open(work / "model.pt", "ab") as stdout:  # fcconv convert model.pt -o - >> model.pt
        done = subprocess.run(
            [sys.executable, "-m", "fcconv", "convert", "model.pt", "-o", "-", *CONVERT],
            cwd=work, stdout=stdout, stderr=subprocess.PIPE, timeout=120,
        )  # fmt: skip
    assert done.returncode == 2
    refused_once(done.stderr, "stdout is the input file")
    assert snapshot(work) == before


@pytest.mark.parametrize("how", ["hard link", "symlink", "relative", "dot"])
def test_the_input_through_another_name(work: Path, invoke, monkeypatch, how: str) -> None:
    monkeypatch.chdir(work)
    relative = f"../{work.name}/model.pt"
    name = {"hard link": "same.pt", "symlink": "alias.pt", "relative": relative,
            "dot": "./model.pt"}[how]  # fmt: skip
    if how == "hard link":
        os.link(work / "model.pt", work / name)
    elif how == "symlink":
        os.symlink("model.pt", work / name)
    before = snapshot(work)
    result = invoke("convert", "model.pt", "-o", name, "--force", *CONVERT, exit=2)
    refused_once(result.stderr, "is the input file")
    assert snapshot(work) == before


# ----------------------------------------------------------- what is at the output path


def test_links_are_never_followed_or_replaced(work: Path, invoke, monkeypatch) -> None:
    monkeypatch.chdir(work)
    os.symlink("nowhere.pt", work / "dangling.pt")
    (work / "theirs.pt").write_bytes(b"someone else's file")
    os.symlink("theirs.pt", work / "link.pt")
    before = snapshot(work)
    for name in ("dangling.pt", "link.pt"):
        for force in ((), ("--force",)):
            result = invoke("convert", "model.pt", "-o", name, *force, *CONVERT, exit=2)
            refused_once(result.stderr, "is a symbolic link", "neither writes through")
    assert snapshot(work) == before


def test_devices_fifos_and_sockets_are_never_replaced(work: Path, invoke, monkeypatch) -> None:
    import socket

    monkeypatch.chdir(work)
    os.mkfifo(work / "fifo.pt")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(work / "socket.pt"))
    try:
        before = snapshot(work)
        for name, kind in (("fifo.pt", "FIFO"), ("socket.pt", "socket"), ("/dev/null", "device")):
            result = invoke("convert", "model.pt", "-o", name, "--force", *CONVERT, exit=2)
            refused_once(result.stderr, kind, "replaces only regular files")
        assert snapshot(work) == before
        assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    finally:
        server.close()


def test_an_existing_regular_file_is_replaced_only_with_force(work: Path, invoke, monkeypatch):
    monkeypatch.chdir(work)
    (work / "out.pt").write_bytes(b"older result")
    result = invoke("convert", "model.pt", "-o", "out.pt", *CONVERT, exit=2)
    refused_once(result.stderr, "already exists", "--force")
    assert (work / "out.pt").read_bytes() == b"older result"
    invoke("convert", "model.pt", "-o", "out.pt", "--force", *CONVERT)
    assert torch.load(work / "out.pt", weights_only=True)["fc.weight"].shape == (5, 2, 3, 4)


# ---------------------------------------------------------------- folders


def sharded(folder: Path) -> Path:
    folder.mkdir()
    save_file(state(), str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        '{"metadata": {}, "weight_map": {"fc.weight": "model-00001-of-00001.safetensors", '
        '"fc.bias": "model-00001-of-00001.safetensors"}}'
    )
    return folder


def test_nothing_is_written_inside_an_input_folder(work: Path, invoke, monkeypatch) -> None:
    monkeypatch.chdir(work)
    sharded(work / "model")
    before = snapshot(work)
    for output in ("model/conv", "model/sub/conv", "model", "."):
        result = invoke("convert", "model", "-o", output, *CONVERT, "--force", exit=2)
        refused_once(result.stderr)
        assert "input" in result.stderr or "names no file" in result.stderr, result.stderr
    result = invoke("convert", "model", "-o", "-", *CONVERT, exit=2)  # a folder to stdout
    refused_once(result.stderr, "cannot go to stdout")
    assert snapshot(work) == before and not (work / "-").exists()


def test_force_replaces_only_a_folder_fcconv_wrote(work: Path, invoke, monkeypatch) -> None:
    monkeypatch.chdir(work)
    sharded(work / "model")
    (work / "theirs").mkdir()
    (work / "theirs" / "notes.txt").write_text("keep me")
    result = invoke("convert", "model", "-o", "theirs", *CONVERT, "--force", exit=2)
    refused_once(result.stderr, "a folder fcconv did not write")
    assert (work / "theirs" / "notes.txt").read_text() == "keep me"

    invoke("convert", "model", "-o", "ours", *CONVERT)
    assert (work / "ours" / MARKER).is_file()
    invoke("convert", "model", "-o", "ours", *CONVERT, "--force", "--order", "hwc")
    (work / "ours" / "config.json").write_text("{}")  # the user adds a file
    result = invoke("convert", "model", "-o", "ours", *CONVERT, "--force", exit=2)
    refused_once(result.stderr, "holds files fcconv did not write (config.json)")
    assert (work / "ours" / "config.json").exists()


# ----------------------------------------------------- outputs that appear meanwhile


def test_an_output_created_meanwhile_is_kept(work: Path) -> None:
    """Another program (or a second fcconv) creates the output while fcconv writes it."""
    target = work / "out.safetensors"

    def another_program(_: Path) -> None:
        target.write_bytes(b"the other program's result")

    layers = {"fc.weight": (Patch(3, 4, 2), "hwc")}
    with pytest.raises(OutputError) as raised:
        stream_convert(work / "model.safetensors", target, layers, check=another_program)
    assert "appeared while fcconv was writing" in str(raised.value)
    assert target.read_bytes() == b"the other program's result"
    assert not [p for p in os.listdir(work) if p.endswith(TEMP_SUFFIX)]
    stream_convert(work / "model.safetensors", target, layers, force=True)  # --force replaces
    assert read_header(target).tensors["fc.weight"].shape == (5, 2, 3, 4)


@pytest.mark.parametrize("output", ["out.pt", "out.safetensors"])
def test_two_converts_to_one_new_output_cannot_both_win(
    work: Path, monkeypatch, output: str
) -> None:
    """The first to finish writes, the second is refused, nothing is mixed.

    The other convert's atomic rename lands while this one is finishing its
    own file (after writing, before the move into place), whichever writer
    made it (streamed or in memory).
    """
    real_fsync = fcconv.io.atomic._fsync
    target = work / output

    def first_finishes_meanwhile(path: Path) -> None:
        real_fsync(path)
        first = work / "first.tmp"
        shutil.copyfile(work / "model.pt", first)
        os.replace(first, target)

    monkeypatch.setattr(fcconv.io.atomic, "_fsync", first_finishes_meanwhile)
    with pytest.raises(FcconvError, match="appeared while fcconv was writing"):
        convert_checkpoint(work / "model.pt", target, layers=["fc"], patch="3x4x2")
    assert target.read_bytes() == (work / "model.pt").read_bytes()
    assert sorted(os.listdir(work)) == sorted(["model.pt", "model.safetensors", output])


def test_a_folder_created_meanwhile_is_kept(work: Path) -> None:
    src = sharded(work / "model")
    target = work / "out"

    def another_program(_: object) -> None:
        target.mkdir()
        (target / "theirs.txt").write_text("x")

    with pytest.raises(OutputError, match="appeared while fcconv was writing"):
        convert_sharded(src, target, {"fc.weight": (Patch(3, 4, 2), "hwc")}, check=another_program)
    assert sorted(os.listdir(target)) == ["theirs.txt"]
    assert sorted(os.listdir(work)) == ["model", "model.pt", "model.safetensors", "out"]


@pytest.mark.parametrize("without", ["renameat2", "renameat2 and link"])
def test_no_replace_holds_on_every_fallback(tmp_path: Path, monkeypatch, without: str) -> None:
    monkeypatch.setattr(fcconv.io.atomic, "_renameat2", lambda: None)
    if without == "renameat2 and link":

        def no_links(*args, **kwargs):
            raise OSError(errno.EPERM, "links not supported here")

        monkeypatch.setattr(os, "link", no_links)
    (tmp_path / "a").write_text("new")
    (tmp_path / "b").write_text("existing")
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_text() == "existing"
    rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert sorted(os.listdir(tmp_path)) == ["b", "c"] and (tmp_path / "c").read_text() == "new"


def test_atomic_output_refuses_an_existing_target_without_force(tmp_path: Path) -> None:
    target = tmp_path / "t.bin"
    target.write_bytes(b"before")
    with pytest.raises(OutputError, match="already exists"), atomic_output(target) as temporary:
        temporary.write_bytes(b"after")
    assert target.read_bytes() == b"before" and os.listdir(tmp_path) == ["t.bin"]


# ------------------------------------------------------------------ faults


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_file_size_limit_while_writing(tmp_path: Path, samples: Path, fmt: str) -> None:
    """EFBIG (``ulimit -f``): one line, exit 2, no output, no temporary file."""
    shutil.copyfile(samples / f"seed_fc.{fmt}", tmp_path / f"in.{fmt}")

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    done = subprocess.run(
        [sys.executable, "-m", "fcconv", "convert", f"in.{fmt}", "-o", f"out.{fmt}",
         "--layer", "fc", "--patch", "20x20x10", "--order", "hwc"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, preexec_fn=limit_file_size,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    refused_once(done.stderr, "File too large", "free some space")
    assert sorted(os.listdir(tmp_path)) == [f"in.{fmt}"]


def test_a_truncated_input_after_loading_is_no_sigbus(tmp_path: Path) -> None:
    """Inputs are read, not memory-mapped: cutting the file under fcconv cannot kill it."""
    torch.save({"w": torch.randn(256, 1024)}, tmp_path / "big.pt")
    script = (
        "import os, sys; from fcconv.io.checkpoint import load_checkpoint; "
        "c = load_checkpoint(sys.argv[1]); os.truncate(sys.argv[1], 0); "
        "print(float(c.tensors['w'].sum()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "big.pt")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, (done.returncode, done.stderr)  # -7 would be SIGBUS


# --------------------------------------------------------------- whole models


@pytest.mark.parametrize("which", ["output", "state_dict_out"])
def test_convolutionalize_never_writes_its_model(tmp_path: Path, samples: Path, which: str):
    model = tmp_path / "tiny_vgg.safetensors"
    shutil.copyfile(samples / "tiny_vgg.safetensors", model)
    before = snapshot(tmp_path)
    outputs = {"output": tmp_path / "dense.pt2", "state_dict_out": None, which: model}
    with pytest.raises(FcconvError, match="is the input file"):
        convolutionalize_file(
            model, outputs["output"], state_dict_out=outputs["state_dict_out"],
            input_size="32x32", arch="fcconv.samples_models:tiny_vgg", force=True,
        )  # fmt: skip
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_file_size_limit_while_exporting_a_program(tmp_path: Path, samples: Path) -> None:
    """torch.export.save aborted the process when the disk filled; now the write is ours."""
    shutil.copyfile(samples / "tiny_vgg.safetensors", tmp_path / "tiny_vgg.safetensors")

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    done = subprocess.run(
        [sys.executable, "-m", "fcconv", "convolutionalize", "tiny_vgg.safetensors", "--arch",
         "fcconv.samples_models:tiny_vgg", "--input", "32x32", "-o", "dense.pt2"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    refused_once(done.stderr, "File too large")
    assert sorted(os.listdir(tmp_path)) == ["tiny_vgg.safetensors"]
