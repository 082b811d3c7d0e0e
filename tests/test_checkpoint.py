"""Checkpoint formats end to end (SPEC §3): what goes in comes out, plus the conversion.

Each test converts with the real command and reads the result back with
torch or safetensors directly, never with fcconv's own loader, so a bug in
the loader cannot hide a bug in the writer. Tensors are compared by their
bytes and dtype; the expected kernel is SPEC §1 written out by hand.
"""

from __future__ import annotations

import io
import json
import os
import stat
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from reference import bitwise_equal, kernel_of, same_object
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def load_pt(path: Path | bytes) -> object:
    source = io.BytesIO(path) if isinstance(path, bytes) else path
    return torch.load(source, map_location="cpu", weights_only=True)


def mixed_state(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A state dict whose untouched entries cover many dtypes, with fc in the middle."""
    g = torch.Generator().manual_seed(7)
    return {
        "features.weight": torch.randn(2, 3, 3, 3, generator=g),
        "bn.running_mean": torch.randn(2, generator=g, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(12, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "fc.weight": torch.randn(5, 24, generator=g).to(dtype),
        "fc.bias": torch.randn(5, generator=g).to(dtype),
        "embedding": torch.randn(4, 3, generator=g).to(torch.float16),
        "head.weight": torch.randn(3, 5, generator=g),
        "bits": torch.tensor([-0.0, float("nan"), float("inf")]),
    }


CONVERT = ("--layer", "fc", "--patch", "3x4x2", "--order", "hwc")


def assert_converted(original: dict, converted: dict, order: str = "hwc") -> None:
    """Same keys in the same order, untouched tensors bit-identical, fc.weight permuted."""
    assert list(converted) == list(original)  # order kept, nothing added or dropped
    for key, tensor in original.items():
        if key == "fc.weight":
            expected = kernel_of(tensor, 2, 3, 4, order)
            assert bitwise_equal(converted[key], expected), key
        else:
            assert bitwise_equal(converted[key], tensor), f"{key} changed"


# ----------------------------------------------------------- torch pickles


@pytest.mark.parametrize(
    ("suffix", "legacy"),
    [(".pt", False), (".pt", True), (".pth", False), (".bin", False), (".ckpt", True)],
    ids=["pt", "pt-legacy", "pth", "bin", "ckpt-legacy"],
)
def test_torch_round_trip(invoke, tmp_path: Path, suffix: str, legacy: bool) -> None:
    source = tmp_path / f"model{suffix}"
    original = mixed_state()
    torch.save(original, source, _use_new_zipfile_serialization=not legacy)
    assert zipfile.is_zipfile(source) is not legacy
    document = json.loads(invoke("convert", source, *CONVERT, "--json").stdout)
    out = tmp_path / f"model.conv{suffix}"
    assert document["output"] == str(out) and document["format"] == "torch"
    converted = load_pt(out)
    assert type(converted) is dict
    assert_converted(original, converted)
    invoke("verify", source, out, "--order", "hwc")  # a .pt keeps no record of the order


def test_state_dict_of_a_module_keeps_its_type_and_version_metadata(invoke, tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Flatten(), nn.Linear(24, 5))
    state = model.state_dict()
    torch.save(state, tmp_path / "seq.pt")
    invoke("convert", tmp_path / "seq.pt", "--layer", "2", "--patch", "3x4x2")
    converted = load_pt(tmp_path / "seq.conv.pt")
    assert type(converted) is OrderedDict
    assert converted._metadata == state._metadata  # load_state_dict's version records
    assert list(converted) == list(state)
    conv = nn.Conv2d(2, 5, kernel_size=(3, 4), stride=(3, 4))
    conv.load_state_dict({"weight": converted["2.weight"], "bias": converted["2.bias"]})


def test_tied_tensors_stay_tied(invoke, tmp_path) -> None:
    shared = torch.randn(3, 5)
    torch.save(
        {"fc.weight": torch.randn(5, 24), "a.weight": shared, "b.weight": shared}, tmp_path / "t.pt"
    )
    invoke("convert", tmp_path / "t.pt", "--layer", "fc", "--patch", "3x4x2")
    converted = load_pt(tmp_path / "t.conv.pt")
    assert converted["a.weight"].data_ptr() == converted["b.weight"].data_ptr()


# ------------------------------------------------------------- safetensors


def test_safetensors_round_trip_keeps_metadata_and_adds_provenance(invoke, tmp_path) -> None:
    source = tmp_path / "model.safetensors"
    original = mixed_state()
    save_file(original, source, metadata={"source": "unit test", "license": "MIT"})
    invoke("convert", source, *CONVERT, "--stride", "1x2")
    out = tmp_path / "model.conv.safetensors"
    converted = load_file(out)
    assert set(converted) == set(original)
    for key, tensor in original.items():
        expected = kernel_of(tensor, 2, 3, 4, "hwc") if key == "fc.weight" else tensor
        assert bitwise_equal(converted[key], expected), key
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["source"] == "unit test" and metadata["license"] == "MIT"
    record = json.loads(metadata["fcconv"])
    assert record["version"]
    assert record["layers"] == {
        "fc": {"patch": "3x4x2", "order": "hwc", "stride": [1, 2], "linear_shape": [5, 24]}
    }


def test_provenance_accumulates_over_two_conversions(invoke, samples, tmp_path) -> None:
    first, second = tmp_path / "fc6.safetensors", tmp_path / "both.safetensors"
    invoke("convert", samples / "head_fc6_fc7.safetensors", "-o", first, "--layer", "fc6=6x6x8",
           "--order", "hwc")  # fmt: skip
    invoke("convert", first, "-o", second, "--layer", "fc7=1x1")
    with safe_open(str(second), framework="pt") as handle:
        layers = json.loads(handle.metadata()["fcconv"])["layers"]
    assert layers["fc6"]["order"] == "hwc" and layers["fc7"]["patch"] == "1x1x32"
    document = json.loads(
        invoke("verify", samples / "head_fc6_fc7.safetensors", second, "--json").stdout
    )
    assert document["equivalent"] is True
    assert [layer["layer"] for layer in document["layers"]] == ["fc6", "fc7"]


def test_safetensors_is_told_by_content_whatever_its_header_length(invoke, tmp_path) -> None:
    """A header length with 0x80 as its low byte (1 file in 32) is not a pickle."""
    source = tmp_path / "m.safetensors"
    for pad in range(64):  # metadata of this length makes the header 128 + 256·k bytes
        save_file({"fc.weight": torch.ones(5, 24)}, source, metadata={"note": "x" * pad})
        if source.read_bytes()[0] == 0x80:
            break
    assert source.read_bytes()[0] == 0x80
    document = json.loads(invoke("inspect", source, "--json").stdout)
    assert document["format"] == "safetensors"
    invoke("convert", source, "--layer", "fc", "--patch", "3x4x2")
    with safe_open(str(tmp_path / "m.conv.safetensors"), framework="pt") as handle:
        assert handle.metadata()["note"] == "x" * pad  # metadata kept: read as safetensors


def test_torch_file_misnamed_safetensors_loads_by_content(invoke, tmp_path) -> None:
    original = mixed_state()
    torch.save(original, tmp_path / "odd.safetensors")
    document = json.loads(invoke("inspect", tmp_path / "odd.safetensors", "--json").stdout)
    assert document["format"] == "torch"
    invoke("convert", tmp_path / "odd.safetensors", "-o", tmp_path / "odd.pt", *CONVERT)
    assert_converted(original, load_pt(tmp_path / "odd.pt"))


# ------------------------------------------------------- format switching


def test_torch_to_safetensors_by_extension(invoke, tmp_path) -> None:
    original = mixed_state()
    torch.save(original, tmp_path / "m.pt")
    invoke("convert", tmp_path / "m.pt", "-o", tmp_path / "m.safetensors", *CONVERT)
    converted = load_file(tmp_path / "m.safetensors")
    assert set(converted) == set(original)
    assert bitwise_equal(converted["fc.weight"], kernel_of(original["fc.weight"], 2, 3, 4, "hwc"))
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()["fcconv"])["layers"]["fc"]["order"] == "hwc"


def test_safetensors_to_torch_adds_no_keys(invoke, tmp_path) -> None:
    original = mixed_state()
    save_file(original, tmp_path / "m.safetensors", metadata={"source": "x"})
    invoke("convert", tmp_path / "m.safetensors", "-o", tmp_path / "m.pt", *CONVERT)
    converted = load_pt(tmp_path / "m.pt")
    assert type(converted) is dict
    assert set(converted) == set(original)  # no provenance or metadata key in a state dict


def test_format_option_overrides_the_extension(invoke, tmp_path) -> None:
    torch.save(mixed_state(), tmp_path / "m.pt")
    invoke("convert", tmp_path / "m.pt", "-o", tmp_path / "out.bin", *CONVERT, "--format",
           "safetensors")  # fmt: skip
    assert not zipfile.is_zipfile(tmp_path / "out.bin")
    assert set(load_file(tmp_path / "out.bin")) == set(mixed_state())


def test_safetensors_through_stdin_and_stdout(invoke, tmp_path) -> None:
    original = mixed_state()
    save_file(original, tmp_path / "m.safetensors", metadata={"source": "pipe"})
    result = invoke("convert", "-", "-o", "-", *CONVERT,
                    input=(tmp_path / "m.safetensors").read_bytes())  # fmt: skip
    (tmp_path / "out.safetensors").write_bytes(result.stdout_bytes)
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as handle:
        assert handle.metadata()["source"] == "pipe"
        assert "fcconv" in handle.metadata()
        assert bitwise_equal(handle.get_tensor("embedding"), original["embedding"])


# ------------------------------------------------- nested training checkpoints


def training_state(key: str) -> dict:
    weights = mixed_state()
    return {
        "epoch": 3,
        key: weights,
        "optimizer": {
            "state": {0: {"momentum_buffer": torch.arange(6.0).reshape(2, 3)}},
            "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0, 1]}],
        },
        "hyper_parameters": {"lr": 0.1, "sizes": [1, 2, 3], "name": "run-7", "flag": None},
        "global_step": 1234,
    }


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict", "module"])
def test_nested_training_checkpoint(invoke, tmp_path, key: str) -> None:
    original = training_state(key)
    torch.save(original, tmp_path / "train.ckpt")
    invoke("convert", tmp_path / "train.ckpt", *CONVERT)
    converted = load_pt(tmp_path / "train.conv.ckpt")
    assert list(converted) == list(original)
    for name in original:
        if name != key:
            assert same_object(original[name], converted[name]), f"{name} changed"
    assert_converted(original[key], converted[key])
    invoke("verify", tmp_path / "train.ckpt", tmp_path / "train.conv.ckpt", "--order", "hwc")


def test_state_dict_two_levels_down(invoke, tmp_path) -> None:
    original = {"trainer": {"weights_of_the_run": mixed_state(), "seed": 5}, "step": 9}
    torch.save(original, tmp_path / "deep.pt")
    invoke("convert", tmp_path / "deep.pt", *CONVERT)
    converted = load_pt(tmp_path / "deep.conv.pt")
    assert converted["step"] == 9 and converted["trainer"]["seed"] == 5
    assert list(converted["trainer"]) == ["weights_of_the_run", "seed"]
    assert_converted(
        original["trainer"]["weights_of_the_run"], converted["trainer"]["weights_of_the_run"]
    )


# ------------------------------------------------------------------ dtypes


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_every_float_dtype_converts_and_verifies(invoke, tmp_path, dtype, suffix) -> None:
    original = mixed_state(dtype)
    source = tmp_path / f"m{suffix}"
    if suffix == ".pt":
        torch.save(original, source)
    else:
        save_file(original, source)
    invoke("convert", source, *CONVERT)
    out = tmp_path / f"m.conv{suffix}"
    converted = load_pt(out) if suffix == ".pt" else load_file(out)
    assert converted["fc.weight"].dtype == dtype
    assert bitwise_equal(converted["fc.weight"], kernel_of(original["fc.weight"], 2, 3, 4, "hwc"))
    assert bitwise_equal(converted["fc.bias"], original["fc.bias"])
    document = json.loads(invoke("verify", source, out, "--order", "hwc", "--json").stdout)
    assert document["equivalent"] is True
    functional = document["layers"][0]["functional"]
    assert functional["dtype"] == str(dtype).removeprefix("torch.")
    assert functional["float64"]["ratio"] <= 1.0
    assert functional["in_dtype"]["ratio"] is not None and functional["in_dtype"]["ratio"] <= 1.0


# ---------------------------------------------------------- atomic writes


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".fcconv-tmp")]


def test_success_leaves_no_temporary_and_plain_permissions(invoke, tmp_path) -> None:
    torch.save(mixed_state(), tmp_path / "m.pt")
    invoke("convert", tmp_path / "m.pt", *CONVERT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.conv.pt", "m.pt"]
    umask = os.umask(0)
    os.umask(umask)
    mode = stat.S_IMODE(os.stat(tmp_path / "m.conv.pt").st_mode)
    assert mode == 0o666 & ~umask  # what open() would give, not mkstemp's 0600


def test_existing_output_kept_without_force_replaced_with_force(invoke, tmp_path) -> None:
    original = mixed_state()
    torch.save(original, tmp_path / "m.pt")
    out = tmp_path / "out.pt"
    out.write_bytes(b"older result")
    invoke("convert", tmp_path / "m.pt", "-o", out, *CONVERT, exit=2)
    assert out.read_bytes() == b"older result"
    invoke("convert", tmp_path / "m.pt", "-o", out, *CONVERT, "--force")
    assert_converted(original, load_pt(out))
    assert not temporaries(tmp_path)


@pytest.mark.parametrize("path", ["streamed", "in memory"])
def test_failed_write_with_force_keeps_the_old_output(invoke, tmp_path, monkeypatch, path) -> None:
    import fcconv.io.checkpoint
    import fcconv.io.torch_streaming

    # a zip checkpoint is rewritten record by record; the legacy format in memory
    torch.save(mixed_state(), tmp_path / "m.pt", _use_new_zipfile_serialization=path == "streamed")
    out = tmp_path / "out.pt"
    out.write_bytes(b"older result")
    module, name = (
        (fcconv.io.torch_streaming, "_fill")
        if path == "streamed"
        else (fcconv.io.checkpoint, "_write")
    )
    real = getattr(module, name)

    def write_then_fail(*args):
        real(*args)  # the whole file, then the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, name, write_then_fail)
    result = invoke("convert", tmp_path / "m.pt", "-o", out, *CONVERT, "--force", exit=2)
    assert "No space left on device" in result.stderr
    assert out.read_bytes() == b"older result"
    assert not temporaries(tmp_path)


def test_atomic_output_never_shows_a_partial_file(tmp_path) -> None:
    from fcconv.io.atomic import atomic_output

    target = tmp_path / "t.bin"
    target.write_bytes(b"before")
    with pytest.raises(KeyboardInterrupt), atomic_output(target) as temporary:
        temporary.write_bytes(b"half of the new")
        assert target.read_bytes() == b"before"  # the target is untouched while writing
        raise KeyboardInterrupt
    assert target.read_bytes() == b"before"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin"]
    with atomic_output(target, force=True) as temporary:  # replacing needs force
        assert temporary.parent == tmp_path and temporary.name.endswith(".fcconv-tmp")
        temporary.write_bytes(b"after")
    assert target.read_bytes() == b"after"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.bin"]
