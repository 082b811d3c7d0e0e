"""A ``.pt2`` is data until trusted: strings torch would evaluate or resolve are refused.

Each hostile program is fcconv's own program with one string of its model
JSON replaced. The payload touches a marker file; the test shows the marker
is never created and the refusal is one line, exit 2; with ``--trust-pickle``
the user takes responsibility and torch loads the file as before.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fcconv import map_image
from fcconv.errors import UnsafeCheckpointError
from fcconv.io.pt2 import code_in_program, expression_problem, guard_problem, target_problem


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(4 * 3 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.trunk(x), 1))


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from fcconv.fcn import convolutionalize_detailed, save_exported

    folder = tmp_path_factory.mktemp("programs")
    conversion = convolutionalize_detailed(Small().eval(), (8, 8))
    save_exported(conversion.model, folder / "dense.pt2", (12, 12))
    pixels = np.random.default_rng(0).integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "image.png")
    return {"pt2": folder / "dense.pt2", "image": folder / "image.png"}


def rewritten(source: Path, target: Path, change) -> Path:
    """A copy of ``source`` whose model JSON is passed through ``change(model) -> model``."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = old.read(info.filename)
            if info.filename.endswith("models/model.json"):
                data = json.dumps(change(json.loads(data))).encode()
            new.writestr(info, data)
    return target


def touching(marker: Path) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


def first(model: dict, key: str) -> dict:
    """The first JSON object in ``model`` that holds ``key``."""
    stack = [model]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if key in value:
                return value
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    raise AssertionError(f"no {key} in the program")


def in_expression(marker: Path):
    def change(model: dict) -> dict:
        holder = first(model, "expr_str")
        holder["expr_str"] = f"Add({holder['expr_str']}, 0*({touching(marker)} or 0))"
        return model

    return change


def in_guard(marker: Path):
    def change(model: dict) -> dict:
        model["guards_code"] = [*model.get("guards_code", []), f"{touching(marker)} is None"]
        return model

    return change


def relu_resolved_elsewhere(model: dict) -> dict:
    for node in model["graph_module"]["graph"]["nodes"]:
        if node["target"] == "torch.ops.aten.relu.default":
            node["target"] = "torch.nn.functional.relu"  # resolved, then called, by attribute path
    return model


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fcconv: error:"), stderr
    return lines[0]


@pytest.mark.parametrize("where", [in_expression, in_guard])
def test_a_payload_in_the_program_never_runs(invoke, program, tmp_path, where) -> None:
    marker = tmp_path / "marker"
    evil = rewritten(program["pt2"], tmp_path / "evil.pt2", where(marker))
    picture = tmp_path / "map.png"
    line = one_line(invoke("map", evil, program["image"], "-o", picture, exit=2).stderr)
    assert "--trust-pickle" in line
    assert not marker.exists() and not picture.exists()
    with pytest.raises(UnsafeCheckpointError):
        map_image(evil, program["image"], picture)
    assert not marker.exists()


def test_the_payload_is_real(program, tmp_path) -> None:
    """The guard is what stops it: torch itself runs the expression's payload."""
    marker = tmp_path / "marker"
    evil = rewritten(program["pt2"], tmp_path / "evil.pt2", in_expression(marker))
    try:
        torch.export.load(evil)
    except Exception:  # the sum is no longer a size torch accepts; the payload ran first
        pass
    assert marker.exists()


def test_a_target_outside_torchs_operators_is_refused_before_torch_resolves_it(
    invoke, program, tmp_path
) -> None:
    other = rewritten(program["pt2"], tmp_path / "other.pt2", relu_resolved_elsewhere)
    picture = tmp_path / "map.png"
    line = one_line(invoke("map", other, program["image"], "-o", picture, exit=2).stderr)
    assert "torch.nn.functional.relu" in line and "--trust-pickle" in line
    assert not picture.exists()


def test_fcconvs_own_program_passes(invoke, program, tmp_path) -> None:
    assert code_in_program(program["pt2"]) is None
    invoke("map", program["pt2"], program["image"], "-o", tmp_path / "map.png")


def test_range_constraints_name_symbols_with_integer_bounds(program, tmp_path) -> None:
    def huge(model: dict) -> dict:  # torch would count up to the symbol's number
        model["range_constraints"]["u99999999999"] = {"min_val": 0, "max_val": None}
        return model

    def strange(model: dict) -> dict:
        key = next(iter(model["range_constraints"]))
        model["range_constraints"][key]["min_val"] = "__import__('os')"
        return model

    for change in (huge, strange):
        assert "range constraint" in code_in_program(
            rewritten(program["pt2"], tmp_path / "x.pt2", change)
        )


def test_archives_that_are_not_checkable_programs_are_refused(tmp_path) -> None:
    (tmp_path / "a.pt2").write_bytes(b"not a zip")
    with zipfile.ZipFile(tmp_path / "b.pt2", "w") as archive:  # the pre-2.8 format
        archive.writestr("serialized_exported_program.json", "{}")
    with zipfile.ZipFile(tmp_path / "c.pt2", "w") as archive:
        archive.writestr("archive/models/model.json", "[" * 100_000 + "]" * 100_000)
    for name in "abc":
        assert code_in_program(tmp_path / f"{name}.pt2") is not None


@pytest.mark.parametrize(
    "text",
    [
        "s0 + 2*s1 // 3",
        "Max(Integer(1), FloorDiv(Symbol('s53', positive=True, integer=True), Integer(2)))",
        "Eq(Mod(s0, 2), 0)",
        "-s0 <= 5",
    ],
)
def test_shape_expressions_in_the_grammar(text: str) -> None:
    assert expression_problem(text) is None


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os').system('x')",
        "s0.__class__",
        "Symbol('s0', __import__=True)",
        "Symbol(exec('x'))",
        "(lambda: 1)()",
        "[s0]",
        "'s0'",
        "s0; import os",
        "eval('1')",
        "Add(" * 300 + "1" + ")" * 300,
        "getattr(s0, 'x')",
        "x" * 30_000,
        3,
    ],
)
def test_shape_expressions_outside_the_grammar(text) -> None:
    assert expression_problem(text) is not None


def test_guards_are_conditions_on_sizes() -> None:
    assert guard_problem("L['x'].size()[3] >= 3 and L['x'].size()[2] >= 3") is None
    assert guard_problem("L['args'][0].stride()[1] == 1") is None
    for bad in (
        "L['x'\") + __import__('os').system('x') + (\"'].size()[0] == 1",
        "L['x'].size()[0] == 1\nimport os",
        "L['x'].__class__",
        "L[0]",
        "open('x')",
        "L['x'].size()[0], exec('x')",
        "x == 1",
    ):
        assert guard_problem(bad) is not None, bad


def test_targets_in_torchs_operator_namespaces() -> None:
    assert target_problem("torch.ops.aten.max_pool2d.default") is None
    assert target_problem("_operator.floordiv") is None
    assert target_problem("torch.sym_max") is None
    for bad in (
        "torch.save",
        "torch.ops.load_library",
        "torch.ops.aten.__class__.x",
        "torch.ops.mylib.op.default",
        "builtins.exec",
        "#custom:op",
        None,
    ):
        assert target_problem(bad) is not None, bad


def test_trust_code_is_the_users_decision(invoke, program, tmp_path) -> None:
    """``--trust-code`` (alias of ``--trust-pickle``) hands the file to torch as it is."""
    marker = tmp_path / "marker"
    evil = rewritten(program["pt2"], tmp_path / "evil.pt2", in_guard(marker))
    invoke("map", evil, program["image"], "-o", tmp_path / "m.png", "--trust-code", exit=None)
    assert marker.exists()
