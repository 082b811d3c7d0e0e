"""Multi-output heads (SPEC section 5, "Real models"), against an independent reference.

The models are shaped like published face-detector stages (MTCNN's R-Net and
O-Net: PReLU, ``ceil_mode`` pools, a W×H×C flatten, a shared ``Linear →
PReLU`` feeding a face head, a box head and a landmark head). Each is written
as ``trunk`` (to the feature map) plus ``heads`` (flatten to the output
structure); fcconv sees only ``forward``. The reference applies the model's
own ``heads`` to every window of its own ``trunk``'s feature map and gathers
each output's cells, so nothing of fcconv's graph reading is trusted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.utils._pytree as pytree
from fcn_helpers import seeded
from torch import nn

from fcconv.errors import CheckpointError, LayerError
from fcconv.fcn import convolutionalize, convolutionalize_detailed, load_model, verify_dense
from fcconv.fcn.load import match_keys
from fcconv.geometry import conv_weight_to_linear


class Stage(nn.Module):
    """R-Net's trunk, small: 3x12x12 -> conv3 -> 10 -> pool(3, 2, ceil) -> 5 -> conv3 -> 3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3)
        self.prelu1 = nn.PReLU(6)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.prelu2 = nn.PReLU(8)
        self.dense = nn.Linear(8 * 3 * 3, 16)
        self.prelu = nn.PReLU(16)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.prelu2(self.conv2(self.pool1(self.prelu1(self.conv1(x)))))

    def shared(self, features: torch.Tensor) -> torch.Tensor:
        x = features.permute(0, 3, 2, 1).contiguous()
        return self.prelu(self.dense(x.view(x.shape[0], -1)))

    def forward(self, x: torch.Tensor):
        return self.heads(self.trunk(x))


class TwoHeads(Stage):
    """Boxes and face probabilities, returned as a tuple (boxes, probs) like MTCNN."""

    def __init__(self) -> None:
        super().__init__()
        self.face = nn.Linear(16, 2)
        self.softmax = nn.Softmax(dim=1)
        self.box = nn.Linear(16, 4)

    def heads(self, features: torch.Tensor):
        x = self.shared(features)
        return self.box(x), self.softmax(self.face(x))


class ThreeHeads(Stage):
    """O-Net's three heads behind a Dropout, in a nested dict with a list inside."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.25)
        self.face = nn.Linear(16, 2)
        self.box = nn.Linear(16, 4)
        self.landmarks = nn.Linear(16, 10)

    def heads(self, features: torch.Tensor):
        x = self.drop(self.shared(features))
        probs = torch.softmax(self.face(x), dim=1)
        return {"boxes": self.box(x), "out": {"landmarks": self.landmarks(x), "faces": [probs]}}


class KeepBoxes(nn.Module):
    """A wrapper that keeps one output: the other branch must be dropped, not refused."""

    def __init__(self) -> None:
        super().__init__()
        self.model = TwoHeads()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        boxes, _ = self.model(x)
        return boxes


NATIVE = (12, 12)
LINEARS = {
    "TwoHeads": ["dense", "face", "box"],
    "ThreeHeads": ["dense", "face", "box", "landmarks"],
}


def reference(model: Stage, x: torch.Tensor):
    """The model's own heads on every 3x3 window of its own trunk's map: the same structure."""
    with torch.no_grad():
        features = model.trunk(x)
        rows, cols = features.shape[2] - 2, features.shape[3] - 2
        cells = {
            (p, q): model.heads(features[:, :, p : p + 3, q : q + 3])
            for p in range(rows)
            for q in range(cols)
        }
        leaves, spec = pytree.tree_flatten(cells[0, 0])
        maps = []
        for k in range(len(leaves)):
            out = torch.empty(x.shape[0], leaves[k].shape[1], rows, cols, dtype=x.dtype)
            for (p, q), structure in cells.items():
                out[:, :, p, q] = pytree.tree_leaves(structure)[k]
            maps.append(out)
    return pytree.tree_unflatten(maps, spec)


@pytest.mark.parametrize("factory", [TwoHeads, ThreeHeads])
def test_every_output_becomes_dense_together_and_keeps_its_structure(factory) -> None:
    model = seeded(factory()).double()
    conversion = convolutionalize_detailed(model, NATIVE)
    dense = conversion.model
    x = torch.randn(2, 3, 12 + 3 * 2, 12 + 2 * 2, generator=torch.Generator().manual_seed(1))
    x = x.double()
    with torch.no_grad():
        got = dense(x)
    want = reference(model, x)
    assert pytree.tree_structure(got) == pytree.tree_structure(want)
    for g, w in zip(pytree.tree_leaves(got), pytree.tree_leaves(want), strict=True):
        assert g.shape == w.shape and g.shape[2:] == (4, 3)
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    # every Linear of every branch is a conv: the shared one 3x3 over the map, the others 1x1
    names = LINEARS[factory.__name__]
    kernels = {name: dense.get_submodule(name).kernel_size for name in names}
    assert kernels == {name: (3, 3) if name == "dense" else (1, 1) for name in names}
    assert torch.equal(
        conv_weight_to_linear(dense.get_submodule("dense").weight, "whc"), model.dense.weight
    )
    assert [o.order for o in conversion.outputs] == ["whc"] * len(conversion.outputs)
    assert conversion.output_names == [o.name for o in conversion.outputs]
    check = verify_dense(model, dense, NATIVE)
    assert check, check.problems
    assert [o.name for o in check.outputs] == conversion.output_names
    assert all(o.comparisons["dense"].passed for o in check.outputs)


def test_output_names_follow_the_structure() -> None:
    names = convolutionalize_detailed(seeded(ThreeHeads()), NATIVE).output_names
    assert names == ["boxes", "out.landmarks", "out.faces.0"]
    assert convolutionalize_detailed(seeded(TwoHeads()), NATIVE).output_names == ["0", "1"]


def test_keeping_some_outputs_drops_the_others_and_what_feeds_only_them() -> None:
    model = seeded(ThreeHeads()).double()
    x = torch.randn(1, 3, 20, 16, generator=torch.Generator().manual_seed(2)).double()
    want = reference(model, x)
    one = convolutionalize(model, NATIVE, outputs=["out.landmarks"])
    with torch.no_grad():
        torch.testing.assert_close(one(x), want["out"]["landmarks"], rtol=1e-9, atol=1e-12)
    kept = {name for name, _ in one.named_modules()}
    assert "landmarks" in kept and not {"box", "face"} & kept
    two = convolutionalize(model, NATIVE, outputs=["out.faces.0", "boxes"])
    with torch.no_grad():
        got = two(x)
    assert set(got) == {"boxes", "out"} and set(got["out"]) == {"faces"}
    torch.testing.assert_close(got["out"]["faces"][0], want["out"]["faces"][0])
    assert verify_dense(model, two, NATIVE)  # the recorded selection is verified
    with pytest.raises(
        LayerError, match=r"no output 'box'; its outputs are: boxes, out\.landmarks"
    ):
        convolutionalize(model, NATIVE, outputs=["box"])


def test_a_wrapper_that_keeps_one_output_converts() -> None:
    wrapper = seeded(KeepBoxes()).double()
    conversion = convolutionalize_detailed(wrapper, NATIVE)
    assert conversion.output_names == ["output"]
    assert "model.face" not in dict(conversion.model.named_modules())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)).double()
    with torch.no_grad():
        torch.testing.assert_close(conversion.model(x), reference(wrapper.model, x)[0])
    assert verify_dense(wrapper, conversion.model, NATIVE)


def test_layers_outside_the_kept_outputs_are_refused() -> None:
    with pytest.raises(LayerError, match="'face' is not in the head of the outputs converted"):
        convolutionalize(seeded(TwoHeads()), NATIVE, outputs=["0"], layers=["face"])


# ------------------------------------------------------------------ weights with prefixes


def test_weights_with_a_wrapper_prefix_load_either_way(tmp_path: Path, monkeypatch) -> None:
    import sys
    import types

    from safetensors.torch import save_file

    module = types.ModuleType("heads_archs")
    module.two = TwoHeads
    module.keep = KeepBoxes
    monkeypatch.setitem(sys.modules, "heads_archs", module)
    plain = seeded(TwoHeads())
    save_file(plain.state_dict(), tmp_path / "plain.safetensors")
    wrapped = load_model(tmp_path / "plain.safetensors", arch="heads_archs:keep")  # model. added
    assert torch.equal(wrapped.model.dense.weight, plain.dense.weight)
    torch.save(seeded(KeepBoxes(), 1).state_dict(), tmp_path / "wrapped.pt")  # model. removed
    loaded = load_model(tmp_path / "wrapped.pt", arch="heads_archs:two")
    assert torch.equal(loaded.box.bias, seeded(KeepBoxes(), 1).model.box.bias)
    torch.save({"a.weight": torch.zeros(1), "b.weight": torch.zeros(1)}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match="does not fit arch=.*missing conv1.weight"):
        load_model(tmp_path / "odd.pt", arch="heads_archs:two")


def test_match_keys_prefers_the_nearest_unique_suffix() -> None:
    state = {"module.fc.weight": 0, "other.module.fc.weight": 1, "fc.bias": 2}
    mapping, missing = match_keys(state, ["fc.weight", "net.fc.bias", "gone"])
    assert mapping == {"fc.weight": "module.fc.weight", "net.fc.bias": "fc.bias"}
    assert missing == ["gone"]
    tie = {"a.fc.weight": 0, "b.fc.weight": 1}
    assert match_keys(tie, ["fc.weight"]) == ({}, ["fc.weight"])


# ------------------------------------------------------------------ command line


def test_cli_multi_head_json_has_cells_and_crops(tmp_path: Path, invoke, samples: Path) -> None:
    out = tmp_path / "detector.pt2"
    result = invoke(
        "convolutionalize", samples / "detector_stage.safetensors",
        "--arch", "fcconv.samples_models:detector_stage(width=16, hidden=64)",
        "--input", "24", "-o", out, "--json",
    )  # fmt: skip
    document = json.loads(result.stdout)
    outputs = document["conversion"]["outputs"]
    assert [o["name"] for o in outputs] == ["face", "box"]
    # R-Net arithmetic: conv3 (w 3), pool 3/2 (w 5, s 2), conv3 (w 9), pool 3/2 (w 13, s 4),
    # conv2 (w 17), then the 3x3 feature map at stride 4: 17 + 2*4 = 25 > 24 (ceil mode)
    for output in outputs:
        assert output["cells"] == {"offset": [0, 0], "stride": [4, 4], "window": [25, 25]}
    crops = document["verification"]["crops"]
    # 3x3 cells per output; only the cell whose crop ends at the input's end is exact
    assert crops["cells"] == 18 and crops["crop_exact"] == 2
    assert crops["max_abs_diff_exact"] < 1e-9 < crops["max_abs_diff_other"]
    assert "'pool1' (MaxPool2d)" in crops["reasons"][0] and "ceil_mode" in crops["reasons"][0]
    assert len(document["warnings"]) == 1
    assert result.stderr.startswith("warning: the dense map is not the model run on each crop")
    extra = {"fcconv.json": ""}
    program = torch.export.load(out, extra_files=extra).module()
    facts = json.loads(extra["fcconv.json"])
    assert facts["outputs"][1]["cells"]["window"] == [25, 25] and facts["input_size"] == [24, 24]
    maps = program(torch.randn(1, 3, 40, 32))
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        "face": (1, 2, 5, 3),
        "box": (1, 4, 5, 3),
    }


def test_cli_keep_output(tmp_path: Path, invoke, samples: Path) -> None:
    result = invoke(
        "convolutionalize", samples / "detector_stage.safetensors",
        "--arch", "fcconv.samples_models:detector_stage", "--input", "24x24",
        "-o", tmp_path / "boxes.pt2", "--keep-output", "box", "--json",
    )  # fmt: skip
    document = json.loads(result.stdout)
    assert [o["name"] for o in document["conversion"]["outputs"]] == ["box"]
    assert [c["name"] for c in document["conversion"]["changes"]] == ["dense4", "dense5_2"]
    result = invoke(
        "convolutionalize", samples / "detector_stage.safetensors",
        "--arch", "fcconv.samples_models:detector_stage", "--input", "24x24",
        "-o", tmp_path / "none.pt2", "--keep-output", "boxes", exit=2,
    )  # fmt: skip
    assert (
        "no output 'boxes'; its outputs are: face, box (give them to --keep-output)"
        in result.stderr
    )
    assert not (tmp_path / "none.pt2").exists()


def test_the_readme_walk_through_runs(
    tmp_path: Path, invoke, samples: Path, monkeypatch, capsys
) -> None:
    import re
    import shlex
    import shutil

    page = (Path(__file__).resolve().parent.parent / "docs" / "guide" / "models.md").read_text()
    section = page[page.index("## Walk-through: a two-headed detector stage") :]
    section = section[: section.index("\n## ")]
    command = re.search(r"\$ (fcconv convolutionalize .*?)\n```", section, flags=re.S).group(1)
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    shutil.copytree(samples, tmp_path / "sample_checkpoints")
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    arguments = shlex.split(command.replace("\\\n", " "))[1:]
    invoke(*arguments)
    exec(compile(block, "docs/guide/models.md", "exec"), {"__name__": "docs"})
    shapes, box = capsys.readouterr().out.splitlines()
    assert shapes == "{'face': (1, 2, 5, 3), 'box': (1, 4, 5, 3)}"
    (top, bottom), (left, right) = eval(box)  # the printed box: two (start, stop) pairs
    assert bottom - top == right - left == 25 and top % 4 == left % 4 == 0
