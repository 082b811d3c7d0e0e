"""``--flip``: kernels for a framework that convolves, recorded, and understood by ``verify``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from reference import bitwise_equal, kernel_of
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def _convert_flipped(invoke, samples: Path, out: Path) -> None:
    invoke(
        "convert", samples / "seed_fc.safetensors", "-o", out, "--layer", "fc",
        "--patch", "20x20x10", "--flip",
    )  # fmt: skip


def test_flip_writes_the_reversed_kernel_and_records_it(invoke, samples, tmp_path) -> None:
    out = tmp_path / "flip.safetensors"
    _convert_flipped(invoke, samples, out)
    weight = load_file(samples / "seed_fc.safetensors")["fc.weight"]
    kernel = load_file(out)["fc.weight"]
    assert bitwise_equal(kernel, kernel_of(weight, 10, 20, 20, "chw").flip(2, 3).contiguous())
    with safe_open(str(out), "pt") as handle:
        record = json.loads(handle.metadata()["fcconv"])
    assert record["layers"]["fc"]["flip"] is True
    result = invoke("verify", samples / "seed_fc.safetensors", out, "--json")
    assert json.loads(result.stdout)["layers"][0]["flip"] is True


def test_verify_names_an_unrecorded_flip_and_fails_without_flip(invoke, samples, tmp_path) -> None:
    out, bare = tmp_path / "flip.safetensors", tmp_path / "bare.safetensors"
    _convert_flipped(invoke, samples, out)
    with safe_open(str(out), framework="pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "fcconv"}
    save_file(load_file(out), str(bare), metadata=metadata)  # the provenance is gone
    result = invoke("verify", samples / "seed_fc.safetensors", bare, exit=1)
    assert "spatial axes flipped" in " ".join(result.stderr.split())
    invoke("verify", samples / "seed_fc.safetensors", bare, "--flip")


def test_verify_flip_on_an_unflipped_kernel_fails(invoke, samples, tmp_path) -> None:
    out = tmp_path / "plain.safetensors"
    invoke(
        "convert", samples / "seed_fc.safetensors", "-o", out, "--layer", "fc",
        "--patch", "20x20x10",
    )  # fmt: skip
    invoke("verify", samples / "seed_fc.safetensors", out, "--flip", exit=1)


def test_flip_of_a_pickle_and_a_pointwise_layer(invoke, samples, tmp_path) -> None:
    out = tmp_path / "head.pt"
    invoke(
        "convert", samples / "head_fc6_fc7.safetensors", "-o", out, "--layer", "fc6=6x6x8",
        "--layer", "fc7=1x1", "--flip",
    )  # fmt: skip
    state = torch.load(out, weights_only=True)
    before = load_file(samples / "head_fc6_fc7.safetensors")
    assert bitwise_equal(state["fc7.weight"], before["fc7.weight"][:, :, None, None])
    expected = kernel_of(before["fc6.weight"], 8, 6, 6, "chw").flip(2, 3).contiguous()
    assert bitwise_equal(state["fc6.weight"], expected)
    invoke("verify", samples / "head_fc6_fc7.safetensors", out, "--flip")
