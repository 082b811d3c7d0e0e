"""verify judges against the order the model uses, and every result says where it came from.

The hand-conversion bug of issue #16: a kernel with its two spatial axes
swapped (``W.view(O, C, H, W).transpose(2, 3)``) is a permutation of the
weight, so *some* order fits it; it is still not the model, which flattens
``chw``. Without a record or a flag, ``verify`` takes the weights' evidence
when it is clear, else the framework's default, and a kernel matching only
another order is a difference that names it and how to assert it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SEED_PATCH = "20x20x10"


def _seed_case(folder: Path) -> tuple[Path, Path, Path]:
    """Linear 4000→64, its transposed hand conversion and its right one, as .pt (no record)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 4000, generator=generator)
    bias = torch.randn(64, generator=generator)
    model, wrong, right = folder / "m.pt", folder / "wrong.pt", folder / "right.pt"
    torch.save({"fc.weight": weight, "fc.bias": bias}, model)
    kernel = weight.view(64, 10, 20, 20)
    torch.save({"fc.weight": kernel.transpose(2, 3).contiguous(), "fc.bias": bias}, wrong)
    torch.save({"fc.weight": kernel.clone(), "fc.bias": bias}, right)
    return model, wrong, right


def test_a_transposed_hand_conversion_fails_and_names_the_order_it_matches(
    invoke, tmp_path
) -> None:
    model, wrong, right = _seed_case(tmp_path)
    failed = invoke("verify", model, wrong, "--json", exit=1)
    document = json.loads(failed.stdout)
    assert document["equivalent"] is False and document["exit_code"] == 1
    (layer,) = document["layers"]
    assert layer["order"] == "chw" and layer["order_from"] in ("default", "weights")
    named = [p for p in layer["problems"] if "cwh" in p]
    assert named and "--order cwh" in named[0] and 'order="cwh"' in named[0]
    human = " ".join(invoke("verify", model, wrong, exit=1).stderr.split())
    assert "--order cwh" in human and "chw (default)" in human  # on the layer's row
    # asserted, it passes, and the order is the flag's
    asserted = json.loads(invoke("verify", model, wrong, "--order", "cwh", "--json").stdout)
    assert asserted["equivalent"] is True
    assert asserted["layers"][0]["order"] == "cwh"
    assert asserted["layers"][0]["order_from"] == "flag"
    # the right hand conversion passes as it is
    passed = json.loads(invoke("verify", model, right, "--json").stdout)
    assert passed["equivalent"] is True
    assert passed["layers"][0]["order_from"] in ("default", "weights")


def _smooth_square_head(path: Path) -> torch.Tensor:
    """A head whose columns vary smoothly over a square 5x5 patch, flattened chw."""
    out, channels, side = 64, 4, 5
    generator = torch.Generator().manual_seed(0)
    phase = torch.rand(out, channels, 1, 1, generator=generator) * 6.28
    freq = 0.3 + 0.4 * torch.rand(out, channels, 1, 1, generator=generator)
    i = torch.arange(side).view(1, 1, side, 1)
    j = torch.arange(side).view(1, 1, 1, side)
    kernel = (torch.sin(freq * i + phase) * torch.cos(freq * j - phase)).float()
    torch.save({"fc.weight": kernel.reshape(out, -1), "fc.bias": torch.zeros(out)}, path)
    return kernel


def test_evidence_never_proves_a_transpose_of_a_square_patch(invoke, tmp_path) -> None:
    """Smooth weights lead clearly with the family {chw, cwh}, which no statistic of
    neighbouring columns can split (SPEC §6): the transpose is still a difference."""
    model = tmp_path / "square.pt"
    kernel = _smooth_square_head(model)
    bias = torch.zeros(64)
    wrong, right = tmp_path / "wrong.pt", tmp_path / "right.pt"
    torch.save({"fc.weight": kernel.transpose(2, 3).contiguous(), "fc.bias": bias}, wrong)
    torch.save({"fc.weight": kernel.contiguous(), "fc.bias": bias}, right)
    evidence = json.loads(invoke("inspect", model, "--patch", "5x5x4", "--json").stdout)
    family = evidence["order_evidence"]["fc"]["families"][0]
    assert sorted(family) == ["chw", "cwh"] and evidence["order_evidence"]["fc"]["winner"] is None
    document = json.loads(invoke("verify", model, wrong, "--json", exit=1).stdout)
    (layer,) = document["layers"]
    assert layer["order"] == "chw" and layer["order_from"] == "default"
    assert any("--order cwh" in p for p in layer["problems"])
    passed = json.loads(invoke("verify", model, right, "--json").stdout)
    assert passed["equivalent"] and passed["layers"][0]["order_from"] == "default"


def test_order_from_in_every_convert_result(invoke, samples, tmp_path) -> None:
    runs = {
        "default": (),
        "flag": ("--order", "hwc"),
        "weights": ("--order", "auto"),
    }
    for came, flags in runs.items():
        out = tmp_path / f"{came}.safetensors"
        document = json.loads(
            invoke(
                "convert", samples / "trained_nhwc.safetensors", "-o", out, "--layer", "fc",
                "--patch", "6x4x16", *flags, "--json",
            ).stdout
        )  # fmt: skip
        (layer,) = document["layers"]
        assert layer["order_from"] == came
        assert (layer["order_margin"] is not None) == (came == "weights")
        verified = document["verification"]["layers"][0]
        assert verified["order_from"] == came
        # verify reads the record back: the order now comes from it
        again = json.loads(invoke("verify", samples / "trained_nhwc.safetensors", out, "--json"
                                  ).stdout)  # fmt: skip
        assert again["layers"][0]["order_from"] == "record"
        # inspect says so too
        inspected = json.loads(invoke("inspect", out, "--json").stdout)
        assert inspected["converted"][0]["order_from"] == "record"


def test_a_record_is_the_order_even_when_the_weights_disagree(invoke, tmp_path) -> None:
    """A record (or flag) is the claim checked: a kernel that matches it passes."""
    generator = torch.Generator().manual_seed(3)
    state = {"fc.weight": torch.randn(6, 24, generator=generator), "fc.bias": torch.zeros(6)}
    save_file(state, str(tmp_path / "m.safetensors"))
    out = tmp_path / "m.conv.safetensors"
    invoke("convert", tmp_path / "m.safetensors", "--layer", "fc", "--patch", "3x4x2",
           "--order", "whc")  # fmt: skip
    document = json.loads(invoke("verify", tmp_path / "m.safetensors", out, "--json").stdout)
    assert document["layers"][0]["order"] == "whc"
    assert document["layers"][0]["order_from"] == "record"
