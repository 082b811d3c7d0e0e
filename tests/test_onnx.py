"""ONNX graphs made fully convolutional, checked in onnxruntime against independent references.

The references do not use fcconv: the original ONNX graph run on each
crop (exact when the trunk does not pad), or the PyTorch model the graph was
exported from, its head applied by hand to every window of its trunk's map.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

SAMPLE = "tiny_cnn.onnx"  # Conv 3x3 → ReLU → MaxPool 2 → Flatten → Gemm → ReLU → Gemm, 3x16x16


def run(path_or_model, x: np.ndarray) -> np.ndarray:
    data = path_or_model if isinstance(path_or_model, bytes) else Path(path_or_model).read_bytes()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def dims(info) -> list:
    return [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]


def test_a_sample_graph_becomes_dense_and_matches_the_original_on_crops(
    invoke, samples, tmp_path
) -> None:
    out = tmp_path / "dense.onnx"
    result = invoke("convolutionalize", samples / SAMPLE, "-o", out, "--json")
    document = json.loads(result.stdout)
    assert document["ok"] and document["verification"]["passed"]
    assert document["order"] == "chw" and document["feature_map"] == "7x7x8"
    coordinates = document["coordinates"]
    assert coordinates["stride"] == [2, 2] and coordinates["window"] == [16, 16]
    assert coordinates["crop_exact"] == coordinates["crops_compared"] > 0
    dense = onnx.load(out)
    onnx.checker.check_model(dense, full_check=True)
    assert {n.op_type for n in dense.graph.node} == {"Conv", "Relu", "MaxPool"}
    assert dims(dense.graph.input[0])[2:] == ["height", "width"]
    assert dims(dense.graph.output[0])[1:] == [5, "map_height", "map_width"]
    x = np.random.default_rng(0).standard_normal((2, 3, 26, 22)).astype(np.float32)
    scores = run(out, x)
    assert scores.shape == (2, 5, 6, 4)
    for p in range(6):
        for q in range(4):
            crop = np.ascontiguousarray(x[:, :, 2 * p : 2 * p + 16, 2 * q : 2 * q + 16])
            np.testing.assert_allclose(scores[:, :, p, q], run(samples / SAMPLE, crop), atol=1e-5)


class PermutedHead(nn.Module):
    """A padded trunk, an NHWC flatten by a dynamic reshape, x @ W.T + b, softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc6 = nn.Parameter(torch.randn(16, 4 * 6 * 5))
        self.b6 = nn.Parameter(torch.randn(16))
        self.fc7 = nn.Parameter(torch.randn(3, 16))
        self.b7 = nn.Parameter(torch.randn(3))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        flat = features.permute(0, 2, 3, 1).reshape(features.shape[0], -1)
        hidden = torch.relu(flat @ self.fc6.T + self.b6)
        return torch.softmax(hidden @ self.fc7.T + self.b7, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def _export(model: nn.Module, path: Path, size: tuple[int, int]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation
        torch.onnx.export(
            model.eval(), (torch.randn(1, 3, *size),), str(path), dynamo=False,
            input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )  # fmt: skip


def test_matmul_add_with_a_permute_and_a_dynamic_reshape(invoke, tmp_path) -> None:
    torch.manual_seed(0)
    model, path, out = PermutedHead(), tmp_path / "m.onnx", tmp_path / "m.dense.onnx"
    _export(model, path, (6, 5))
    result = invoke("convolutionalize", path, "-o", out, "--json")
    document = json.loads(result.stdout)
    assert document["order"] == "hwc" and "Transpose" in document["order_detail"]
    assert document["order_from"] == "model"
    assert [layer["was"] for layer in document["layers"]] == ["MatMul + Add", "MatMul + Add"]
    assert "pads" in document["coordinates"]["note"]
    x = torch.randn(2, 3, 11, 9)
    scores = run(out, x.numpy())
    with torch.no_grad():  # the PyTorch head on every 6x5 window of the trunk's map
        features = model.trunk(x)
        for p in range(features.shape[2] - 5):
            for q in range(features.shape[3] - 4):
                expected = model.head(features[:, :, p : p + 6, q : q + 5])
                np.testing.assert_allclose(scores[:, :, p, q], expected.numpy(), atol=1e-5)


def test_verify_catches_a_dense_graph_with_a_wrong_order(invoke, samples, tmp_path) -> None:
    import dataclasses

    from fcconv.onnx.graph import find_head, rewrite

    original = onnx.load(samples / SAMPLE)
    head = find_head(original)
    right, wrong = tmp_path / "right.onnx", tmp_path / "wrong.onnx"
    onnx.save(rewrite(original, head), right)
    onnx.save(rewrite(original, dataclasses.replace(head, order="hwc")), wrong)
    invoke("verify", samples / SAMPLE, right)
    result = invoke("verify", samples / SAMPLE, wrong, "--json", exit=1)
    assert not json.loads(result.stdout)["runtime"][0]["passed"]


def test_a_pytorch_model_written_as_onnx_runs_on_larger_inputs(invoke, samples, tmp_path) -> None:
    from fcconv.fcn import head_on_windows
    from fcconv.fcn.load import load_model

    out = tmp_path / "tiny_vgg.onnx"
    weights, arch = samples / "tiny_vgg.safetensors", "fcconv.samples_models:tiny_vgg"
    result = invoke("convolutionalize", weights, "--arch", arch, "--input", "32x32", "-o", out)
    assert out.read_bytes()[:1] != b"P"  # a protobuf, not a .pt2 zip under the .onnx name
    assert "wrote" in result.stderr
    x = torch.randn(1, 3, 64, 48)
    scores = run(out, x.numpy())
    reference = head_on_windows(load_model(str(weights), arch=arch), (32, 32), x)
    np.testing.assert_allclose(scores, reference.numpy(), atol=1e-4)


@pytest.mark.parametrize(
    ("model", "output", "words"),
    [
        ("tiny_vgg.safetensors", "dense.pt", "suffix"),
        (SAMPLE, "dense.pt2", "ONNX graph"),
    ],
)
def test_the_output_suffix_decides_or_is_refused(invoke, samples, tmp_path, model, output, words):
    args = (
        ["--arch", "fcconv.samples_models:tiny_vgg", "--input", "32x32"] if "vgg" in model else []
    )
    result = invoke("convolutionalize", samples / model, "-o", tmp_path / output, *args, exit=2)
    assert result.stderr.startswith("fcconv: error: ") and words in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_graphs_are_one_line_errors(invoke, samples, tmp_path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage" * 10)
    result = invoke("convolutionalize", broken, "-o", tmp_path / "d.onnx", exit=2)
    assert result.stderr.startswith("fcconv: error: ") and result.stderr.count("\n") == 1
    model = onnx.load(samples / SAMPLE)
    model.graph.output.append(
        onnx.helper.make_tensor_value_info("/1/Relu_output_0", 1, ["n", "c", "h", "w"])
    )
    two = tmp_path / "two.onnx"
    onnx.save(model, two)
    result = invoke("convolutionalize", two, "-o", tmp_path / "d.onnx", exit=2)
    assert "/1/Relu_output_0" in result.stderr  # an output that is not the head's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.onnx", "two.onnx"]


def test_missing_extra_names_the_install_command(invoke, samples, tmp_path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)  # as if it were not installed
    result = invoke("convolutionalize", samples / SAMPLE, "-o", tmp_path / "d.onnx", exit=2)
    assert "pip install 'fcconv[onnx]'" in result.stderr


def test_options_an_onnx_graph_does_not_take_are_refused(invoke, samples, tmp_path) -> None:
    args = ("--arch", "x:y", "--state-dict-out", tmp_path / "w.pt")
    result = invoke("convolutionalize", samples / SAMPLE, "-o", tmp_path / "d.onnx", *args, exit=2)
    assert "--arch" in result.stderr and "--state-dict-out" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_library_returns_results_truthy_on_success(samples, tmp_path) -> None:
    import fcconv

    dense = tmp_path / "d.onnx"
    result = fcconv.convolutionalize_onnx(samples / SAMPLE, dense, input_size=None)
    assert result and result.exit_code == 0 and result.to_dict()["written"]
    check = fcconv.verify_onnx(samples / SAMPLE, dense)
    assert check and check.to_dict()["equivalent"]
