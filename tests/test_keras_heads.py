"""Keras models as people publish them: the order read from the file, heads that fan out,
per-cell layers, global pooling, Keras 2-era configs and nested models.

The references are Keras's own layers (or numpy): a converted kernel is right
when ``conv2d(map, kernel)`` equals what the model's own ``Flatten`` (after
its ``Permute``) and ``Dense`` kernel compute on the same map; a converted
model is right when every cell of every output equals the original model's
layers applied to that cell's window of the trunk's map, computed here by
calling the original's layers one by one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import keras_models as km
import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# model → (builder, the Dense that reads the map, the layer whose map it reads, its H x W x C,
#          the order the config gives, layout)
MODELS = {
    "rnet": (km.mtcnn_rnet, "fc4", "prelu3", "flatten", "3x3x64", "cwh", "channels_last"),
    "cf": (km.channels_first_net, "fc1", "c1", "flat", "5x4x6", "chw", "channels_first"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each model saved as .keras, .h5 and .weights.h5 (built once for the module)."""
    import os

    os.environ.setdefault("KERAS_BACKEND", "torch")
    folder = tmp_path_factory.mktemp("keras_heads")
    found = {}
    builders = {**{k: v[0] for k, v in MODELS.items()}, "onet": km.mtcnn_onet}
    builders["gap"] = km.global_pool_net
    builders["gmp"] = lambda: km.global_pool_net("max")
    builders["nested"] = km.nested_net
    for name, build in builders.items():
        model = build()
        for suffix in (".keras", ".h5", ".weights.h5"):
            found[f"{name}{suffix}"] = km.save(model, folder / f"{name}{suffix}")
    return found


def _np(tensor: Any) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(tensor), dtype=np.float64)


def _keras_truth(model_path: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The map the Dense layer reads (as NCHW) and its output before any activation, both
    computed by the model's own layers (Keras flattens, numpy multiplies)."""
    import keras

    _, dense, feeder, flatten, _, _, layout = MODELS[name]
    model = keras.saving.load_model(model_path, compile=False)
    x = np.random.default_rng(4).standard_normal((3, *model.inputs[0].shape[1:]))
    x = x.astype(np.float32)
    grab = keras.Model(
        model.inputs[0], [model.get_layer(feeder).output, model.get_layer(flatten).output]
    )
    feature_map, flat = (_np(t) for t in grab(x))
    kernel, bias = (np.asarray(w, np.float64) for w in model.get_layer(dense).get_weights())
    if layout == "channels_last":
        feature_map = feature_map.transpose(0, 3, 1, 2)
    return feature_map, flat @ kernel + bias


def _conv_out(feature_map: np.ndarray, weight: torch.Tensor, bias: torch.Tensor) -> np.ndarray:
    out = F.conv2d(torch.from_numpy(feature_map), weight.double(), bias.double())
    return out.flatten(1).numpy()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_weights_only_routes_read_the_order_from_the_config(invoke, files, tmp_path, name, suffix):
    _, dense, _, _, patch, order, _ = MODELS[name]
    out = tmp_path / "w.pt"
    source = files[f"{name}{suffix}"]
    args = ("convert", source, "-o", out, "--format", "torch", "--layer", f"{dense}={patch}")
    document = json.loads(invoke(*args, "--json").stdout)
    layer = document["layers"][0]
    assert (layer["order"], layer["order_from"]) == (order, "model")
    feature_map, expected = _keras_truth(files[f"{name}.keras"], name)
    converted = torch.load(out, weights_only=True)
    got = _conv_out(feature_map, converted[f"{dense}.weight"], converted[f"{dense}.bias"])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # the patch may be left out: the config knows the map
    invoke("convert", source, "-o", tmp_path / "w2.pt", "--format", "torch", "--layer", dense)


def test_a_weights_file_states_its_default_order(invoke, files, tmp_path) -> None:
    source = files["rnet.weights.h5"]
    args = (
        "convert",
        source,
        "-o",
        tmp_path / "w.pt",
        "--format",
        "torch",
        "--layer",
        "fc4=3x3x64",
    )
    result = invoke(*args, "--json")
    document = json.loads(result.stdout)
    assert (document["layers"][0]["order"], document["layers"][0]["order_from"]) == (
        "hwc",
        "default",
    )
    assert len(document["warnings"]) == 1 and "Permute" in document["warnings"][0]
    human = invoke(*args[:3], tmp_path / "w1.pt", *args[4:])
    warnings = [line for line in human.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "hwc" in warnings[0]
    # asserting the order the model uses gives the right kernel, recorded as a flag
    flagged = json.loads(
        invoke(*args[:3], tmp_path / "w2.pt", *args[4:], "--order", "cwh", "--json").stdout
    )
    assert flagged["layers"][0]["order_from"] == "flag" and not flagged["warnings"]
    feature_map, expected = _keras_truth(files["rnet.keras"], "rnet")
    converted = torch.load(tmp_path / "w2.pt", weights_only=True)
    got = _conv_out(feature_map, converted["fc4.weight"], converted["fc4.bias"])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_flag_against_the_config_is_said(invoke, files, tmp_path) -> None:
    args = ("convert", files["rnet.keras"], "-o", tmp_path / "w.pt", "--format", "torch")
    document = json.loads(invoke(*args, "--layer", "fc4", "--order", "hwc", "--json").stdout)
    assert document["layers"][0]["order_from"] == "flag"
    assert any("cwh" in line for line in document["warnings"])


def test_a_patch_against_the_config_is_refused(invoke, files, tmp_path) -> None:
    args = ("convert", files["rnet.keras"], "-o", tmp_path / "w.pt", "--format", "torch")
    result = invoke(*args, "--layer", "fc4=6x6x16", exit=2)
    assert result.stderr.count("\n") == 1 and "3x3x64" in result.stderr
    assert not (tmp_path / "w.pt").exists()


# ----------------------------------------------------------- whole models in Keras


def _head_on_windows(
    original: Any, names: list[str], features: np.ndarray, window: tuple[int, int]
) -> list[np.ndarray]:
    """Every output of the original's head on every window (stride 1), calling its layers."""
    batch, height, width, _ = features.shape
    rows, cols = height - window[0] + 1, width - window[1] + 1
    crops = [
        features[:, p : p + window[0], q : q + window[1]] for p in range(rows) for q in range(cols)
    ]
    x = np.stack(crops, 1).reshape(-1, window[0], window[1], features.shape[-1])
    outputs = []
    for branch in names:
        y = x
        for layer in branch.split(">"):
            y = original.get_layer(layer)(y)
        outputs.append(_np(y).reshape(batch, rows, cols, -1))
    return outputs


HEADS = {
    # model: (trunk's last layer, the head's layers per output, the first conv's window)
    "rnet": ("prelu3", ["permute>flatten>fc4>prelu4>fc5-1", "permute>flatten>fc4>prelu4>fc5-2"]),
    "onet": (
        "prelu4",
        [f"permute>flatten>fc5>prelu5>fc6-{i}" for i in (1, 2, 3)],
    ),
    "gap": ("c2", ["gap>fc1>bn>act>ln>fc2"]),
    "gmp": ("c2", ["gmp>fc1>bn>act>ln>fc2"]),
}


def _trunk_features(original: Any, last: str, x: np.ndarray) -> np.ndarray:
    """The original's trunk on a larger input: its layers called one by one (a chain)."""
    y: Any = x
    for layer in original.layers[1:]:
        y = layer(y)
        if layer.name == last:
            return _np(y)
    raise AssertionError(last)


@pytest.mark.parametrize("name", ["rnet", "gap", "gmp", "onet"])
def test_a_whole_model_converts_and_every_head_equals_the_original_on_every_window(
    invoke, files, tmp_path, name
) -> None:
    import keras

    out = tmp_path / f"{name}.conv.keras"
    document = json.loads(
        invoke("convert", files[f"{name}.keras"], "-o", out, "--stride", "1", "--json").stdout
    )
    assert document["verification"]["runtime"][0]["passed"]
    original = keras.saving.load_model(files[f"{name}.keras"], compile=False)
    converted = keras.saving.load_model(out, compile=False)
    native = tuple(original.inputs[0].shape[1:3])
    big = np.random.default_rng(9).standard_normal((2, native[0] + 9, native[1] + 7, 3))
    big = big.astype(np.float32)
    last, branches = HEADS[name]
    features = _trunk_features(original, last, big)
    window = tuple(_trunk_features(original, last, big[:, : native[0], : native[1]]).shape[1:3])
    expected = _head_on_windows(original, branches, features, window)
    got = converted(big)
    got = [_np(y) for y in (got if isinstance(got, list | tuple) else [got])]
    assert len(got) == len(expected) > 0
    for mine, theirs in zip(got, expected, strict=True):
        assert mine.shape == theirs.shape and mine.shape[1] * mine.shape[2] > 1
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5)


def test_a_wrong_order_on_a_whole_model_fails_in_keras(invoke, files, tmp_path) -> None:
    out = tmp_path / "bad.keras"
    invoke("convert", files["rnet.keras"], "-o", out, "--order", "hwc", exit=1)
    assert not out.exists()


def test_a_legacy_h5_with_a_fanned_out_head_converts_and_loads(invoke, files, tmp_path):
    import keras

    out = tmp_path / "rnet.conv.h5"
    invoke("convert", files["rnet.h5"], "-o", out)
    invoke("verify", files["rnet.h5"], out)
    converted = keras.saving.load_model(out, compile=False)
    maps = converted(np.zeros((1, 48, 48, 3), np.float32))
    assert [tuple(m.shape) for m in maps] == [(1, 3, 3, 2), (1, 3, 3, 4)]


@pytest.mark.parametrize(
    ("name", "layer"),
    [("cf", "'flat'"), ("nested", "Flatten")],
)
def test_models_fcconv_cannot_rewrite_are_refused_in_one_line(invoke, files, tmp_path, name, layer):
    out = tmp_path / "x.keras"
    result = invoke("convert", files[f"{name}.keras"], "-o", out, exit=2)
    assert result.stderr.startswith("fcconv: error: ") and result.stderr.count("\n") == 1
    assert layer in result.stderr and not out.exists()


# ----------------------------------------------------------- Keras 2 files, nested models


@pytest.mark.parametrize("style", ["2.0", "2.2"])
def test_keras2_h5_files_are_read_with_their_order(invoke, tmp_path, style) -> None:
    source = tmp_path / f"k{style}.h5"
    weights = km.keras2_h5(source, style, np.random.default_rng(2))
    listed = json.loads(invoke("inspect", source, "--json").stdout)
    assert {layer["name"] for layer in listed["layers"]} == {"fc1", "fc2"}
    document = json.loads(
        invoke(
            "convert",
            source,
            "-o",
            tmp_path / "w.pt",
            "--format",
            "torch",
            "--layer",
            "fc1",
            "--json",
        ).stdout
    )
    assert (document["layers"][0]["order"], document["layers"][0]["order_from"]) == ("chw", "model")
    assert document["layers"][0]["patch"] == "6x6x4"
    # numpy: the map [6, 6, 4] permuted to [4, 6, 6] and flattened, times the Dense kernel
    feature_map = np.random.default_rng(3).standard_normal((2, 6, 6, 4))
    expected = feature_map.transpose(0, 3, 1, 2).reshape(2, -1) @ weights["fc1"]["kernel"]
    expected += weights["fc1"]["bias"]
    converted = torch.load(tmp_path / "w.pt", weights_only=True)
    got = _conv_out(
        feature_map.transpose(0, 3, 1, 2), converted["fc1.weight"], converted["fc1.bias"]
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # the whole model: its config rewritten in its own era's form
    out = tmp_path / "k.conv.h5"
    invoke("convert", source, "-o", out)
    invoke("verify", source, out)


def test_a_keras22_model_converted_loads_in_keras(invoke, tmp_path) -> None:
    import keras

    source, out = tmp_path / "k.h5", tmp_path / "k.conv.h5"
    weights = km.keras2_h5(source, "2.2", np.random.default_rng(2))
    invoke("convert", source, "-o", out, "--stride", "1")
    model = keras.saving.load_model(out, compile=False)
    x = np.random.default_rng(5).standard_normal((1, 10, 9, 3)).astype(np.float32)
    got = _np(model([x]))  # a Keras 2 Model lists its inputs
    assert got.shape == (1, 3, 2, 3)
    original = keras.saving.load_model(source, compile=False)
    for p in range(3):
        for q in range(2):
            crop = x[:, p : p + 8, q : q + 8]
            np.testing.assert_allclose(got[:, p, q], _np(original([crop])), rtol=1e-4, atol=1e-5)
    del weights


def test_dense_layers_inside_nested_models_are_seen(invoke, files, tmp_path) -> None:
    for suffix in (".keras", ".h5", ".weights.h5"):
        listed = json.loads(invoke("inspect", files[f"nested{suffix}"], "--json").stdout)
        assert {layer["name"] for layer in listed["layers"]} == {"head.fc1", "fc2"}
    out = tmp_path / "n.pt"
    args = ("convert", files["nested.keras"], "-o", out, "--format", "torch")
    document = json.loads(invoke(*args, "--layer", "head.fc1", "--json").stdout)
    assert document["layers"][0]["patch"] == "4x4x6"
    assert document["layers"][0]["order_from"] == "model"


def test_inspect_shows_the_head_it_read(invoke, files) -> None:
    head = json.loads(invoke("inspect", files["rnet.keras"], "--json").stdout)["head"]
    assert head["found"] and head["permute"] == ["permute"] and head["flatten"] == "flatten"
    assert (head["feature_map"], head["order"], head["order_from"]) == ("3x3x64", "cwh", "model")
    assert head["dense"] == ["fc4", "fc5-1", "fc5-2"] and head["outputs"] == ["fc5-1", "fc5-2"]
    human = invoke("inspect", files["rnet.keras"]).stderr
    assert "cwh" in human and "permute" in human
    weights = json.loads(invoke("inspect", files["rnet.weights.h5"], "--json").stdout)["head"]
    assert not weights["found"] and weights["order_from"] == "default"
    refused = json.loads(invoke("inspect", files["cf.keras"], "--json").stdout)["head"]
    assert not refused["found"] and (refused["order"], refused["order_from"]) == ("chw", "model")


def test_the_orders_a_model_uses_are_read_for_every_dense_that_reads_a_map(files) -> None:
    from fcconv.keras.summary import model_orders

    assert {k: v[0] for k, v in model_orders(files["rnet.keras"]).items()} == {"fc4": "cwh"}
    assert {k: v[0] for k, v in model_orders(files["cf.h5"]).items()} == {"fc1": "chw"}
    assert {k: v[0] for k, v in model_orders(files["nested.keras"]).items()} == {"head.fc1": "hwc"}
    assert model_orders(files["rnet.weights.h5"]) == {}


def test_verify_judges_a_keras_conversion_against_the_models_order(invoke, files, tmp_path):
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    args = ("convert", files["rnet.keras"], "--format", "torch", "--layer", "fc4")
    invoke(*args, "-o", good)
    invoke(*args, "-o", bad, "--order", "hwc")  # a torch .pt keeps no record of the order
    document = json.loads(invoke("verify", files["rnet.keras"], good, "--json").stdout)
    layer = document["layers"][0]
    assert (layer["order"], layer["order_from"]) == ("cwh", "model")
    failed = json.loads(invoke("verify", files["rnet.keras"], bad, "--json", exit=1).stdout)
    assert (failed["layers"][0]["order"], failed["layers"][0]["order_from"]) == ("cwh", "model")
    assert any("hwc" in problem for problem in failed["layers"][0]["problems"])
