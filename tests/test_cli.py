"""The three commands from outside, through click's CliRunner (STYLE habit 8).

Every test asserts the exit code with the output in the failure message,
parses ``--json`` from ``result.stdout`` and looks for people's text in
``result.stderr``. Rich wraps long lines at the console width, so human text
is compared with its whitespace collapsed (``flat``), except in the one test
that checks the ``nn.Conv2d(...)`` line can be copied as printed.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from reference import bitwise_equal, kernel_of, same_object
from safetensors import safe_open
from torch import nn

SEED_CONV2D = "nn.Conv2d(10, 64, kernel_size=(20, 20), stride=(20, 20), padding=0, bias=True)"
ORDERS = ("chw", "cwh", "hcw", "hwc", "wch", "whc")


def flat(text: str) -> str:
    """Human text with line wrapping undone: every run of whitespace becomes one space."""
    return " ".join(text.split())


def as_json(result) -> dict:
    """The one JSON document on stdout."""
    return json.loads(result.stdout)


def load_pt(path: Path) -> object:
    return torch.load(path, map_location="cpu", weights_only=True)


def tiny_linear(prefix: str = "", seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with a 3×4×2 patch Linear (N = 24, all six orders distinct)."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"{prefix}features.weight": torch.randn(2, 3, 3, 3, generator=g),
        f"{prefix}fc.weight": torch.randn(5, 24, generator=g),
        f"{prefix}fc.bias": torch.randn(5, generator=g),
    }


@pytest.fixture
def seed_pt(tmp_path: Path, samples: Path) -> Path:
    path = tmp_path / "seed_fc.pt"
    shutil.copyfile(samples / "seed_fc.pt", path)
    return path


# ------------------------------------------------------------------- help


def test_top_level_help_lists_every_command(invoke) -> None:
    from fcconv.cli import cli

    result = invoke("--help")
    assert "Usage:" in result.stdout
    for name in cli.commands:
        assert name in result.stdout, f"{name} missing from fcconv --help"
    assert {"inspect", "convert", "verify"} <= set(cli.commands)


@pytest.mark.parametrize("command", ["inspect", "convert", "verify"])
def test_every_command_has_help(invoke, command: str) -> None:
    from fcconv.cli import cli

    result = invoke(command, "--help")
    assert result.stdout.startswith("Usage:"), result.stdout
    assert result.stderr == ""
    for param in cli.commands[command].params:
        for option in param.opts:
            if option.startswith("--"):
                assert option in result.stdout, f"{option} missing from {command} --help"


def test_every_registered_command_has_help(invoke) -> None:
    from fcconv.cli import cli

    for name in cli.commands:
        result = invoke(name, "--help")
        assert "Usage: " in result.stdout and name in result.stdout


def test_version(invoke) -> None:
    from fcconv import __version__

    assert __version__ in invoke("--version").stdout


def test_every_command_appears_in_readme() -> None:
    from fcconv.cli import cli

    readme = Path(__file__).resolve().parent.parent / "README.md"
    if not readme.exists():
        pytest.skip("README.md does not exist yet; this test checks it once it does")
    text = readme.read_text(encoding="utf-8")
    missing = [name for name in cli.commands if f"fcconv {name}" not in text]
    assert not missing, f"commands not documented in README.md: {missing}"


def test_no_arguments_prints_help_and_exits_2(invoke) -> None:
    result = invoke(exit=2)
    assert "Usage:" in result.stderr
    assert result.stdout == ""


# ---------------------------------------------------------------- inspect


def test_inspect_human_table_on_stderr(invoke, samples: Path) -> None:
    result = invoke("inspect", samples / "seed_fc.pt")
    assert result.stdout == ""
    text = flat(result.stderr)
    assert "fc" in text and "64 × 4000" in text and "float32" in text
    assert "20x20x10" in text


def test_inspect_json(invoke, samples: Path) -> None:
    result = invoke("inspect", samples / "seed_fc.pt", "--json")
    document = json.loads(result.stdout)
    assert result.stderr == ""
    assert document["format"] == "torch"
    [layer] = document["layers"]
    assert layer["name"] == "fc"
    assert (layer["out_features"], layer["in_features"]) == (64, 4000)
    assert layer["weight"] == "fc.weight" and layer["bias"] == "fc.bias"
    assert layer["dtype"] == "float32"
    assert "20x20x10" in layer["patches"]
    assert document["converted"] == []


def test_inspect_channels_lists_only_patches_with_that_many_channels(invoke, samples) -> None:
    document = json.loads(
        invoke("inspect", samples / "seed_fc.pt", "--channels", "10", "--json").stdout
    )
    patches = document["layers"][0]["patches"]
    assert patches[0] == "20x20x10"  # squarest first
    for patch in patches:
        h, w, c = map(int, patch.split("x"))
        assert c == 10 and h * w * c == 4000


def test_inspect_input_limits_patches_to_the_feature_map(invoke, samples) -> None:
    document = json.loads(
        invoke("inspect", samples / "seed_fc.pt", "--input", "25x25x10", "--json").stdout
    )
    patches = document["layers"][0]["patches"]
    assert "20x20x10" in patches
    for patch in patches:
        h, w, c = map(int, patch.split("x"))
        assert h <= 25 and w <= 25 and c == 10 and h * w * c == 4000


def test_inspect_lists_a_nested_prefixed_layer(invoke, samples) -> None:
    document = json.loads(invoke("inspect", samples / "training_checkpoint.pt", "--json").stdout)
    names = [layer["name"] for layer in document["layers"]]
    assert names == ["model.fc"]  # model.backbone is a 4-D conv, not Linear-shaped
    assert document["layers"][0]["in_features"] == 640


def test_inspect_shows_converted_layers(invoke, samples, tmp_path) -> None:
    out = tmp_path / "seed.conv.safetensors"
    invoke("convert", samples / "seed_fc.safetensors", "-o", out, "--layer", "fc",
           "--patch", "20x20x10", "--order", "hwc")  # fmt: skip
    document = json.loads(invoke("inspect", out, "--json").stdout)
    assert document["layers"] == []  # no 2-D weight left
    [converted] = document["converted"]
    assert converted["layer"] == "fc"
    assert converted["conv_shape"] == [64, 10, 20, 20]
    assert converted["order"] == "hwc" and converted["patch"] == "20x20x10"
    human = flat(invoke("inspect", out).stderr)
    assert "converted: fc conv 64×10×20×20" in human and "order hwc" in human


def test_inspect_bad_file_exits_2(invoke, tmp_path) -> None:
    result = invoke("inspect", tmp_path / "nope.pt", "--json", exit=2)
    error = json.loads(result.stdout)["error"]  # --json: the failure as a document too
    assert error["kind"] == "CheckpointError" and error["path"] == str(tmp_path / "nope.pt")
    assert result.stderr.startswith("fcconv: error: ") and "no such file" in result.stderr


# ---------------------------------------------------------------- convert


def test_convert_seed_reports_conv2d_line_and_geometry(invoke, seed_pt, tmp_path) -> None:
    out = tmp_path / "out.pt"
    result = invoke("convert", seed_pt, "-o", out, "--layer", "fc", "--patch", "20x20x10",
                    "--input", "100x60")  # fmt: skip
    assert result.stdout == ""
    text = flat(result.stderr)
    assert SEED_CONV2D in text
    assert "input 100×60×10 → output map 5×3×64 (15 windows)" in text
    assert "order chw" in text and "stride 20x20" in text
    assert "uncovered" not in text
    assert "equivalent" in text and f"wrote {out}" in text
    kernel = load_pt(out)["fc.weight"]
    assert kernel.shape == (64, 10, 20, 20)


def test_convert_json_carries_plan_geometry_and_verdict(invoke, seed_pt, tmp_path) -> None:
    out = tmp_path / "out.pt"
    result = invoke("convert", seed_pt, "-o", out, "--layer", "fc", "--patch", "20x20x10",
                    "--input", "100x60", "--json")  # fmt: skip
    assert result.stderr == ""
    document = json.loads(result.stdout)
    assert document["written"] is True and document["format"] == "torch"
    assert document["output"] == str(out)
    [layer] = document["layers"]
    assert layer["conv2d"] == SEED_CONV2D
    assert layer["linear_shape"] == [64, 4000] and layer["conv_shape"] == [64, 10, 20, 20]
    assert layer["order"] == "chw" and layer["stride"] == [20, 20]
    geometry = layer["geometry"]
    assert geometry["input"] == [100, 60, 10] and geometry["output_map"] == [5, 3, 64]
    assert geometry["uncovered_rows"] == 0 and geometry["uncovered_cols"] == 0
    verification = document["verification"]
    assert verification["equivalent"] is True and verification["exit_code"] == 0
    [check] = verification["layers"]
    assert check["exact"] is True and check["passed"] is True
    assert check["functional"]["output_grid"] == [5, 3] and check["functional"]["cells"] == 15


def test_convert_warns_about_uncovered_rows(invoke, seed_pt, tmp_path) -> None:
    args = ("convert", seed_pt, "--layer", "fc", "--patch", "20x20x10", "--input", "105x60")
    human = flat(invoke(*args, "-o", tmp_path / "a.pt").stderr)
    assert "input 105×60×10 → output map 5×3×64" in human
    assert "leaves the last 5 row(s) uncovered" in human
    assert "column(s) uncovered" not in human
    document = json.loads(invoke(*args, "-o", tmp_path / "b.pt", "--json").stdout)
    geometry = document["layers"][0]["geometry"]
    assert geometry["uncovered_rows"] == 5 and geometry["uncovered_cols"] == 0
    assert any("5 row(s) uncovered" in w for w in geometry["warnings"])


def test_conv2d_line_is_printed_unbroken(invoke, seed_pt, tmp_path, monkeypatch) -> None:
    """The line is meant to be copied into code: the console must not break it."""
    monkeypatch.setenv("COLUMNS", "80")  # a common terminal, and rich's width for pipes
    result = invoke("convert", seed_pt, "-o", tmp_path / "o.pt", "--layer", "fc",
                    "--patch", "20x20x10")  # fmt: skip
    assert SEED_CONV2D in result.stderr, result.stderr


def test_conv2d_line_builds_the_module_that_loads_the_weights(invoke, seed_pt, tmp_path) -> None:
    """The printed nn.Conv2d(...) loads the output and maps 100×60 to 5×3×64 = Linear per window."""
    out = tmp_path / "out.pt"
    args = ("-o", out, "--layer", "fc", "--patch", "20x20x10", "--order", "hwc", "--json")
    document = as_json(invoke("convert", seed_pt, *args))
    conv = eval(document["layers"][0]["conv2d"], {"nn": nn})  # noqa: S307 - our own output
    conv.load_state_dict({k.removeprefix("fc."): v for k, v in load_pt(out).items()})
    original = load_pt(seed_pt)
    x = torch.randn(1, 10, 100, 60, generator=torch.Generator().manual_seed(3))
    y = conv(x).detach()
    assert y.shape == (1, 64, 5, 3)
    for p in range(5):
        for q in range(3):
            window = x[0, :, 20 * p : 20 * p + 20, 20 * q : 20 * q + 20]
            vector = window.permute(1, 2, 0).reshape(-1)  # hwc: channel fastest
            expected = original["fc.weight"] @ vector + original["fc.bias"]
            torch.testing.assert_close(y[0, :, p, q], expected, rtol=1e-4, atol=1e-4)


def test_convert_several_layers_in_one_call(invoke, samples, tmp_path) -> None:
    out = tmp_path / "head.conv.safetensors"
    result = invoke("convert", samples / "head_fc6_fc7.safetensors", "-o", out,
                    "--layer", "fc6=6x6x8", "--layer", "fc7=1x1", "--json")  # fmt: skip
    document = json.loads(result.stdout)
    fc6, fc7 = document["layers"]
    assert (fc6["layer"], fc7["layer"]) == ("fc6", "fc7")
    assert fc6["conv_shape"] == [32, 8, 6, 6] and fc6["stride"] == [6, 6]
    assert fc7["conv_shape"] == [10, 32, 1, 1] and fc7["stride"] == [1, 1]
    assert fc6["conv2d"] == (
        "nn.Conv2d(8, 32, kernel_size=(6, 6), stride=(6, 6), padding=0, bias=True)"
    )
    assert fc7["conv2d"] == (
        "nn.Conv2d(32, 10, kernel_size=(1, 1), stride=(1, 1), padding=0, bias=True)"
    )
    assert document["verification"]["equivalent"] is True
    with safe_open(str(out), framework="pt") as handle:
        assert handle.get_slice("fc6.weight").get_shape() == [32, 8, 6, 6]
        assert handle.get_slice("fc7.weight").get_shape() == [10, 32, 1, 1]


def test_convert_default_output_name(invoke, samples, tmp_path) -> None:
    model = tmp_path / "model.pt"
    shutil.copyfile(samples / "seed_fc.pt", model)
    result = invoke("convert", model, "--layer", "fc", "--patch", "20x20x10")
    expected = tmp_path / "model.conv.pt"
    assert expected.exists()
    assert f"wrote {expected}" in flat(result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.conv.pt", "model.pt"]


def test_convert_default_output_name_keeps_safetensors(invoke, samples, tmp_path) -> None:
    model = tmp_path / "model.safetensors"
    shutil.copyfile(samples / "seed_fc.safetensors", model)
    document = json.loads(
        invoke("convert", model, "--layer", "fc", "--patch", "20x20", "--json").stdout
    )
    assert document["output"] == str(tmp_path / "model.conv.safetensors")
    assert document["format"] == "safetensors"
    assert (tmp_path / "model.conv.safetensors").exists()


def test_convert_nested_training_checkpoint_by_suffix(invoke, samples, tmp_path) -> None:
    out = tmp_path / "trained.conv.pt"
    args = ("-o", out, "--layer", "fc", "--patch", "8x8x10", "--json")
    document = as_json(invoke("convert", samples / "training_checkpoint.pt", *args))
    assert document["layers"][0]["layer"] == "model.fc"
    assert document["layers"][0]["weight"] == "model.fc.weight"
    before, after = load_pt(samples / "training_checkpoint.pt"), load_pt(out)
    assert list(after) == list(before) == ["state_dict", "optimizer", "epoch", "hparams"]
    for key in ("optimizer", "epoch", "hparams"):
        assert same_object(before[key], after[key]), key
    assert list(after["state_dict"]) == list(before["state_dict"])
    for key in ("model.backbone.weight", "model.backbone.bias", "model.fc.bias"):
        assert bitwise_equal(before["state_dict"][key], after["state_dict"][key]), key
    kernel = after["state_dict"]["model.fc.weight"]
    assert bitwise_equal(
        kernel, kernel_of(before["state_dict"]["model.fc.weight"], 10, 8, 8, "chw")
    )


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.", "module._orig_mod."])
def test_prefixed_keys_match_by_unique_suffix(invoke, tmp_path, prefix: str) -> None:
    source = tmp_path / "prefixed.pt"
    torch.save(tiny_linear(prefix), source)
    document = json.loads(
        invoke("convert", source, "--layer", "fc", "--patch", "3x4x2", "--json").stdout
    )
    assert document["layers"][0]["weight"] == f"{prefix}fc.weight"
    after = load_pt(tmp_path / "prefixed.conv.pt")
    assert list(after) == list(tiny_linear(prefix))
    assert after[f"{prefix}fc.weight"].shape == (5, 2, 3, 4)


def test_full_prefixed_name_also_works(invoke, tmp_path) -> None:
    source = tmp_path / "p.pt"
    torch.save(tiny_linear("module."), source)
    document = json.loads(
        invoke("convert", source, "--layer", "module.fc", "--patch", "3x4", "--json").stdout
    )
    assert document["layers"][0]["patch"] == "3x4x2"


def test_convert_to_and_from_stdio_in_process(invoke, samples) -> None:
    data = (samples / "seed_fc.pt").read_bytes()
    result = invoke("convert", "-", "-o", "-", "--layer", "fc", "--patch", "20x20x10", input=data)
    assert "wrote stdout" in flat(result.stderr)
    converted = torch.load(io.BytesIO(result.stdout_bytes), weights_only=True)
    original = load_pt(samples / "seed_fc.pt")
    assert bitwise_equal(
        converted["fc.weight"], kernel_of(original["fc.weight"], 10, 20, 20, "chw")
    )
    assert bitwise_equal(converted["fc.bias"], original["fc.bias"])


def test_convert_json_with_checkpoint_on_stdout_is_refused(invoke, seed_pt) -> None:
    result = invoke("convert", seed_pt, "-o", "-", "--layer", "fc", "--patch", "20x20",
                    "--json", exit=2)  # fmt: skip
    assert json.loads(result.stdout)["error"]["kind"] == "SpecError"  # the report, not data
    assert result.stderr.startswith("fcconv: error: ") and "stdout" in result.stderr


def test_convert_no_verify_writes_without_checks(invoke, seed_pt, tmp_path) -> None:
    out = tmp_path / "o.pt"
    args = ("-o", out, "--layer", "fc", "--patch", "20x20", "--no-verify", "--json")
    document = as_json(invoke("convert", seed_pt, *args))
    assert document["verification"] is None and document["written"] is True
    assert load_pt(out)["fc.weight"].shape == (64, 10, 20, 20)


def _damage_one_element(monkeypatch, path: str) -> None:
    """Make the conversion put 1 + the right value at kernel [3, 2, 1, 0] (a chw 20x20x10 patch)."""
    if path == "in memory":
        from fcconv import plan

        real = plan.linear_weight_to_conv_nd

        def off_by_one_element(weight, patch, order, **options):
            kernel = real(weight, patch, order, **options).clone()
            kernel[3, 2, 1, 0] += 1.0
            return kernel

        monkeypatch.setattr(plan, "linear_weight_to_conv_nd", off_by_one_element)
        return
    import os
    import struct

    from fcconv.io.streaming import _Writer

    real_permute = _Writer.permute

    def permute_then_damage(self, move, checksum=False):
        crc = real_permute(self, move, checksum)
        element = 3 * move.features + 2 * 400 + 1 * 20 + 0  # row 3, tap (2, 1, 0)
        (value,) = struct.unpack("<f", os.pread(self.source, 4, move.src_offset + element * 4))
        os.pwrite(self.output, struct.pack("<f", value + 1.0), move.dst_offset + element * 4)
        return crc

    monkeypatch.setattr(_Writer, "permute", permute_then_damage)


@pytest.mark.parametrize("path", ["streamed", "in memory"])
def test_convert_exits_1_and_writes_nothing_when_verification_fails(
    invoke, seed_pt, tmp_path, monkeypatch, path
) -> None:
    if path == "in memory":  # the legacy format is converted in memory
        torch.save(torch.load(seed_pt), seed_pt, _use_new_zipfile_serialization=False)
    _damage_one_element(monkeypatch, path)
    out = tmp_path / "o.pt"
    human = invoke("convert", seed_pt, "-o", out, "--layer", "fc", "--patch", "20x20x10", exit=1)
    assert not out.exists()
    text = flat(human.stderr)
    assert "not written" in text and "fc.weight" in text
    assert "conv [3, 2, 1, 0]" in text  # where: the kernel index of the bad element
    args = ("-o", out, "--layer", "fc", "--patch", "20x20x10", "--json")
    document = as_json(invoke("convert", seed_pt, *args, exit=1))
    assert document["written"] is False
    assert document["verification"]["equivalent"] is False
    assert document["verification"]["exit_code"] == 1
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed_fc.pt"]


def test_convert_without_layer_is_a_usage_error(invoke, seed_pt) -> None:
    result = invoke("convert", seed_pt, "--patch", "20x20x10", exit=2)
    assert result.stderr.startswith("fcconv: error: ") and "--layer" in result.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["convert", "SEED", "--bogus"], ["--bogus", "convert --help"]),
        (["convert"], ["Missing argument"]),
        (["verify", "SEED"], ["Missing argument"]),
        (["frobnicate"], ["frobnicate"]),
    ],
)
def test_click_usage_errors_are_one_line_exit_2(invoke, seed_pt, args, words) -> None:
    result = invoke(*[seed_pt if a == "SEED" else a for a in args], exit=2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcconv: error: "), result.stderr
    for word in words:
        assert word in lines[0]


# ----------------------------------------------------------------- verify


def test_verify_exit_0_and_json_verdict(invoke, seed_pt, tmp_path) -> None:
    out = tmp_path / "o.pt"
    invoke("convert", seed_pt, "-o", out, "--layer", "fc", "--patch", "20x20x10")
    human = invoke("verify", seed_pt, out, "--input", "100x60")
    assert human.stdout == ""
    text = flat(human.stderr)
    assert "fc: pass" in text and "equivalent" in text and "NOT" not in text
    assert "100×60 → 5×3×64" in text
    document = json.loads(invoke("verify", seed_pt, out, "--input", "100x60", "--json").stdout)
    assert document["equivalent"] is True and document["exit_code"] == 0
    assert document["differences"] == []
    [layer] = document["layers"]
    assert layer["passed"] is True and layer["exact"] is True
    assert layer["functional"]["input_size"] == [100, 60]
    assert layer["functional"]["output_grid"] == [5, 3]


def test_verify_exit_1_and_json_verdict(invoke, seed_pt, tmp_path) -> None:
    out = tmp_path / "o.pt"
    invoke("convert", seed_pt, "-o", out, "--layer", "fc", "--patch", "20x20x10", "--order", "hwc")
    human = invoke("verify", seed_pt, out, "--order", "chw", exit=1)
    assert "NOT equivalent" in flat(human.stderr)
    document = json.loads(invoke("verify", seed_pt, out, "--order", "chw", "--json", exit=1).stdout)
    assert document["equivalent"] is False and document["exit_code"] == 1


def test_verify_judges_the_default_order_without_a_record_or_flag(invoke, tmp_path) -> None:
    """A .pt keeps no record and random weights no evidence: the model is taken to flatten
    chw, PyTorch's convention; a kernel in any other order is a difference naming it."""
    source = tmp_path / "m.pt"
    torch.save(tiny_linear(), source)
    for order in ORDERS:
        out = tmp_path / f"m.{order}.pt"
        invoke("convert", source, "-o", out, "--layer", "fc", "--patch", "3x4x2", "--order", order)
        if order == "chw":
            document = json.loads(invoke("verify", source, out, "--json").stdout)
            assert document["layers"][0]["order_from"] == "default"
            continue
        failed = json.loads(invoke("verify", source, out, "--json", exit=1).stdout)
        (layer,) = failed["layers"]
        assert layer["order"] == "chw" and layer["order_from"] == "default"
        assert any(f"--order {order}" in p and f'order="{order}"' in p for p in layer["problems"])
        asserted = json.loads(invoke("verify", source, out, "--order", order, "--json").stdout)
        assert asserted["equivalent"] is True
        assert asserted["layers"][0]["order"] == order
        assert asserted["layers"][0]["order_from"] == "flag"


def test_verify_says_when_orders_coincide(invoke, samples, tmp_path) -> None:
    out = tmp_path / "head.conv.pt"  # .pt: no provenance, the default order is judged
    invoke("convert", samples / "head_fc6_fc7.safetensors", "-o", out, "--layer", "fc6=6x6x8",
           "--layer", "fc7=1x1")  # fmt: skip
    result = invoke("verify", samples / "head_fc6_fc7.safetensors", out, "--json")
    document = json.loads(result.stdout)
    assert document["equivalent"] is True
    notes = " ".join(document["notes"])
    assert "fc6: order chw, the framework's default" in notes
    assert "same permutation for a 1x1x32 patch" in notes


def test_verify_uses_safetensors_provenance(invoke, samples, tmp_path) -> None:
    out = tmp_path / "seed.conv.safetensors"
    invoke("convert", samples / "seed_fc.safetensors", "-o", out, "--layer", "fc",
           "--patch", "20x20x10", "--order", "wch", "--stride", "10x10")  # fmt: skip
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["source"] == "fcconv samples"  # the input's metadata is kept
    record = json.loads(metadata["fcconv"])
    assert record["layers"]["fc"]["order"] == "wch"
    assert record["layers"]["fc"]["patch"] == "20x20x10"
    assert record["layers"]["fc"]["stride"] == [10, 10]
    document = json.loads(invoke("verify", samples / "seed_fc.safetensors", out, "--json").stdout)
    assert document["equivalent"] is True
    assert "fc: order wch from the file's metadata" in document["notes"]
    [layer] = document["layers"]
    assert layer["stride"] == [10, 10]  # from the metadata, not the default
    assert layer["functional"]["output_grid"] == [2, 2]


def test_verify_explicit_flags_are_checked(invoke, seed_pt, tmp_path) -> None:
    out = tmp_path / "o.pt"
    invoke("convert", seed_pt, "-o", out, "--layer", "fc", "--patch", "20x20x10")
    invoke("verify", seed_pt, out, "--layer", "fc", "--patch", "20x20x10", "--order", "chw")
    result = invoke("verify", seed_pt, out, "--layer", "fc", "--patch", "10x40x10", exit=1)
    assert "NOT equivalent" in flat(result.stderr)


def test_verify_same_file_twice_exits_2(invoke, seed_pt) -> None:
    result = invoke("verify", seed_pt, seed_pt, exit=2)
    assert result.stderr.startswith("fcconv: error: ")
    assert "no converted layer" in result.stderr


def test_verify_files_in_the_wrong_order_exits_2(invoke, seed_pt, tmp_path) -> None:
    out = tmp_path / "o.pt"
    invoke("convert", seed_pt, "-o", out, "--layer", "fc", "--patch", "20x20x10")
    result = invoke("verify", out, seed_pt, exit=2)
    assert "no converted layer" in result.stderr and len(result.stderr.splitlines()) == 1


def test_verify_both_from_stdin_exits_2(invoke) -> None:
    result = invoke("verify", "-", "-", exit=2, input=b"")
    assert result.stderr.startswith("fcconv: error: ") and "stdin" in result.stderr


def test_verify_reads_converted_from_stdin(invoke, seed_pt, tmp_path) -> None:
    out = tmp_path / "o.pt"
    invoke("convert", seed_pt, "-o", out, "--layer", "fc", "--patch", "20x20x10")
    document = json.loads(invoke("verify", seed_pt, "-", "--json", input=out.read_bytes()).stdout)
    assert document["equivalent"] is True


def test_nested_verify(invoke, samples, tmp_path) -> None:
    out = tmp_path / "t.pt"
    invoke(
        "convert", samples / "training_checkpoint.pt", "-o", out, "--layer", "fc", "--patch", "8x8"
    )
    document = json.loads(
        invoke("verify", samples / "training_checkpoint.pt", out, "--json").stdout
    )
    assert document["equivalent"] is True
    assert document["layers"][0]["layer"] == "model.fc"


def test_safetensors_output_of_a_torch_input_gets_provenance(invoke, seed_pt, tmp_path) -> None:
    out = tmp_path / "o.safetensors"
    invoke("convert", seed_pt, "-o", out, "--layer", "fc", "--patch", "20x20x10", "--order", "hcw")
    with safe_open(str(out), framework="pt") as handle:
        record = json.loads(handle.metadata()["fcconv"])
    assert record["layers"]["fc"]["order"] == "hcw"
    document = json.loads(invoke("verify", seed_pt, out, "--json").stdout)
    assert "fc: order hcw from the file's metadata" in document["notes"]


def test_state_dict_of_a_bare_linear(invoke, tmp_path) -> None:
    """torch.save(nn.Linear(24, 5).state_dict()) has keys "weight" and "bias", no module name."""
    linear = nn.Linear(24, 5)
    torch.save(linear.state_dict(), tmp_path / "fc.pt")
    document = json.loads(invoke("inspect", tmp_path / "fc.pt", "--json").stdout)
    assert [layer["weight"] for layer in document["layers"]] == ["weight"], document
    name = document["layers"][0]["name"]  # whatever inspect calls it, convert must accept it
    invoke("convert", tmp_path / "fc.pt", "--layer", name, "--patch", "3x4x2")
    converted = load_pt(tmp_path / "fc.conv.pt")
    assert converted["weight"].shape == (5, 2, 3, 4)
