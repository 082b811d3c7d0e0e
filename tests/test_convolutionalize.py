"""Whole-model convolutionalization (SPEC section 5), checked against an independent reference.

Every model here is built as ``trunk`` (an ``nn.Module`` producing the NCHW
feature map) plus a ``head`` method (flatten and the Linear layers), with
``forward = head(trunk(x))``. fcconv sees only ``forward``; the reference
applies the model's own ``head`` to every window of its own ``trunk``'s
feature map, so nothing of fcconv's graph splitting is trusted.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from fcn_helpers import seeded
from torch import nn

from fcconv.errors import CLI_NAMES, FcconvError, LayerError, SpecError, UnsafeCheckpointError
from fcconv.fcn import (
    ArchitectureError,
    ConvolutionalizeError,
    UntraceableModelError,
    convolutionalize,
    convolutionalize_detailed,
    head_on_windows,
    load_model,
    save_exported,
    save_state_dict,
    verify_dense,
)
from fcconv.geometry import conv_weight_to_linear

lib = importlib.import_module("fcconv.fcn")
cli_module = importlib.import_module("fcconv.cli")


class TwoPart(nn.Module):
    """``forward = head(trunk(x))``; subclasses define both."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


def sequential_flatten() -> nn.Sequential:
    """A plain nn.Sequential with nn.Flatten: 3x12x12 -> 6x4x4 map."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 7),
    )


class TorchFlatten(TwoPart):
    """A custom forward with torch.flatten; a 3x5 map so that h and w differ."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(2, 5, 3, stride=2), nn.Tanh())
        self.fc1 = nn.Linear(5 * 3 * 5, 9)
        self.fc2 = nn.Linear(9, 4)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


class ViewFlatten(TwoPart):
    """The classic x.view(x.size(0), -1), softmax over the classes."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AvgPool2d(2))
        self.fc1 = nn.Linear(4 * 4 * 4, 8)
        self.fc2 = nn.Linear(8, 5)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), -1)
        return torch.softmax(self.fc2(nn.functional.gelu(self.fc1(x))), dim=-1)


class NHWCFlatten(TwoPart):
    """Keras-style: permute to NHWC, then flatten (order hwc)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(4 * 4 * 6, 6)
        self.out = nn.LogSoftmax(dim=1)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        return self.out(self.fc(x))


class WHCFlatten(TwoPart):
    """permute(0, 3, 2, 1) before the flatten: order whc."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(3 * 4 * 6, 10)
        self.fc2 = nn.Linear(10, 3)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x.permute(0, 3, 2, 1), 1)
        return self.fc2(nn.functional.relu(self.fc1(x)))


class TinyVGG(TwoPart):
    """VGG-style: conv stages, AdaptiveAvgPool2d((3, 3)), three Linear layers with Dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((3, 3))
        self.classifier = nn.Sequential(
            nn.Linear(6 * 3 * 3, 16),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(16, 12),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(12, 5),
        )

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(x), 1))


class BatchNormHead(TwoPart):
    """Linear -> BatchNorm1d -> ReLU -> Linear, in eval mode with real statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU())
        self.fc1 = nn.Linear(4 * 3 * 3, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 3)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x.flatten(1)))))


class DataDependent(nn.Module):
    """Python control flow on a tensor value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.fc = nn.Linear(2 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.sum() > 0:
            x = x * 2
        return self.fc(x.flatten(1))


# model factory, native (H, W), in_channels, expected order, feature map (C, kh, kw)
CASES = {
    "sequential-nn.Flatten": (sequential_flatten, (12, 12), 3, "chw", (6, 4, 4)),
    "torch.flatten": (TorchFlatten, (8, 12), 2, "chw", (5, 3, 5)),
    "view(size(0), -1)": (ViewFlatten, (10, 10), 3, "chw", (4, 4, 4)),
    "permute-nhwc": (NHWCFlatten, (8, 12), 3, "hwc", (4, 4, 6)),
    "permute-0321": (WHCFlatten, (8, 12), 3, "whc", (3, 4, 6)),
    "vgg-adaptive-pool": (TinyVGG, (12, 12), 3, "chw", (6, 3, 3)),
    "batchnorm1d": (BatchNormHead, (7, 7), 3, "chw", (4, 3, 3)),
}


def parts(model: nn.Module) -> tuple:
    """The model's own trunk and head: an nn.Sequential splits at its nn.Flatten."""
    if isinstance(model, nn.Sequential):
        cut = next(i for i, m in enumerate(model) if isinstance(m, nn.Flatten))
        return nn.Sequential(*list(model)[:cut]), nn.Sequential(*list(model)[cut:])
    return model.trunk, model.head


def reference_map(
    model: nn.Module, x: torch.Tensor, kernel: tuple[int, int], stride
) -> torch.Tensor:
    """The model's own head on every window of its own trunk's feature map."""
    trunk, head = parts(model)
    kh, kw = kernel
    with torch.no_grad():
        features = trunk(x)
        rows = (features.shape[2] - kh) // stride[0] + 1
        cols = (features.shape[3] - kw) // stride[1] + 1
        cells = {}
        for p in range(rows):
            for q in range(cols):
                top, left = p * stride[0], q * stride[1]
                window = features[:, :, top : top + kh, left : left + kw].contiguous()
                cells[p, q] = head(window)
        classes = cells[0, 0].shape[1]
        out = torch.empty(x.shape[0], classes, rows, cols)
        for (p, q), scores in cells.items():
            out[:, :, p, q] = scores
    return out


@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
@pytest.mark.parametrize("case", list(CASES))
def test_native_and_dense_equality(case: str, stride: int) -> None:
    factory, native, channels, order, (c, kh, kw) = CASES[case]
    model = seeded(factory())
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    conversion = convolutionalize_detailed(model, native, stride=stride)
    dense = conversion.model.eval()
    assert conversion.order == order
    assert (conversion.patch.channels, *conversion.patch.sizes) == (c, kh, kw)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, channels, *native, generator=generator)
    with torch.no_grad():
        expected = model(x)
        got = dense(x)
    assert got.shape == (*expected.shape, 1, 1)
    torch.testing.assert_close(got.flatten(1), expected, rtol=1e-5, atol=1e-5)

    # Larger input: 3 window steps down, 2 across (plus a ragged pixel).
    step = conversion.window_stride
    assert step is not None
    larger = (native[0] + 3 * step[0] + 1, native[1] + 2 * step[1])
    big = torch.randn(2, channels, *larger, generator=generator)
    with torch.no_grad():
        got = dense(big)
    want = reference_map(model, big, (kh, kw), (stride, stride))
    assert got.shape == want.shape
    assert got.shape[1] == expected.shape[1] and got.shape[2] >= 4 and got.shape[3] >= 3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    check = verify_dense(model, dense, native, larger, stride=stride)
    assert check, check.problems
    assert check.map_size == tuple(got.shape[2:])
    assert check.needed_tolerance <= check.tolerance
    # the original is untouched: same weights, same module types
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == linears


def test_weights_are_permuted_bit_for_bit() -> None:
    model = seeded(NHWCFlatten())
    dense = convolutionalize(model, (8, 12))
    conv = dense.get_submodule("fc")
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (4, 6)
    assert torch.equal(conv_weight_to_linear(conv.weight, "hwc"), model.fc.weight)
    assert torch.equal(conv.bias, model.fc.bias)


def test_vgg_head_report() -> None:
    model = seeded(TinyVGG())
    conversion = convolutionalize_detailed(model, (12, 12), stride=(1, 2))
    dense = conversion.model
    kinds = {name: type(module).__name__ for name, module in dense.named_modules()}
    assert "avgpool" not in kinds  # identity at the native 3x3 map: removed
    assert [kinds[f"classifier.{i}"] for i in (0, 2, 3, 6)] == [
        "Conv2d",
        "Dropout",
        "Conv2d",
        "Conv2d",
    ]
    assert dense.get_submodule("classifier.0").stride == (1, 2)
    assert dense.get_submodule("classifier.3").kernel_size == (1, 1)
    assert conversion.window_stride == (4, 8)
    assert any("identity" in note and "avgpool" in note for note in conversion.notes)
    lines = [change.conv2d for change in conversion.changes if change.conv2d]
    assert lines[0] == "nn.Conv2d(6, 16, kernel_size=(3, 3), stride=(1, 2), padding=0, bias=True)"
    document = json.loads(json.dumps(conversion.to_dict()))
    assert document["order"] == "chw" and document["window_stride"] == [4, 8]


def test_batchnorm1d_becomes_batchnorm2d_with_the_same_buffers() -> None:
    model = seeded(BatchNormHead())
    dense = convolutionalize(model, (7, 7))
    twin = dense.get_submodule("bn")
    assert isinstance(twin, nn.BatchNorm2d)
    for name, tensor in model.bn.state_dict().items():
        assert torch.equal(twin.state_dict()[name], tensor)


def test_crop_account_of_a_padded_and_of_a_valid_trunk() -> None:
    model = seeded(TinyVGG())  # 3x3 convs with padding 1: a crop sees zeros at its borders
    dense = convolutionalize(model, (12, 12))
    check = verify_dense(model, dense, (12, 12))
    assert check and check.larger_size == (20, 20)  # two window steps of 4 pixels
    assert check.map_size == (3, 3) and check.crops.cells == 9
    # every cell reads padding at both ends of both axes in its crop: none is crop-exact
    assert check.crops.crop_exact == 0
    assert check.crops.max_abs_diff_other > 1e-3
    assert any(
        "'trunk.0'" in r and "(Conv2d)" in r and "both ends of H and W" in r
        for r in check.crops.reasons
    )
    assert len(check.warnings) == 1 and "not the model run on each crop" in check.warnings[0]
    # one line names the layers that share a call site, instead of repeating the site per layer
    (warning,) = check.warnings
    assert warning.count("'trunk.") >= 2 and warning.count("(Conv2d)") == 1
    # A trunk without padding and with pooling aligned to the windows: every crop agrees.
    valid = seeded(ViewFlatten())
    check = verify_dense(valid, convolutionalize(valid, (10, 10)), (10, 10), (16, 14))
    assert check and check.crops.cells == 12 and check.crops.crop_exact == 12
    scale = check.outputs[0].comparisons["dense"].reference_scale
    assert check.crops.max_abs_diff_exact <= check.tolerance * scale and not check.warnings
    assert json.loads(json.dumps(check.to_dict()))["crops"]["crop_exact"] == 12


def test_verify_dense_catches_a_wrong_order() -> None:
    model = seeded(WHCFlatten())
    dense = convolutionalize(model, (8, 12))
    conv = dense.get_submodule("fc1")
    with torch.no_grad():  # what a chw assumption would have produced
        conv.weight.copy_(model.fc1.weight.reshape(conv.weight.shape))
    check = verify_dense(model, dense, (8, 12))
    assert not check
    assert check.native_max_abs_diff > 1e-3
    assert "native size" in check.problems[0]


def test_head_on_windows_matches_the_reference() -> None:
    model = seeded(TorchFlatten())
    x = torch.randn(1, 2, 13, 15, generator=torch.Generator().manual_seed(3))
    got = head_on_windows(model, (8, 12), x, stride=1)
    torch.testing.assert_close(got, reference_map(model, x, (3, 5), (1, 1)))


def test_inplace_shares_the_trunk() -> None:
    model = seeded(sequential_flatten())
    dense = convolutionalize(model, (12, 12), inplace=True)
    assert dense.get_submodule("0") is model[0]
    copied = convolutionalize(model, (12, 12))
    assert copied.get_submodule("0") is not model[0]


def test_returned_in_eval_mode_even_from_a_model_in_training_mode() -> None:
    model = seeded(TinyVGG()).train()  # Dropout in the head, live
    bn_model = seeded(BatchNormHead()).train()
    conversion = convolutionalize_detailed(bn_model, (7, 7))
    assert not any(module.training for module in conversion.model.modules())
    assert all(module.training for module in bn_model.modules())  # the original keeps its flags
    assert any("training mode" in note and "eval mode" in note for note in conversion.notes)
    assert conversion.window_stride == (2, 2)
    dense = convolutionalize(model, (12, 12))
    assert not dense.training and not any(module.training for module in dense.modules())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(dense(x), dense(x), rtol=0, atol=0)  # no live Dropout
    assert verify_dense(model, dense, (12, 12))
    assert not convolutionalize(seeded(BatchNormHead()), (7, 7)).training


def test_layers_are_checked_against_the_head() -> None:
    model = seeded(TinyVGG())
    assert convolutionalize(model, (12, 12), layers=["classifier.0", "classifier.6"])
    assert convolutionalize(model, (12, 12), layers=["classifier.3"])  # any Linear of the head
    with pytest.raises(LayerError, match="its Linear layers are: classifier.0"):
        convolutionalize(model, (12, 12), layers=["fc"])


class FlattenThenBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.norm = nn.BatchNorm1d(2 * 4 * 4)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(torch.flatten(self.conv(x), 1)))


class GlobalPoolMinusBatchMean(nn.Module):
    """Centres the pooled features over the batch: not a function of one cell's vector."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.conv(x).mean((2, 3))
        return self.fc(pooled - pooled.mean(0, keepdim=True))


class LayerNormOverTheFlattenedMap(nn.Module):
    """LayerNorm over ``C·H·W`` mixes a window's cells: it has no per-cell twin."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.ln = nn.LayerNorm(2 * 4 * 4)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.ln(self.conv(x).flatten(1)))


class SoftmaxOverBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(self.conv(x).flatten(1)), dim=0)


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor):
        features = self.conv(x)
        return self.fc(features.flatten(1)), features


@pytest.mark.parametrize(
    ("factory", "error", "pattern"),
    [
        (
            DataDependent,
            UntraceableModelError,
            r"DataDependent branches on tensor values at tests/test_convolutionalize\.py:\d+ "
            r"\(`if x\.sum\(\) > 0:`\)",
        ),
        (FlattenThenBatchNorm, ConvolutionalizeError, r"'fc' \(Linear\) is fed by 'norm'"),
        (
            GlobalPoolMinusBatchMean,
            ConvolutionalizeError,
            r"node 'mean_1' \(Tensor\.mean\) after 'mean' .* at tests/test_conv",
        ),
        (LayerNormOverTheFlattenedMap, ConvolutionalizeError, r"'fc' \(Linear\) is fed by 'ln'"),
        (SoftmaxOverBatch, ConvolutionalizeError, r"node 'softmax'"),
        (
            TwoOutputs,
            ConvolutionalizeError,
            r"output '1' comes from 'conv' \(Conv2d\) at .*outputs=",
        ),
    ],
)
def test_refusals_name_the_node_and_the_weight_only_path(factory, error, pattern) -> None:
    with pytest.raises(error, match=pattern) as raised:
        convolutionalize(seeded(factory()), (6, 6))
    message = str(raised.value)
    assert "\n" not in message and "fcconv convert" in message
    assert raised.value.exit_code == 2


def test_wrong_input_size_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="does not run at input_size= 5x5: a 3x5x5 input fails"):
        convolutionalize(seeded(sequential_flatten()), (5, 5))


# ------------------------------------------------------------------ .pt2 export


LOADER = textwrap.dedent(
    """
    import sys, torch
    results = {}
    for name in sys.argv[1:]:
        program = torch.export.load(name + ".pt2").module()
        inputs = torch.load(name + ".inputs.pt")
        results[name] = [program(x) for x in inputs]
    assert not any(m.startswith(("fcconv", "test_")) for m in sys.modules), "user code loaded"
    torch.save(results, "outputs.pt")
    """
)


@pytest.mark.slow
def test_pt2_round_trip_in_a_fresh_process(tmp_path: Path) -> None:
    cases = {"vgg": (TinyVGG, (12, 12), 3), "whc": (WHCFlatten, (8, 12), 3)}
    expected = {}
    for name, (factory, native, channels) in cases.items():
        model = seeded(factory())
        dense = convolutionalize(model, native)
        info = save_exported(dense, tmp_path / f"{name}.pt2", (native[0] + 8, native[1] + 4))
        assert info.dynamic and info.roundtrip_max_abs_diff == 0.0, info.note
        assert not info.rejected_shapes and (1, channels, *native) in info.probed_shapes
        assert info.ranges["height"][0] == native[0] and info.ranges["batch"][0] == 1
        generator = torch.Generator().manual_seed(5)
        inputs = [
            torch.randn(1, channels, *native, generator=generator),  # 1x1 map
            torch.randn(3, channels, native[0] + 9, native[1] + 20, generator=generator),
        ]
        torch.save(inputs, tmp_path / f"{name}.inputs.pt")
        with torch.no_grad():
            expected[name] = [dense(x) for x in inputs]
    with pytest.raises(FcconvError, match="already exists"):
        save_exported(dense, tmp_path / "whc.pt2", (8, 12))
    done = subprocess.run(
        [sys.executable, "-I", "-c", LOADER, *cases],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outputs = torch.load(tmp_path / "outputs.pt")
    for name, tensors in expected.items():
        for got, want in zip(outputs[name], tensors, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not list(tmp_path.glob("*.fcconv-tmp"))


def test_state_dict_output_loads_into_a_hand_written_conv_head(tmp_path: Path) -> None:
    model = seeded(NHWCFlatten())
    dense = convolutionalize(model, (8, 12))
    path = save_state_dict(dense, tmp_path / "dense.safetensors")
    from safetensors.torch import load_file

    state = load_file(path)
    head = nn.Conv2d(4, 6, kernel_size=(4, 6), stride=(1, 1), padding=0, bias=True)
    head.load_state_dict({"weight": state["fc.weight"], "bias": state["fc.bias"]})
    assert torch.equal(head.weight, dense.get_submodule("fc").weight)


# ------------------------------------------------------------------ loading


def test_load_model_refuses_pickles_without_trust(tmp_path: Path) -> None:
    from fcconv.samples_models import tiny_vgg

    pickled = tmp_path / "model.pt"
    torch.save(tiny_vgg(), pickled)
    with pytest.raises(UnsafeCheckpointError, match="trust_pickle=True") as raised:
        load_model(pickled)
    assert "pass --trust-pickle if" in raised.value.render(CLI_NAMES)
    loaded = load_model(pickled, trust_pickle=True)
    assert not loaded.training and type(loaded).__name__ == "VGGStyle"
    weights = tmp_path / "weights.pt"
    torch.save(tiny_vgg().state_dict(), weights)
    with pytest.raises(FcconvError, match="only weights.*arch=") as raised:
        load_model(weights)
    assert "give --arch package.module:callable" in raised.value.render(CLI_NAMES)
    with pytest.raises(ArchitectureError, match="malformed arch="):
        load_model(weights, arch="fcconv.samples_models")
    with pytest.raises(ArchitectureError, match="has no attribute"):
        load_model(weights, arch="fcconv.samples_models:nope")
    with pytest.raises(FcconvError, match="does not fit arch="):
        load_model(weights, arch="fcconv.samples_models:keras_style")
    rebuilt = load_model(weights, arch="fcconv.samples_models:tiny_vgg")
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            rebuilt.state_dict().values(), tiny_vgg().state_dict().values(), strict=True
        )
    )


# ------------------------------------------------------------------ command line


@pytest.fixture
def archs(monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable module of factories for --arch, without touching sys.path."""
    module = types.ModuleType("fcconv_test_archs")
    module.data_dependent = lambda: seeded(DataDependent())
    module.layer_norm = lambda: seeded(LayerNormOverTheFlattenedMap())
    module.whc = lambda: seeded(WHCFlatten())
    monkeypatch.setitem(sys.modules, "fcconv_test_archs", module)
    return "fcconv_test_archs"


def invoke(*args: object):
    return CliRunner().invoke(cli_module.convolutionalize, [str(a) for a in args])


def test_cli_json_and_outputs(tmp_path: Path, archs: str) -> None:
    weights = tmp_path / "whc.safetensors"
    from safetensors.torch import save_file

    save_file(seeded(WHCFlatten()).state_dict(), weights)
    out, state = tmp_path / "whc.pt2", tmp_path / "whc-conv.pt"
    result = invoke(
        weights, "--arch", f"{archs}:whc", "--input", "8x12", "-o", out,
        "--stride", "2x1", "--state-dict-out", state, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["ok"] is True
    assert document["conversion"]["order"] == "whc"
    assert document["conversion"]["stride"] == [2, 1]
    assert document["verification"]["map_size"] == [3, 3]  # two window steps past 8x12
    assert document["export"]["dynamic"] is True
    assert out.exists() and torch.load(state)["fc1.weight"].shape == (10, 3, 4, 6)
    # without --json: nothing on stdout, the report on stderr
    result = invoke(weights, "--arch", f"{archs}:whc", "--input", "8x12", "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "whc" in result.stderr
    assert "fc1: nn.Conv2d(3, 10, kernel_size=(4, 6), stride=(1, 1)" in result.stderr


@pytest.mark.parametrize(
    ("arch", "error"),
    [("data_dependent", UntraceableModelError), ("layer_norm", ConvolutionalizeError)],
)
def test_cli_refusals_exit_2_and_write_nothing(tmp_path: Path, archs: str, arch, error) -> None:
    factory = getattr(sys.modules[archs], arch)
    weights = tmp_path / "w.pt"
    torch.save(factory().state_dict(), weights)
    result = invoke(
        weights, "--arch", f"{archs}:{arch}", "--input", "6x6", "-o", tmp_path / "o.pt2",
        "--state-dict-out", tmp_path / "o.pt",
    )  # fmt: skip
    assert isinstance(result.exception, error), result.output
    assert result.exception.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]


def test_cli_user_errors(tmp_path: Path, archs: str) -> None:
    from fcconv.samples_models import tiny_vgg

    pickled = tmp_path / "model.pt"
    torch.save(tiny_vgg(), pickled)
    result = invoke(pickled, "--input", "32x32", "-o", tmp_path / "o.pt2")
    assert isinstance(result.exception, UnsafeCheckpointError)
    result = invoke(pickled, "--input", "32by32", "-o", tmp_path / "o.pt2", "--trust-pickle")
    assert isinstance(result.exception, SpecError)
    existing = tmp_path / "exists.pt2"
    existing.write_bytes(b"keep me")
    result = invoke(pickled, "--input", "32x32", "-o", existing, "--trust-pickle")
    assert isinstance(result.exception, FcconvError) and "--force" in result.exception.render(
        CLI_NAMES
    )
    assert existing.read_bytes() == b"keep me"
    result = invoke(pickled, "--input", "32x32", "-o", "-", "--trust-pickle")
    assert isinstance(result.exception, SpecError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.pt2", "model.pt"]


def test_cli_exit_1_when_verification_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fcconv.samples_models import tiny_vgg

    pickled = tmp_path / "model.pt"
    torch.save(tiny_vgg(), pickled)
    real = lib.verify_dense

    def failing(*args, **kwargs):
        check = real(*args, **kwargs)
        check.problems.append("injected difference")
        return check

    monkeypatch.setattr(lib, "verify_dense", failing)
    result = invoke(
        pickled, "--trust-pickle", "--input", "32x32", "-o", tmp_path / "o.pt2", "--json"
    )
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["verification"]["problems"] == ["injected difference"]
    assert not (tmp_path / "o.pt2").exists()


def test_cli_help_names_every_option() -> None:
    result = CliRunner().invoke(cli_module.convolutionalize, ["--help"])
    assert result.exit_code == 0
    for option in ("--arch", "--layer", "--stride", "--trust-pickle", "--state-dict-out", "--json"):
        assert option in result.output


def test_registered_in_the_main_group(tmp_path: Path) -> None:
    """Through fcconv's own group: the one-line error and exit code 2."""
    cli = pytest.importorskip("fcconv.cli")
    main = getattr(cli, "main", None)
    if not isinstance(main, click.Group) or "convolutionalize" not in main.commands:
        pytest.skip("fcconv.cli.main does not carry the convolutionalize command yet")
    weights = tmp_path / "w.pt"
    torch.save({"x": torch.zeros(1)}, weights)
    result = CliRunner().invoke(
        main, ["convolutionalize", str(weights), "--input", "8x8", "-o", str(tmp_path / "o.pt2")]
    )
    assert result.exit_code == 2
    assert result.stderr.startswith("fcconv: error: ") and "--arch" in result.stderr
