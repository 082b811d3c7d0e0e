"""Declared sizes never drive time or memory (issue 9, "Unbounded time or memory").

Files may declare anything: a ``[0, 2**60]`` weight in a 100-byte
safetensors file, a ``[0, 2**30]`` weight in a 1 KB ``.pt``, an index that
is a FIFO, a pipe on stdin that never ends. Every case here must finish at
once (an alarm fails the test instead of letting it hang) and either work
or be refused in one line; the work left (listing patches, ranking orders,
the functional check) is bounded by limits that do not depend on what the
file says. Zero-sized weights and limits of the command line's numbers are
here too.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from fcconv import FcconvError, convert_checkpoint, inspect_checkpoint, verify_checkpoints
from fcconv.errors import CheckpointError, SpecError
from fcconv.geometry import CANDIDATE_SIDE_LIMIT, Patch, candidate_patches, parse_patch
from fcconv.io import stdio
from fcconv.io.sharded import load_index


@contextlib.contextmanager
def within(seconds: int) -> Iterator[None]:
    """Fail (instead of hanging) when the block runs longer than ``seconds``."""

    def expire(*_: object) -> None:
        raise TimeoutError(f"still running after {seconds} s: a declared size drives the work")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def safetensors_declaring(path: Path, shape: list[int], dtype: str = "F32") -> Path:
    raw = json.dumps({"fc.weight": {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}})
    raw += " " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw.encode())
    return path


def _features(text: str) -> int:
    return math.prod(int(number) for number in text.split("x"))


def one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------ declared shapes


def test_a_100_byte_file_declaring_2_60_inputs(tmp_path: Path) -> None:
    path = safetensors_declaring(tmp_path / "huge.safetensors", [0, 2**60])
    assert path.stat().st_size < 120
    with within(20):
        listed = inspect_checkpoint(path)
        assert listed.entries[0].in_features == 2**60
        # patches up to the search limit, each a true factorization of 2**60
        for fits in (listed.fits["fc"], inspect_checkpoint(path, channels=1).fits["fc"]):
            assert fits and all(_features(text) == 2**60 for text in fits), fits
        assert listed.fits["fc"][0] == "65536x65536x268435456"
        out = tmp_path / "out.safetensors"
        result = convert_checkpoint(path, out, layers=["fc"], patch="32x32")  # header only
        assert result.exit_code == 0
        with safe_open(str(out), framework="pt") as handle:
            assert handle.get_slice("fc.weight").get_shape() == [0, 2**50, 32, 32]
        assert verify_checkpoints(path, out).exit_code == 0


@pytest.mark.parametrize(
    "shape", [[0, 10**400], [0, 2**64], [2**40, 2**40, 0], [0, 2**63]], ids=str
)
def test_absurd_shapes_are_refused_in_one_line(tmp_path: Path, shape: list[int]) -> None:
    path = safetensors_declaring(tmp_path / "absurd.safetensors", shape)
    for job in (lambda: inspect_checkpoint(path), lambda: verify_checkpoints(path, path)):
        with within(20), pytest.raises(CheckpointError) as raised:
            job()
        assert "corrupt safetensors header" in one_line(raised.value)


def test_a_small_pt_declaring_2_30_inputs_allocates_nothing_large(tmp_path: Path) -> None:
    """The order evidence used to build 8 GiB index maps for this 1 KB file."""
    torch.save({"fc.weight": torch.empty(0, 2**30)}, tmp_path / "zero.pt")
    assert (tmp_path / "zero.pt").stat().st_size < 2000
    with within(20):
        evidence = inspect_checkpoint(tmp_path / "zero.pt", patch="32768x32768x1").evidence
        assert evidence["fc"].winner is None and "not judged" in evidence["fc"].reason
        out = tmp_path / "out.pt"
        convert_checkpoint(tmp_path / "zero.pt", out, layers=["fc"], patch="32768x32768x1")
        assert torch.load(out, weights_only=True)["fc.weight"].shape == (0, 1, 32768, 32768)
        assert verify_checkpoints(tmp_path / "zero.pt", out).exit_code == 0


def test_candidate_patches_is_bounded_whatever_the_size() -> None:
    with within(20):
        for features in (2**60, 2**61 - 1, 10**18, 2**62 * 3):
            candidate_patches(features)
            candidate_patches(features, channels=1)
            candidate_patches(features, channels=3)


@given(st.integers(1, 5000), st.one_of(st.none(), st.integers(1, 64)))
def test_candidate_patches_against_brute_force(features: int, channels: int | None) -> None:
    """Below the search limit, the bounded search finds exactly what every divisor gives."""
    if channels is None:
        expected = [
            Patch(s, s, features // (s * s))
            for s in range(1, features + 1)
            if features % (s * s) == 0
        ]
        expected.sort(key=lambda p: -p.height)
    else:
        area = features // channels if features % channels == 0 else 0
        pairs = [(h, area // h) for h in range(1, area + 1) if area % h == 0]
        pairs.sort(key=lambda hw: (abs(hw[0] - hw[1]), -hw[0]))
        expected = [Patch(h, w, channels) for h, w in pairs]
    assert candidate_patches(features, channels, limit=10**6) == expected
    assert features < CANDIDATE_SIDE_LIMIT**2


# ------------------------------------------------------- zero-sized weights


def test_a_weight_without_rows_converts_and_verifies(tmp_path: Path) -> None:
    torch.save({"fc.weight": torch.empty(0, 8), "fc.bias": torch.empty(0)}, tmp_path / "z.pt")
    save_file({"fc.weight": torch.empty(0, 8)}, str(tmp_path / "z.safetensors"))
    for name in ("z.pt", "z.safetensors"):
        source = tmp_path / name
        out = tmp_path / f"out-{name}"
        result = convert_checkpoint(source, out, layers=["fc"], patch="2x2x2")
        assert result.exit_code == 0, result.to_dict()
        check = result.verification.layers[0]
        assert check.exact and "nothing to compare" in " ".join(check.functional.notes)
        assert verify_checkpoints(source, out).exit_code == 0


@pytest.mark.parametrize("shape", [(4, 0), (0, 0)], ids=str)
def test_a_weight_without_inputs_is_refused(tmp_path: Path, shape: tuple[int, int]) -> None:
    torch.save({"fc.weight": torch.empty(shape)}, tmp_path / "z.pt")
    listed = inspect_checkpoint(tmp_path / "z.pt")
    assert listed.entries[0].in_features == 0 and listed.fits["fc"] == []
    with pytest.raises(FcconvError) as raised:
        convert_checkpoint(tmp_path / "z.pt", tmp_path / "o.pt", layers=["fc"], patch="1x1")
    assert "without inputs" in one_line(raised.value)
    assert not (tmp_path / "o.pt").exists()


# ------------------------------------------------ the functional check's work


@pytest.mark.parametrize(
    ("option", "value"),
    [("input_size", "300000x300000"), ("stride", "99999x99999"), ("input_size", "5000x5000")],
)
def test_a_check_too_large_to_run_is_refused_before_writing(
    tmp_path: Path, samples: Path, option: str, value: str
) -> None:
    out = tmp_path / "out.pt"
    with within(20), pytest.raises(SpecError) as raised:
        convert_checkpoint(
            samples / "seed_fc.pt", out, layers=["fc"], patch="20x20x10", **{option: value}
        )
    message = one_line(raised.value)
    assert "too large to run" in message and "verify=False" in message
    assert not out.exists()
    with within(20):  # the geometry alone is arithmetic: it works without the checks
        result = convert_checkpoint(
            samples / "seed_fc.pt", out, layers=["fc"], patch="20x20x10", verify=False,
            **{option: value},
        )  # fmt: skip
    assert result.exit_code == 0 and out.exists()
    with within(20), pytest.raises(SpecError, match="too large to run"):
        verify_checkpoints(samples / "seed_fc.pt", out, **{option: value})


@pytest.mark.parametrize("text", ["99999999999x2", "2x" + "9" * 5000, "4294967296x4294967296x1"])
def test_numbers_too_large_for_a_spec(text: str) -> None:
    with pytest.raises(SpecError) as raised:
        parse_patch(text)
    assert "too large" in one_line(raised.value) and len(str(raised.value)) < 300


# ------------------------------------------------------------- streams, files


def test_a_pipe_larger_than_the_limit_is_refused(monkeypatch, invoke) -> None:
    monkeypatch.setattr(stdio, "MAX_STDIN_BYTES", 1000)
    result = invoke("inspect", "-", input=b"\x80" * 5000, exit=2)
    assert "more than 0 MiB" in result.stderr and "give its path" in result.stderr


def test_endless_and_device_stdin(tmp_path: Path) -> None:
    """Real processes: /dev/zero is refused at once, an endless pipe at the limit."""
    with open(os.devnull, "rb") as null:
        device = subprocess.run(
            [sys.executable, "-m", "fcconv", "inspect", "-"],
            stdin=null, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert device.returncode == 2 and "character device" in device.stderr, device.stderr
    script = (
        "import fcconv.io.stdio as s; s.MAX_STDIN_BYTES = 1 << 20; "
        "from fcconv.cli import main; main(['inspect', '-'])"
    )
    command = [sys.executable, "-c", script]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE) as endless:
        try:
            for _ in range(64):  # 4 MiB, four times what the process may read
                endless.stdin.write(b"\x80" * (1 << 16))
            endless.stdin.close()
        except BrokenPipeError:
            pass  # it stopped reading: the point
        assert endless.wait(timeout=60) == 2
        message = endless.stderr.read().decode()
    assert "more than 1 MiB" in message and message.count("\n") == 1, message


def test_a_fifo_index_or_shard_never_blocks(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"fc.weight": torch.ones(2, 4)}, str(folder / "shard.safetensors"))
    index = {"weight_map": {"fc.weight": "fifo.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    os.mkfifo(folder / "fifo.safetensors")
    os.mkfifo(tmp_path / "index.safetensors.index.json")
    with within(20):
        with pytest.raises(CheckpointError, match="FIFO"):
            load_index(folder)
        with pytest.raises(CheckpointError, match="FIFO"):
            load_index(tmp_path / "index.safetensors.index.json")
        with pytest.raises(CheckpointError, match="FIFO"):
            inspect_checkpoint(folder / "fifo.safetensors")


def test_an_index_larger_than_any_real_one_is_not_read(tmp_path: Path) -> None:
    index = tmp_path / "big.safetensors.index.json"
    with open(index, "wb") as handle:
        handle.truncate(1 << 30)  # sparse: a 1 GiB index that takes no disk
    with within(20), pytest.raises(CheckpointError) as raised:
        load_index(index)
    assert "more than any real index" in one_line(raised.value)


@pytest.mark.parametrize("document", ["[" * 100000 + "]" * 100000, '{"weight_map": NaN}'])
def test_an_index_that_is_not_an_index(tmp_path: Path, document: str) -> None:
    index = tmp_path / "bad.safetensors.index.json"
    index.write_text(document)
    with pytest.raises(CheckpointError) as raised:
        load_index(index)
    assert "is not a valid index" in one_line(raised.value)


def test_file_names_over_255_bytes(tmp_path: Path, samples: Path, invoke, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    long = "é" * 200  # 400 bytes in UTF-8
    result = invoke("inspect", f"{long}.pt", exit=2)
    assert "too long" in result.stderr and result.stderr.count("\n") == 1
    args = ("convert", samples / "seed_fc.pt", "--layer", "fc", "--patch", "20x20x10")
    result = invoke(*args, "-o", f"{long}.pt", exit=2)
    assert "longer than a file name may be" in result.stderr
    fits = "a" * 250 + ".pt"  # 253 bytes: fits, and so must its temporary name
    invoke(*args, "-o", fits, exit=0)
    assert sorted(os.listdir(tmp_path)) == [fits]


def test_a_seed_torch_cannot_take(invoke, samples: Path) -> None:
    seed_fc = samples / "seed_fc.pt"
    result = invoke("verify", seed_fc, seed_fc, "--seed", str(10**30), exit=2)
    assert "--seed" in result.stderr and "out of range" in result.stderr


@pytest.mark.parametrize("key", ["data_offsets", "data\\u005foffsets"], ids=["plain", "escaped"])
def test_more_tensors_than_any_checkpoint_holds(tmp_path: Path, monkeypatch, key: str) -> None:
    """A 100 MB header of tiny entries would take gigabytes in Python: refused, before or after
    parsing (escaped keys cannot hide the count of objects)."""
    import fcconv.io.safetensors as safetensors_io

    monkeypatch.setattr(safetensors_io, "MAX_TENSORS", 50)
    entries = ",".join(f'"t{i}": {{"dtype": "F32", "shape": [0], "{key}": [0, 0]}}'
                       for i in range(200))  # fmt: skip
    raw = "{" + entries + "}"
    raw += " " * (-len(raw) % 8)
    path = tmp_path / "many.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw.encode())
    with pytest.raises(CheckpointError, match="more than 50 tensors"):
        inspect_checkpoint(path)


def test_a_sharded_checkpoint_is_bounded_too(tmp_path: Path, monkeypatch) -> None:
    import fcconv.io.sharded as sharded_io

    monkeypatch.setattr(sharded_io, "MAX_TENSORS", 50)
    for number in range(3):  # each shard alone is within the bound, all three are not
        tensors = {f"s{number}.t{i}": torch.zeros(1) for i in range(30)}
        save_file(tensors, str(tmp_path / f"shard{number}.safetensors"))
    weight_map = {f"s{n}.t0": f"shard{n}.safetensors" for n in range(3)}
    (tmp_path / "a.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="describe more than 50 tensors"):
        load_index(tmp_path / "a.safetensors.index.json")
    many = {f"t{i}": "shard0.safetensors" for i in range(60)}
    (tmp_path / "b.safetensors.index.json").write_text(json.dumps({"weight_map": many}))
    with pytest.raises(CheckpointError, match="maps more than 50 tensors"):
        load_index(tmp_path / "b.safetensors.index.json")


def test_a_checkpoint_nested_too_deeply_to_write_back(tmp_path: Path) -> None:
    """Unpickling is iterative, pickling recurses: a 3000-deep list loads but cannot be saved."""
    deep: list = []
    inner = deep
    for _ in range(3000):
        inner.append([])
        inner = inner[0]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        torch.save({"state_dict": {"fc.weight": torch.randn(5, 24)}, "deep": deep},
                   tmp_path / "deep.pt")  # fmt: skip
    finally:
        sys.setrecursionlimit(limit)
    assert inspect_checkpoint(tmp_path / "deep.pt").entries[0].name == "fc"
    with pytest.raises(CheckpointError) as raised:
        convert_checkpoint(tmp_path / "deep.pt", tmp_path / "o.pt", layers=["fc"], patch="2x3x4")
    assert "too deeply" in one_line(raised.value)
    assert sorted(os.listdir(tmp_path)) == ["deep.pt"]


def test_a_path_longer_than_the_system_allows(invoke, tmp_path: Path) -> None:
    path = "a/" * 3000 + "x.pt"
    result = invoke("inspect", path, exit=2)
    assert "too long" in result.stderr and len(result.stderr) < 300
