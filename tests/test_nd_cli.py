"""1-D and 3-D conversions through the command line, on every path a checkpoint takes.

convert → verify exits 0 with no flags (the layers, orders and strides found
from the files), a wrong order exits 1, a bad N-D spec is one line and exit
2 with every file as it was. Kernels are compared bit for bit with the
independent tap-by-tap definition (``tests/reference_nd.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reference_nd import kernel_by_definition
from safetensors import safe_open
from safetensors.torch import save_file
from test_bad_input import assert_refused, snapshot

SEQ = {"seq.fc1": ((4,), 8, 6), "seq.fc2": ((1,), 6, 3)}
"""A 1-D head: fc1 reads windows of 4 steps of 8 channels, fc2 is its pointwise follower."""
CLIP = {"clip.fc": ((2, 3, 2), 3, 5)}
"""A 3-D head: 2 frames × 3 rows × 2 columns × 3 channels."""

RUNS = {
    1: (["--layer", "seq.fc1=4", "--layer", "seq.fc2=1", "--order", "lc", "--input", "13"], "lc"),
    3: (["--layer", "clip.fc=d=2,h=3,w=2", "--order", "hwdc", "--stride", "1"], "hwdc"),
}
PATHS = ["safetensors", "pt", "in memory", "sharded"]


def state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(10)
    tensors = {"trunk.weight": torch.randn(8, 1, 3, generator=generator)}
    for name, (sizes, channels, out) in {**SEQ, **CLIP}.items():
        features = channels * int(torch.tensor(sizes).prod())
        tensors[f"{name}.weight"] = torch.randn(out, features, generator=generator)
        tensors[f"{name}.bias"] = torch.randn(out, generator=generator)
    return tensors


def write(folder: Path, path: str) -> Path:
    """The checkpoint as ``path`` reads it; returns what to give ``convert``."""
    tensors = state()
    if path == "safetensors":
        save_file(tensors, str(folder / "model.safetensors"), metadata={"note": "kept"})
        return folder / "model.safetensors"
    if path == "pt":
        torch.save(tensors, folder / "model.pt")
        return folder / "model.pt"
    if path == "in memory":  # the legacy format has no records to stream
        torch.save(tensors, folder / "model.pt", _use_new_zipfile_serialization=False)
        return folder / "model.pt"
    shards = folder / "model"
    shards.mkdir()
    names = {"a.safetensors": ["trunk.weight", "seq.fc1.weight", "seq.fc1.bias"]}
    names["b.safetensors"] = [k for k in tensors if k not in names["a.safetensors"]]
    for shard, keys in names.items():
        save_file({k: tensors[k] for k in keys}, str(shards / shard))
    weight_map = {key: shard for shard, keys in names.items() for key in keys}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (shards / "model.safetensors.index.json").write_text(json.dumps(index))
    return shards


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".pt":
        return torch.load(path, weights_only=True)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    found = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            found |= {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    return found


def heads(ndim: int) -> dict[str, tuple[tuple[int, ...], int, int]]:
    return SEQ if ndim == 1 else CLIP


@pytest.mark.parametrize("ndim", [1, 3])
@pytest.mark.parametrize("path", PATHS)
def test_convert_then_verify_on_every_path(invoke, tmp_path, path, ndim) -> None:
    source = write(tmp_path, path)
    options, order = RUNS[ndim]
    convert = json.loads(invoke("convert", source, *options, "--json").stdout)
    assert convert["written"] and convert["verification"]["equivalent"]
    expected_mode = "in memory" if path == "in memory" else "streamed"
    assert convert["mode"] == expected_mode
    output = Path(convert["output"])
    before, after = state(), read_tensors(output)
    for name, (sizes, channels, _) in heads(ndim).items():
        kernel = kernel_by_definition(before[f"{name}.weight"], channels, sizes, order)
        assert after[f"{name}.weight"].shape == kernel.shape
        assert torch.equal(after[f"{name}.weight"].view(torch.int32), kernel.view(torch.int32))
    untouched = [k for k in before if not any(k.startswith(f"{n}.weight") for n in heads(ndim))]
    assert all(torch.equal(before[k], after[k]) for k in untouched)
    # verify needs no flags where the file records the orders; a .pt has no record, and
    # random weights no evidence: its order is asserted (else the default would judge it)
    flags = ("--order", order) if path in ("pt", "in memory") else ()
    check = json.loads(invoke("verify", source, output, *flags, "--json").stdout)
    assert check["equivalent"] and [layer["layer"] for layer in check["layers"]] == list(
        heads(ndim)
    )
    assert all(layer["order"] in (order, "cl", "cdhw") for layer in check["layers"])
    # the wrong order is a difference, not an error
    wrong = "cl" if ndim == 1 else "cdhw"
    first = next(iter(heads(ndim)))
    failed = invoke("verify", source, output, "--layer", first, "--order", wrong, "--json", exit=1)
    problems = json.loads(failed.stdout)["layers"][0]["problems"]
    assert any(f"not the original's under order {wrong}" in p for p in problems)


def test_the_1d_report_and_json_say_what_was_built(invoke, tmp_path) -> None:
    source = write(tmp_path, "safetensors")
    human = invoke("convert", source, *RUNS[1][0])
    text = " ".join(human.stderr.split())
    assert (
        "build it with: nn.Conv1d(8, 6, kernel_size=(4,), stride=(4,), padding=0, bias=True)"
        in text
    )
    assert "cell p sees input positions 4p … 4p+3 (a 4-position receptive field)" in text
    assert "input length 13 leaves the last 1 position(s) uncovered by 4-position windows" in text
    document = json.loads(invoke("convert", source, *RUNS[1][0], "--json", "--force").stdout)
    fc1, fc2 = document["layers"]
    assert fc1["conv_shape"] == [6, 8, 4] and fc1["patch"] == "l=4,c=8" and fc1["stride"] == [4]
    assert fc1["conv1d"].startswith("nn.Conv1d(8, 6, kernel_size=(4,)") and "conv2d" not in fc1
    assert fc1["geometry"] == {
        "input": [13, 8],
        "output_map": [3, 6],  # (13 − 4) // 4 + 1 windows
        "receptive_field": [4],
        "uncovered": [1],
        "warnings": [
            "input length 13 leaves the last 1 position(s) uncovered by 4-position windows at "
            "stride 4"
        ],
    }
    assert fc2["patch"] == "l=1,c=6" and fc2["stride"] == [1]
    assert fc2["geometry"]["input"] == [3, 6] and fc2["geometry"]["output_map"] == [3, 3]
    functional = document["verification"]["layers"][0]["functional"]
    assert functional["input_size"] == [13] and functional["output_grid"] == [3]
    with safe_open(str(tmp_path / "model.conv.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    record = json.loads(metadata["fcconv"])["layers"]
    assert record["seq.fc1"] == {
        "patch": "l=4,c=8", "order": "lc", "stride": [4], "linear_shape": [6, 32]
    }  # fmt: skip
    assert metadata["note"] == "kept"


def test_the_3d_report_names_conv3d_and_every_axis(invoke, tmp_path) -> None:
    source = write(tmp_path, "pt")
    document = json.loads(
        invoke("convert", source, "--layer", "clip.fc=2x3x2x3", "--input", "3x4x2", "--json").stdout
    )
    (layer,) = document["layers"]
    assert layer["conv_shape"] == [5, 3, 2, 3, 2] and layer["patch"] == "d=2,h=3,w=2,c=3"
    assert layer["conv3d"] == (
        "nn.Conv3d(3, 5, kernel_size=(2, 3, 2), stride=(2, 3, 2), padding=0, bias=True)"
    )
    assert layer["geometry"]["output_map"] == [1, 1, 1, 5]
    assert layer["geometry"]["uncovered"] == [1, 1, 0]
    human = " ".join(
        invoke("convert", source, "--layer", "clip.fc=2x3x2x3", "--force").stderr.split()
    )
    assert "cell (p, q, r) sees input frames 2p … 2p+1, rows 3q … 3q+2, columns 2r … 2r+1" in human


def test_verify_without_provenance_judges_the_default_order_and_names_the_fit(
    invoke, tmp_path
) -> None:
    source = write(tmp_path, "pt")
    invoke("convert", source, *RUNS[3][0], "-o", tmp_path / "out.pt")
    wrong = json.loads(invoke("verify", source, tmp_path / "out.pt", "--json", exit=1).stdout)
    (layer,) = wrong["layers"]
    assert layer["order"] == "cdhw" and layer["order_from"] == "default"
    assert any("order hwdc" in p and "--order hwdc" in p for p in layer["problems"])
    flag = ("--order", "hwdc")
    check = json.loads(invoke("verify", source, tmp_path / "out.pt", *flag, "--json").stdout)
    assert check["equivalent"] and check["layers"][0]["order_from"] == "flag"
    # no provenance in a .pt: the stride is the patch's unless given
    assert check["layers"][0]["stride"] == [2, 3, 2]


@pytest.mark.parametrize("ndim", [1, 3])
def test_flipped_kernels_of_every_rank(invoke, tmp_path, ndim) -> None:
    source = write(tmp_path, "safetensors")
    options, order = RUNS[ndim]
    result = invoke("convert", source, *options, "--flip", "--json")
    document = json.loads(result.stdout)
    flip_back = "weight.flip(2)" if ndim == 1 else "weight.flip(2, 3, 4)"
    assert any(flip_back in warning for warning in document["warnings"])
    after = read_tensors(tmp_path / "model.conv.safetensors")
    for name, (sizes, channels, _) in heads(ndim).items():
        weight = state()[f"{name}.weight"]
        flipped = kernel_by_definition(weight, channels, sizes, order, flip=True)
        assert torch.equal(after[f"{name}.weight"], flipped)
    invoke("verify", source, tmp_path / "model.conv.safetensors")  # the provenance says flip
    # an explicit order is checked; the flip still comes from the file
    invoke("verify", source, tmp_path / "model.conv.safetensors", "--order", order)


def test_order_auto_reads_a_smooth_1d_head(invoke, tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    kernel = torch.randn(32, 8, 1, generator=g) * torch.linspace(0, 1, 12)
    kernel = kernel + 0.1 * torch.randn(32, 8, 12, generator=g)
    weight = kernel.permute(0, 2, 1).reshape(32, 96).contiguous()  # flattened L-major: lc
    torch.save({"fc.weight": weight, "fc.bias": torch.zeros(32)}, tmp_path / "m.pt")
    document = json.loads(
        invoke(
            "convert",
            tmp_path / "m.pt",
            "--layer",
            "fc",
            "--patch",
            "12",
            "--order",
            "auto",
            "--json",
        ).stdout  # fmt: skip
    )
    assert document["layers"][0]["order"] == "lc"
    assert document["notes"][0].startswith("fc: order lc chosen from the weights")
    warned = json.loads(
        invoke("convert", tmp_path / "m.pt", "--layer", "fc=12", "--force", "--json").stdout
    )
    assert warned["warnings"][0].startswith("the weights of fc favour order lc")


def test_inspect_lists_1d_and_3d_patches_and_converted_layers(invoke, tmp_path) -> None:
    source = write(tmp_path, "safetensors")
    listing = json.loads(
        invoke("inspect", source, "--rank", "1", "--channels", "8", "--json").stdout
    )
    patches = {layer["name"]: layer["patches"] for layer in listing["layers"]}
    assert patches["seq.fc1"] == ["l=4,c=8"]  # 32 = 4 × 8
    assert patches["clip.fc"] == []  # 36 is no multiple of 8
    cubes = json.loads(invoke("inspect", source, "--rank", "3", "--json").stdout)["layers"]
    assert {layer["name"]: layer["patches"][0] for layer in cubes}["seq.fc1"] == "d=2,h=2,w=2,c=4"
    limited = json.loads(invoke("inspect", source, "--input", "l=5,c=8", "--json").stdout)
    assert {layer["name"]: layer["patches"] for layer in limited["layers"]}["seq.fc1"] == [
        "l=4,c=8"
    ]
    human = invoke("inspect", source, "--rank", "1")
    assert "patches that fit (l=L,c=C)" in " ".join(human.stderr.split())
    invoke("convert", source, *RUNS[3][0])
    invoke(
        "convert",
        tmp_path / "model.conv.safetensors",
        *RUNS[1][0],
        "-o",
        tmp_path / "b.safetensors",
    )
    converted = json.loads(invoke("inspect", tmp_path / "b.safetensors", "--json").stdout)[
        "converted"
    ]
    shapes = {layer["layer"]: (layer["conv_shape"], layer["patch"]) for layer in converted}
    assert shapes == {
        "clip.fc": ([5, 3, 2, 3, 2], "d=2,h=3,w=2,c=3"),
        "seq.fc1": ([6, 8, 4], "l=4,c=8"),
        "seq.fc2": ([3, 6, 1], "l=1,c=6"),
    }
    evidence = json.loads(invoke("inspect", source, "--patch", "l=4", "--json").stdout)
    assert evidence["order_evidence"]["seq.fc1"]["patch"] == "l=4,c=8"


BAD = [
    (["--layer", "seq.fc1=5"], ["patch l=5 does not fit seq.fc1", "1-D patches that fit"]),
    (["--layer", "seq.fc1=l=4,h=2"], ["malformed patch 'l=4,h=2'", "l=16,c=64"]),
    (["--layer", "seq.fc1=4", "--order", "hwc"], ["order hwc is for 2-D patches", "--order cl"]),
    (["--layer", "seq.fc1=4", "--input", "24x24"], ["input size 24x24 has 2 numbers", "give T"]),
    (["--layer", "seq.fc1=4", "--stride", "2x2"], ["stride 2x2 has 2 numbers", "1-D"]),
    (["--layer", "clip.fc=2x3x2x3", "--input", "1x3x3"], ["input 1x3x3 is smaller than one 2x3x2"]),
    (["--layer", "clip.fc=2x3x2x3", "--order", "auto"], ["not judged", "choose it with --order"]),
    (["--layer", "clip.fc=2x3x2x3", "--order", "lc"], ["order lc is for 1-D patches", "3-D"]),
    (["--layer", "clip.fc=d=2,h=3,w=2", "--input", "3000x3000x3000"], ["too large to run"]),
]


@pytest.mark.parametrize(("args", "words"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_nd_specs_are_one_line_and_touch_nothing(invoke, tmp_path, args, words) -> None:
    source = write(tmp_path, "safetensors")
    before = snapshot(tmp_path)
    result = invoke("convert", source, *args, exit=None)
    assert_refused(result, tmp_path, before, *words)


def test_verify_refuses_an_order_of_another_rank(invoke, tmp_path) -> None:
    source = write(tmp_path, "safetensors")
    invoke("convert", source, *RUNS[3][0])
    before = snapshot(tmp_path)
    result = invoke(
        "verify", source, tmp_path / "model.conv.safetensors", "--order", "lc", exit=None
    )
    assert_refused(result, tmp_path, before, "order lc is for 1-D patches", "clip.fc")


def test_a_keras_file_takes_2d_patches_only(invoke, tmp_path, samples) -> None:
    before = snapshot(tmp_path)
    result = invoke(
        "convert", samples / "keras_cnn.weights.h5", "-o", tmp_path / "x.weights.h5",
        "--layer", "fc6=8", exit=None,
    )  # fmt: skip
    assert_refused(result, tmp_path, before, "is a Keras file", "2-D --patch", "1-D l=8")


def test_a_provenance_record_of_another_rank_is_ignored_field_by_field(invoke, tmp_path) -> None:
    from fcconv.io.provenance import layer_records

    source = write(tmp_path, "safetensors")
    invoke("convert", source, *RUNS[1][0])
    converted = tmp_path / "model.conv.safetensors"
    tensors = read_tensors(converted)
    bogus = {"patch": "l=4,c=8", "order": "hwc", "stride": [2, 2], "linear_shape": [6, 32]}
    record = {"version": "0", "layers": {"seq.fc1": bogus, "seq.fc2": {"order": "cdhw"}}}
    save_file(tensors, str(converted), metadata={"fcconv": json.dumps(record), "note": "kept"})
    clean = layer_records({"fcconv": json.dumps(record)})
    # without a patch any rank's order is well formed: the kernel's rank decides in verify
    assert clean == {
        "seq.fc1": {"patch": "l=4,c=8", "linear_shape": [6, 32]},
        "seq.fc2": {"order": "cdhw"},
    }
    # the records name no order of the kernels' rank: each layer is judged in the default cl
    default = json.loads(invoke("verify", source, converted, "--json", exit=1).stdout)
    assert default["layers"][0]["order_from"] == "default"
    assert any("--order lc" in p for p in default["layers"][0]["problems"])
    assert default["layers"][1]["passed"]  # a 1-position patch: every order is one permutation
    check = json.loads(invoke("verify", source, converted, "--order", "lc", "--json").stdout)
    assert check["equivalent"]
    assert "seq.fc1: order lc as given" in check["notes"]
    assert check["layers"][0]["stride"] == [4]  # the recorded [2, 2] is no 1-D stride


def _readme_block() -> tuple[list[list[str]], list[str]]:
    """The commands and the quoted output of the 1-D and 3-D example in guide/checkpoints.md."""
    import re
    import shlex

    page = Path(__file__).resolve().parent.parent / "docs" / "guide" / "checkpoints.md"
    page = page.read_text()
    start = page.index("### 1-D and 3-D patches (Conv1d, Conv3d)")
    console = re.search(r"```console\n(.*?)```", page[start:], flags=re.S).group(1)
    quoted = re.search(r"```text\n(.*?)```", page[start:], flags=re.S).group(1)
    commands = [shlex.split(line[2:]) for line in console.replace("\\\n", " ").splitlines()]
    return commands, quoted.splitlines()


def test_the_readme_example_runs_and_prints_what_it_quotes(invoke, tmp_path, samples, monkeypatch):
    import shutil

    shutil.copytree(samples, tmp_path / "sample_checkpoints")
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    commands, quoted = _readme_block()
    printed = []
    for command in commands:
        assert command[0] == "fcconv"
        printed += invoke(*command[1:]).stderr.splitlines()
    assert [line for line in quoted if line not in printed] == []
    assert (tmp_path / "out" / "seq_head.conv.safetensors").is_file()


@pytest.mark.parametrize("ndim", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_every_dtype_streams_and_verifies(invoke, tmp_path, dtype, ndim) -> None:
    """Bytes permuted as unsigned integers of their width (lc, hwdc move them), never as values."""
    tensors = {key: value.to(dtype) for key, value in state().items()}
    source, converted = tmp_path / "model.safetensors", tmp_path / "model.conv.safetensors"
    save_file(tensors, str(source))
    options, order = RUNS[ndim]
    document = json.loads(invoke("convert", source, *options, "--json").stdout)
    assert document["mode"] == "streamed" and document["verification"]["equivalent"]
    after = read_tensors(converted)
    for name, (sizes, channels, _) in heads(ndim).items():
        expected = kernel_by_definition(tensors[f"{name}.weight"], channels, sizes, order)
        assert after[f"{name}.weight"].dtype == dtype
        assert torch.equal(after[f"{name}.weight"].view(torch.uint8), expected.view(torch.uint8))
    check = json.loads(invoke("verify", source, converted, "--json").stdout)
    assert check["equivalent"]
    assert {layer["dtype"] for layer in check["layers"]} == {str(dtype).removeprefix("torch.")}


def test_a_claimed_patch_of_another_rank_is_a_difference(invoke, tmp_path) -> None:
    """Flags are checked, not trusted: a 2-D patch claimed for a Conv1d kernel fails (exit 1)."""
    source = write(tmp_path, "safetensors")
    invoke("convert", source, *RUNS[1][0])
    result = invoke("verify", source, tmp_path / "model.conv.safetensors", "--layer",
                    "seq.fc1=2x2", "--layer", "seq.fc2=1", "--json", exit=1)  # fmt: skip
    document = json.loads(result.stdout)
    assert document["layers"][0]["problems"] == [
        "seq.fc1.weight has shape (6, 8, 4), expected (6, 8, 2, 2) for patch 2x2x8"
    ]
    assert document["notes"][0] == (
        "seq.fc1: the converted kernel is 1-D (l=4,c=8), not 2-D as the patch 2x2x8 given "
        "says; checked as chw"
    )
