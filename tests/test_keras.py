"""Keras 3 files: inspect, convert and verify, checked against Keras's own definitions.

The references here are independent of fcconv: a Keras Dense kernel ``[N, O]``
fed NHWC-flattened patches is, as a Conv2D kernel, its reshape to
``[kh, kw, C, O]`` (Keras's Flatten is a row-major reshape of a channels-last
map), and a converted model's map cell equals the *original model* run on
the matching crop when the trunk does not pad. Tests that run Keras import it
on its torch backend (conftest points ``KERAS_HOME`` at a temp folder).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from reference import bitwise_equal, kernel_of

# Keras's torch backend calls np.array(tensor) as NumPy 2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CNN = "keras_cnn"
FEATURES = (8, 6, 6)  # the map the head of keras_cnn reads: H, W, C


def h5_array(path: Path, dataset: str) -> np.ndarray:
    with h5py.File(path, "r") as handle:
        return handle[dataset][()]


def keras_weights(path: Path) -> h5py.File:
    """The weights h5 of a .keras zip, opened from memory."""
    import io

    with zipfile.ZipFile(path) as archive:
        return h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")


def test_inspect_lists_dense_layers_as_linear_entries(invoke, samples: Path) -> None:
    result = invoke("inspect", samples / f"{CNN}.keras", "--channels", "6", "--json")
    document = json.loads(result.stdout)
    assert document["format"] == "keras"
    layers = {layer["name"]: layer for layer in document["layers"]}
    assert (layers["fc6"]["out_features"], layers["fc6"]["in_features"]) == (32, 288)
    assert "8x6x6" in layers["fc6"]["patches"]
    assert (layers["fc7"]["out_features"], layers["fc7"]["in_features"]) == (10, 32)


def test_weights_file_kernels_become_keras_conv2d_kernels(invoke, samples, tmp_path) -> None:
    source, out = samples / f"{CNN}.weights.h5", tmp_path / "cnn.conv.weights.h5"
    invoke("convert", source, "-o", out, "--layer", "fc6=8x6x6", "--layer", "fc7=1x1")
    dense6 = h5_array(source, "layers/dense/vars/0")
    dense7 = h5_array(source, "layers/dense_1/vars/0")
    # Keras names a layer's group after its class, in the model's order: the trunk's
    # Conv2D keeps conv2d, the two Dense layers become conv2d_1 and conv2d_2.
    with h5py.File(out, "r") as handle:
        assert handle["layers/conv2d_1/vars"].attrs["name"] == "fc6"
        kernel6 = handle["layers/conv2d_1/vars/0"][()]
        kernel7 = handle["layers/conv2d_2/vars/0"][()]
        trunk, bias6 = handle["layers/conv2d/vars/0"][()], handle["layers/conv2d_1/vars/1"][()]
    assert np.array_equal(trunk, h5_array(source, "layers/conv2d/vars/0"))
    assert np.array_equal(bias6, h5_array(source, "layers/dense/vars/1"))
    with h5py.File(out, "r") as handle:
        assert "layers/dense" not in handle
    assert kernel6.tobytes() == dense6.reshape(*FEATURES, 32).tobytes()
    assert kernel7.tobytes() == dense7.reshape(1, 1, 32, 10).tobytes()
    invoke("verify", source, out)


def test_format_torch_writes_pytorch_layout(invoke, samples, tmp_path) -> None:
    out = tmp_path / "cnn.pt"
    invoke("convert", samples / f"{CNN}.keras", "--format", "torch", "-o", out)
    state = torch.load(out, weights_only=True)
    with keras_weights(samples / f"{CNN}.keras") as handle:
        conv = torch.from_numpy(handle["layers/conv2d/vars/0"][()])
        dense = torch.from_numpy(handle["layers/dense/vars/0"][()])
    assert bitwise_equal(state["conv.weight"], conv.permute(3, 2, 0, 1).contiguous())
    expected = kernel_of(dense.T.contiguous(), 6, 8, 6, "hwc")
    assert bitwise_equal(state["fc6.weight"], expected.contiguous())
    assert state["fc7.weight"].shape == (10, 32, 1, 1)
    invoke("verify", samples / f"{CNN}.keras", out)
    invoke("verify", samples / f"{CNN}.keras", out, "--order", "chw", exit=1)


def test_default_output_names(invoke, samples, tmp_path) -> None:
    import shutil

    for name in (f"{CNN}.weights.h5",):
        shutil.copy(samples / name, tmp_path / name)
    invoke("convert", tmp_path / f"{CNN}.weights.h5", "--layer", "fc6=8x6x6", "--no-verify")
    assert (tmp_path / f"{CNN}.conv.weights.h5").is_file()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--flip"], "never flips"),
        (["-o", "{tmp}/x.h5"], "same kind"),
        (["-o", "{tmp}/x.keras", "--format", "torch"], "named as a Keras file"),
        (["--layer", "fc7=1x1"], "rewritten whole"),
        (["--patch", "4x12x6"], "feature map"),
    ],
)
def test_keras_model_refusals_are_one_line_and_write_nothing(
    invoke, samples, tmp_path, args, words
) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out.keras")]
    result = invoke("convert", samples / f"{CNN}.keras", *args, exit=2)
    assert result.stderr.startswith("fcconv: error: ") and words in result.stderr
    assert result.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_keras_file_is_refused(invoke, samples, tmp_path) -> None:
    broken = tmp_path / "broken.keras"
    data = (samples / f"{CNN}.keras").read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    result = invoke("convert", broken, "-o", tmp_path / "out.keras", exit=2)
    assert result.stderr.startswith("fcconv: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.keras"]


def test_missing_extra_names_the_install_command(invoke, samples, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "h5py", None)  # as if it were not installed
    result = invoke("inspect", samples / f"{CNN}.weights.h5", exit=2)
    assert "pip install 'fcconv[keras]'" in result.stderr
    assert result.stderr.count("\n") == 1


# ------------------------------------------------------------ run in Keras


def _crops_match_the_map(original_path: Path, converted_path: Path, size, stride) -> None:
    """Every map cell equals the original model on its crop (the trunk does not pad)."""
    import keras

    original = keras.saving.load_model(original_path)
    converted = keras.saving.load_model(converted_path)
    native = tuple(original.inputs[0].shape[1:3])
    x = np.random.default_rng(3).standard_normal((2, *size, 3)).astype(np.float32)
    dense = keras.ops.convert_to_numpy(converted(x))
    rows, cols = dense.shape[1:3]
    assert rows >= 2 and cols >= 2
    for p in range(rows):
        for q in range(cols):
            top, left = p * stride[0], q * stride[1]
            crop = x[:, top : top + native[0], left : left + native[1]]
            expected = keras.ops.convert_to_numpy(original(crop))
            np.testing.assert_allclose(dense[:, p, q], expected, rtol=1e-5, atol=1e-5)


def test_a_keras_model_converts_and_its_map_matches_crops(invoke, samples, tmp_path) -> None:
    out = tmp_path / "cnn.conv.keras"
    result = invoke("convert", samples / f"{CNN}.keras", "-o", out, "--json")
    document = json.loads(result.stdout)
    (runtime,) = document["verification"]["runtime"]
    assert runtime["passed"] and runtime["windows"] >= 4
    assert [layer["order"] for layer in document["layers"]] == ["hwc", "hwc"]
    with zipfile.ZipFile(out) as archive:
        config = json.loads(archive.read("config.json"))
        assert "fcconv" in json.loads(archive.read("metadata.json"))
    classes = [layer["class_name"] for layer in config["config"]["layers"]]
    assert classes == ["InputLayer", "Conv2D", "MaxPooling2D", "Conv2D", "Conv2D"]
    # trunk: conv 3x3 valid, pool 2: windows of 8x6 map cells lie 16x12 pixels apart
    _crops_match_the_map(samples / f"{CNN}.keras", out, (50, 38), (16, 12))
    invoke("verify", samples / f"{CNN}.keras", out)


def test_a_wrong_order_fails_in_keras_and_writes_nothing(invoke, samples, tmp_path) -> None:
    out = tmp_path / "cnn.conv.keras"
    result = invoke("convert", samples / f"{CNN}.keras", "-o", out, "--order", "chw", exit=1)
    assert "DIFFERS" in result.stderr and "not written" in result.stderr
    assert list(tmp_path.iterdir()) == []
    invoke("convert", samples / f"{CNN}.keras", "-o", out, "--order", "chw", "--no-verify")
    result = invoke("verify", samples / f"{CNN}.keras", out, "--json", exit=1)
    assert not json.loads(result.stdout)["runtime"][0]["passed"]


def _build(kind: str, path: Path) -> None:
    import keras
    from keras import layers

    keras.utils.set_random_seed(1)
    image = keras.Input((12, 10, 3), name="img")
    x = layers.Conv2D(4, 3, activation="relu", name="c1")(image)
    x = layers.BatchNormalization(name="bn")(x)
    if kind == "permute":
        x = layers.Permute((3, 1, 2), name="nchw")(x)  # flattened as C, H, W
    x = layers.Flatten(name="flat")(x)
    x = layers.Dense(8, activation="relu", name="fc6")(x)
    x = layers.Dropout(0.5, name="drop")(x)
    scores = layers.Dense(5, activation="softmax", name="fc7")(x)
    keras.Model(image, scores).save(path)


@pytest.mark.slow
def test_a_functional_model_with_permute_takes_its_order_from_the_config(invoke, tmp_path):
    model, out = tmp_path / "f.keras", tmp_path / "f.conv.keras"
    _build("permute", model)
    result = invoke("convert", model, "-o", out, "--stride", "1x1", "--json")
    assert [layer["order"] for layer in json.loads(result.stdout)["layers"]] == ["chw", "chw"]
    _crops_match_the_map(model, out, (15, 14), (1, 1))
    invoke("convert", model, "-o", tmp_path / "bad.keras", "--order", "hwc", exit=1)


@pytest.mark.slow
def test_a_legacy_h5_model_converts_and_runs_on_larger_inputs(invoke, tmp_path) -> None:
    import warnings

    model, out = tmp_path / "m.h5", tmp_path / "m.conv.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _build("plain", model)
    invoke("convert", model, "-o", out)
    _crops_match_the_map(model, out, (22, 18), (10, 8))
    invoke("verify", model, out)


def test_converted_weights_load_into_the_model_with_conv2d_layers(invoke, samples, tmp_path):
    import keras
    from keras import layers

    out = tmp_path / "cnn.conv.weights.h5"
    invoke(
        "convert", samples / f"{CNN}.weights.h5", "-o", out, "--layer", "fc6=8x6x6",
        "--layer", "fc7=1x1", "--stride", "1x1",
    )  # fmt: skip
    dense = keras.Sequential(
        [
            keras.Input((None, None, 3)),
            layers.Conv2D(6, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(32, (8, 6), activation="relu"),
            layers.Conv2D(10, 1),
        ]
    )
    dense.load_weights(out)
    original = keras.saving.load_model(samples / f"{CNN}.keras")
    x = np.random.default_rng(5).standard_normal((2, 20, 16, 3)).astype(np.float32)
    scores = keras.ops.convert_to_numpy(dense(x))
    assert scores.shape == (2, 2, 2, 10)  # 9x7 map, 8x6 windows at stride 1
    for p in range(2):
        for q in range(2):
            crop = x[:, 2 * p : 2 * p + 18, 2 * q : 2 * q + 14]
            expected = keras.ops.convert_to_numpy(original(crop))
            np.testing.assert_allclose(scores[:, p, q], expected, rtol=1e-5, atol=1e-5)


def test_the_library_converts_a_keras_model(samples, tmp_path) -> None:
    import fcconv

    result = fcconv.convert_checkpoint(samples / f"{CNN}.keras", tmp_path / "c.keras", layers=[])
    assert result and result.exit_code == 0
    assert [plan.name for plan in result.plans] == ["fc6", "fc7"]
    assert result.to_dict()["verification"]["runtime"][0]["passed"]
    check = fcconv.verify_checkpoints(samples / f"{CNN}.keras", tmp_path / "c.keras")
    assert check and check.runtime[0].windows == 4


def test_order_evidence_says_a_flip_cannot_be_seen(invoke, samples) -> None:
    result = invoke("inspect", samples / "trained_nhwc.pt", "--patch", "6x4x16", "--json")
    evidence = json.loads(result.stdout)["order_evidence"]["fc"]
    assert "cannot be seen" in evidence["flip"]
    human = invoke("inspect", samples / "trained_nhwc.pt", "--patch", "6x4x16")
    assert "flip" in " ".join(human.stderr.split())
