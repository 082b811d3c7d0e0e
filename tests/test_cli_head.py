"""A two-layer head: the pointwise follower sees the first layer's map, at stride 1."""

from __future__ import annotations

import json


def test_follower_reads_the_previous_map(invoke, samples, tmp_path) -> None:
    result = invoke(
        "convert", samples / "head_fc6_fc7.safetensors", "-o", tmp_path / "h.safetensors",
        "--layer", "fc6=6x6x8", "--layer", "fc7=1x1", "--stride", "2x2", "--input", "14x14",
        "--json",
    )  # fmt: skip
    fc6, fc7 = json.loads(result.stdout)["layers"]
    assert fc6["stride"] == [2, 2] and fc7["stride"] == [1, 1]
    assert fc6["geometry"]["output_map"] == [5, 5, 32]
    assert fc7["geometry"]["input"] == [5, 5, 32]
    assert fc7["geometry"]["output_map"] == [5, 5, 10]
    checks = json.loads(result.stdout)["verification"]["layers"]
    assert [c["functional"]["output_grid"] for c in checks] == [[5, 5], [5, 5]]
