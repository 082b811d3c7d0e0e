"""Global pooling as a sliding window, class activation maps, per-cell heads (SPEC section 5).

The references never use fcconv: the model's own trunk gives the feature map
of the larger input, each native-size window of it is cut by hand and fed to
the model's own head (``avgpool`` → ``flatten`` → ``fc``, timm's
``forward_head``), and the cell must equal that. For ``head="cam"`` the
window is one feature cell.
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from classifier_models import (
    FaceNetTail,
    mobilenet_v3_small,
    resnet18,
    timm_resnet18,
)
from click.testing import CliRunner
from fcn_helpers import seeded
from torch import nn

from fcconv.errors import ConvolutionalizeError, SpecError
from fcconv.fcn import convolutionalize, convolutionalize_detailed, verify_dense


def torchvision_trunk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "features"):  # MobileNetV3
        return model.features(x)
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


def torchvision_head(model: nn.Module, window: torch.Tensor) -> torch.Tensor:
    classifier = model.classifier if hasattr(model, "classifier") else model.fc
    return classifier(torch.flatten(model.avgpool(window), 1))


def head_on_every_window(trunk, head, x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """``[B, O, rows, cols]``: the model's head on each ``window`` of its trunk's map."""
    features = trunk(x)
    rows = features.shape[2] - window[0] + 1
    cols = features.shape[3] - window[1] + 1
    cells = [
        [head(features[:, :, i : i + window[0], j : j + window[1]]) for j in range(cols)]
        for i in range(rows)
    ]
    return torch.stack([torch.stack(row, -1) for row in cells], -2)


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4) -> None:
    assert got.shape == want.shape
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= rtol * scale, (got - want).abs().max() / scale


CLASSIFIERS = {
    "torchvision-resnet18": lambda: resnet18(num_classes=10, width=8),
    "torchvision-mobilenet_v3_small": lambda: mobilenet_v3_small(num_classes=10, width=0.25),
    "timm-resnet18": lambda: timm_resnet18(num_classes=10, width=8),
}


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_published_classifiers_give_the_head_on_every_native_window(name: str) -> None:
    model = seeded(CLASSIFIERS[name](), scale=0.1)
    native, (height, width) = 64, (64 + 2 * 32, 64 + 32)
    conversion = convolutionalize_detailed(model, native)
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = conversion.model(x)
        if name.startswith("timm"):
            want = head_on_every_window(model.forward_features, model.forward_head, x, (2, 2))
        else:
            trunk = lambda t: torchvision_trunk(model, t)  # noqa: E731
            want = head_on_every_window(trunk, lambda w: torchvision_head(model, w), x, (2, 2))
    assert dense.shape == (2, 10, (height - native) // 32 + 1, (width - native) // 32 + 1)
    assert_close(dense, want)
    (output,) = conversion.outputs
    assert output.head == "global_pool" and output.window == (2, 2)
    assert output.cells is not None and output.cells.stride == (32, 32)
    check = verify_dense(model, conversion.model, native)
    assert check, check.problems
    assert check.map_size == (3, 3) and check.crops.cells == 9
    assert check.crops.crop_exact is not None and check.crops.reasons


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax", "catavgmax", "fast"])
def test_every_timm_global_pool_becomes_a_window(pool: str) -> None:
    model = seeded(timm_resnet18(num_classes=4, width=4, global_pool=pool, drop_rate=0.2))
    conversion = convolutionalize_detailed(model, 32)
    x = torch.randn(1, 3, 96, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = head_on_every_window(model.forward_features, model.forward_head, x, (1, 1))
        assert_close(conversion.model(x), want)
    assert verify_dense(model, conversion.model, 32)


def test_a_full_size_resnet18_gives_the_224_formula_of_cells() -> None:
    model = resnet18().eval()  # torchvision's init, full width: 11.7 M parameters
    height, width = 288, 256
    dense = convolutionalize(model, 224)
    x = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = dense(x)
        trunk = lambda t: torchvision_trunk(model, t)  # noqa: E731
        want = head_on_every_window(trunk, lambda w: torchvision_head(model, w), x, (7, 7))
    assert got.shape == (1, 1000, (height - 224) // 32 + 1, (width - 224) // 32 + 1)
    assert_close(got, want)


def test_cam_is_the_head_on_every_feature_cell() -> None:
    model = seeded(timm_resnet18(num_classes=5, width=4, global_pool="avgmax"))
    conversion = convolutionalize_detailed(model, 64, head="cam")
    x = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        features = model.forward_features(x)
        want = head_on_every_window(model.forward_features, model.forward_head, x, (1, 1))
        # the same, by hand: the pool of one cell is the cell, then the Linear
        by_hand = torch.einsum("oc,bchw->bohw", model.fc.weight, features)
        by_hand = by_hand + model.fc.bias[:, None, None]
        got = conversion.model(x)
    assert got.shape == (2, 5, 3, 2)  # one cell per feature cell
    assert_close(got, want)
    assert_close(got, by_hand)
    (output,) = conversion.outputs
    assert output.head == "cam" and output.window == (1, 1)
    assert output.cells.stride == (32, 32)
    assert output.cells.window[0] < conversion_window(model)
    assert any("CAM" in change.now for change in conversion.changes)
    check = verify_dense(model, conversion.model, 64)
    assert check, check.problems
    assert check.native_max_abs_diff is not None and check.crops.crop_exact == 0


def conversion_window(model: nn.Module) -> int:
    return convolutionalize_detailed(model, 64).outputs[0].cells.window[0]


def test_cam_needs_a_global_pool() -> None:
    model = seeded(nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)))
    with pytest.raises(SpecError, match="cam needs a global pool"):
        convolutionalize(model, 6, head="cam")


def test_facenet_converts_with_its_normalisation_kept() -> None:
    model = seeded(FaceNetTail())
    conversion = convolutionalize_detailed(model, 32)
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(5))

    def head(window: torch.Tensor) -> torch.Tensor:
        pooled = model.dropout(model.avgpool_1a(window))
        return F.normalize(model.last_bn(model.last_linear(pooled.view(len(pooled), -1))), dim=1)

    def trunk(t: torch.Tensor) -> torch.Tensor:
        return F.relu(model.block8(model.conv2d_1a(t)))

    with torch.no_grad():
        got = conversion.model(x)
        want = head_on_every_window(trunk, head, x, (15, 15))
    assert_close(got, want)
    norms = got.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)  # each cell a unit vector
    assert verify_dense(model, conversion.model, 32)


class PerCellHead(nn.Module):
    """A global pool, then every kind of per-cell layer fcconv carries, in two heads."""

    def __init__(self, tail: str) -> None:
        super().__init__()
        self.tail = tail
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.fc1 = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)
        self.bn = nn.BatchNorm1d(8)
        self.prelu = nn.PReLU(8) if tail == "prelu-per-unit" else nn.PReLU()
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(8, 4)
        self.fc3 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        v = F.adaptive_avg_pool2d(features, 1).flatten(1)
        h = self.drop(self.prelu(self.bn(self.ln(F.gelu(self.fc1(v))))))
        h = F.silu(h) + 0.5 * h
        scores = torch.cat([self.fc2(h), self.fc3(h)], dim=-1)
        if self.tail == "softmax":
            return torch.softmax(scores, dim=-1)
        if self.tail == "log_softmax":
            return F.log_softmax(scores, dim=1)
        if self.tail == "norm":
            return scores / scores.norm(dim=1, keepdim=True)
        return F.normalize(scores, dim=-1)


@pytest.mark.parametrize("tail", ["softmax", "log_softmax", "norm", "prelu-per-unit", "normalize"])
def test_per_cell_layers_are_carried_into_the_dense_head(tail: str) -> None:
    model = seeded(PerCellHead(tail))
    conversion = convolutionalize_detailed(model, 15)
    x = torch.randn(2, 3, 31, 23, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = conversion.model(x)
        want = head_on_every_window(model.conv, model.head, x, (7, 7))
    assert got.shape == (2, 6, 9, 5)
    assert_close(got, want)
    check = verify_dense(model, conversion.model, 15)
    assert check, check.problems


def test_what_is_not_per_cell_is_refused_naming_the_op_and_line() -> None:
    class BatchCentred(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            v = self.fc(self.conv(x).mean((2, 3)))
            return v @ v.T  # every sample against every other: no cell alone

    with pytest.raises(ConvolutionalizeError) as raised:
        convolutionalize(seeded(BatchCentred()), 8)
    message = str(raised.value)
    assert "'matmul' (operator.matmul)" in message
    assert "test_convolutionalize_pools.py:" in message and "`return v @ v.T" in message
    assert "\n" not in message


class SqueezeNetTail(nn.Module):
    """torchvision SqueezeNet's classifier: a 1x1 conv, then the pool; plus the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, 3, stride=2)
        self.classifier = nn.Sequential(
            nn.Dropout(p=0.5),
            nn.Conv2d(4, 5, 1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d((1, 1)),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.features(x)
        return torch.flatten(self.classifier(x), 1), torch.flatten(x.mean((2, 3), keepdim=True), 1)


def test_pools_without_a_linear_after_them_and_pooled_features_as_outputs() -> None:
    model = seeded(SqueezeNetTail())
    conversion = convolutionalize_detailed(model, 17)
    x = torch.randn(1, 3, 33, 25, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        scores, embedding = conversion.model(x)
        pooled = lambda w: torch.flatten(model.classifier(w), 1)  # noqa: E731
        assert_close(scores, head_on_every_window(model.features, pooled, x, (8, 8)))
        mean = lambda w: w.mean((2, 3))  # noqa: E731
        assert_close(embedding, head_on_every_window(model.features, mean, x, (8, 8)))
    assert verify_dense(model, conversion.model, 17)


def test_a_pool_over_a_flattened_map_is_refused() -> None:
    class Flattened(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).flatten(2).mean(-1))  # a raster, not a region

    with pytest.raises(ConvolutionalizeError, match="no region of the input"):
        convolutionalize(seeded(Flattened()), 8)


class Pool1d(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv1d(2, 5, 3, stride=2)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.tanh(self.conv(x))
        if self.kind == "module":
            return self.fc(torch.flatten(self.pool(f), 1))
        return self.fc(F.adaptive_max_pool1d(f, 1).squeeze(-1))


class Pool3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, stride=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((-3, -2, -1)))


@pytest.mark.parametrize(
    ("model", "native", "larger", "cells"),
    [
        (Pool1d("module"), (33,), (57,), (13,)),
        (Pool1d("function"), (33,), (41,), (5,)),
        (Pool3d(), (9, 9, 9), (13, 9, 11), (3, 1, 2)),
    ],
)
def test_one_and_three_dimensional_global_pools(model, native, larger, cells) -> None:
    model = seeded(model)
    conversion = convolutionalize_detailed(model, native)
    channels = model.conv.in_channels
    x = torch.randn(1, channels, *larger, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = conversion.model(x)
    assert tuple(got.shape[2:]) == cells
    assert math.prod(cells) > 1
    check = verify_dense(model, conversion.model, native, larger)
    assert check, check.problems
    assert check.map_size == cells


# ------------------------------------------------------------------ command line


@pytest.fixture
def pool_archs(monkeypatch: pytest.MonkeyPatch) -> str:
    """Factories that build a trained model themselves (as ``pretrained=True`` does)."""
    module = types.ModuleType("fcconv_test_pool_archs")
    module.timm_resnet = lambda pool="avg": seeded(timm_resnet18(3, 4, pool), seed=11)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module.__name__


def invoke(*args: object):
    from fcconv.cli import models as cli_models

    return CliRunner().invoke(cli_models.convolutionalize, [str(a) for a in args])


@pytest.mark.parametrize("head", ["pool", "cam"])
def test_cli_arch_alone_uses_the_factory_weights(tmp_path: Path, pool_archs: str, head) -> None:
    out = tmp_path / "r18.pt2"
    arch = f'{pool_archs}:timm_resnet("avgmax")'
    result = invoke("--arch", arch, "--input", "32x32", "-o", out, "--head", head, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["model"] is None
    assert document["conversion"]["weights_from"] == "factory"
    (output,) = document["conversion"]["outputs"]
    assert output["head"] == ("cam" if head == "cam" else "global_pool")
    assert output["window"] == [1, 1] and output["cells"]["stride"] == [32, 32]
    assert document["verification"]["passed"] is True
    recorded = _recorded(out)
    assert recorded["weights_from"] == "factory" and recorded["head"] == head
    model = sys.modules[pool_archs].timm_resnet("avgmax")
    x = torch.randn(1, 3, 96, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        got = torch.export.load(out).module()(x)
        want = head_on_every_window(model.forward_features, model.forward_head, x, (1, 1))
    assert got.shape == (1, 3, 3, 2)
    assert_close(got, want)
    # for people: the report says the weights came from the factory and what the head is
    result = invoke("--arch", arch, "--input", "32x32", "-o", out, "--head", head, "--force")
    assert result.exit_code == 0, result.output
    words = " ".join(result.stderr.replace("│", " ").split())
    assert "built by the --arch factory" in words
    assert ("CAM" if head == "cam" else "global pool") in words


def _recorded(path: Path) -> dict:
    """The facts fcconv wrote beside the program in the ``.pt2`` archive."""
    from fcconv.fcn import METADATA

    extra = {METADATA: ""}
    torch.export.load(path, extra_files=extra)
    return json.loads(extra[METADATA])


def test_cli_without_model_or_arch_is_a_usage_error(tmp_path: Path) -> None:
    result = invoke("--input", "32x32", "-o", tmp_path / "o.pt2")
    assert result.exit_code == 2
    assert "MODEL" in result.output
    assert list(tmp_path.iterdir()) == []


class FlattenHeads(nn.Module):
    """Two Linear heads on one flattened map, concatenated, or a layer that reads the map."""

    def __init__(self, tail: str) -> None:
        super().__init__()
        self.tail = tail
        self.conv = nn.Conv2d(3, 2, 3)
        self.fc1, self.fc2 = nn.Linear(2 * 4 * 4, 2), nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = F.relu(self.conv(x).flatten(1))
        if self.tail == "concat":
            return torch.cat([self.fc1(flat), self.fc2(flat)], 1).softmax(-1)
        return self.fc1(flat) + flat.sum(1, keepdim=True)  # sums over the whole window


def test_concatenated_linear_heads_on_a_flatten_and_what_reads_the_flat_vector() -> None:
    model = seeded(FlattenHeads("concat"))
    dense = convolutionalize(model, 6)
    assert dense(torch.zeros(1, 3, 10, 8)).shape == (1, 5, 5, 3)
    assert verify_dense(model, dense, 6)
    with pytest.raises(ConvolutionalizeError, match=r"'sum_1' \(Tensor.sum\) at .* reads the flat"):
        convolutionalize(seeded(FlattenHeads("sum")), 6)


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_per_cell_heads_export_and_load_without_the_model_code(tmp_path, monkeypatch, suffix):
    if suffix == ".onnx":
        pytest.importorskip("onnxruntime")
    from fcconv.api import convolutionalize_file

    module = types.ModuleType("fcconv_test_per_cell")
    module.build = lambda: seeded(PerCellHead("prelu-per-unit"))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    out = tmp_path / f"dense{suffix}"
    result = convolutionalize_file(None, out, arch=f"{module.__name__}:build", input_size=15)
    assert result, result.verification.problems
    # the program or graph was run on probe sizes against the converted model
    assert result.export.dynamic and result.export.rejected_shapes == []
    assert result.export.roundtrip_max_abs_diff < 1e-4
