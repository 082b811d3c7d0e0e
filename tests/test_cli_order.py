"""--order auto, the order warning and the order sections of inspect and verify, from outside."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

PATCH = "6x4x16"  # the trained samples' feature map, HxWxC


@pytest.mark.parametrize(
    ("sample", "expected"),
    [("trained_nchw.pt", "chw"), ("trained_nhwc.pt", "hwc"), ("trained_nhwc.safetensors", "hwc")],
)
def test_auto_picks_the_order_the_head_was_trained_with(
    invoke, samples, tmp_path, sample, expected
) -> None:
    out = tmp_path / f"out{Path(sample).suffix}"
    result = invoke(
        "convert", samples / sample, "-o", out, "--layer", "fc", "--patch", PATCH,
        "--order", "auto", "--json",
    )  # fmt: skip
    (layer,) = json.loads(result.stdout)["layers"]
    assert layer["order"] == expected
    assert layer["order_evidence"]["winner"] == expected
    assert f"order {expected} chosen from the weights" in result.stderr
    verified = json.loads(invoke("verify", samples / sample, out, "--json").stdout)
    assert [check["order"] for check in verified["layers"]] == [expected]


def test_auto_refuses_random_weights_and_shows_the_ranking(invoke, samples, tmp_path) -> None:
    result = invoke(
        "convert", samples / "seed_fc.pt", "-o", tmp_path / "out.pt", "--layer", "fc",
        "--patch", "20x20x10", "--order", "auto", exit=2,
    )  # fmt: skip
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("fcconv: error: cannot choose the flatten order of fc")
    assert "no clear evidence" in line and "ranking: " in line and "--order" in line
    assert not (tmp_path / "out.pt").exists()


def _smooth_square_head(path: Path) -> None:
    """A head whose columns vary smoothly over a square 5x5 patch, flattened chw."""
    out, channels, side = 64, 4, 5
    generator = torch.Generator().manual_seed(0)
    phase = torch.rand(out, channels, 1, 1, generator=generator) * 6.28
    freq = 0.3 + 0.4 * torch.rand(out, channels, 1, 1, generator=generator)
    i = torch.arange(side).view(1, 1, side, 1)
    j = torch.arange(side).view(1, 1, 1, side)
    kernel = torch.sin(freq * i + phase) * torch.cos(freq * j - phase)
    weight = kernel.reshape(out, channels * side * side).float()
    torch.save({"fc.weight": weight, "fc.bias": torch.zeros(out)}, path)


def test_auto_refuses_a_square_transpose_naming_both(invoke, tmp_path) -> None:
    model = tmp_path / "square.pt"
    _smooth_square_head(model)
    result = invoke(
        "convert", model, "--layer", "fc", "--patch", "5x5x4", "--order", "auto", exit=2
    )
    (line,) = result.stderr.strip().splitlines()
    assert "chw and cwh" in line and "transposes" in line


def test_warning_fires_on_a_wrong_order_and_not_on_the_right_one(invoke, samples, tmp_path) -> None:
    args = ["convert", samples / "trained_nhwc.pt", "--layer", "fc", "--patch", PATCH]
    wrong = invoke(*args, "-o", tmp_path / "a.pt")  # default chw
    warnings = [line for line in wrong.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "favour order hwc" in warnings[0]
    right = invoke(*args, "-o", tmp_path / "b.pt", "--order", "hwc")
    assert "warning:" not in right.stderr
    random = invoke(
        "convert", samples / "seed_fc.pt", "-o", tmp_path / "c.pt", "--layer", "fc",
        "--patch", "20x20x10",
    )  # fmt: skip
    assert "warning:" not in random.stderr


def test_inspect_ranks_orders_for_a_patch(invoke, samples) -> None:
    result = invoke("inspect", samples / "trained_nchw.pt", "--patch", PATCH, "--json")
    evidence = json.loads(result.stdout)["order_evidence"]["fc"]
    assert evidence["winner"] == "chw"
    scores = {row["order"]: row["score"] for row in evidence["ranking"]}
    assert set(scores) == {"chw", "cwh", "hcw", "hwc", "wch", "whc"}
    assert max(scores, key=scores.get) == "chw"
    assert evidence["margin"] > 0.1 and math.isfinite(evidence["margin_sigmas"])
    human = invoke("inspect", samples / "trained_nchw.pt", "--patch", PATCH)
    assert "ranking: chw" in human.stderr


def test_verify_judges_the_order_the_weights_show(invoke, samples, tmp_path) -> None:
    """No record, no flag: the weights clearly say hwc, so a chw kernel is a difference."""
    out = tmp_path / "out.pt"
    invoke("convert", samples / "trained_nhwc.pt", "-o", out, "--layer", "fc", "--patch", PATCH)
    failed = json.loads(invoke("verify", samples / "trained_nhwc.pt", out, "--json", exit=1).stdout)
    (layer,) = failed["layers"]
    assert layer["order"] == "hwc" and layer["order_from"] == "weights"
    assert layer["order_margin"] > 0.1
    assert any("--order chw" in p for p in layer["problems"])
    # asserted, it passes, and the note says the weights disagree
    flag = ("--order", "chw")
    result = json.loads(invoke("verify", samples / "trained_nhwc.pt", out, *flag, "--json").stdout)
    assert result["equivalent"] is True and result["layers"][0]["order_from"] == "flag"
    assert any("probably trained on hwc" in note for note in result["notes"])
