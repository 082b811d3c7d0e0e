"""The installed ``fcconv`` command in real shell pipelines, as users run it.

These start real processes (each that touches tensors imports torch, seconds
on a busy machine), so they are few: one pipeline through ``-`` both ways,
with the ``--json`` contract, and the error format. Exit 1 and everything
else is covered in-process (test_cli.py, test_verify_catches.py).
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BIN = Path(sys.executable).parent


def fcconv_command() -> str:
    """The console script of the environment running the tests, else the one on PATH."""
    script = BIN / "fcconv"
    if script.exists():
        return str(script)
    found = shutil.which("fcconv")
    if found is None:
        pytest.skip("the fcconv console script is not installed (pip install -e .)")
    return found


def sh(command: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """Run a bash pipeline; with pipefail, a failing stage fails the whole line."""
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", command],
        cwd=cwd,
        capture_output=True,
        timeout=120,
        check=False,
    )


def explain(process: subprocess.CompletedProcess[bytes]) -> str:
    return (
        f"exit {process.returncode}\n--- stderr\n{process.stderr.decode(errors='replace')}"
        f"\n--- stdout\n{process.stdout[:2000].decode(errors='replace')}"
    )


def test_pipeline_through_stdin_and_stdout(tmp_path: Path, samples: Path) -> None:
    fcconv = shlex.quote(fcconv_command())
    seed = shlex.quote(str(samples / "seed_fc.pt"))
    piped = sh(
        f"cat {seed} | {fcconv} convert - -o - --layer fc --patch 20x20x10 --order hwc > out.pt",
        tmp_path,
    )
    assert piped.returncode == 0, explain(piped)
    assert piped.stdout == b""  # the checkpoint went to the file, nothing else did
    human = " ".join(piped.stderr.decode().split())
    assert "wrote stdout" in human and "equivalent" in human  # people's text on stderr
    assert "nn.Conv2d(10, 64, kernel_size=(20, 20)" in human
    converted = torch.load(tmp_path / "out.pt", weights_only=True)  # the pipe holds a checkpoint
    assert converted["fc.weight"].shape == (64, 10, 20, 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]  # no temp file, no stray

    # verify reads the converted file from a pipe too, and prints exactly one JSON document
    flags = "--order hwc --json --input 100x60"  # a .pt keeps no record of its order
    checked = sh(f"cat out.pt | {fcconv} verify {seed} - {flags}", tmp_path)
    assert checked.returncode == 0, explain(checked)
    document = json.loads(checked.stdout)  # the whole stdout: nothing before or after it
    assert document["equivalent"] is True and document["exit_code"] == 0
    assert document["layers"][0]["order"] == "hwc"
    assert document["layers"][0]["functional"]["output_grid"] == [5, 3]
    assert b'"equivalent"' not in checked.stderr  # no JSON leaked to stderr


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    fcconv = shlex.quote(fcconv_command())
    failed = sh(f"{fcconv} convert missing.pt --layer fc --patch 20x20x10 --json", tmp_path)
    assert failed.returncode == 2, explain(failed)
    # --json: the failure as one document (the envelope with its error) on stdout
    assert json.loads(failed.stdout)["error"]["path"] == "missing.pt"
    [line] = failed.stderr.decode().strip().splitlines()
    assert line.startswith("fcconv: error: no such file: missing.pt")
    usage = sh(f"{fcconv} convert missing.pt --bogus", tmp_path)
    assert usage.returncode == 2, explain(usage)
    [line] = usage.stderr.decode().strip().splitlines()
    assert line.startswith("fcconv: error: ") and "--bogus" in line
    assert line.endswith("(see 'fcconv convert --help')")  # the real program name
    assert list(tmp_path.iterdir()) == []
