"""``.pt`` → ``.pt`` record by record: what torch.load reads back is the conversion, bit for bit.

The expected checkpoint is built independently (the reference kernel of
tests/reference.py put into the loaded object) and compared with what
``torch.load`` reads from fcconv's output: ``weights_only``, memory-mapped,
and with torch computing the storage offsets itself. The zip must also be
one that zip tools accept (every CRC-32 right), and laid out as
``torch.save`` lays out the same object.
"""

from __future__ import annotations

import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from reference import kernel_of, same_object
from torch import nn

import fcconv.io.torch_streaming as torchzip
from fcconv import convert_checkpoint
from fcconv.io.checkpoint import load_checkpoint

C, KH, KW = 4, 2, 3  # fc reads 2x3x4 patches


def training_checkpoint(dtype: torch.dtype = torch.float32) -> dict:
    """A nested checkpoint with every kind of sharing torch.save preserves."""
    torch.manual_seed(3)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(C * KH * KW, 5), out=nn.Linear(5, 3)))
    model.to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, C * KH * KW, dtype=dtype)).float().sum().backward()
    optimizer.step()
    state = model.state_dict()  # an OrderedDict with _metadata
    state["fc.bias_alias"] = state["fc.bias"]  # the same tensor twice
    state["fc.row"] = state["fc.weight"][1]  # a view into the weight that gets converted
    state["out.slice"] = state["out.weight"][:, 1:3]  # a strided view of an untouched weight
    state["empty"] = torch.zeros(0, dtype=dtype)
    return {
        "state_dict": state,
        "optimizer": optimizer.state_dict(),
        "ema": {"fc.weight": nn.Parameter(model.fc.weight.detach() * 0.5)},
        "epoch": 7,
        "notes": ["a", ("tuple", 1)],
    }


def expected_after(checkpoint: dict, order: str) -> dict:
    state = checkpoint["state_dict"].copy()
    state._metadata = checkpoint["state_dict"]._metadata  # what torch.save keeps of a state dict
    state["fc.weight"] = kernel_of(state["fc.weight"], C, KH, KW, order).contiguous()
    return {**checkpoint, "state_dict": state}


def convert(src: Path, dst: Path, order: str = "hwc", **options) -> dict:
    result = convert_checkpoint(
        src, dst, layers=["fc"], patch=f"{KH}x{KW}x{C}", order=order, force=True, **options
    )
    assert result, result.to_dict()
    return result.to_dict()


@pytest.mark.parametrize("order", ["chw", "hwc", "wch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_load_reads_the_conversion_bit_for_bit(tmp_path, order, dtype) -> None:
    checkpoint = training_checkpoint(dtype)
    torch.save(checkpoint, tmp_path / "in.pt")
    document = convert(tmp_path / "in.pt", tmp_path / "out.pt", order)
    assert document["mode"] == "streamed" and document["format"] == "torch"
    expected = expected_after(checkpoint, order)
    for options in ({}, {"mmap": True}):
        loaded = torch.load(tmp_path / "out.pt", weights_only=True, **options)
        assert same_object(loaded, expected), options
        state = loaded["state_dict"]
        assert type(state) is OrderedDict and state._metadata == checkpoint["state_dict"]._metadata
        # sharing survives: the alias is the same storage, the untouched view still a view
        assert state["fc.bias_alias"].data_ptr() == state["fc.bias"].data_ptr()
        assert state["out.slice"].untyped_storage().data_ptr() == (
            state["out.weight"].untyped_storage().data_ptr()
        )
        assert type(loaded["ema"]["fc.weight"]) is nn.Parameter


def test_torch_finds_every_storage_where_it_computes_it(tmp_path) -> None:
    """The layout is torch's own: its offset arithmetic (meta and mmap loads) agrees."""
    from torch.utils.serialization import config

    checkpoint = training_checkpoint()
    torch.save(checkpoint, tmp_path / "in.pt")
    convert(tmp_path / "in.pt", tmp_path / "out.pt")
    before = config.load.calculate_storage_offsets
    config.load.calculate_storage_offsets = True  # torch's config objects are not monkeypatchable
    try:
        loaded = torch.load(tmp_path / "out.pt", weights_only=True, mmap=True)
    finally:
        config.load.calculate_storage_offsets = before
    assert same_object(loaded, expected_after(checkpoint, "hwc"))
    torchzip.open_archive(tmp_path / "out.pt")  # meta offsets match the zip's own directory


def test_every_crc_is_right_and_the_records_are_what_torch_save_writes(tmp_path) -> None:
    checkpoint = training_checkpoint()
    torch.save(checkpoint, tmp_path / "in.pt")
    convert(tmp_path / "in.pt", tmp_path / "out.pt")
    torch.save(expected_after(checkpoint, "hwc"), tmp_path / "reference.pt")
    with (
        zipfile.ZipFile(tmp_path / "out.pt") as ours,
        zipfile.ZipFile(tmp_path / "reference.pt") as theirs,
    ):
        assert ours.testzip() is None  # reads every record and checks its CRC-32

        def records(archive):
            return {
                info.filename.split("/", 1)[1]: (info.file_size, info.CRC, info.compress_type)
                for info in archive.infolist()
                if "serialization_id" not in info.filename
            }

        assert records(ours) == records(theirs)
        assert [i.filename.split("/", 1)[1] for i in ours.infolist()] == [
            i.filename.split("/", 1)[1] for i in theirs.infolist()
        ]


def test_copied_records_keep_the_checksum_the_input_had(tmp_path) -> None:
    """A file torch wrote without CRCs keeps that for its untouched records."""
    from torch.utils.serialization import config

    checkpoint = training_checkpoint()
    config.save.compute_crc32 = False
    try:
        torch.save(checkpoint, tmp_path / "in.pt")
    finally:
        config.save.compute_crc32 = True
    convert(tmp_path / "in.pt", tmp_path / "out.pt")
    assert same_object(
        torch.load(tmp_path / "out.pt", weights_only=True), expected_after(checkpoint, "hwc")
    )
    kernel = kernel_of(checkpoint["state_dict"]["fc.weight"], C, KH, KW, "hwc").contiguous()
    data = (tmp_path / "out.pt").read_bytes()
    crcs = {  # record bytes → the CRC its directory entry states
        data[r.offset : r.offset + r.size]: r.crc
        for r in torchzip._storage_records(tmp_path / "out.pt").values()
    }
    assert crcs.pop(kernel.numpy().tobytes()) == zlib.crc32(kernel.numpy().tobytes())
    assert set(crcs.values()) == {0}  # as the input had them


def test_the_input_tensors_are_never_read_into_memory(tmp_path, monkeypatch) -> None:
    """After a first look that maps the file (reading no tensor), torch loads only on meta."""
    checkpoint = training_checkpoint()
    torch.save(checkpoint, tmp_path / "in.pt")
    import fcconv.io.checkpoint as io_checkpoint

    loads = []
    real = io_checkpoint._torch_load

    def recording(file, trust_pickle, zipped, meta=False):
        loads.append("meta" if meta else "mapped" if zipped else "read")
        return real(file, trust_pickle, zipped, meta)

    monkeypatch.setattr(io_checkpoint, "_torch_load", recording)
    convert(tmp_path / "in.pt", tmp_path / "out.pt")
    assert loads == ["mapped", "meta", "meta"]  # the look, the input's structure, the output's


@pytest.mark.parametrize("case", ["legacy format", "weight is a transposed view"])
def test_what_cannot_stream_converts_in_memory(tmp_path, case) -> None:
    checkpoint = training_checkpoint()
    if case == "weight is a transposed view":
        weight = checkpoint["state_dict"]["fc.weight"]
        checkpoint["state_dict"]["fc.weight"] = weight.t().contiguous().t()
        torch.save(checkpoint, tmp_path / "in.pt")
    else:
        torch.save(checkpoint, tmp_path / "in.pt", _use_new_zipfile_serialization=False)
    document = convert(tmp_path / "in.pt", tmp_path / "out.pt")
    assert document["mode"] == "in memory"
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    assert same_object(loaded, expected_after(checkpoint, "hwc"))


def test_a_record_filled_from_the_wrong_storage_fails_verification(tmp_path, monkeypatch) -> None:
    """The mapping from torch's storage keys to input records is checked, not trusted."""
    checkpoint = training_checkpoint()
    torch.save(checkpoint, tmp_path / "in.pt")
    real = torchzip._written_records

    def swapped(path):
        records = real(path)
        # out.bias and its momentum buffer: 3 floats each, different values
        first, second = (i for i, record in enumerate(records) if record.size == 12)
        records[first], records[second] = records[second], records[first]
        return records

    monkeypatch.setattr(torchzip, "_written_records", swapped)
    result = convert_checkpoint(
        tmp_path / "in.pt", tmp_path / "out.pt", layers=["fc"], patch=f"{KH}x{KW}x{C}"
    )
    assert not result and not (tmp_path / "out.pt").exists()
    differences = result.to_dict()["verification"]["differences"]
    assert any("reads another storage than the original's" in d for d in differences), differences


def test_a_trusted_pickle_streams_too(tmp_path) -> None:
    checkpoint = training_checkpoint()
    checkpoint["config"] = Path("runs/7")  # needs --trust-pickle to load
    torch.save(checkpoint, tmp_path / "in.pt")
    document = convert(tmp_path / "in.pt", tmp_path / "out.pt", trust_pickle=True)
    assert document["mode"] == "streamed"
    loaded = load_checkpoint(tmp_path / "out.pt", trust_pickle=True)
    assert loaded.container["config"] == Path("runs/7")


def test_a_refusal_while_torch_lays_out_the_archive_converts_in_memory(
    tmp_path, monkeypatch
) -> None:
    """Unsupported raised mid-write: the temporary file goes, the in-memory path takes over."""

    def refuse(self, obj):
        raise torchzip.Unsupported("a tensor this cannot stand in for")

    checkpoint = training_checkpoint()
    torch.save(checkpoint, tmp_path / "in.pt")
    monkeypatch.setattr(torchzip._StandIns, "reduce", refuse)
    document = convert(tmp_path / "in.pt", tmp_path / "out.pt")
    assert document["mode"] == "in memory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pt", "out.pt"]
    assert same_object(
        torch.load(tmp_path / "out.pt", weights_only=True), expected_after(checkpoint, "hwc")
    )


def test_a_non_ascii_output_name(tmp_path) -> None:
    """torch writes such a path through a Python file: slower, the same archive."""
    checkpoint = training_checkpoint()
    torch.save(checkpoint, tmp_path / "in.pt")
    document = convert(tmp_path / "in.pt", tmp_path / "poids-été.pt")
    assert document["mode"] == "streamed"
    loaded = torch.load(tmp_path / "poids-été.pt", weights_only=True)
    assert same_object(loaded, expected_after(checkpoint, "hwc"))
    with zipfile.ZipFile(tmp_path / "poids-été.pt") as archive:
        assert archive.testzip() is None
