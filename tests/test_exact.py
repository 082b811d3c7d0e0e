"""The exact check reads every element, a block of rows at a time, on every path.

A single element moved anywhere in a large weight, the last block of rows
included, must be caught, with its place, by the streaming convert's check
(safetensors and torch zip), the in-memory convert's check, and ``verify``
of two files on disk. The weight here spans two real blocks
(``fcconv.verify.exact.BLOCK_BYTES``); a property test moves elements anywhere in
weights of many shapes cut into blocks of a few rows.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import index_table
from safetensors.torch import load_file, save_file

import fcconv.verify.exact
from fcconv import convert_checkpoint, verify_checkpoints
from fcconv.geometry import ORDERS, Patch, linear_weight_to_conv
from fcconv.io.sources import DiskTensors, open_source
from fcconv.io.streaming import _Writer
from fcconv.verify import functional_check, functional_rows
from fcconv.verify.exact import MemoryTensors, linear_columns, permuted_mismatch

PATCH = Patch(7, 7, 256)  # 12,544 features: rows of 50 KB
ROWS = 700  # 35 MB: a 32 MB block of 668 rows, then a last block of 32
LAST = ROWS - 1


def test_the_weight_spans_two_blocks() -> None:
    per_block = fcconv.verify.exact.BLOCK_BYTES // (PATCH.features * 4)
    assert per_block < ROWS < 2 * per_block


@given(c=st.integers(1, 4), h=st.integers(1, 4), w=st.integers(1, 4), order=st.sampled_from(ORDERS))
def test_linear_columns_is_the_mixed_radix_number_of_spec_1(c, h, w, order) -> None:
    columns = linear_columns(Patch(h, w, c), order)
    assert columns.tolist() == index_table(order, (c, h, w)).reshape(-1).tolist()


def test_functional_rows_are_all_or_evenly_spaced_with_both_ends() -> None:
    assert functional_rows(5, 24) == [0, 1, 2, 3, 4]
    rows = functional_rows(4096, 25088)
    assert rows[0] == 0 and rows[-1] == 4095 and len(rows) == len(set(rows)) == 167
    gaps = {b - a for a, b in zip(rows, rows[1:], strict=False)}
    assert gaps <= {24, 25}
    assert functional_rows(10, 10**9) == [0, 9]  # at least both ends, however wide


# ----------------------------------------------------------- any place, any shape


def _moved(kernel: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """``kernel`` with the elements at flat positions ``a`` and ``b`` exchanged."""
    flat = kernel.clone().reshape(-1)
    flat[a], flat[b] = flat[b].clone(), flat[a].clone()
    return flat.reshape(kernel.shape)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_a_moved_element_is_found_anywhere_in_memory_and_on_disk(
    data, tmp_path_factory, monkeypatch
) -> None:
    c, h, w = (data.draw(st.integers(1, 3)) for _ in range(3))
    rows = data.draw(st.integers(1, 9))
    order = data.draw(st.sampled_from(ORDERS))
    patch = Patch(h, w, c)
    monkeypatch.setattr(
        fcconv.verify.exact, "BLOCK_BYTES", data.draw(st.integers(1, 3)) * patch.features * 4
    )
    weight = torch.randn(rows, patch.features, generator=torch.Generator().manual_seed(rows))
    weight = weight + torch.arange(weight.numel()).reshape(weight.shape)  # every value distinct
    size = weight.numel()
    a = data.draw(st.integers(0, size - 1))
    b = data.draw(st.integers(0, size - 1).filter(lambda x: x != a))
    kernel = _moved(linear_weight_to_conv(weight, patch, order), a, b)
    first_row, first_tap = divmod(min(a, b), patch.features)

    folder = tmp_path_factory.mktemp("moved")
    save_file({"w": weight}, str(folder / "before.safetensors"))
    save_file({"w": kernel}, str(folder / "after.safetensors"))
    sides = {
        "memory": (MemoryTensors({"w": weight}), MemoryTensors({"w": kernel})),
        "disk": tuple(
            DiskTensors(open_source(str(folder / f)))
            for f in ("before.safetensors", "after.safetensors")
        ),
    }
    for original, converted in sides.values():
        found = permuted_mismatch(original, converted, "w", patch, order, rows)
        assert found is not None and found.count == 2
        assert (found.row, found.tap) == (first_row, first_tap)
        assert found.column == index_table(order, (c, h, w)).reshape(-1)[first_tap]
    intact = linear_weight_to_conv(weight, patch, order)
    assert (
        permuted_mismatch(
            MemoryTensors({"w": weight}), MemoryTensors({"w": intact}), "w", patch, order, rows
        )
        is None
    )


# ----------------------------------------------------- a large weight, every path

POSITIONS = {
    "first element": ((0, 0), (0, 1)),
    "across the block boundary": ((667, 12543), (668, 0)),
    "last block": ((LAST, 9000), (LAST, 12543)),
    "last element": ((350, 5), (LAST, 12543)),
}


def _flat(row: int, tap: int) -> int:
    return row * PATCH.features + tap


def _conv_index(row: int, tap: int) -> str:
    c, rest = divmod(tap, PATCH.height * PATCH.width)
    i, j = divmod(rest, PATCH.width)
    return f"conv [{row}, {c}, {i}, {j}]"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A layer as safetensors, as a torch zip, and its correct conversion (read only)."""
    generator = torch.Generator().manual_seed(12)
    layer = {
        "features.weight": torch.randn(4, 3, generator=generator),
        "fc.weight": torch.randn(ROWS, PATCH.features, generator=generator),
        "fc.bias": torch.randn(ROWS, generator=generator),
    }
    folder = tmp_path_factory.mktemp("large")
    save_file(layer, str(folder / "model.safetensors"))
    torch.save(layer, folder / "model.pt")
    torch.save(layer, folder / "legacy.pt", _use_new_zipfile_serialization=False)
    good = folder / "good.safetensors"
    assert convert_checkpoint(folder / "model.safetensors", good, **CONVERT)
    return folder


CONVERT = {"layers": ["fc"], "patch": "7x7x256", "order": "hwc"}


def _damage_while_streaming(monkeypatch, a: tuple[int, int], b: tuple[int, int]) -> None:
    """After the writer permutes the weight, exchange two elements of what it wrote."""
    real = _Writer.permute
    columns = index_table("hwc", PATCH.sizes("chw")).reshape(-1)

    def permute_then_move(self, move, checksum=False):
        crc = real(self, move, checksum)
        for (row, tap), (to_row, to_tap) in ((a, b), (b, a)):
            element = move.src_offset + (row * PATCH.features + int(columns[tap])) * 4
            os.pwrite(
                self.output,
                os.pread(self.source, 4, element),
                move.dst_offset + _flat(to_row, to_tap) * 4,
            )
        return crc

    monkeypatch.setattr(_Writer, "permute", permute_then_move)


def _assert_caught(problems: str, a: tuple[int, int], b: tuple[int, int]) -> None:
    first = min(a, b)
    assert "fc.weight: 2 element(s) are not the original's under order hwc" in problems
    assert f"first at {_conv_index(*first)}" in problems


def _problems(document: dict) -> str:
    return " | ".join(p for layer in document["layers"] for p in layer["problems"])


@pytest.mark.parametrize("where", list(POSITIONS))
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_streaming_convert_catches_a_moved_element(
    tmp_path, files, monkeypatch, where, suffix
) -> None:
    a, b = POSITIONS[where]
    _damage_while_streaming(monkeypatch, a, b)
    result = convert_checkpoint(files / f"model{suffix}", tmp_path / f"out{suffix}", **CONVERT)
    assert not result.written and result.exit_code == 1
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left
    _assert_caught(_problems(result.to_dict()["verification"]), a, b)


@pytest.mark.parametrize("where", list(POSITIONS))
def test_in_memory_convert_catches_a_moved_element(tmp_path, files, monkeypatch, where) -> None:
    from fcconv import plan

    a, b = POSITIONS[where]
    real = plan.linear_weight_to_conv_nd

    def moved(weight, patch, order, **options):
        return _moved(real(weight, patch, order, **options), _flat(*a), _flat(*b))

    monkeypatch.setattr(plan, "linear_weight_to_conv_nd", moved)
    result = convert_checkpoint(files / "legacy.pt", tmp_path / "out.pt", **CONVERT)
    assert not result and list(tmp_path.iterdir()) == []
    _assert_caught(_problems(result.to_dict()["verification"]), a, b)


@pytest.mark.parametrize("where", list(POSITIONS))
def test_verify_of_two_files_catches_a_moved_element(tmp_path, files, where) -> None:
    from safetensors import safe_open

    a, b = POSITIONS[where]
    good = files / "good.safetensors"
    tensors = load_file(good)
    tensors["fc.weight"] = _moved(tensors["fc.weight"], _flat(*a), _flat(*b))
    with safe_open(str(good), framework="pt") as handle:
        metadata = handle.metadata()
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    result = verify_checkpoints(files / "model.safetensors", bad)
    assert not result and result.exit_code == 1
    _assert_caught(_problems(result.to_dict()), a, b)


def test_the_intact_large_conversion_verifies(files) -> None:
    result = verify_checkpoints(files / "model.safetensors", files / "good.safetensors")
    assert result, result.to_dict()
    document = json.loads(json.dumps(result.to_dict()))
    functional = document["layers"][0]["functional"]
    assert functional["channels_checked"] == len(functional_rows(ROWS, PATCH.features)) < ROWS


def test_the_functional_check_on_a_row_subset_still_sees_a_wrong_order(files) -> None:
    """Every row shares the permutation: the rows it reads show a wrong one."""
    layer = load_file(files / "model.safetensors")
    weight, bias = layer["fc.weight"], layer["fc.bias"]
    wrong = linear_weight_to_conv(weight, PATCH, "whc")  # judged as hwc below
    check = functional_check(weight, bias, wrong, bias, PATCH, "hwc", (7, 7))
    assert check.channels_checked == len(functional_rows(ROWS, PATCH.features)) < ROWS
    assert not check and check.float64.ratio > 1e6
    right = linear_weight_to_conv(weight, PATCH, "hwc")
    assert functional_check(weight, bias, right, bias, PATCH, "hwc", (7, 7))
