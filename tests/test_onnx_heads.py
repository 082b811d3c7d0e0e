"""ONNX graphs as the exporters write them, made dense: every head checked against PyTorch.

Each model here has a ``trunk`` and a ``head``; it is exported to ONNX by
torch's TorchScript exporter (optionally with its initializers listed as
graph inputs, as older model-zoo files are) or by its default dynamo
exporter (which fixes the batch at 1 and reshapes to a constant ``[1, N]``).
The reference is independent of fcconv and of ONNX: the PyTorch head applied
to every window of the PyTorch trunk's map on a larger input; the dense
graph runs in onnxruntime.
"""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnxruntime = pytest.importorskip("onnxruntime")


class Alex(nn.Module):
    """AlexNet's shape, small: features → flatten → Linear → ReLU → Dropout → Linear."""

    size = (12, 12)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Linear(8 * 5 * 5, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 4)
        )

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class Pooled(Alex):
    """A ResNet-style end: global pooling (as ``pool`` says), flatten, Linear."""

    def __init__(self, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.fc = nn.Linear(8, 5)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        if self.pool == "mean":
            return self.fc(features.mean((2, 3)))
        pooled = nn.AdaptiveAvgPool2d(1) if self.pool == "avg" else nn.AdaptiveMaxPool2d(1)
        return self.fc(torch.flatten(pooled(features), 1))


class Normed(Alex):
    """Per-cell layers between the linear layers: BatchNorm1d, PReLU per unit, LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Sequential(
            nn.Linear(200, 16), nn.BatchNorm1d(16), nn.PReLU(16), nn.Linear(16, 12),
            nn.LayerNorm(12), nn.Linear(12, 4),
        )  # fmt: skip
        with torch.no_grad():  # statistics that are not the identity
            self.classifier[1].running_mean.uniform_(-1, 1)
            self.classifier[1].running_var.uniform_(0.5, 2)
            self.classifier[2].weight.uniform_(0.1, 0.5)
            self.classifier[4].weight.uniform_(0.5, 1.5)


class TwoHeads(Alex):
    """MTCNN's end: Linear → PReLU → (scores, box offsets)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(200, 16)
        self.act = nn.PReLU(16)
        self.scores = nn.Linear(16, 2)
        self.boxes = nn.Linear(16, 4)

    def head(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.act(self.fc(torch.flatten(features, 1)))
        return torch.softmax(self.scores(hidden), dim=1), self.boxes(hidden)


class Merged(TwoHeads):
    """Two branches added back together: not a head fcconv rewrites."""

    def __init__(self) -> None:
        super().__init__()
        self.boxes = nn.Linear(16, 2)

    def head(self, features: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        hidden = self.act(self.fc(torch.flatten(features, 1)))
        return self.scores(hidden) + self.boxes(hidden)


class Wake(nn.Module):
    """openWakeWord's shape: ``[1, 16, 96]`` features → Conv1d → Flatten → Gemm."""

    size = (24,)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(16, 8, 5, stride=2)
        self.fc1 = nn.Linear(8 * 10, 12)
        self.fc2 = nn.Linear(12, 1)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(torch.flatten(features, 1)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class Volume(Wake):
    """A 3-D trunk: Conv3d → Flatten → Linear."""

    size = (6, 6, 6)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 3, 3)  # type: ignore[assignment]
        self.fc1 = nn.Linear(3 * 4 * 4 * 4, 5)
        self.fc2 = nn.Linear(5, 3)


CHANNELS = {Wake: 16, Volume: 2}


def export(model: nn.Module, path: Path, how: str) -> None:
    """``how``: "dynamo" (torch's default exporter), "script" (TorchScript, dynamic batch),
    or "inputs" (TorchScript with every initializer listed as a graph input)."""
    channels = CHANNELS.get(type(model), 3)
    x = torch.randn(1, channels, *model.size)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how == "dynamo":
            pytest.importorskip("onnxscript")
            torch.onnx.export(model, (x,), str(path), dynamo=True)
            return
        torch.onnx.export(
            model, (x,), str(path), dynamo=False, opset_version=17,
            input_names=["x"], dynamic_axes={"x": {0: "batch"}},
            keep_initializers_as_inputs=how == "inputs",
        )  # fmt: skip


def run_all(path: Path, x: np.ndarray) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def reference(model: nn.Module, x: torch.Tensor, window: tuple[int, ...]) -> list[np.ndarray]:
    """The PyTorch head on every window (stride 1) of the trunk's map: ``[B, O, *grid]``."""
    with torch.no_grad():
        features = model.trunk(x)
        grid = [size - side + 1 for size, side in zip(features.shape[2:], window, strict=True)]
        cells = {}
        for corner in itertools.product(*(range(n) for n in grid)):
            index = tuple(slice(c, c + side) for c, side in zip(corner, window, strict=True))
            out = model.head(features[(slice(None), slice(None), *index)])
            cells[corner] = out if isinstance(out, tuple) else (out,)
        outputs = []
        for k in range(len(next(iter(cells.values())))):
            stacked = torch.stack([cells[c][k] for c in itertools.product(*map(range, grid))], -1)
            outputs.append(stacked.reshape(*stacked.shape[:2], *grid).numpy())
        return outputs


def _check(invoke, model: nn.Module, tmp_path: Path, how: str, extra: int = 5) -> dict:
    torch.manual_seed(0)
    path, out = tmp_path / "m.onnx", tmp_path / "m.dense.onnx"
    export(model, path, how)
    document = json.loads(invoke("convolutionalize", path, "-o", out, "--json").stdout)
    assert document["ok"] and document["order_from"] == "model"
    with torch.no_grad():
        native = model.trunk(torch.zeros(1, CHANNELS.get(type(model), 3), *model.size))
    window = tuple(native.shape[2:])
    size = tuple(side + extra for side in model.size)
    x = torch.randn(1, CHANNELS.get(type(model), 3), *size)
    got = run_all(out, x.numpy())
    expected = reference(model.eval(), x, window)
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.shape == theirs.shape and np.prod(mine.shape[2:]) > 1
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5)
    return document


@pytest.mark.parametrize("how", ["dynamo", "script", "inputs"])
def test_an_alexnet_style_graph_from_each_exporter_becomes_dense(invoke, tmp_path, how) -> None:
    _check(invoke, Alex(), tmp_path, how)


@pytest.mark.parametrize("pool", ["avg", "max", "mean"])
def test_a_global_pool_head_becomes_a_sliding_window(invoke, tmp_path, pool) -> None:
    document = _check(invoke, Pooled(pool), tmp_path, "script")
    assert document["layers"][0]["was"] in ("GlobalAveragePool", "MaxPool", "ReduceMean")


def test_normalization_and_prelu_between_linear_layers_are_carried(invoke, tmp_path) -> None:
    _check(invoke, Normed(), tmp_path, "script")


@pytest.mark.parametrize("how", ["script", "dynamo"])
def test_a_head_with_two_outputs_becomes_two_maps(invoke, tmp_path, how) -> None:
    _check(invoke, TwoHeads(), tmp_path, how)


@pytest.mark.parametrize("model", [Wake, Volume], ids=["1-D", "3-D"])
def test_1d_and_3d_graphs_become_dense(invoke, tmp_path, model) -> None:
    document = _check(invoke, model(), tmp_path, "script", extra=6 if model is Wake else 2)
    assert document["order"] == ("cl" if model is Wake else "cdhw")


def test_a_head_that_merges_is_refused_naming_the_node(invoke, tmp_path) -> None:
    path = tmp_path / "m.onnx"
    export(Merged(), path, "script")
    result = invoke("convolutionalize", path, "-o", tmp_path / "d.onnx", exit=2)
    assert result.stderr.startswith("fcconv: error: ") and result.stderr.count("\n") == 1
    assert "Add node" in result.stderr and not (tmp_path / "d.onnx").exists()


def test_inspect_lists_the_head_it_would_rewrite(invoke, tmp_path) -> None:
    path = tmp_path / "m.onnx"
    export(TwoHeads(), path, "script")
    document = json.loads(invoke("inspect", path, "--json").stdout)
    assert document["format"] == "onnx"
    assert sorted(layer["in_features"] for layer in document["layers"]) == [16, 16, 200]
    head = document["head"]
    assert head["found"] and head["feature_map"] == "5x5x8" and head["order"] == "chw"
    assert len(head["linears"]) == 3 and len(head["outputs"]) == 2
    assert "5x5x8" in invoke("inspect", path).stderr
