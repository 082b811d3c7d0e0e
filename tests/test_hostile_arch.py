"""``--arch`` names a model factory, never any callable: the payload never runs."""

from __future__ import annotations

import functools
import os

import pytest
import torch
from torch import nn

from fcconv.errors import ArchitectureError
from fcconv.fcn.usercode import check_factory

EVIL = """
import functools, os, subprocess
helper = functools.partial(os.system, "touch X")
class NotAModel:
    def __init__(self):
        os.system("touch X")
class Builder:
    @classmethod
    def make(cls):
        import torch
        return torch.nn.Linear(2, 2)
"""


@pytest.mark.parametrize(
    "arch",
    [
        'os:system("touch X")',
        "builtins:exec(\"open('X', 'w')\")",
        'subprocess:run(["touch", "X"])',
        'evil:os.system("touch X")',
        'evil:subprocess.call(["touch", "X"])',
        "evil:helper",
        "evil:NotAModel",
        'torch:save({}, "X")',
        "antigravity:x",
    ],
)
def test_a_payload_named_as_arch_never_runs(invoke, samples, tmp_path, monkeypatch, arch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.py").write_text(EVIL)
    result = invoke(
        "convolutionalize", samples / "tiny_vgg.safetensors", "--arch", arch,
        "--input", "32x32", "-o", tmp_path / "out.pt2", exit=2,
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fcconv: error:"), result.stderr
    assert not (tmp_path / "X").exists()
    assert not (tmp_path / "out.pt2").exists()


def test_factories_pass() -> None:
    from fcconv.samples_models import tiny_vgg

    check_factory(tiny_vgg, "fcconv.samples_models:tiny_vgg")
    check_factory(nn.Linear, "torch.nn:Linear")

    class Builder:
        @classmethod
        def make(cls) -> nn.Module:
            return nn.Linear(2, 2)

    check_factory(Builder.make, "tests:Builder.make")


@pytest.mark.parametrize(
    "thing",
    [os.system, exec, print, functools.partial(nn.Linear, 2, 2), torch.load, torch.hub.load, dict],
)
def test_other_callables_are_refused(thing) -> None:
    with pytest.raises(ArchitectureError):
        check_factory(thing, "x:y")


def test_a_sample_factory_still_converts(invoke, samples, tmp_path) -> None:
    invoke(
        "convolutionalize", samples / "tiny_vgg.safetensors", "--arch",
        "fcconv.samples_models:tiny_vgg", "--input", "32x32", "-o", tmp_path / "out.pt2",
    )  # fmt: skip
    assert (tmp_path / "out.pt2").is_file()
