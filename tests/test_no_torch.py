"""A verified safetensors conversion, and ``verify`` of two safetensors files, never import torch.

Issue #16 point 5: the checks of SPEC §4 run in numpy (bfloat16 and float8
through ``ml_dtypes``). The CLI runs in a subprocess whose import system
refuses ``torch``: any import of it would fail the command. The float64 and
in-dtype judgements are the ones of :mod:`fcconv.verify.windows`, so a wrong
conversion must still be caught there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

NO_TORCH = """
import runpy, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch imported: {name}")
        return None

sys.meta_path.insert(0, NoTorch())
sys.argv = ["fcconv", *sys.argv[1:]]
try:
    runpy.run_module("fcconv", run_name="__main__")
finally:
    assert "torch" not in sys.modules
"""


def run_without_torch(*args: str | Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", NO_TORCH, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _head(path: Path, dtype: torch.dtype) -> None:
    """A smooth trained-looking head: 6 outputs reading a 4×5×3 patch flattened chw."""
    generator = torch.Generator().manual_seed(7)
    ramp = torch.linspace(0, 1, 4).view(4, 1) + torch.linspace(0, 1, 5)
    kernel = torch.randn(6, 3, 1, 1, generator=generator) * ramp
    kernel = kernel + 0.1 * torch.randn(6, 3, 4, 5, generator=generator)
    weight = kernel.reshape(6, -1)
    bias = torch.randn(6, generator=generator)
    save_file({"fc.weight": weight.to(dtype), "fc.bias": bias.to(dtype)}, str(path))


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_convert_and_verify_of_safetensors_never_import_torch(tmp_path, dtype) -> None:
    source, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    _head(source, dtype)
    done = run_without_torch(
        "convert", source, "-o", out, "--layer", "fc", "--patch", "4x5x3", "--json"
    )
    assert done.returncode == 0, done.stderr
    layer = json.loads(done.stdout)["verification"]["layers"][0]
    assert layer["functional"]["float64"]["passed"]
    if dtype != torch.float8_e4m3fn:
        assert layer["functional"]["in_dtype"]["judged"]
    checked = run_without_torch("verify", source, out, "--json")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["equivalent"] is True


def test_a_wrong_order_is_caught_without_torch(tmp_path) -> None:
    source, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    _head(source, torch.float32)
    done = run_without_torch("convert", source, "-o", out, "--layer", "fc", "--patch", "4x5x3")
    assert done.returncode == 0, done.stderr
    tensors = load_file(str(out))
    tensors["fc.weight"] = tensors["fc.weight"].transpose(2, 3).reshape(6, 3, 4, 5).contiguous()
    save_file(tensors, str(out), metadata=None)
    checked = run_without_torch("verify", source, out, "--order", "chw", "--json")
    assert checked.returncode == 1, checked.stderr
    layer = json.loads(checked.stdout)["layers"][0]
    assert not layer["exact"]
    assert not layer["functional"]["float64"]["passed"]
