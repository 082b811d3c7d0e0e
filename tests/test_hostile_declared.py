"""Declared sizes never drive allocation: a 1.7 KB .pt declaring a [0, 2**30] weight."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch


@pytest.mark.parametrize(
    ("output", "options"),
    [("out.pt", ()), ("out.pt", ("--order", "hwc")), ("out.safetensors", ("--order", "hwc"))],
)
def test_an_empty_layer_declaring_a_billion_inputs_converts_within_2_gb(
    tmp_path: Path, output: str, options: tuple[str, ...]
) -> None:
    model = tmp_path / "zero.pt"
    torch.save({"fc.weight": torch.zeros(0, 2**30), "fc.bias": torch.zeros(0)}, model)
    assert model.stat().st_size < 4096
    args = ["convert", str(model), "-o", str(tmp_path / output), "--layer", "fc", "--patch", "1x1"]
    script = textwrap.dedent(
        f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from fcconv.cli import main
        sys.argv = ["fcconv", *{[*args, *options, "--json"]!r}]
        main()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["layers"][0]["conv_shape"] == [0, 2**30, 1, 1]
    if output.endswith(".pt"):
        written = torch.load(tmp_path / output, weights_only=True)["fc.weight"]
    else:
        from safetensors.torch import load_file

        written = load_file(tmp_path / output)["fc.weight"]
    assert tuple(written.shape) == (0, 2**30, 1, 1)
