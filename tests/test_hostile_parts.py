"""Every file an input is made of is an input: never written, with or without --force."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from onnx.external_data_helper import convert_model_to_external_data
from safetensors.torch import save_file

from fcconv.io.parts import parts_of

SAMPLE = "tiny_cnn.onnx"


def one_line_refusal(stderr: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fcconv: error:"), stderr


def external(samples: Path, folder: Path, data: str = "weights.onnx") -> Path:
    """The sample graph with its weights in an external-data file beside it."""
    model = onnx.load(samples / SAMPLE)
    convert_model_to_external_data(model, location=data, size_threshold=0)
    path = folder / "model.onnx"
    onnx.save_model(model, path)
    assert (folder / data).is_file()
    return path


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_an_onnx_models_external_data_is_never_written(invoke, samples, tmp_path, force) -> None:
    model = external(samples, tmp_path)
    weights = tmp_path / "weights.onnx"
    before = weights.read_bytes()
    result = invoke("convolutionalize", model, "-o", weights, *force, exit=2)
    one_line_refusal(result.stderr)
    assert "model.onnx" in result.stderr
    assert weights.read_bytes() == before
    invoke("convolutionalize", model, "-o", tmp_path / "dense.onnx")  # the model itself reads


def test_the_map_picture_never_replaces_a_models_external_data(invoke, samples, tmp_path) -> None:
    inline = tmp_path / "inline.onnx"
    arch = ("--arch", "fcconv.samples_models:blob_net", "--input", "96x96")
    invoke("convolutionalize", samples / "blob_net.safetensors", *arch, "-o", inline)
    assert parts_of(inline) == []  # the dense graph carries its weights inline
    dense = onnx.load(inline)
    convert_model_to_external_data(dense, location="weights.png", size_threshold=0)
    onnx.save_model(dense, tmp_path / "dense.onnx")
    before = (tmp_path / "weights.png").read_bytes()
    shutil.copyfile(samples / "blobs.png", tmp_path / "image.png")
    image = tmp_path / "image.png"
    result = invoke(
        "map", tmp_path / "dense.onnx", image, "-o", tmp_path / "weights.png", "--force", exit=2
    )
    one_line_refusal(result.stderr)
    assert (tmp_path / "weights.png").read_bytes() == before
    invoke("map", tmp_path / "dense.onnx", image, "-o", tmp_path / "map.png")


def test_a_shard_named_by_an_index_is_part_of_it(tmp_path) -> None:
    import torch

    save_file({"w": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "a.safetensors", "v": 3}}))
    assert parts_of(index) == [tmp_path / "a.safetensors"]
    assert parts_of(tmp_path / "a.safetensors") == []


def test_unreadable_inputs_have_no_parts(tmp_path) -> None:
    (tmp_path / "bad.onnx").write_bytes(b"\xff" * 10)
    (tmp_path / "bad.index.json").write_text("[" * 100_000)
    assert parts_of(tmp_path / "bad.onnx") == parts_of(tmp_path / "bad.index.json") == []
