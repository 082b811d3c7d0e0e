"""Tests for fcconv.io.sharded: index validation, the sharded round trip, and its faults.

A small checkpoint is split over three shards with safetensors' own writer and
indexed the way transformers does it. Converted tensors are checked bit for
bit against ``fcconv.geometry.linear_weight_to_conv``, untouched shards and
the index byte for byte against the input.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from reference import bitwise_equal
from safetensors import safe_open
from safetensors.torch import save_file

from fcconv.errors import CLI_NAMES, CheckpointError, FcconvError, LayerError
from fcconv.geometry import Patch, linear_weight_to_conv
from fcconv.io.atomic import MARKER, default_output
from fcconv.io.safetensors import read_header
from fcconv.io.sharded import (
    convert_sharded,
    find_index,
    is_sharded,
    load_index,
    read_sharded_tensors,
)

ROOT = Path(__file__).resolve().parent.parent
PATCH = Patch(2, 3, 5)  # kh=2, kw=3, C=5: N=30
INDEX = "model.safetensors.index.json"
SHARDS = {
    "model-00001-of-00003.safetensors": ["features.0.weight", "features.0.bias"],
    "model-00002-of-00003.safetensors": ["classifier.0.weight", "classifier.0.bias"],
    "model-00003-of-00003.safetensors": ["classifier.3.weight", "classifier.3.bias"],
}


def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = {
        "features.0.weight": (5, 3, 3, 3),
        "features.0.bias": (5,),
        "classifier.0.weight": (9, PATCH.features),
        "classifier.0.bias": (9,),
        "classifier.3.weight": (4, PATCH.features),
        "classifier.3.bias": (4,),
    }
    return {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def make_sharded(folder: Path, index_extra: dict | None = None) -> Path:
    """A three-shard checkpoint as transformers writes it; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    everything = tensors()
    weight_map = {}
    for shard, names in SHARDS.items():
        save_file({n: everything[n] for n in names}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, shard))
    total = sum(t.numel() * t.element_size() for t in everything.values())
    index = {"metadata": {"total_size": total, "format": "pt"}, "weight_map": weight_map}
    index.update(index_extra or {})
    (folder / INDEX).write_text(json.dumps(index, indent=2))
    return folder


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_one_line(raised: pytest.ExceptionInfo, *fragments: str) -> None:
    value = raised.value  # as the command line prints it
    message = value.render(CLI_NAMES) if isinstance(value, FcconvError) else str(value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def read(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(name)


def siblings(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


# ------------------------------------------------------------- round trips


@pytest.mark.parametrize("as_index_file", [False, True])
def test_round_trip_rewrites_one_shard_and_copies_the_rest(
    tmp_path: Path, as_index_file: bool
) -> None:
    src = make_sharded(tmp_path / "model")
    before = folder_digest(src)
    dst = tmp_path / "model.conv"
    seen: list[tuple[int, int]] = []
    result = convert_sharded(
        src / INDEX if as_index_file else src,
        dst,
        {"classifier.0.weight": (PATCH, "hwc")},
        {"fcconv": "provenance"},
        block_bytes=64,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert folder_digest(src) == before
    after = folder_digest(dst)
    assert sorted(after) == sorted([INDEX, *SHARDS, MARKER])  # the marker: fcconv wrote it
    touched = "model-00002-of-00003.safetensors"
    for name in [INDEX, *SHARDS]:
        assert (after[name] == before[name]) == (name != touched), name

    original = tensors()
    kernel = read(dst / touched, "classifier.0.weight")
    expected = linear_weight_to_conv(original["classifier.0.weight"], PATCH, "hwc")
    assert bitwise_equal(kernel, expected)
    assert bitwise_equal(read(dst / touched, "classifier.0.bias"), original["classifier.0.bias"])
    assert read_header(dst / touched).metadata == {"format": "pt", "fcconv": "provenance"}

    assert result.index_path == dst / INDEX
    assert result.tensors["classifier.0.weight"].shape == (9, 5, 2, 3)
    assert result.metadata == load_index(src).metadata
    total = sum(p.stat().st_size for p in dst.iterdir() if p.name != MARKER)
    assert total == load_index(dst).file_bytes
    assert seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert siblings(tmp_path) == ["model", "model.conv"]


def test_layers_in_two_shards_and_a_metadata_function(tmp_path: Path) -> None:
    src = make_sharded(tmp_path / "model")
    calls = []

    def provenance(header, layers):
        calls.append((header.path.name, sorted(layers)))
        return {"layers": ",".join(sorted(layers))}

    layers = {"classifier.0.weight": (PATCH, "chw"), "classifier.3.weight": (PATCH, "wch")}
    convert_sharded(src, tmp_path / "out", layers, provenance)
    assert sorted(calls) == [
        ("model-00002-of-00003.safetensors", ["classifier.0.weight"]),
        ("model-00003-of-00003.safetensors", ["classifier.3.weight"]),
    ]
    original = tensors()
    converted = read_sharded_tensors(load_index(tmp_path / "out"), list(layers))
    for name, (patch, order) in layers.items():
        assert bitwise_equal(converted[name], linear_weight_to_conv(original[name], patch, order))
    shard = tmp_path / "out" / "model-00003-of-00003.safetensors"
    assert read_header(shard).metadata == {"layers": "classifier.3.weight"}


def test_link_hard_links_only_the_untouched_shards(tmp_path: Path) -> None:
    src = make_sharded(tmp_path / "model")
    dst = tmp_path / "out"
    convert_sharded(src, dst, {"classifier.0.weight": (PATCH, "hwc")}, link=True)
    for shard in SHARDS:
        linked = os.path.samefile(src / shard, dst / shard)
        assert linked == (shard != "model-00002-of-00003.safetensors"), shard
    assert not os.path.samefile(src / INDEX, dst / INDEX)


def test_other_index_keys_are_kept(tmp_path: Path) -> None:
    src = make_sharded(tmp_path / "model", {"extra": {"kept": True}})
    convert_sharded(src, tmp_path / "out", {"classifier.0.weight": (PATCH, "hwc")})
    assert json.loads((tmp_path / "out" / INDEX).read_text())["extra"] == {"kept": True}


def test_read_sharded_tensors_and_helpers(tmp_path: Path) -> None:
    src = make_sharded(tmp_path / "model")
    checkpoint = load_index(src)
    got = read_sharded_tensors(checkpoint, ["classifier.3.bias", "features.0.bias"])
    assert list(got) == ["classifier.3.bias", "features.0.bias"]
    assert bitwise_equal(got["features.0.bias"], tensors()["features.0.bias"])
    with pytest.raises(LayerError) as raised:
        read_sharded_tensors(checkpoint, ["nope"])
    assert_one_line(raised, "'nope'")
    assert (
        checkpoint.header_of("classifier.3.bias").path == src / "model-00003-of-00003.safetensors"
    )
    assert is_sharded(src) and is_sharded(src / INDEX)
    assert not is_sharded(src / "model-00001-of-00003.safetensors")
    assert find_index(src) == src / INDEX
    assert Path(default_output(src)) == (tmp_path / "model.conv").resolve()
    assert Path(default_output(src / INDEX)) == (tmp_path / "model.conv").resolve()


# ---------------------------------------------------------------- refusals


def test_output_folder_rules(tmp_path: Path) -> None:
    src = make_sharded(tmp_path / "model")
    layers = {"classifier.0.weight": (PATCH, "hwc")}
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("previous")
    with pytest.raises(CheckpointError) as raised:
        convert_sharded(src, dst, layers)
    assert_one_line(raised, "already exists", "--force")
    with pytest.raises(CheckpointError) as raised:  # not a folder fcconv wrote: kept
        convert_sharded(src, dst, layers, force=True)
    assert_one_line(raised, "fcconv did not write", "--force")
    assert sorted(p.name for p in dst.iterdir()) == ["old.txt"]

    (dst / "old.txt").unlink()
    dst.rmdir()
    convert_sharded(src, dst, layers)
    convert_sharded(src, dst, layers, force=True)  # a folder fcconv wrote: replaced
    assert sorted(p.name for p in dst.iterdir()) == sorted([INDEX, *SHARDS, MARKER])
    assert siblings(tmp_path) == ["model", "out"]

    for bad, fragment in [(src, "is or holds the input"), (tmp_path, "is or holds the input")]:
        with pytest.raises(CheckpointError) as raised:
            convert_sharded(src, bad, layers, force=True)
        assert_one_line(raised, fragment)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(CheckpointError) as raised:
        convert_sharded(src, tmp_path / "a-file", layers, force=True)
    assert_one_line(raised, "is a file")
    with pytest.raises(CheckpointError) as raised:
        convert_sharded(src, tmp_path / "a-file" / "out", layers)
    assert_one_line(raised, "is a file, not a folder")


def test_unknown_layer_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    src = make_sharded(tmp_path / "model")
    with pytest.raises(LayerError) as raised:
        convert_sharded(src, tmp_path / "out", {"fc.weight": (PATCH, "hwc")})
    assert_one_line(raised, "'fc.weight'", "fcconv inspect")
    with pytest.raises(LayerError):
        convert_sharded(src, tmp_path / "out", {"classifier.0.bias": (PATCH, "hwc")})
    assert siblings(tmp_path) == ["model"]


def test_folder_without_or_with_several_indexes(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError) as raised:
        load_index(empty)
    assert_one_line(raised, "with no *.safetensors.index.json")
    src = make_sharded(tmp_path / "model")
    (src / "other.safetensors.index.json").write_text((src / INDEX).read_text())
    with pytest.raises(CheckpointError) as raised:
        load_index(src)
    assert_one_line(raised, "several indexes", "give the one you mean")
    assert (
        load_index(src / "other.safetensors.index.json").weight_map
        == load_index(src / INDEX).weight_map
    )


# ------------------------------------------------------------------ faults


def break_index(folder: Path, change) -> None:
    index = json.loads((folder / INDEX).read_text())
    change(index)
    (folder / INDEX).write_text(json.dumps(index))


def drop_shard(folder: Path) -> None:
    (folder / "model-00003-of-00003.safetensors").unlink()


def ghost_tensor(folder: Path) -> None:
    break_index(folder, lambda i: i["weight_map"].update(ghost="model-00001-of-00003.safetensors"))


def moved_tensor(folder: Path) -> None:
    def move(index: dict) -> None:
        index["weight_map"]["classifier.3.bias"] = "model-00001-of-00003.safetensors"

    break_index(folder, move)


def unlisted_tensor(folder: Path) -> None:
    break_index(folder, lambda i: i["weight_map"].pop("features.0.bias"))


def header_disagrees(folder: Path) -> None:
    # The shard is rewritten holding another tensor than the one the index names.
    shard = folder / "model-00003-of-00003.safetensors"
    save_file({"classifier.3.weight": torch.zeros(4, 30), "renamed": torch.zeros(4)}, str(shard))


def truncated_shard(folder: Path) -> None:
    shard = folder / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])


def escaping_shard(folder: Path) -> None:
    break_index(folder, lambda i: i["weight_map"].update(x="../model-00001-of-00003.safetensors"))


def not_json(folder: Path) -> None:
    (folder / INDEX).write_text("{ not json")


def no_weight_map(folder: Path) -> None:
    (folder / INDEX).write_text(json.dumps({"metadata": {}}))


@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        (drop_shard, ["names shard model-00003-of-00003.safetensors", "fetch the missing shard"]),
        (ghost_tensor, ["'ghost'", "no shard holds it", "regenerate its index"]),
        (moved_tensor, ["'classifier.3.bias'", "it is in model-00003", "regenerate its index"]),
        (unlisted_tensor, ["holds 'features.0.bias'", "does not list it"]),
        (header_disagrees, ["'classifier.3.bias'", "no shard holds it"]),
        (truncated_shard, ["model-00002-of-00003.safetensors", "truncated"]),
        (escaping_shard, ["outside the index's folder"]),
        (not_json, ["not JSON", "re-download"]),
        (no_weight_map, ["no weight_map"]),
    ],
)
def test_damaged_checkpoints_are_one_line_errors(tmp_path: Path, damage, fragments) -> None:
    src = make_sharded(tmp_path / "model")
    damage(src)
    before = folder_digest(src)
    with pytest.raises(CheckpointError) as raised:
        convert_sharded(src, tmp_path / "out", {"classifier.0.weight": (PATCH, "hwc")})
    assert_one_line(raised, *fragments)
    assert folder_digest(src) == before
    assert siblings(tmp_path) == ["model"]


def test_header_disagreeing_by_an_extra_tensor(tmp_path: Path) -> None:
    src = make_sharded(tmp_path / "model")
    shard = src / "model-00001-of-00003.safetensors"
    everything = tensors()
    extra = {n: everything[n] for n in SHARDS[shard.name]} | {"stray": torch.ones(2)}
    save_file(extra, str(shard))
    with pytest.raises(CheckpointError) as raised:
        load_index(src)
    assert_one_line(raised, "shard model-00001-of-00003.safetensors holds 'stray'", "does not list")


@pytest.mark.parametrize("previous", [False, True])
def test_disk_full_midway_keeps_the_previous_folder_and_no_temp_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, previous: bool
) -> None:
    src = make_sharded(tmp_path / "model")
    before = folder_digest(src)
    dst = tmp_path / "out"
    if previous:
        convert_sharded(src, dst, {"classifier.0.weight": (PATCH, "chw")})
        old = folder_digest(dst)
    real = os.copy_file_range
    calls = []

    def fill_up(*args: int) -> int:
        calls.append(args)
        if len(calls) > 3:  # well into the second shard
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", fill_up)
    with pytest.raises(CheckpointError) as raised:
        convert_sharded(
            src, dst, {"classifier.0.weight": (PATCH, "hwc")}, force=True, block_bytes=128
        )
    assert_one_line(raised, str(dst), "No space left on device", "free some space")
    assert ".fcconv-tmp" not in str(raised.value)
    assert folder_digest(src) == before
    if previous:
        assert folder_digest(dst) == old
    assert siblings(tmp_path) == (["model", "out"] if previous else ["model"])


def test_link_across_devices_is_a_clean_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_sharded(tmp_path / "model")

    def cross_device(*args: object) -> None:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "link", cross_device)
    with pytest.raises(CheckpointError) as raised:
        convert_sharded(src, tmp_path / "out", {"classifier.0.weight": (PATCH, "hwc")}, link=True)
    assert_one_line(raised, "could not hard-link", "drop --link")
    assert siblings(tmp_path) == ["model"]


def test_failed_final_rename_restores_the_previous_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_sharded(tmp_path / "model")
    dst = tmp_path / "out"
    convert_sharded(src, dst, {"classifier.0.weight": (PATCH, "chw")})
    old = folder_digest(dst)
    import fcconv.io.atomic

    def fail(source, target):  # the new folder onto the target, after the old one moved aside
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(fcconv.io.atomic, "rename_noreplace", fail)
    with pytest.raises(CheckpointError) as raised:
        convert_sharded(src, dst, {"classifier.0.weight": (PATCH, "hwc")}, force=True)
    assert_one_line(raised, "Input/output error")
    assert folder_digest(dst) == old
    assert siblings(tmp_path) == ["model", "out"]


KILLED = textwrap.dedent(
    """
    import sys, time
    from fcconv.geometry import Patch
    from fcconv.io.sharded import convert_sharded

    def progress(done, total):
        print("writing", flush=True)
        time.sleep(0.05)

    convert_sharded(sys.argv[1], sys.argv[2], {"classifier.0.weight": (Patch(2, 3, 5), "hwc")},
                    block_bytes=64, progress=progress)
    """
)


def test_killed_mid_write_leaves_no_partial_folder(tmp_path: Path) -> None:
    """A killed process may leave only its ``.NAME.*.fcconv-tmp`` folder behind."""
    src = make_sharded(tmp_path / "model")
    before = folder_digest(src)
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(src), str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert child.stdout is not None
    for _ in range(3):
        assert child.stdout.readline() == "writing\n"
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    assert not (tmp_path / "out").exists()
    left = [name for name in siblings(tmp_path) if name != "model"]
    assert len(left) == 1 and left[0].startswith(".out.") and left[0].endswith(".fcconv-tmp")
    assert folder_digest(src) == before


def test_check_sees_the_complete_folder_before_it_is_renamed(tmp_path: Path) -> None:
    src = make_sharded(tmp_path / "model")
    dst = tmp_path / "out"
    seen = []

    def check(built) -> None:
        assert built.folder.name.endswith(".fcconv-tmp") and not dst.exists()
        seen.append(read_sharded_tensors(built, ["classifier.0.weight"])["classifier.0.weight"])

    convert_sharded(src, dst, {"classifier.0.weight": (PATCH, "hwc")}, check=check)
    expected = linear_weight_to_conv(tensors()["classifier.0.weight"], PATCH, "hwc")
    assert len(seen) == 1 and bitwise_equal(seen[0], expected)

    def refuse(built) -> None:
        raise AssertionError("verification failed")

    old = folder_digest(dst)
    with pytest.raises(AssertionError, match="verification failed"):
        convert_sharded(src, dst, {"classifier.0.weight": (PATCH, "cwh")}, force=True, check=refuse)
    assert folder_digest(dst) == old
    assert siblings(tmp_path) == ["model", "out"]
