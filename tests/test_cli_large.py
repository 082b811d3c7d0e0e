"""The CLI's large-file paths: streaming safetensors rewrite and sharded folders.

The library pieces are tested in test_streaming.py / test_sharded.py; here the
commands choose them, verify before the rename, and report what they did.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from reference import bitwise_equal
from safetensors import safe_open
from safetensors.torch import save_file
from test_sharded import INDEX, PATCH, make_sharded

import fcconv.io.safetensors
import fcconv.io.streaming
from fcconv.geometry import Patch, linear_weight_to_conv
from fcconv.io.sources import DiskTensors


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


@pytest.fixture
def layer_file(tmp_path: Path) -> Path:
    generator = torch.Generator().manual_seed(3)
    tensors = {
        "backbone.weight": torch.randn(4, 2, 3, 3, generator=generator),
        "head.fc.weight": torch.randn(6, 3 * 4 * 5, generator=generator),
        "head.fc.bias": torch.randn(6, generator=generator),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"origin": "test"})
    return path


@pytest.mark.parametrize("order", ["chw", "hwc"])
def test_safetensors_to_safetensors_streams_and_verifies(invoke, layer_file, order) -> None:
    out = layer_file.with_name("out.safetensors")
    result = invoke(
        "convert", layer_file, "-o", out, "--layer", "fc", "--patch", "3x4x5",
        "--order", order, "--json",
    )  # fmt: skip
    document = json.loads(result.stdout)
    assert document["mode"] == "streamed" and document["written"] is True
    assert document["verification"]["equivalent"] is True
    before, _ = _read(layer_file)
    after, metadata = _read(out)
    expected = linear_weight_to_conv(before["head.fc.weight"], Patch(3, 4, 5), order)
    assert bitwise_equal(after["head.fc.weight"], expected)
    assert bitwise_equal(after["backbone.weight"], before["backbone.weight"])
    assert metadata["origin"] == "test"
    assert json.loads(metadata["fcconv"])["layers"]["head.fc"]["order"] == order
    invoke("verify", layer_file, out)


def test_streamed_output_that_fails_verification_is_not_written(
    invoke, layer_file, monkeypatch
) -> None:
    real = fcconv.io.streaming.stream_convert

    def wrong_order(src, dst, layers, *args, **kwargs):
        return real(src, dst, {k: (p, "hwc") for k, (p, _) in layers.items()}, *args, **kwargs)

    monkeypatch.setattr(fcconv.io.streaming, "stream_convert", wrong_order)
    out = layer_file.with_name("out.safetensors")
    result = invoke("convert", layer_file, "-o", out, "--layer", "fc", "--patch", "3x4x5", exit=1)
    assert "not written" in result.stderr and "head.fc.weight" in result.stderr
    assert sorted(os.listdir(layer_file.parent)) == ["model.safetensors"]


def test_inspect_reads_safetensors_headers_without_torch_tensors(invoke, layer_file) -> None:
    document = json.loads(invoke("inspect", layer_file, "--json", "--channels", "5").stdout)
    assert document["format"] == "safetensors"
    (layer,) = document["layers"]
    assert (layer["name"], layer["out_features"], layer["in_features"]) == ("head.fc", 6, 60)
    assert "3x4x5" in layer["patches"] or "4x3x5" in layer["patches"]


def test_sharded_folder_round_trip(invoke, tmp_path: Path) -> None:
    source = make_sharded(tmp_path / "model")
    out = tmp_path / "model.conv"
    invoke("convert", source, "--layer", f"classifier.0={PATCH}", "--order", "whc", "-q")
    assert (out / INDEX).is_file()
    untouched = "model-00001-of-00003.safetensors"
    assert (out / untouched).read_bytes() == (source / untouched).read_bytes()
    result = json.loads(invoke("verify", source, out, "--json").stdout)
    assert result["equivalent"] is True
    assert [layer["order"] for layer in result["layers"]] == ["whc"]
    listed = json.loads(invoke("inspect", source / INDEX, "--json").stdout)
    assert {layer["name"] for layer in listed["layers"]} == {"classifier.0", "classifier.3"}


def test_sharded_link_shares_untouched_shards(invoke, tmp_path: Path) -> None:
    source = make_sharded(tmp_path / "model")
    out = tmp_path / "linked"
    invoke("convert", source, "-o", out, "--layer", f"classifier.3={PATCH}", "--link")
    shard = "model-00001-of-00003.safetensors"
    assert os.stat(out / shard).st_ino == os.stat(source / shard).st_ino
    rewritten = "model-00003-of-00003.safetensors"
    assert os.stat(out / rewritten).st_ino != os.stat(source / rewritten).st_ino


def test_a_folder_without_an_index_is_refused(invoke, tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    result = invoke("inspect", tmp_path / "weights", exit=2)
    assert "is a directory" in result.stderr and "index.json" in result.stderr


def _convert(invoke, layer_file: Path) -> Path:
    out = layer_file.with_name("out.safetensors")
    invoke("convert", layer_file, "-o", out, "--layer", "fc", "--patch", "3x4x5", "-q")
    return out


def test_verify_of_two_files_reads_only_the_layers(invoke, layer_file, monkeypatch) -> None:
    out = _convert(invoke, layer_file)
    asked: list[str] = []
    real = fcconv.io.safetensors.read_tensors

    def recording(path, names):
        asked.extend(names)
        return real(path, names)

    rows: list[str] = []
    real_rows = DiskTensors.row_bits

    def recording_rows(self, key, start, stop):
        rows.append(key)
        return real_rows(self, key, start, stop)

    monkeypatch.setattr(fcconv.io.safetensors, "read_tensors", recording)
    monkeypatch.setattr(DiskTensors, "row_bits", recording_rows)
    invoke("verify", layer_file, out)
    assert "backbone.weight" not in asked + rows  # compared by its bytes, never loaded
    assert "head.fc.weight" in rows  # the weight is compared a block of rows at a time
    assert set(rows) <= {"head.fc.weight", "head.fc.bias"}  # the bias as bits, in one read


def test_verify_finds_a_changed_untouched_byte_on_disk(invoke, layer_file) -> None:
    out = _convert(invoke, layer_file)
    tensors, metadata = _read(out)
    tampered = tensors["backbone.weight"].clone()
    tampered[1, 0, 2, 1] = -tampered[1, 0, 2, 1]
    save_file({**tensors, "backbone.weight": tampered}, str(out), metadata=metadata)
    result = invoke("verify", layer_file, out, "--json", exit=1)
    (difference,) = json.loads(result.stdout)["differences"]
    assert difference == "backbone.weight differs: 1 element(s), first at [1, 0, 2, 1]"


def test_verify_on_disk_reports_dtype_and_missing_tensors(invoke, layer_file) -> None:
    out = _convert(invoke, layer_file)
    tensors, metadata = _read(out)
    changed = {**tensors, "backbone.weight": tensors["backbone.weight"].double()}
    changed["extra"] = torch.zeros(2)
    save_file(changed, str(out), metadata=metadata)
    differences = json.loads(invoke("verify", layer_file, out, "--json", exit=1).stdout)[
        "differences"
    ]
    assert "backbone.weight differs: dtype float32 → float64" in differences
    assert "extra is new in the converted checkpoint" in differences
