"""Tests for fcconv.io.safetensors and fcconv.io.streaming: header checks, rewrite, faults.

Every converted tensor is checked bit for bit against
``fcconv.geometry.linear_weight_to_conv`` (tested on its own in
test_geometry.py) applied to the tensor safetensors itself reads back, and
every untouched tensor against the original. Weights are random bit patterns
(NaN payloads, -0.0 and subnormals included), so a rewrite that rounds,
casts or reorders anything shows up.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import bitwise_equal
from safetensors import safe_open
from safetensors.torch import save, save_file

from fcconv.dtypes import by_code
from fcconv.errors import CLI_NAMES, CheckpointError, FcconvError, LayerError, SpecError
from fcconv.geometry import ORDERS, Patch, linear_weight_to_conv
from fcconv.io import atomic
from fcconv.io.safetensors import read_header, read_tensors
from fcconv.io.streaming import converted_header, copy_file, stream_convert

ROOT = Path(__file__).resolve().parent.parent
PATCH = Patch(3, 5, 4)  # kh=3, kw=5, C=4: N=60, no two axes alike
SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
DTYPES = {
    "F32": torch.float32,
    "F64": torch.float64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A tensor of ``dtype`` holding arbitrary bit patterns."""
    integer = SAME_WIDTH_INT[dtype.itemsize]
    info = torch.iinfo(integer)
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(info.min, info.max, shape, dtype=integer, generator=generator)
    return raw.view(dtype)


def model(dtype: torch.dtype = torch.float32, rows: int = 7) -> dict[str, torch.Tensor]:
    """A small checkpoint: two Linear weights among untouched tensors of several dtypes."""
    return {
        "features.0.weight": random_bits((4, 3, 3, 3), torch.float32, 1),
        "fc.weight": random_bits((rows, PATCH.features), dtype, 2),
        "fc.bias": random_bits((rows,), dtype, 3),
        "head.weight": random_bits((5, PATCH.features), dtype, 4),
        "num_batches_tracked": torch.tensor(12, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    save_file(tensors, str(path), metadata=metadata if metadata is not None else {"format": "pt"})
    return path


def read_all(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".fcconv-tmp"))


def assert_one_line(error: pytest.ExceptionInfo, *fragments: str) -> None:
    value = error.value  # as the command line prints it
    message = value.render(CLI_NAMES) if isinstance(value, FcconvError) else str(value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def raw_file(
    path: Path, header: dict | bytes | str, data: bytes = b"", length: int | None = None
) -> Path:
    """A file with exactly the header and data given: for malformed inputs."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    size = len(header) if length is None else length
    path.write_bytes(size.to_bytes(8, "little") + header + data)
    return path


def f32(shape: list[int], begin: int) -> dict:
    count = 4
    for n in shape:
        count *= n
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + count]}


# ------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("order", ORDERS)
def test_rewrite_is_the_reference_permutation_bit_for_bit(
    tmp_path: Path, dtype_name: str, order: str
) -> None:
    dtype = DTYPES[dtype_name]
    src = write(tmp_path / "in.safetensors", model(dtype))
    original, _ = read_all(src)
    dst = tmp_path / "out.safetensors"
    # A block of 3 rows of 60 elements: blocks that do not divide the 7 rows.
    block = 3 * PATCH.features * dtype.itemsize
    stream_convert(src, dst, {"fc.weight": (PATCH, order)}, block_bytes=block)

    converted, metadata = read_all(dst)
    assert list(converted) == list(original)
    assert metadata == {"format": "pt"}
    assert bitwise_equal(
        converted["fc.weight"], linear_weight_to_conv(original["fc.weight"], PATCH, order)
    )
    for name in original.keys() - {"fc.weight"}:
        assert bitwise_equal(converted[name], original[name]), name
    assert read_header(dst).tensors["fc.weight"].dtype == dtype_name


def test_several_layers_each_in_its_own_order(tmp_path: Path) -> None:
    src = write(tmp_path / "in.safetensors", model(torch.bfloat16))
    original, _ = read_all(src)
    dst = tmp_path / "out.safetensors"
    head = Patch(5, 3, 4)
    layers = {"head.weight": (head, "whc"), "fc.weight": (PATCH, "chw")}
    stream_convert(src, dst, layers, block_bytes=1)  # a block smaller than a row: one row
    converted, _ = read_all(dst)
    assert bitwise_equal(
        converted["fc.weight"], linear_weight_to_conv(original["fc.weight"], PATCH, "chw")
    )
    assert bitwise_equal(
        converted["head.weight"], linear_weight_to_conv(original["head.weight"], head, "whc")
    )
    assert bitwise_equal(converted["fc.bias"], original["fc.bias"])


SHAPE = st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 6))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    shape=SHAPE,
    rows=st.integers(1, 9),
    order=st.sampled_from(ORDERS),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]),
    block_rows=st.integers(1, 10),
)
def test_any_patch_any_block_size(
    tmp_path: Path,
    shape: tuple[int, int, int],
    rows: int,
    order: str,
    dtype: torch.dtype,
    block_rows: int,
) -> None:
    patch = Patch(*shape)
    weight = random_bits((rows, patch.features), dtype, rows)
    src = write(tmp_path / "h.safetensors", {"a": torch.ones(3), "w": weight, "z": torch.zeros(2)})
    dst = tmp_path / "h.out.safetensors"
    block = block_rows * patch.features * dtype.itemsize
    stream_convert(src, dst, {"w": (patch, order)}, force=True, block_bytes=block)
    converted, _ = read_all(dst)
    assert bitwise_equal(converted["w"], linear_weight_to_conv(weight, patch, order))
    assert torch.equal(converted["a"], torch.ones(3)) and torch.equal(
        converted["z"], torch.zeros(2)
    )


def test_chw_changes_only_the_header_and_keeps_the_data_offset(tmp_path: Path) -> None:
    # A header with room to spare, as files written with padding have.
    packed = save(model(), metadata={"format": "pt"})
    length = int.from_bytes(packed[:8], "little")
    header = packed[8 : 8 + length] + b" " * 64
    src = tmp_path / "in.safetensors"
    src.write_bytes(len(header).to_bytes(8, "little") + header + packed[8 + length :])
    dst = tmp_path / "out.safetensors"
    stream_convert(src, dst, {"fc.weight": (PATCH, "chw")})
    before, after = read_header(src), read_header(dst)
    assert after.data_start == before.data_start
    assert src.read_bytes()[before.data_start :] == dst.read_bytes()[after.data_start :]
    assert after.tensors["fc.weight"].shape == (7, 4, 3, 5)
    assert dst.read_bytes()[8 : after.data_start].rstrip(b" ").endswith(b"}")


def test_a_header_that_outgrows_its_padding_is_what_safetensors_writes(tmp_path: Path) -> None:
    # One F32 tensor whose header is already a multiple of 8: no padding to grow into.
    weight = random_bits((2, PATCH.features), torch.float32)
    src = tmp_path / "in.safetensors"
    src.write_bytes(save({"wwwwww": weight}, metadata={"format": "pt"}))
    assert read_header(src).header_bytes % 8 == 0
    dst = tmp_path / "out.safetensors"
    stream_convert(src, dst, {"wwwwww": (PATCH, "hwc")})
    kernel = linear_weight_to_conv(weight, PATCH, "hwc")
    assert read_header(dst).header_bytes > read_header(src).header_bytes
    # Same tensors, same order, same metadata: the very bytes safetensors writes.
    assert dst.read_bytes() == save({"wwwwww": kernel}, metadata={"format": "pt"})


def test_metadata_none_keeps_given_replaces(tmp_path: Path) -> None:
    src = write(tmp_path / "in.safetensors", model(), {"format": "pt", "note": "kept"})
    layers = {"fc.weight": (PATCH, "hwc")}
    stream_convert(src, tmp_path / "a.safetensors", layers)
    assert read_all(tmp_path / "a.safetensors")[1] == {"format": "pt", "note": "kept"}
    stream_convert(src, tmp_path / "b.safetensors", layers, {"format": "pt", "fcconv": "{}"})
    assert read_all(tmp_path / "b.safetensors")[1] == {"format": "pt", "fcconv": "{}"}
    stream_convert(src, tmp_path / "c.safetensors", layers, {})
    assert read_all(tmp_path / "c.safetensors")[1] is None


def test_unusual_names_and_extra_header_keys_survive(tmp_path: Path) -> None:
    weight = random_bits((2, PATCH.features), torch.float32)
    header = {
        "__metadata__": {"ünïcode": "✓"},
        "tête.weight": {**f32([2, PATCH.features], 0), "note": [1, 2]},
        'quote"d': f32([1], 2 * PATCH.features * 4),
    }
    data = weight.numpy().tobytes() + b"\x00\x00\x80\x7f"  # +inf
    src = raw_file(tmp_path / "in.safetensors", header, data)
    dst = tmp_path / "out.safetensors"
    stream_convert(src, dst, {"tête.weight": (PATCH, "cwh")})
    converted, metadata = read_all(dst)
    assert metadata == {"ünïcode": "✓"}
    assert bitwise_equal(converted["tête.weight"], linear_weight_to_conv(weight, PATCH, "cwh"))
    assert converted['quote"d'].item() == float("inf")
    assert read_header(dst).tensors["tête.weight"].extra == {"note": [1, 2]}


def test_progress_counts_every_byte_once(tmp_path: Path) -> None:
    src = write(tmp_path / "in.safetensors", model(rows=50))
    dst = tmp_path / "out.safetensors"
    seen: list[tuple[int, int]] = []
    stream_convert(
        src,
        dst,
        {"fc.weight": (PATCH, "hwc")},
        block_bytes=512,
        progress=lambda d, t: seen.append((d, t)),
    )
    done = [d for d, _ in seen]
    assert len(seen) > 5 and done == sorted(done)
    assert seen[-1] == (dst.stat().st_size, dst.stat().st_size)


def test_copy_falls_back_from_copy_file_range_to_sendfile_to_read_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write(tmp_path / "in.safetensors", model())
    stream_convert(src, tmp_path / "expected.safetensors", {"fc.weight": (PATCH, "hwc")})
    expected = (tmp_path / "expected.safetensors").read_bytes()

    def refuse(code: int):
        def call(*args: object) -> int:
            raise OSError(code, os.strerror(code))

        return call

    monkeypatch.setattr(os, "copy_file_range", refuse(errno.EXDEV), raising=False)
    stream_convert(
        src, tmp_path / "sendfile.safetensors", {"fc.weight": (PATCH, "hwc")}, block_bytes=64
    )
    assert (tmp_path / "sendfile.safetensors").read_bytes() == expected
    monkeypatch.setattr(os, "sendfile", refuse(errno.ENOSYS), raising=False)
    stream_convert(
        src, tmp_path / "plain.safetensors", {"fc.weight": (PATCH, "hwc")}, block_bytes=64
    )
    assert (tmp_path / "plain.safetensors").read_bytes() == expected


def test_copy_file_copies_and_refuses_to_clobber(tmp_path: Path) -> None:
    src = write(tmp_path / "in.safetensors", model())
    copy_file(src, tmp_path / "copy", block_bytes=100)
    assert (tmp_path / "copy").read_bytes() == src.read_bytes()
    with pytest.raises(FileExistsError):
        copy_file(src, tmp_path / "copy")


def test_read_tensors_reads_only_what_is_named(tmp_path: Path) -> None:
    src = write(tmp_path / "in.safetensors", model())
    tensors = read_tensors(src, ["fc.bias"])
    assert list(tensors) == ["fc.bias"]
    assert bitwise_equal(tensors["fc.bias"], model()["fc.bias"])
    with pytest.raises(LayerError) as error:
        read_tensors(src, ["fc.bias", "nope"])
    assert_one_line(error, "'nope'", "fcconv inspect")


def test_streaming_does_not_import_torch() -> None:
    code = (
        "import sys, fcconv.io.streaming, fcconv.io.sharded\n"
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("layers", "error", "fragments"),
    [
        ({"nope.weight": (PATCH, "chw")}, LayerError, ["'nope.weight'", "fcconv inspect"]),
        ({"fc.bias": (PATCH, "chw")}, LayerError, ["shape [7]", "2-D"]),
        ({"features.0.weight": (PATCH, "chw")}, LayerError, ["not a Linear weight"]),
        ({"fc.weight": (Patch(2, 2, 4), "chw")}, SpecError, ["16 elements", "in_features 60"]),
        ({"fc.weight": (PATCH, "xyz")}, SpecError, ["malformed order"]),
    ],
)
def test_unconvertible_layers_are_refused_before_writing(
    tmp_path: Path, layers: dict, error: type, fragments: list[str]
) -> None:
    src = write(tmp_path / "in.safetensors", model())
    with pytest.raises(error) as raised:
        stream_convert(src, tmp_path / "out.safetensors", layers)
    assert_one_line(raised, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


@pytest.mark.parametrize("dtype", ["I64", "I32", "U8", "BOOL", "C64"])
def test_non_float_weights_are_refused(tmp_path: Path, dtype: str) -> None:
    bits = by_code(dtype).bits
    size = 2 * PATCH.features * bits // 8
    header = {"w": {"dtype": dtype, "shape": [2, PATCH.features], "data_offsets": [0, size]}}
    src = raw_file(tmp_path / "in.safetensors", header, bytes(size))
    with pytest.raises(LayerError) as raised:
        stream_convert(src, tmp_path / "out.safetensors", {"w": (PATCH, "hwc")})
    assert_one_line(raised, dtype, "floating-point")


def test_existing_output_is_kept_without_force_and_replaced_with_it(tmp_path: Path) -> None:
    src = write(tmp_path / "in.safetensors", model())
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"previous")
    with pytest.raises(CheckpointError) as raised:
        stream_convert(src, dst, {"fc.weight": (PATCH, "hwc")})
    assert_one_line(raised, "already exists", "--force")
    assert dst.read_bytes() == b"previous"
    stream_convert(src, dst, {"fc.weight": (PATCH, "hwc")}, force=True)
    assert read_header(dst).tensors["fc.weight"].shape == (7, 4, 3, 5)
    with pytest.raises(CheckpointError) as raised:
        stream_convert(src, src, {"fc.weight": (PATCH, "hwc")}, force=True)
    assert_one_line(raised, "is the input file")


def test_converted_header_raises_what_stream_convert_raises(tmp_path: Path) -> None:
    header = read_header(write(tmp_path / "in.safetensors", model()))
    with pytest.raises(LayerError):
        converted_header(header, {"nope": (PATCH, "chw")})
    with pytest.raises(TypeError):
        converted_header(header, {}, {"n": 1})  # type: ignore[dict-item]


# ---------------------------------------------------------- header validation

GOOD = {"a": f32([2], 0), "b": f32([1], 8)}


@pytest.mark.parametrize(
    ("header", "data", "length", "fragment"),
    [
        (b"", b"", None, "does not start with a JSON object"),
        (GOOD, bytes(12), 10_000, "runs past the end of the"),
        (b"\xff\xfe{}", b"", None, "not UTF-8"),
        ("[1, 2]", b"", None, "does not start with a JSON object"),
        ('{"a": ', b"", None, "not valid JSON"),
        ('{"a": {}, "a": {}}', b"", None, "names 'a' twice"),
        ({"__metadata__": {"k": 1}}, b"", None, "__metadata__ is not a mapping"),
        ({"__metadata__": "x"}, b"", None, "__metadata__ is not a mapping"),
        ({"a": [1]}, b"", None, "not a tensor description"),
        ({"a": {"dtype": "F32", "shape": [1]}}, b"", None, "has no data_offsets"),
        ({"a": {**f32([1], 0), "dtype": "F128"}}, bytes(4), None, "unknown dtype 'F128'"),
        ({"a": {**f32([1], 0), "shape": [-1]}}, bytes(4), None, "malformed shape"),
        ({"a": {**f32([1], 0), "shape": [1.0]}}, bytes(4), None, "malformed shape"),
        ({"a": {**f32([1], 0), "shape": [True]}}, bytes(4), None, "malformed shape"),
        (
            {"a": {**f32([1], 0), "data_offsets": [0, 4, 8]}},
            bytes(4),
            None,
            "malformed data_offsets",
        ),
        ({"a": {**f32([1], 0), "data_offsets": [4, 0]}}, bytes(4), None, "malformed data_offsets"),
        ({"a": {**f32([2], 0), "data_offsets": [0, 4]}}, bytes(4), None, "needs 8 bytes"),
        (
            {"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}},
            bytes(2),
            None,
            "needs 1.5 bytes",
        ),
        ({"a": f32([2], 0), "b": f32([1], 12)}, bytes(16), None, "leaves a gap"),
        ({"a": f32([2], 0), "b": f32([2], 4)}, bytes(12), None, "overlaps the previous"),
        ({"a": f32([2], 4)}, bytes(12), None, "leaves a gap"),
        (GOOD, bytes(16), None, "cover 12 bytes but the data section holds 16"),
        (GOOD, bytes(8), None, "ends at byte 12 of a 8-byte data section"),
    ],
)
def test_malformed_headers_are_one_line_errors(
    tmp_path: Path, header: object, data: bytes, length: int | None, fragment: str
) -> None:
    path = raw_file(tmp_path / "bad.safetensors", header, data, length)  # type: ignore[arg-type]
    before = digest(path)
    with pytest.raises(CheckpointError) as raised:
        read_header(path)
    assert_one_line(raised, str(path), fragment, "re-download or re-export it")
    with pytest.raises(CheckpointError):
        stream_convert(path, tmp_path / "out.safetensors", {})
    assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]


def test_a_file_shorter_than_the_length_field(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    with pytest.raises(CheckpointError) as raised:
        read_header(path)
    assert_one_line(raised, str(path), "only 3 bytes long", "re-download or re-export it")


def test_a_valid_header_is_read_in_file_order(tmp_path: Path) -> None:
    header = {"__metadata__": {"k": "v"}, "z": f32([1], 0), "a": f32([0], 4), "m": f32([2], 4)}
    info = read_header(
        raw_file(tmp_path / "ok.safetensors", "  " + json.dumps(header) + "  ", bytes(12))
    )
    assert list(info.tensors) == ["z", "a", "m"]
    assert info.metadata == {"k": "v"} and info.data_bytes == 12
    assert (
        info.data_start == 8 + info.header_bytes
        and info.file_bytes == (tmp_path / "ok.safetensors").stat().st_size
    )


def test_missing_and_unreadable_inputs(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as raised:
        read_header(tmp_path / "absent.safetensors")
    assert_one_line(raised, "does not exist")
    with pytest.raises(CheckpointError) as raised:
        read_header(tmp_path)
    assert_one_line(raised, "is a directory")


# ------------------------------------------------------------------ faults


def test_disk_full_midway_leaves_no_output_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write(tmp_path / "in.safetensors", model(rows=40))
    before = digest(src)
    real = os.copy_file_range
    calls = []

    def fill_up(*args: int) -> int:
        calls.append(args)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", fill_up)
    dst = tmp_path / "out.safetensors"
    for order in ("chw", "hwc"):  # hwc: the failure is in the worker thread
        calls.clear()
        with pytest.raises(CheckpointError) as raised:
            stream_convert(src, dst, {"fc.weight": (PATCH, order)}, block_bytes=256)
        assert_one_line(raised, str(dst), "No space left on device", "free some space")
        assert len(calls) == 3
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]
    assert digest(src) == before


def test_write_failure_while_permuting_keeps_the_previous_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write(tmp_path / "in.safetensors", model(rows=40))
    dst = tmp_path / "out.safetensors"
    stream_convert(src, dst, {"fc.weight": (PATCH, "chw")})
    previous = digest(dst)
    real = os.pwrite
    writes = []

    def fail_late(fd: int, data: bytes, offset: int) -> int:
        writes.append(offset)
        if len(writes) > 3:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", fail_late)
    with pytest.raises(CheckpointError) as raised:
        stream_convert(src, dst, {"fc.weight": (PATCH, "hwc")}, force=True, block_bytes=256)
    assert_one_line(raised, "quota", "free some space")
    assert digest(dst) == previous
    assert leftovers(tmp_path) == []


CHILD = textwrap.dedent(
    """
    import os, resource, signal, sys, time
    from fcconv.errors import FcconvError
    from fcconv.geometry import Patch
    from fcconv.io.streaming import stream_convert

    src, dst, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode == "fsize":
        # A file-size limit stands in for a full disk: the write fails with EFBIG
        # (SIGXFSZ would kill the process instead, so it is ignored).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = int(sys.argv[4])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        progress = None
    else:
        def progress(done, total):
            print("writing", flush=True)
            time.sleep(0.05)
    try:
        stream_convert(src, dst, {"fc.weight": (Patch(3, 5, 4), "hwc")}, force=True,
                       block_bytes=2048, progress=progress)
    except FcconvError as error:
        print(f"fcconv: error: {error}", file=sys.stderr)
        sys.exit(2)
    """
)


def test_file_size_limit_in_a_child_process_is_a_clean_error(tmp_path: Path) -> None:
    src = write(tmp_path / "in.safetensors", model(rows=200))
    before = digest(src)
    dst = tmp_path / "out.safetensors"
    limit = src.stat().st_size // 2
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(dst), "fsize", str(limit)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "File too large" in result.stderr, result.stderr
    assert not dst.exists() and leftovers(tmp_path) == []
    assert digest(src) == before


@pytest.mark.parametrize("previous", [False, True])
def test_killed_mid_write_leaves_the_target_absent_or_whole(tmp_path: Path, previous: bool) -> None:
    """SIGKILL cannot be handled: the target is untouched, a temp file may remain.

    The only thing a killed process may leave is its temporary file, named
    ``.NAME.*.fcconv-tmp`` beside the target, never a partial file under
    the target's name.
    """
    src = write(tmp_path / "in.safetensors", model(rows=200))
    before = digest(src)
    dst = tmp_path / "out.safetensors"
    if previous:
        stream_convert(src, dst, {"fc.weight": (PATCH, "chw")})
        old = digest(dst)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(src), str(dst), "slow"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert child.stdout is not None
    assert child.stdout.readline() == "writing\n"
    assert child.stdout.readline() == "writing\n"
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    if previous:
        assert digest(dst) == old
    else:
        assert not dst.exists()
    temporary = leftovers(tmp_path)
    assert len(temporary) == 1 and temporary[0].startswith(".out.safetensors.")
    assert digest(src) == before


def test_unwritable_target_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write(tmp_path / "in.safetensors", model())
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    with pytest.raises(CheckpointError) as raised:
        stream_convert(src, blocker / "out.safetensors", {"fc.weight": (PATCH, "hwc")})
    assert_one_line(raised, "a-file", "choose another -o")

    # Running as root, permissions cannot be taken away: refuse the temp file instead.
    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", denied)
    with pytest.raises(CheckpointError) as raised:
        stream_convert(src, tmp_path / "out.safetensors", {"fc.weight": (PATCH, "hwc")})
    assert_one_line(raised, "Permission denied", "choose a folder you can write to")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "in.safetensors"]


def test_failed_rename_removes_the_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write(tmp_path / "in.safetensors", model())

    def denied(*args: object) -> None:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    import fcconv.io.atomic

    monkeypatch.setattr(fcconv.io.atomic, "rename_noreplace", denied)  # the final move
    with pytest.raises(CheckpointError) as raised:
        stream_convert(src, tmp_path / "out.safetensors", {"fc.weight": (PATCH, "hwc")})
    assert_one_line(raised, "Operation not permitted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_truncated_input_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    src = write(tmp_path / "in.safetensors", model())
    data = src.read_bytes()
    src.write_bytes(data[: len(data) - 10])
    before = digest(src)
    with pytest.raises(CheckpointError) as raised:
        stream_convert(src, tmp_path / "out.safetensors", {"fc.weight": (PATCH, "hwc")})
    assert_one_line(raised, "truncated")
    assert digest(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_input_that_shrinks_while_copied_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write(tmp_path / "in.safetensors", model())
    monkeypatch.setattr(os, "copy_file_range", lambda *args: 0)
    with pytest.raises(CheckpointError) as raised:
        stream_convert(src, tmp_path / "out.safetensors", {"fc.weight": (PATCH, "chw")})
    assert_one_line(raised, "ended early")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


def test_check_sees_the_complete_file_before_it_is_renamed(tmp_path: Path) -> None:
    src = write(tmp_path / "in.safetensors", model())
    dst = tmp_path / "out.safetensors"
    seen = []

    def check(path: Path) -> None:
        assert path.parent == tmp_path and path.name.endswith(".fcconv-tmp") and not dst.exists()
        seen.append(read_tensors(path, ["fc.weight"])["fc.weight"])

    stream_convert(src, dst, {"fc.weight": (PATCH, "hwc")}, check=check)
    expected = linear_weight_to_conv(model()["fc.weight"], PATCH, "hwc")
    assert len(seen) == 1 and bitwise_equal(seen[0], expected)

    class Mismatch(Exception):
        pass

    def refuse(path: Path) -> None:
        raise Mismatch("verification failed")

    previous = digest(dst)
    with pytest.raises(Mismatch):
        stream_convert(src, dst, {"fc.weight": (PATCH, "whc")}, force=True, check=refuse)
    assert digest(dst) == previous
    assert leftovers(tmp_path) == []
