"""Nothing crashes: standard streams, the one top-level handler, text from files (issue 9).

Exit 1 means one thing, a verification difference. Closed, full or broken
standard streams, an unexpected exception, an interrupt: each is one line
(when stderr can take one) and exit 2 (130 for an interrupt), never a
traceback without ``--debug``. Names and paths from files reach the
terminal as text: no rich markup is interpreted, no escape sequence is
sent. The process-level cases inspect a safetensors file, which needs no
torch import, so each subprocess starts in a fraction of a second.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fcconv.api
from fcconv.io import stdio

ESCAPE = "\x1b"


def many_entries(path: Path, count: int = 3000) -> Path:
    """A valid safetensors file whose ``inspect --json`` is far larger than a pipe's buffer."""
    header = {f"layer{i}.weight": {"dtype": "F32", "shape": [0, 24], "data_offsets": [0, 0]}
              for i in range(count)}  # fmt: skip
    raw = json.dumps(header)
    raw += " " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw.encode())
    return path


def run(args: list[str], cwd: Path, close: tuple[int, ...] = (), **kwargs):
    def close_fds() -> None:
        for descriptor in close:
            os.close(descriptor)

    return subprocess.run(
        [sys.executable, "-m", "fcconv", *args], cwd=cwd, preexec_fn=close_fds, timeout=120,
        **kwargs,
    )  # fmt: skip


def one_error_line(stderr: bytes, *words: str) -> str:
    text = stderr.decode()
    assert text.count("\n") == 1 and text.startswith("fcconv: error: "), text
    for word in words:
        assert word in text, text
    return text


@pytest.fixture
def big(tmp_path: Path) -> Path:
    return many_entries(tmp_path / "big.safetensors")


def test_stdout_closed(tmp_path: Path, big: Path) -> None:
    done = run(
        ["inspect", "big.safetensors", "--json"], tmp_path, close=(1,), stderr=subprocess.PIPE
    )
    assert done.returncode == 2
    one_error_line(done.stderr, "stdout is closed")
    human = run(["inspect", "big.safetensors"], tmp_path, close=(1,), stderr=subprocess.DEVNULL)
    assert human.returncode == 0  # the report goes to stderr: stdout is not needed


def test_stdout_full(tmp_path: Path, big: Path) -> None:
    with open("/dev/full", "wb") as full:
        done = run(["inspect", "big.safetensors", "--json"], tmp_path, stdout=full,
                   stderr=subprocess.PIPE)  # fmt: skip
    assert done.returncode == 2
    one_error_line(done.stderr, "No space left on device")


def test_stdin_closed(tmp_path: Path) -> None:
    done = run(["inspect", "-"], tmp_path, close=(0,), capture_output=True)
    assert done.returncode == 2
    one_error_line(done.stderr, "stdin is closed")


def test_stderr_closed_still_exits_2(tmp_path: Path) -> None:
    done = run(["inspect", "missing.safetensors"], tmp_path, close=(2,), stdout=subprocess.PIPE)
    assert done.returncode == 2 and done.stdout == b""


def test_reader_of_stdout_closing_early(tmp_path: Path, big: Path) -> None:
    """Click made this exit 1 with an empty stderr: a difference that was not one."""
    with subprocess.Popen(
        [sys.executable, "-m", "fcconv", "inspect", "big.safetensors", "--json"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ) as process:  # fmt: skip
        assert process.stdout.read(10) == b'{\n  "schem'
        process.stdout.close()  # the reader goes away (like `| head -c 10`)
        assert process.wait(timeout=60) == 2
        one_error_line(process.stderr.read(), "broken pipe")


# ------------------------------------------------------------------ the handler


@pytest.mark.parametrize(
    ("raised", "code", "words"),
    [
        (RuntimeError("boom\nsecond line"), 2, ["internal error (RuntimeError: boom)", "bug"]),
        (MemoryError(), 2, ["ran out of memory"]),
        (OSError(errno.EIO, "Input/output error", "disk.bin"), 2, ["Input/output error"]),
        (BrokenPipeError(errno.EPIPE, "Broken pipe"), 2, ["broken pipe"]),
        (KeyboardInterrupt(), 130, ["aborted"]),
    ],
    ids=["bug", "memory", "os error", "broken pipe", "interrupt"],
)
def test_anything_unexpected_is_one_line(monkeypatch, invoke, raised, code, words) -> None:
    def fail(*args, **kwargs):
        raise raised

    monkeypatch.setattr(fcconv.api, "inspect_checkpoint", fail)
    result = invoke("inspect", "x.pt", exit=code)
    # (click starts a fresh line after ^C: an empty line may precede "aborted")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr
    assert ("bug" in result.stderr) == isinstance(raised, RuntimeError)


def test_debug_shows_the_traceback(monkeypatch, invoke) -> None:
    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(fcconv.api, "inspect_checkpoint", fail)
    result = invoke("inspect", "x.pt", "--debug", exit=2)
    assert "Traceback" in result.stderr and "--debug" in result.stderr


# ------------------------------------------------------------ text from files


HOSTILE_NAMES = ["[/]", "[bold red]x", ESCAPE + "[31mred", "a\nb", ":smile:", "\u202eevil"]


@pytest.fixture
def named(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    state = {}
    for name in HOSTILE_NAMES:
        state[f"{name}.weight"] = torch.randn(5, 24, generator=g)
        state[f"{name}.bias"] = torch.randn(5, generator=g)
    save_file(state, str(tmp_path / "names.safetensors"), metadata={"[/]": ESCAPE + "[2J"})
    return tmp_path / "names.safetensors"


def printed(name: str) -> str:
    """How a name must appear: control and format characters as escapes, markup as is."""
    return name.replace(ESCAPE, "\\x1b").replace("\n", "\\n").replace("\u202e", "\\u202e")


def no_markup_no_escapes(text: str, *names: str) -> None:
    assert ESCAPE not in text and "\u202e" not in text, repr(text)
    for name in names:
        assert printed(name) in text, (printed(name), text)


def test_names_print_as_text_everywhere(tmp_path: Path, named: Path, invoke) -> None:
    listed = invoke("inspect", named).stderr
    no_markup_no_escapes(listed, "[/]", "[bold red]x", "a\nb")
    for name in HOSTILE_NAMES:
        out = tmp_path / "out.safetensors"
        done = invoke("convert", named, "-o", out, "--layer", name, "--patch", "2x3x4",
                      "--force", "--order", "hwc")  # fmt: skip
        no_markup_no_escapes(done.stderr, name)
        checked = invoke("verify", named, out)
        no_markup_no_escapes(checked.stderr, name)
    missing = invoke("convert", named, "--layer", ESCAPE + "[31m[/]nope", "--patch", "2x3x4",
                     exit=2)  # fmt: skip
    no_markup_no_escapes(missing.stderr, ESCAPE + "[31m[/]nope")
    assert missing.stderr.count("\n") == 1


def test_differences_print_as_text(tmp_path: Path, named: Path, invoke) -> None:
    out = tmp_path / "out.safetensors"
    invoke("convert", named, "-o", out, "--layer", "[/]", "--patch", "2x3x4")
    data = out.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"]["[/]"] = ESCAPE + "[5m[blink]"  # an altered value, hostile too
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    out.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + length :])
    result = invoke("verify", named, out, exit=1)
    assert ESCAPE not in result.stderr and "[blink]" in result.stderr
    assert "__metadata__" in result.stderr and "differs" in result.stderr


def test_the_guarantees_section_is_true() -> None:
    """Every test file it names exists, and the limits it states are the code's."""
    from fcconv import evidence, geometry, verify
    from fcconv.io import files, safetensors

    root = Path(__file__).resolve().parent.parent
    section = (root / "docs" / "guarantees.md").read_text()
    for name in set(re.findall(r"`(test_\w+\.py)`", section)):
        assert (root / "tests" / name).is_file(), name
    assert (root / "benchmarks" / "hostile_limits.py").is_file()
    stated = {
        "262,144 tensors": safetensors.MAX_TENSORS == 262_144,
        "64 MB per index": files.MAX_INDEX_BYTES == 64 << 20,
        "1 GiB from a pipe": stdio.MAX_STDIN_BYTES == 1 << 30,
        "sides up to 65,536": geometry.CANDIDATE_SIDE_LIMIT == 65_536,
        "over 4M elements": evidence.MAX_FEATURES == 1 << 22,
        "more than 16M float64 values": verify.MAX_CHECK_ELEMENTS == 1 << 24,
        "more than 8.6G products": round(verify.MAX_CHECK_MACS / 1e9, 1) == 8.6,
        "beyond 127 levels": safetensors.MAX_JSON_DEPTH == 127,
    }
    for words, holds in stated.items():
        assert words in section and holds, words
