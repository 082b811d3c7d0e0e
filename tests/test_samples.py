"""The shipped samples are what the committed script makes, and small.

Only what is reproducible on any x86-64 CPU is compared exactly: the file
names, keys, shapes, dtypes and non-tensor state. Values that come out of
floating-point work (training, and even seeded random initialisation, whose
kernels are compiled per instruction set) are compared by what they mean:
randomly initialised weights agree with a fresh run to a few units of
roundoff, and the trained heads still carry clear evidence of their own
flatten order.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fcconv.evidence import rank_orders
from fcconv.geometry import Patch
from fcconv.io.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_checkpoints"
TRAINED = {"trained_nchw": "chw", "trained_nhwc": "hwc"}
TRAINED_PATCH = Patch(6, 4, 16)
RANDOM_INIT = (
    "seed_fc.pt",
    "seed_fc.safetensors",
    "head_fc6_fc7.safetensors",
    "tiny_vgg.safetensors",
    "detector_stage.safetensors",
    "blob_net.safetensors",
    "seq_head.safetensors",
    "clip_head.safetensors",
)
# Regenerating means training two CNNs: seconds, so these run under `make test-slow`.
regenerated = pytest.mark.slow


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_samples.py"), str(out)],
        check=True,
        capture_output=True,
    )
    return out


def shipped_names() -> list[str]:
    # Outputs of the README's examples (model.conv.pt beside the input) are not samples.
    return sorted(p.name for p in SAMPLES.iterdir() if ".conv" not in p.name and p.is_file())


@regenerated
def test_the_script_makes_every_shipped_sample_and_nothing_else(made: Path) -> None:
    assert sorted(p.name for p in made.iterdir()) == shipped_names()
    for name in shipped_names():
        assert (SAMPLES / name).stat().st_size < 2_000_000, name


KERAS_SAMPLES = ("keras_cnn.keras", "keras_cnn.weights.h5")
ONNX_SAMPLES = ("tiny_cnn.onnx",)
IMAGE_SAMPLES = ("blobs.png",)


def checkpoint_names() -> list[str]:
    others = KERAS_SAMPLES + ONNX_SAMPLES + IMAGE_SAMPLES
    return [name for name in shipped_names() if name not in others]


@regenerated
@pytest.mark.parametrize("name", IMAGE_SAMPLES)
def test_image_samples_agree_pixel_by_pixel(made: Path, name: str) -> None:
    from PIL import Image

    shipped = np.asarray(Image.open(SAMPLES / name), dtype=np.int16)
    fresh = np.asarray(Image.open(made / name), dtype=np.int16)
    assert shipped.shape == fresh.shape
    assert np.abs(shipped - fresh).max() <= 1  # rounding of float64 discs to 8 bits


def _without_object_ids(value: object) -> object:
    """A Keras config without ``shared_object_id`` (a memory address, new every run)."""
    if isinstance(value, dict):
        return {k: _without_object_ids(v) for k, v in value.items() if k != "shared_object_id"}
    if isinstance(value, list):
        return [_without_object_ids(v) for v in value]
    return value


@regenerated
@pytest.mark.parametrize("name", KERAS_SAMPLES)
def test_keras_samples_agree_by_meaning(made: Path, name: str) -> None:
    from fcconv.io.keras import read_keras

    shipped, fresh = read_keras(SAMPLES / name), read_keras(made / name)
    assert _without_object_ids(shipped.config) == _without_object_ids(fresh.config)
    before, after = shipped.checkpoint().tensors, fresh.checkpoint().tensors
    assert list(before) == list(after)
    for key, tensor in before.items():
        torch.testing.assert_close(tensor, after[key], rtol=1e-6, atol=1e-7)


@regenerated
@pytest.mark.parametrize("name", ONNX_SAMPLES)
def test_onnx_samples_agree_by_meaning(made: Path, name: str) -> None:
    import onnx
    from onnx import numpy_helper

    shipped, fresh = onnx.load(SAMPLES / name), onnx.load(made / name)
    assert [n.op_type for n in shipped.graph.node] == [n.op_type for n in fresh.graph.node]
    assert shipped.graph.input == fresh.graph.input and shipped.graph.output == fresh.graph.output
    for before, after in zip(shipped.graph.initializer, fresh.graph.initializer, strict=True):
        assert before.name == after.name
        np.testing.assert_allclose(
            numpy_helper.to_array(before), numpy_helper.to_array(after), rtol=1e-6, atol=1e-7
        )


@regenerated
@pytest.mark.parametrize("name", checkpoint_names())
def test_same_keys_shapes_and_dtypes(made: Path, name: str) -> None:
    shipped, fresh = load_checkpoint(SAMPLES / name), load_checkpoint(made / name)
    assert list(shipped.tensors) == list(fresh.tensors)
    for key, tensor in shipped.tensors.items():
        assert (tensor.shape, tensor.dtype) == (fresh.tensors[key].shape, fresh.tensors[key].dtype)
    assert shipped.metadata == fresh.metadata


@regenerated
@pytest.mark.parametrize("name", RANDOM_INIT)
def test_randomly_initialised_values_agree_to_roundoff(made: Path, name: str) -> None:
    shipped, fresh = load_checkpoint(SAMPLES / name), load_checkpoint(made / name)
    for key, tensor in shipped.tensors.items():
        torch.testing.assert_close(tensor, fresh.tensors[key], rtol=1e-6, atol=1e-7)


@regenerated
def test_training_checkpoint_keeps_its_state_around_the_weights(made: Path) -> None:
    shipped = load_checkpoint(SAMPLES / "training_checkpoint.pt").container
    fresh = load_checkpoint(made / "training_checkpoint.pt").container
    assert shipped.keys() == fresh.keys() == {"state_dict", "optimizer", "epoch", "hparams"}
    assert shipped["epoch"] == fresh["epoch"] and shipped["hparams"] == fresh["hparams"]
    assert shipped["optimizer"]["param_groups"] == fresh["optimizer"]["param_groups"]
    assert all(key.startswith("model.") for key in shipped["state_dict"])


def _assert_clear_evidence(path: Path, order: str) -> None:
    evidence = rank_orders(load_checkpoint(path).tensors["fc.weight"], TRAINED_PATCH)
    assert evidence.winner == order, (path, evidence.reason)
    assert evidence.margin is not None and evidence.margin >= 0.2, evidence.reason
    assert evidence.margin_sigmas is not None and evidence.margin_sigmas >= 12, evidence.reason


@pytest.mark.parametrize("stem", sorted(TRAINED))
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_shipped_trained_heads_carry_clear_evidence_of_their_order(stem: str, suffix: str) -> None:
    _assert_clear_evidence(SAMPLES / f"{stem}{suffix}", TRAINED[stem])


@regenerated
@pytest.mark.parametrize("stem", sorted(TRAINED))
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_retrained_heads_carry_clear_evidence_of_their_order(
    made: Path, stem: str, suffix: str
) -> None:
    _assert_clear_evidence(made / f"{stem}{suffix}", TRAINED[stem])
