"""Bad input: one line, exit 2, nothing touched (issue 2, "Bad input").

Every case runs the real command (in-process) inside a scratch folder and
asserts the whole contract: exit code 2; stderr is exactly one line that
starts with ``fcconv: error:`` and names the problem; no traceback; nothing
on stdout; and the folder is byte-for-byte as it was, so the input is
unchanged and no output or ``.*.fcconv-tmp`` temporary file was left.

Tests run as root, where permission bits do not stop writes: an unwritable
output folder is simulated twice, by a path below a regular file and by
making the temporary-file creation fail with EACCES (monkeypatch).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pathlib
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

TEMP_SUFFIX = ".fcconv-tmp"


# ------------------------------------------------------------------ helpers


def snapshot(folder: Path) -> dict[str, str]:
    """Every file below ``folder`` (hidden ones too) with the SHA-256 of its bytes."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root, name)
            if path.is_file():
                files[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def temporaries(folder: Path) -> list[str]:
    return [n for _, _, names in os.walk(folder) for n in names if n.endswith(TEMP_SUFFIX)]


def assert_refused(result, folder: Path, before: dict[str, str], *words: str) -> str:
    """The one-line exit-2 contract; returns the message for case-specific checks."""
    output = result.stdout + result.stderr
    assert result.exit_code == 2, output
    assert "Traceback" not in output, output
    assert result.stdout == "", f"stdout must stay empty on errors: {result.stdout!r}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    message = lines[0]
    assert message.startswith("fcconv: error: "), message
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in: {message}"
    assert snapshot(folder) == before, "the folder changed: input modified or output left"
    assert not temporaries(folder), f"temporary files left: {temporaries(folder)}"
    return message


def tiny_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(2, 3, 3, 3, generator=g),
        "fc.weight": torch.randn(5, 24, generator=g),
        "fc.bias": torch.randn(5, generator=g),
        "ifc.weight": torch.randint(-5, 5, (5, 24), generator=g, dtype=torch.int32),
    }


def safetensors_bytes() -> bytes:
    return save({"fc.weight": torch.ones(5, 24)})


def with_header(data: bytes, header: dict) -> bytes:
    """Replace a safetensors header, keeping the data bytes after it."""
    length = int.from_bytes(data[:8], "little")
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + length :]


class RunsCode:
    """Unpickling this creates ``marker``: proof that loading ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A scratch folder holding ``model.pt`` (a conv, a Linear 24→5 and an int32 Linear)."""
    torch.save(tiny_state(), tmp_path / "model.pt")
    return tmp_path


CONVERT = ("convert", "model.pt", "--layer", "fc", "--patch", "3x4x2")


def run_in(work: Path, invoke, monkeypatch, *args: object, **kwargs):
    """Run fcconv with ``work`` as the current folder; relative paths land there."""
    monkeypatch.chdir(work)
    return invoke(*args, exit=2, **kwargs)


# --------------------------------------------------------- unreadable input


def _write(name: str, data: bytes) -> Callable[[Path], str]:
    def make(folder: Path) -> str:
        (folder / name).write_bytes(data)
        return name

    return make


def _truncated(legacy: bool) -> Callable[[Path], str]:
    def make(folder: Path) -> str:
        buffer = io.BytesIO()
        torch.save(tiny_state(), buffer, _use_new_zipfile_serialization=not legacy)
        data = buffer.getvalue()
        (folder / "cut.pt").write_bytes(data[: len(data) // 2])
        return "cut.pt"

    return make


def _directory(folder: Path) -> str:
    (folder / "weights").mkdir()
    return "weights"


def _safetensors(mangle: Callable[[bytes], bytes]) -> Callable[[Path], str]:
    def make(folder: Path) -> str:
        (folder / "bad.safetensors").write_bytes(mangle(safetensors_bytes()))
        return "bad.safetensors"

    return make


def _not_utf8_header(data: bytes) -> bytes:
    length = int.from_bytes(data[:8], "little")
    return data[:8] + b"{" + b"\xff" * (length - 1) + data[8 + length :]


def _offsets_beyond_the_file(data: bytes) -> bytes:
    header = {"fc.weight": {"dtype": "F32", "shape": [5, 24], "data_offsets": [0, 10**6]}}
    return with_header(data, header)


def _shape_and_offsets_disagree(data: bytes) -> bytes:
    header = {"fc.weight": {"dtype": "F32", "shape": [50, 24], "data_offsets": [0, 480]}}
    return with_header(data, header)


def _length_field_too_large(data: bytes) -> bytes:
    return (10**9).to_bytes(8, "little") + data[8:]


def _entry_not_an_object(data: bytes) -> bytes:
    return with_header(data, {"fc.weight": 5})


UNREADABLE = {
    "missing file": (lambda folder: "missing.pt", ["no such file", "missing.pt"]),
    "a directory": (_directory, ["weights", "is a directory"]),
    "an empty file": (_write("empty.pt", b""), ["empty.pt", "empty", "0 bytes"]),
    "not a checkpoint": (
        _write("notes.pt", b"these are my notes, not weights\n"),
        ["notes.pt", "not a pytorch or safetensors checkpoint"],
    ),
    "truncated zip .pt": (_truncated(legacy=False), ["cut.pt", "truncated or corrupt"]),
    "truncated legacy .pt": (_truncated(legacy=True), ["cut.pt", "truncated or corrupt"]),
    "safetensors header not utf-8": (
        _safetensors(_not_utf8_header),
        ["bad.safetensors", "corrupt safetensors header"],
    ),
    "safetensors entry not an object": (
        _safetensors(_entry_not_an_object),
        ["bad.safetensors", "corrupt safetensors header"],
    ),
    "safetensors offsets beyond the file": (
        _safetensors(_offsets_beyond_the_file),
        ["bad.safetensors", "corrupt safetensors header"],
    ),
    "safetensors shape and offsets disagree": (
        _safetensors(_shape_and_offsets_disagree),
        ["bad.safetensors", "corrupt safetensors header"],
    ),
    "safetensors length field too large": (
        _safetensors(_length_field_too_large),
        ["bad.safetensors", "corrupt safetensors header", "header length"],
    ),
}


@pytest.mark.parametrize("case", UNREADABLE, ids=str)
@pytest.mark.parametrize("command", ["convert", "inspect", "verify"])
def test_unreadable_input(work, invoke, monkeypatch, case: str, command: str) -> None:
    make, words = UNREADABLE[case]
    name = make(work)
    before = snapshot(work)
    args = {
        "convert": ("convert", name, "--layer", "fc", "--patch", "3x4x2"),
        "inspect": ("inspect", name),
        "verify": ("verify", "model.pt", name),
    }[command]
    result = run_in(work, invoke, monkeypatch, *args)
    assert_refused(result, work, before, *words)


@pytest.mark.parametrize(
    ("data", "words"),
    [(b"", ["<stdin>", "empty"]), (b"plain text\n" * 3, ["<stdin>", "not a pytorch"])],
)
def test_unreadable_stdin(work, invoke, monkeypatch, data: bytes, words: list[str]) -> None:
    before = snapshot(work)
    result = run_in(
        work, invoke, monkeypatch, "convert", "-", "-o", "out.pt", "--layer", "fc",
        "--patch", "3x4x2", input=data,
    )  # fmt: skip
    assert_refused(result, work, before, *words)


def checkpoint_bytes(legacy: bool) -> bytes:
    buffer = io.BytesIO()
    torch.save(tiny_state(), buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_anywhere(work, invoke, monkeypatch, legacy: bool) -> None:
    """Cut the file at many points: every one is a one-line exit 2, never a traceback."""
    data = checkpoint_bytes(legacy)
    monkeypatch.chdir(work)
    for cut in sorted({9, 40, 100, len(data) // 3, len(data) // 2, len(data) - 1}):
        (work / "cut.pt").write_bytes(data[:cut])
        before = snapshot(work)
        result = invoke("inspect", "cut.pt", exit=None)
        assert_refused(result, work, before, "cut.pt", "truncated or corrupt")


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_corrupted_bytes_never_crash(work, invoke, monkeypatch, legacy: bool) -> None:
    """Seeded byte flips: each file either loads or is refused in one line (exit 2)."""
    import random

    data = checkpoint_bytes(legacy)
    rng = random.Random(1234)
    monkeypatch.chdir(work)
    refused = 0
    for _ in range(40):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            damaged[rng.randrange(16, len(damaged))] = rng.randrange(256)
        (work / "flipped.pt").write_bytes(bytes(damaged))
        before = snapshot(work)
        result = invoke("inspect", "flipped.pt", exit=None)
        if result.exit_code != 0:
            message = assert_refused(result, work, before, "flipped.pt")
            assert "--trust-pickle" not in message or "arbitrary unpickling" in message
            refused += 1
    assert refused > 0  # the flips did damage something


# -------------------------------------------------------- code in a pickle


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickle_that_runs_code_is_refused_and_not_run(work, invoke, monkeypatch, legacy) -> None:
    marker = work / "code-ran"
    state = {**tiny_state(), "payload": RunsCode(marker)}
    torch.save(state, work / "evil.pt", _use_new_zipfile_serialization=not legacy)
    assert not marker.exists()
    before = snapshot(work)
    for args in (
        ("convert", "evil.pt", "--layer", "fc", "--patch", "3x4x2"),
        ("inspect", "evil.pt"),
        ("verify", "model.pt", "evil.pt"),
    ):
        result = run_in(work, invoke, monkeypatch, *args)
        message = assert_refused(result, work, before, "evil.pt", "arbitrary unpickling")
        assert "--trust-pickle" in message  # the way out, for files the user trusts
        assert not marker.exists(), "loading the file ran its code"


def test_trust_pickle_really_runs_the_payload(work, invoke, monkeypatch) -> None:
    """Control for the test above: the payload is live, so its absence there means something."""
    marker = work / "code-ran"
    torch.save({"state_dict": tiny_state(), "extra": RunsCode(marker)}, work / "evil.pt")
    monkeypatch.chdir(work)
    invoke("convert", "evil.pt", "-o", "out.pt", "--layer", "fc", "--patch", "3x4x2",
           "--trust-pickle")  # fmt: skip
    assert marker.exists()


# ---------------------------------------------------------- layer problems


def test_unknown_layer_suggests_names(work, invoke, monkeypatch) -> None:
    before = snapshot(work)
    result = run_in(work, invoke, monkeypatch, "convert", "model.pt", "--layer", "fcc",
                    "--patch", "3x4x2")  # fmt: skip
    message = assert_refused(result, work, before, "no layer 'fcc'", "did you mean")
    assert "fc" in message.split("did you mean", 1)[1]
    assert "fcconv inspect" in message  # and where to see them all


def test_ambiguous_suffix_lists_candidates(work, invoke, monkeypatch) -> None:
    g = torch.Generator().manual_seed(1)
    torch.save(
        {
            "a.fc.weight": torch.randn(5, 24, generator=g),
            "b.fc.weight": torch.randn(5, 24, generator=g),
        },
        work / "two.pt",
    )
    before = snapshot(work)
    result = run_in(work, invoke, monkeypatch, "convert", "two.pt", "--layer", "fc",
                    "--patch", "3x4x2")  # fmt: skip
    assert_refused(result, work, before, "ambiguous", "a.fc", "b.fc", "full name")


def test_layer_that_is_not_linear_shaped(work, invoke, monkeypatch) -> None:
    before = snapshot(work)
    result = run_in(work, invoke, monkeypatch, "convert", "model.pt", "--layer", "conv",
                    "--patch", "3x4x2")  # fmt: skip
    assert_refused(result, work, before, "conv", "not Linear-shaped", "(2, 3, 3, 3)")


def test_bias_that_does_not_fit_the_weight(work, invoke, monkeypatch) -> None:
    torch.save({"fc.weight": torch.ones(5, 24), "fc.bias": torch.ones(6)}, work / "b.pt")
    before = snapshot(work)
    result = run_in(work, invoke, monkeypatch, "convert", "b.pt", "--layer", "fc",
                    "--patch", "3x4x2")  # fmt: skip
    assert_refused(result, work, before, "fc.bias", "(6,)", "5 rows")


def test_integer_weight(work, invoke, monkeypatch) -> None:
    before = snapshot(work)
    result = run_in(work, invoke, monkeypatch, "convert", "model.pt", "--layer", "ifc",
                    "--patch", "3x4x2")  # fmt: skip
    assert_refused(result, work, before, "ifc.weight", "int32", "floating-point")


def test_quantized_weight(work, invoke, monkeypatch) -> None:
    with warnings.catch_warnings():  # torch deprecates creating quantized tensors
        warnings.simplefilter("ignore")
        weight = torch.quantize_per_tensor(torch.randn(5, 24), 0.1, 0, torch.qint8)
        torch.save({"qfc.weight": weight, "qfc.bias": torch.zeros(5)}, work / "q.pt")
    before = snapshot(work)
    result = run_in(work, invoke, monkeypatch, "convert", "q.pt", "--layer", "qfc",
                    "--patch", "3x4x2")  # fmt: skip
    # torch (2.13) loads quantized tensors with weights_only=True; if a later torch
    # refuses them, the message changes but must stay a clean one-liner naming q.pt.
    message = assert_refused(result, work, before)
    assert ("qint8" in message and "floating-point" in message) or "q.pt" in message, message


# --------------------------------------------------- patch, stride, order


def test_patch_size_mismatch_shows_both_numbers_and_what_fits(
    work, invoke, monkeypatch, samples
) -> None:
    shutil.copyfile(samples / "seed_fc.pt", work / "seed.pt")
    before = snapshot(work)
    result = run_in(work, invoke, monkeypatch, "convert", "seed.pt", "--layer", "fc",
                    "--patch", "20x20x12")  # fmt: skip
    assert_refused(result, work, before, "4800", "4000", "patches that fit", "20x20x10")


def test_patch_with_known_channels_suggests_that_channel_count(work, invoke, monkeypatch) -> None:
    before = snapshot(work)
    result = run_in(work, invoke, monkeypatch, "convert", "model.pt", "--layer", "fc",
                    "--patch", "3x4x3")  # fmt: skip
    assert_refused(result, work, before, "36", "24", "2x4x3")


def test_patch_area_that_does_not_divide_in_features(work, invoke, monkeypatch) -> None:
    before = snapshot(work)
    result = run_in(work, invoke, monkeypatch, "convert", "model.pt", "--layer", "fc=5x5")
    assert_refused(result, work, before, "5x5", "24", "25", "2x2x6")


MALFORMED = [
    (("--patch", "20x20x"), "malformed patch"),
    (("--patch", "0x4x2"), "malformed patch"),
    (("--patch", "threexfour"), "malformed patch"),
    (("--patch", "3x4x2x1x1"), "malformed patch"),  # 4 numbers are a 3-D patch
    (("--stride", "0x2"), "malformed stride"),
    (("--stride", "2x"), "malformed stride"),
    (("--stride", "fast"), "malformed stride"),
    (("--order", "chx"), "malformed order"),
    (("--order", "chwc"), "malformed order"),
    (("--order", "cch"), "malformed order"),
    (("--input", "100by60"), "malformed input size"),
    (("--input", "0x60"), "malformed input size"),
]


@pytest.mark.parametrize(("option", "words"), MALFORMED, ids=[" ".join(o) for o, _ in MALFORMED])
def test_malformed_spec(work, invoke, monkeypatch, option, words) -> None:
    before = snapshot(work)
    args = ["convert", "model.pt", "--layer", "fc"]
    if option[0] != "--patch":
        args += ["--patch", "3x4x2"]
    result = run_in(work, invoke, monkeypatch, *args, *option)
    message = assert_refused(result, work, before, words, repr(option[1]))
    assert "expected" in message  # and what a good value looks like


@pytest.mark.parametrize("command", ["convert", "verify"])
def test_malformed_spec_in_verify_too(work, invoke, monkeypatch, command) -> None:
    before = snapshot(work)
    args = (
        ("convert", "model.pt", "--layer", "fc")
        if command == "convert"
        else ("verify", "model.pt", "model.pt")
    )
    result = run_in(work, invoke, monkeypatch, *args, "--layer", "fc=3x4x2", "--order", "xyz")
    assert_refused(result, work, before, "malformed order", "'xyz'")


def test_malformed_layer_option(work, invoke, monkeypatch) -> None:
    before = snapshot(work)
    result = run_in(work, invoke, monkeypatch, "convert", "model.pt", "--layer", "=3x4x2")
    assert_refused(result, work, before, "malformed --layer", "NAME")


def test_layer_with_malformed_patch(work, invoke, monkeypatch) -> None:
    before = snapshot(work)
    result = run_in(work, invoke, monkeypatch, "convert", "model.pt", "--layer", "fc=3by4")
    assert_refused(result, work, before, "malformed patch", "'3by4'")


def test_input_smaller_than_one_patch(work, invoke, monkeypatch) -> None:
    before = snapshot(work)
    result = run_in(work, invoke, monkeypatch, *CONVERT, "--input", "2x8")
    assert_refused(result, work, before, "input 2x8", "smaller than one 3x4 patch")


def test_input_smaller_than_one_patch_without_verification(work, invoke, monkeypatch) -> None:
    before = snapshot(work)
    result = run_in(work, invoke, monkeypatch, *CONVERT, "--input", "3x3", "--no-verify")
    assert_refused(result, work, before, "smaller than one")


# ------------------------------------------------------------- the output


def test_existing_output_is_kept_without_force(work, invoke, monkeypatch) -> None:
    (work / "out.pt").write_bytes(b"an earlier result the user still wants")
    before = snapshot(work)
    result = run_in(work, invoke, monkeypatch, *CONVERT, "-o", "out.pt")
    assert_refused(result, work, before, "out.pt", "already exists", "--force")


def test_existing_default_output_is_kept_without_force(work, invoke, monkeypatch) -> None:
    (work / "model.conv.pt").write_bytes(b"an earlier result")
    before = snapshot(work)
    result = run_in(work, invoke, monkeypatch, *CONVERT)
    assert_refused(result, work, before, "model.conv.pt", "already exists", "--force")


@pytest.mark.parametrize("spelling", ["model.pt", "./model.pt", "ABSOLUTE", "LINK"])
@pytest.mark.parametrize("force", [False, True], ids=["", "force"])
def test_output_is_the_input(work, invoke, monkeypatch, spelling: str, force: bool) -> None:
    if spelling == "ABSOLUTE":
        spelling = str(work / "model.pt")
    elif spelling == "LINK":
        (work / "alias.pt").symlink_to(work / "model.pt")
        spelling = "alias.pt"
    before = snapshot(work)
    extra = ["--force"] if force else []
    result = run_in(work, invoke, monkeypatch, *CONVERT, "-o", spelling, *extra)
    assert_refused(result, work, before, "is the input file", "-o")


def test_output_folder_below_a_regular_file(work, invoke, monkeypatch) -> None:
    """A folder that cannot be created or written: its parent is a regular file."""
    before = snapshot(work)
    result = run_in(work, invoke, monkeypatch, *CONVERT, "-o", "model.pt/out.pt")
    message = assert_refused(result, work, before, "model.pt", "folder", "-o")
    assert "does not exist" not in message or "not a folder" in message, (
        f"model.pt exists (as a file); saying its folder does not exist misleads: {message}"
    )


def test_output_folder_missing(work, invoke, monkeypatch) -> None:
    before = snapshot(work)
    result = run_in(work, invoke, monkeypatch, *CONVERT, "-o", "no/such/folder/out.pt")
    assert_refused(result, work, before, "no/such/folder", "does not exist")


def test_output_is_a_directory(work, invoke, monkeypatch) -> None:
    (work / "outdir").mkdir()
    before = snapshot(work)
    result = run_in(work, invoke, monkeypatch, *CONVERT, "-o", "outdir")
    assert_refused(result, work, before, "outdir", "is a directory")


def test_unwritable_output_folder(work, invoke, monkeypatch) -> None:
    """As root nothing is unwritable: simulate EACCES where the temporary file is created."""
    import fcconv.io.atomic

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(fcconv.io.atomic.tempfile, "mkstemp", refuse)
    before = snapshot(work)
    result = run_in(work, invoke, monkeypatch, *CONVERT, "-o", "out.pt")
    assert_refused(result, work, before, "out.pt", "permission denied", "folder you can write")


@pytest.mark.parametrize("output", ["out.pt", "out.safetensors"])
def test_disk_full_while_writing_leaves_nothing(work, invoke, monkeypatch, output) -> None:
    """A write that fails half-way: no partial output, no temporary file, one line."""
    import fcconv.io.checkpoint
    import fcconv.io.torch_streaming

    def half_then_full(checkpoint, fmt, handle):
        handle.write(b"partial checkpoint bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    def fill_half_then_full(src, dst, *args):
        with open(dst, "r+b") as handle:
            handle.write(b"partial checkpoint bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    # .pt to .pt streams record by record; to safetensors it is written in memory
    monkeypatch.setattr(fcconv.io.checkpoint, "_write", half_then_full)
    monkeypatch.setattr(fcconv.io.torch_streaming, "_fill", fill_half_then_full)
    before = snapshot(work)
    result = run_in(work, invoke, monkeypatch, *CONVERT, "-o", output)
    assert_refused(result, work, before, output, "no space left", "free some space")


def test_training_checkpoint_to_safetensors_is_refused(work, invoke, monkeypatch, samples) -> None:
    shutil.copyfile(samples / "training_checkpoint.pt", work / "train.pt")
    before = snapshot(work)
    result = run_in(work, invoke, monkeypatch, "convert", "train.pt", "-o", "out.safetensors",
                    "--layer", "fc", "--patch", "8x8x10")  # fmt: skip
    assert_refused(result, work, before, "training checkpoint", "safetensors", ".pt")


def test_the_input_file_is_not_even_touched(work, invoke, monkeypatch) -> None:
    """Also its timestamps: the refusals read the input at most."""
    stat = os.stat(work / "model.pt")
    run_in(work, invoke, monkeypatch, *CONVERT, "-o", "model.pt", "--force")
    after = os.stat(work / "model.pt")
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (
        stat.st_mtime_ns,
        stat.st_size,
        stat.st_ino,
    )
