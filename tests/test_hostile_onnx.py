"""ONNX graphs whose constant shapes ask for more memory than the budget never reach onnxruntime."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from fcconv.errors import CheckpointError
from fcconv.onnx.budget import check_allocations


def graph_with(nodes: list, initializers: list, opset: int = 17) -> onnx.ModelProto:
    """``y = x + reduce_sum(big)``: a dense-looking graph that builds a huge constant first."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, "h", "w"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, "h", "w"])
    total = helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0)
    add = helper.make_node("Add", ["x", "total"], ["y"])
    graph = helper.make_graph([*nodes, total, add], "g", [x], [y], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    cells = {"offset": [0, 0], "stride": [1, 1], "window": [1, 1]}
    facts = {"input_size": [1, 1], "in_channels": 3, "outputs": [
        {"name": "y", "cells": cells, "map_axes": [2, 3]}
    ]}  # fmt: skip
    helper.set_model_props(model, {"fcconv.json": json.dumps(facts)})
    return model


def constant_of_shape() -> onnx.ModelProto:
    shape = numpy_helper.from_array(np.array([25_000, 25_000], dtype=np.int64), "shape")
    fill = helper.make_node("ConstantOfShape", ["shape"], ["big"])
    return graph_with([fill], [shape])


def expand() -> onnx.ModelProto:
    one = numpy_helper.from_array(np.ones(1, dtype=np.float32), "one")
    shape = numpy_helper.from_array(np.array([30_000, 30_000], dtype=np.int64), "shape")
    return graph_with([helper.make_node("Expand", ["one", "shape"], ["big"])], [one, shape])


def tile() -> onnx.ModelProto:
    row = numpy_helper.from_array(np.ones((1, 1000), dtype=np.float32), "row")
    repeats = numpy_helper.from_array(np.array([1_000_000, 1], dtype=np.int64), "repeats")
    return graph_with([helper.make_node("Tile", ["row", "repeats"], ["big"])], [row, repeats])


@pytest.mark.parametrize("make", [constant_of_shape, expand, tile])
def test_huge_constant_shapes_are_refused(make) -> None:
    with pytest.raises(CheckpointError, match="budget"):
        check_allocations(make(), "hostile.onnx")


def test_the_sample_graph_passes(samples) -> None:
    check_allocations(onnx.load(samples / "tiny_cnn.onnx"), "tiny_cnn.onnx")


def run_limited(args: list[str]) -> subprocess.CompletedProcess:
    script = textwrap.dedent(
        f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from fcconv.cli import main
        sys.argv = ["fcconv", *{args!r}]
        main()
        """
    )
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )


def test_fcconv_map_on_a_2_5_gb_constant_stays_within_2_gb(tmp_path: Path) -> None:
    model = tmp_path / "dense.onnx"
    onnx.save(constant_of_shape(), model)
    assert model.stat().st_size < 1000
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    done = run_limited(["map", str(model), str(tmp_path / "i.png"), "-o", str(tmp_path / "m.png")])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "ConstantOfShape" in lines[0] and "budget" in lines[0]
    done = run_limited(
        ["convolutionalize", str(model), "-o", str(tmp_path / "d.onnx"), "--input", "8x8"]
    )
    assert done.returncode == 2 and "budget" in done.stderr, done.stderr
