"""A program's facts (``fcconv.json``) are checked against their schema before any use."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fcconv.errors import FcconvError
from fcconv.maps.program import parse_facts

GOOD = {
    "input_size": [8, 8],
    "in_channels": 3,
    "outputs": [
        {
            "name": "output",
            "cells": {"offset": [0, 0], "stride": [2, 2], "window": [8, 8]},
            "map_axes": [2, 3],
        }
    ],
    "output_stride": None,
    "phases": [1, 1],
    "reads_past": {"start": [False, False], "end": [False, False]},
}


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from test_hostile_programs import Small

    from fcconv.fcn import convolutionalize_detailed, save_exported

    folder = tmp_path_factory.mktemp("facts")
    save_exported(
        convolutionalize_detailed(Small().eval(), (8, 8)).model, folder / "d.pt2", (12, 12)
    )
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(folder / "i.png")
    return {"pt2": folder / "d.pt2", "image": folder / "i.png"}


def with_facts(source: Path, target: Path, text: str) -> Path:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = old.read(info.filename)
            new.writestr(info, text.encode() if info.filename.endswith("fcconv.json") else data)
    return target


def facts_of(path: Path) -> dict:
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("fcconv.json"))
        return json.loads(archive.read(name))


@pytest.mark.parametrize(
    "change",
    [
        lambda f: f["outputs"][0].update(map_axes=[2, 9]),
        lambda f: f["outputs"][0].update(map_axes=[0, 1]),
        lambda f: f["outputs"][0].update(map_axes=[2, 2]),
        lambda f: f["outputs"].append(dict(f["outputs"][0], name="ghost")),
        lambda f: f.update(phases=[10**30, 1]),
        lambda f: f.update(reads_past={"start": 3, "end": {}}) or f.update(in_channels=7),
        lambda f: f["outputs"][0]["cells"].update(window=[2**40, 1]),
    ],
)
def test_facts_outside_the_schema_are_one_line(invoke, program, tmp_path, change) -> None:
    facts = facts_of(program["pt2"])
    change(facts)
    bad = with_facts(program["pt2"], tmp_path / "bad.pt2", json.dumps(facts))
    result = invoke("map", bad, program["image"], "-o", tmp_path / "m.png", exit=2)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fcconv: error:"), result.stderr
    assert "internal error" not in lines[0]
    assert not (tmp_path / "m.png").exists()


def test_facts_nested_200000_deep_are_one_line(invoke, program, tmp_path) -> None:
    deep = '{"outputs": [], "x": ' + "[" * 200_000 + "]" * 200_000 + "}"
    bad = with_facts(program["pt2"], tmp_path / "deep.pt2", deep)
    result = invoke("map", bad, program["image"], "-o", tmp_path / "m.png", exit=2)
    assert result.stderr.count("\n") == 1 and "internal error" not in result.stderr


def test_the_good_facts_parse() -> None:
    parsed = parse_facts(json.dumps(GOOD), "x.pt2")
    assert parsed["native_size"] == (8, 8) and parsed["outputs"][0].map_axes == (2, 3)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


def mutations() -> st.SearchStrategy[dict]:
    """The good facts with one field anywhere replaced by any JSON value."""
    paths = [
        ("input_size",), ("in_channels",), ("outputs",), ("output_stride",), ("phases",),
        ("reads_past",), ("outputs", 0), ("outputs", 0, "name"), ("outputs", 0, "cells"),
        ("outputs", 0, "map_axes"), ("outputs", 0, "cells", "offset"),
        ("outputs", 0, "cells", "stride"), ("outputs", 0, "cells", "window"),
        ("reads_past", "start"), ("outputs", 0, "map_axes", 1), ("input_size", 0),
    ]  # fmt: skip

    def apply(path: tuple, value: object) -> dict:
        facts = json.loads(json.dumps(GOOD))
        holder = facts
        for key in path[:-1]:
            holder = holder[key]
        holder[path[-1]] = value
        return facts

    return st.builds(apply, st.sampled_from(paths), json_values)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutations(), json_values))
def test_no_facts_make_an_internal_error(facts) -> None:
    text = json.dumps(facts)
    try:
        parsed = parse_facts(text, "fuzz.pt2")
    except FcconvError:
        return
    for output in parsed["outputs"]:
        assert sorted(output.map_axes) == [2, 3]
        assert min(output.cells.stride) >= 1 and min(output.cells.window) >= 1
    assert all(1 <= p <= 64 for p in parsed["phases"])


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=64) | st.text(max_size=64))
def test_no_bytes_make_an_internal_error(data) -> None:
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    try:
        parse_facts(text, "fuzz.pt2")
    except FcconvError:
        pass
