"""``fcconv verify`` catches a wrong conversion and says where (issue 2, SPEC §4).

A correct conversion is damaged in one precise place, and the verdict must be
exit 1 with the key and the index of that place both in the human report
(stderr) and in ``--json``. The reverse is checked too: every correct
conversion, in each of the six orders, is exit 0 with sane numbers.

The patch is 3×4 with 2 channels, so that all six orders are different
permutations. Indices are worked out by hand from SPEC §1: the Linear column
of kernel tap (c, i, j) is the mixed-radix number of its coordinates in the
flatten order.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ORDERS = ("chw", "cwh", "hcw", "hwc", "wch", "whc")
C, KH, KW = 2, 3, 4
PATCH = "3x4x2"


def flat(text: str) -> str:
    return " ".join(text.split())


def column(order: str, c: int, i: int, j: int) -> int:
    """SPEC §1: the Linear input column of kernel tap (c, i, j), by hand."""
    coordinate, size = {"c": c, "h": i, "w": j}, {"c": C, "h": KH, "w": KW}
    index = 0
    for axis in order:  # slowest first
        index = index * size[axis] + coordinate[axis]
    return index


def original_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {
        "stem.weight": torch.randn(2, 3, 3, 3, generator=g),
        "fc.weight": torch.randn(5, C * KH * KW, generator=g),
        "fc.bias": torch.randn(5, generator=g),
        "out.weight": torch.randn(3, 5, generator=g),
        "zeros": torch.zeros(4),
    }


@pytest.fixture
def original(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    torch.save(original_state(), path)
    return path


def convert(invoke, original: Path, order: str, suffix: str = ".pt") -> Path:
    out = original.with_name(f"conv.{order}{suffix}")
    invoke("convert", original, "-o", out, "--layer", "fc", "--patch", PATCH, "--order", order)
    return out


def rewrite(path: Path, change) -> Path:
    """Apply ``change(state)`` to a converted file and save it under a new name."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        state = load_file(path)
        change(state)
        damaged = path.with_name(f"damaged-{path.name}")
        save_file(state, damaged, metadata=metadata)
        return damaged
    state = torch.load(path, weights_only=True)
    change(state)
    damaged = path.with_name(f"damaged-{path.name}")
    torch.save(state, damaged)
    return damaged


def verdicts(invoke, original: Path, converted: Path, *flags: str) -> tuple[str, dict]:
    """Verify twice, for people and for scripts; both must exit 1."""
    human = invoke("verify", original, converted, *flags, exit=1)
    assert human.stdout == ""
    document = json.loads(invoke("verify", original, converted, *flags, "--json", exit=1).stdout)
    assert document["equivalent"] is False and document["exit_code"] == 1
    return flat(human.stderr), document


def problems(document: dict) -> str:
    return " | ".join(p for layer in document["layers"] for p in layer["problems"])


# ------------------------------------------------------------ passes


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("order", ORDERS)
def test_correct_conversion_passes_in_every_order(invoke, original, order, suffix) -> None:
    converted = convert(invoke, original, order, suffix)
    # a .pt keeps no record: its order is asserted with the flag (the weights are random)
    flags = ("--order", order) if suffix == ".pt" else ()
    document = json.loads(invoke("verify", original, converted, *flags, "--json").stdout)
    assert document["equivalent"] is True and document["exit_code"] == 0
    assert document["differences"] == []
    [layer] = document["layers"]
    assert layer["order"] == order and layer["exact"] is True and layer["problems"] == []
    assert layer["order_from"] == ("record" if suffix == ".safetensors" else "flag")
    source = "from the file's metadata" if suffix == ".safetensors" else "as given"
    assert f"fc: order {order} {source}" in document["notes"]
    functional = layer["functional"]
    assert functional["output_grid"] == [2, 2] and functional["cells"] == 4
    assert functional["float64"]["ratio"] <= 1.0  # the sharp judge
    assert functional["in_dtype"]["ratio"] <= 1.0
    assert functional["in_dtype"]["units_of_u"] < 10  # healthy: a few units of roundoff at most
    invoke("verify", original, converted, "--order", order)  # explicit and right: exit 0


def test_functional_numbers_on_a_larger_input_with_overlap(invoke, original) -> None:
    converted = convert(invoke, original, "whc")
    document = json.loads(
        invoke(
            "verify", original, converted, "--order", "whc", "--stride", "1x2", "--input", "7x9",
            "--json",
        ).stdout
    )  # fmt: skip
    [layer] = document["layers"]
    functional = layer["functional"]
    # H' = (7 - 3) // 1 + 1 = 5, W' = (9 - 4) // 2 + 1 = 3; column 8 is left uncovered
    assert functional["input_size"] == [7, 9]
    assert functional["output_grid"] == [5, 3] and functional["cells"] == 15
    assert 0 <= functional["float64"]["ratio"] <= 1.0
    assert functional["float64"]["max_abs_diff"] < 1e-12
    assert functional["in_dtype"]["needed_tolerance"] < 1e-5
    assert any("1 column(s) uncovered" in note for note in functional["notes"])


# ----------------------------------------------------------- catches


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("order", ["chw", "hwc", "wch"])
def test_one_changed_weight(invoke, original, order, suffix) -> None:
    converted = convert(invoke, original, order, suffix)

    def nudge(state):
        state["fc.weight"][1, 1, 1, 2] += 0.5

    flags = ("--order", order) if suffix == ".pt" else ()  # a .pt keeps no record
    human, document = verdicts(invoke, original, rewrite(converted, nudge), *flags)
    col = column(order, 1, 1, 2)
    where = f"first at conv [1, 1, 1, 2] = Linear [1, {col}]"
    assert "fc.weight: 1 element(s) are not the original's" in human and where in human
    assert where in problems(document)
    assert document["layers"][0]["order"] == order  # the asserted order, or the recorded one


def test_one_ulp_is_caught_bit_for_bit(invoke, original) -> None:
    converted = convert(invoke, original, "hwc")

    def one_ulp(state):
        w = state["fc.weight"]
        w[4, 0, 2, 3] = torch.nextafter(w[4, 0, 2, 3], torch.tensor(float("inf")))

    human, document = verdicts(invoke, original, rewrite(converted, one_ulp), "--order", "hwc")
    where = f"conv [4, 0, 2, 3] = Linear [4, {column('hwc', 0, 2, 3)}]"
    assert where in human and where in problems(document)
    assert document["layers"][0]["exact"] is False


def test_swapped_order_flag(invoke, original) -> None:
    converted = convert(invoke, original, "hwc")
    human, document = verdicts(invoke, original, converted, "--order", "chw")
    assert "under order chw" in human and "fc.weight" in human
    # the first Linear column read differently: column 1 is tap (0, 0, 1) under chw,
    # a tap that hwc stores at column 2
    assert f"conv [0, 0, 0, 1] = Linear [0, {column('chw', 0, 0, 1)}]" in problems(document)
    assert "fc: order chw as given" in document["notes"]


def test_provenance_that_lies_about_the_order(invoke, original) -> None:
    converted = convert(invoke, original, "hwc", ".safetensors")
    with safe_open(str(converted), framework="pt") as handle:
        metadata = handle.metadata()
    record = json.loads(metadata["fcconv"])
    assert record["layers"]["fc"]["order"] == "hwc"
    record["layers"]["fc"]["order"] = "chw"
    liar = converted.with_name("liar.safetensors")
    save_file(load_file(converted), liar, metadata={**metadata, "fcconv": json.dumps(record)})
    human, document = verdicts(invoke, original, liar)
    assert "fc: order chw from the file's metadata" in document["notes"]
    assert "fc.weight" in problems(document) and "under order chw" in problems(document)
    assert "under order chw" in human


def test_wrong_patch_flag(invoke, original) -> None:
    converted = convert(invoke, original, "chw")
    human, document = verdicts(invoke, original, converted, "--layer", "fc=4x3x2")
    assert "fc.weight has shape (5, 2, 3, 4), expected (5, 2, 4, 3)" in human
    assert "expected (5, 2, 4, 3) for patch 4x3x2" in problems(document)


@pytest.mark.parametrize(
    ("key", "index"),
    [("stem.weight", (1, 2, 0, 1)), ("out.weight", (2, 4)), ("fc.bias", (3,))],
)
def test_tampered_other_tensor(invoke, original, key: str, index: tuple[int, ...]) -> None:
    converted = convert(invoke, original, "cwh")

    def tamper(state):
        state[key][index] += 1.0

    human, document = verdicts(invoke, original, rewrite(converted, tamper))
    where = f"{key} differs: 1 element(s), first at {list(index)}"
    assert where in human
    assert where in document["differences"]
    if key == "fc.bias":
        assert "fc.bias differs from the original bias" in problems(document)


def test_negative_zero_is_a_difference(invoke, original) -> None:
    converted = convert(invoke, original, "chw")

    def sign(state):
        state["zeros"][2] = -0.0

    human, document = verdicts(invoke, original, rewrite(converted, sign))
    assert "zeros differs: 1 element(s), first at [2]" in document["differences"]


def test_changed_dtype_of_the_converted_weight(invoke, original) -> None:
    converted = convert(invoke, original, "hcw")

    def widen(state):
        state["fc.weight"] = state["fc.weight"].double()

    human, document = verdicts(invoke, original, rewrite(converted, widen))
    assert "fc.weight changed dtype: float32 → float64" in human
    assert "fc.weight changed dtype: float32 → float64" in problems(document)


@pytest.mark.parametrize("key", ["stem.weight", "fc.bias"])
def test_changed_dtype_of_another_tensor(invoke, original, key: str) -> None:
    converted = convert(invoke, original, "hcw")

    def halve(state):
        state[key] = state[key].half()

    human, document = verdicts(invoke, original, rewrite(converted, halve))
    assert f"{key} differs: dtype float32 → float16" in document["differences"]
    assert f"{key} differs: dtype float32 → float16" in human


@pytest.mark.parametrize("change", ["longer", "missing"])
def test_changed_shape_or_missing_bias(invoke, original, change: str) -> None:
    converted = convert(invoke, original, "hwc")

    def damage(state):
        if change == "longer":
            state["fc.bias"] = torch.cat([state["fc.bias"], torch.zeros(1)])
        else:
            del state["fc.bias"]

    human, document = verdicts(invoke, original, rewrite(converted, damage))
    assert "fc.bias differs from the original bias" in problems(document)
    expected = "shape (5,) → (6,)" if change == "longer" else "missing from the converted"
    assert any(d.startswith("fc.bias") and expected in d for d in document["differences"])
    assert "fc.bias" in human


def test_missing_and_extra_tensors(invoke, original) -> None:
    converted = convert(invoke, original, "chw")

    def swap(state):
        del state["out.weight"]
        state["surprise"] = torch.ones(1)

    human, document = verdicts(invoke, original, rewrite(converted, swap))
    assert "out.weight is missing from the converted checkpoint" in document["differences"]
    assert "surprise is new in the converted checkpoint" in document["differences"]
    assert "out.weight is missing" in human


def test_failing_json_keeps_the_functional_numbers(invoke, original) -> None:
    """A failed layer is when the numbers matter most: JSON must carry them, not null."""
    converted = convert(invoke, original, "hwc")
    _, document = verdicts(invoke, original, converted, "--order", "chw")
    functional = document["layers"][0]["functional"]
    assert functional is not None, "verify --json drops the functional check of a failed layer"
    assert functional["float64"]["ratio"] > 1.0  # a wrong order errs by the size of the output
