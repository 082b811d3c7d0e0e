"""The checks themselves under hostile values (issue 9, "Silent acceptance and a false alarm").

* Non-finite weights permuted exactly pass both checks; a conv whose NaN or
  infinite outputs are of another kind fails.
* float8 converts (a bit permutation) and is judged in float64; integer,
  boolean, quantized and sparse weights are refused in one line.
* Untouched tensors of every kind (quantized, sparse) compare bit for bit,
  without crashing.
* ``verify`` compares everything but the converted layers and fcconv's own
  provenance record: safetensors metadata, and the training state around a
  torch checkpoint's weights.
* A nested checkpoint's state dict is found by its well-known name even when
  it holds non-tensor entries; an ambiguous one is refused, never guessed.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fcconv import FcconvError, convert_checkpoint, verify_checkpoints
from fcconv.geometry import Patch, linear_weight_to_conv
from fcconv.verify import functional_check

PATCH = "2x3x4"


def weights(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "fc.weight": torch.randn(5, 24, generator=g).to(dtype),
        "fc.bias": torch.randn(5, generator=g).to(dtype),
    }


def quantized(values: torch.Tensor, scale: float = 0.1) -> torch.Tensor:
    with warnings.catch_warnings():  # torch deprecates creating quantized tensors
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(values, scale, 0, torch.qint8)


def converted(tmp_path: Path, state: dict, name: str = "model.pt", **options) -> tuple[Path, Path]:
    source, out = tmp_path / name, tmp_path / f"conv-{name}"
    if name.endswith(".pt"):
        torch.save(state, source)
    else:
        save_file(state, str(source), metadata=options.pop("metadata", None))
    result = convert_checkpoint(source, out, layers=["fc"], patch=PATCH, **options)
    assert result.exit_code == 0, result.to_dict()
    return source, out


# -------------------------------------------------------------- non-finite


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_weights_permuted_exactly_pass(tmp_path: Path, value: float) -> None:
    state = weights()
    state["fc.weight"][1, 7] = value
    state["fc.weight"][3, 0] = -math.inf
    source, out = converted(tmp_path, state, order="hwc")
    result = verify_checkpoints(source, out, order="hwc")  # a .pt keeps no record
    assert result.exit_code == 0, result.to_dict()["layers"][0]["problems"]
    functional = result.layers[0].functional
    assert functional.float64.nonfinite > 0 and functional.float64.nonfinite_mismatches == 0


def test_non_finite_outputs_of_another_kind_fail() -> None:
    """Hand-made: the conv gives -inf where the Linear gives +inf; the float64 judge fails."""
    patch = Patch(2, 3, 4)
    weight = torch.randn(5, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weight[2, 5] = math.inf
    kernel = linear_weight_to_conv(weight, patch, "chw")
    kernel[2] = -kernel[2]  # row 2 now yields the opposite infinity
    check = functional_check(weight, None, kernel, None, patch, "chw", (2, 3))
    assert check.float64.nonfinite_mismatches > 0 and not check.float64.passed and not check


def test_an_infinity_turned_into_a_nan_is_a_difference(tmp_path: Path) -> None:
    state = weights()
    state["fc.weight"][0, 0] = math.inf
    source, out = converted(tmp_path, state)
    changed = torch.load(out, weights_only=True)
    changed["fc.weight"][0, 0, 0, 0] = math.nan
    torch.save(changed, out)
    result = verify_checkpoints(source, out)
    assert result.exit_code == 1 and not result.layers[0].exact


def test_json_reports_stay_strict_json(tmp_path: Path, invoke) -> None:
    state = weights()
    state["fc.weight"][1, 1] = math.inf
    source, out = converted(tmp_path, state)
    text = invoke("verify", source, out, "--json").stdout

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    document = json.loads(text, parse_constant=refuse)
    assert document["equivalent"] is True


# -------------------------------------------------------------- dtypes, kinds


@pytest.mark.parametrize("name", ["model.pt", "model.safetensors"])
def test_float8_converts_and_is_judged_in_float64(tmp_path: Path, name: str) -> None:
    source, out = converted(tmp_path, weights(torch.float8_e4m3fn), name, order="hwc")
    result = verify_checkpoints(source, out, order="hwc")
    assert result.exit_code == 0, result.to_dict()
    notes = " ".join(result.layers[0].functional.notes)
    assert "judged in float64" in notes and result.layers[0].functional.in_dtype is None
    if name.endswith(".pt"):  # one flipped bit is found
        changed = torch.load(out, weights_only=True)
        bits = changed["fc.weight"].view(torch.uint8)
        bits[0, 0, 0, 0] ^= 1
        torch.save(changed, out)
        assert verify_checkpoints(source, out, order="hwc").exit_code == 1


KINDS = {
    "int32": lambda: torch.randint(-5, 5, (5, 24), dtype=torch.int32),
    "bool": lambda: torch.rand(5, 24) > 0.5,
    "sparse": lambda: torch.randn(5, 24).to_sparse(),
    "qint8": lambda: quantized(torch.randn(5, 24)),
}


@pytest.mark.parametrize("kind", KINDS)
def test_weights_fcconv_does_not_convert_are_refused(tmp_path: Path, invoke, kind: str) -> None:
    torch.save({"fc.weight": KINDS[kind]()}, tmp_path / "m.pt")
    result = invoke("convert", tmp_path / "m.pt", "-o", tmp_path / "o.pt", "--layer", "fc",
                    "--patch", PATCH, exit=2)  # fmt: skip
    assert "dense floating-point weights only" in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("kind", ["int32", "bool"])
def test_verify_refuses_to_judge_integer_weights(tmp_path: Path, invoke, kind: str) -> None:
    weight = KINDS[kind]()
    torch.save({"fc.weight": weight}, tmp_path / "a.pt")
    torch.save({"fc.weight": linear_weight_to_conv(weight, Patch(2, 3, 4), "chw")},
               tmp_path / "b.pt")  # fmt: skip
    result = invoke("verify", tmp_path / "a.pt", tmp_path / "b.pt", exit=2)
    assert "dense floating-point weights only" in result.stderr


def test_untouched_quantized_and_sparse_tensors(tmp_path: Path) -> None:
    """They used to crash convert and verify (SIGSEGV for qint8)."""
    with warnings.catch_warnings():  # CSR support is "beta" and says so
        warnings.simplefilter("ignore")
        csr = torch.randn(3, 5).to_sparse_csr()
    state = {**weights(), "q": quantized(torch.randn(4, 4)), "s": torch.randn(3, 5).to_sparse()}
    state["csr"] = csr
    source, out = converted(tmp_path, state)
    assert verify_checkpoints(source, out).exit_code == 0
    loaded = torch.load(out, weights_only=True)
    for key, replacement, what in (
        ("q", quantized(torch.randn(4, 4)), "differs"),
        ("q", quantized(state["q"].dequantize(), scale=0.2), "quantization parameters"),
        ("s", state["s"] * 2, "indices or values"),
    ):
        changed = dict(loaded, **{key: replacement})
        torch.save(changed, tmp_path / "changed.pt")
        result = verify_checkpoints(source, tmp_path / "changed.pt")
        assert result.exit_code == 1
        assert any(key in d and what in d for d in result.differences), result.differences


# ------------------------------------------------------- everything around


def test_safetensors_metadata_is_compared(tmp_path: Path) -> None:
    source, out = converted(tmp_path, weights(), "model.safetensors",
                            metadata={"format": "pt", "[/]": "\x1b[2J"})  # fmt: skip
    assert verify_checkpoints(source, out).exit_code == 0
    original = load_file(str(out))

    def metadata_of(path: Path) -> dict:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            return json.loads(handle.read(length))["__metadata__"]

    cases = {
        "changed": lambda m: m.update(format="np"),
        "added": lambda m: m.update(extra="1"),
        "removed": lambda m: m.pop("format"),
    }
    for case, change in cases.items():
        metadata = metadata_of(out)
        change(metadata)
        save_file(original, str(tmp_path / "m.safetensors"), metadata=metadata)
        result = verify_checkpoints(source, tmp_path / "m.safetensors")
        assert result.exit_code == 1, case
        assert any("__metadata__" in d for d in result.differences), (case, result.differences)
    metadata = metadata_of(out)  # fcconv's own record is not part of the comparison
    metadata["fcconv"] = metadata["fcconv"].replace('"version"', '"other_version"')
    save_file(original, str(tmp_path / "m.safetensors"), metadata=metadata)
    assert verify_checkpoints(source, tmp_path / "m.safetensors").exit_code == 0


def training(state: dict) -> dict:
    return {
        "state_dict": {**state, "step": 3},
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(5)}},
                      "param_groups": [{"lr": 0.1, "params": [0]}]},
        "epoch": 7,
        "nan_metric": math.nan,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda c: c.update(epoch=8), "checkpoint.epoch"),
        (lambda c: c["optimizer"]["param_groups"][0].update(lr=0.2), "param_groups[0].lr"),
        (lambda c: c["optimizer"]["state"][0]["momentum_buffer"].add_(1), "momentum_buffer"),
        (lambda c: c["state_dict"].update(step=4), "checkpoint.state_dict.step"),
        (lambda c: c.pop("epoch"), "'epoch' is missing"),
        (lambda c: c.update(nan_metric=-0.0), "nan_metric"),
    ],
    ids=["epoch", "lr", "optimizer tensor", "state dict entry", "removed", "float"],
)
def test_training_state_is_compared(tmp_path: Path, change, where: str) -> None:
    source, out = converted(tmp_path, training(weights()))
    assert verify_checkpoints(source, out).exit_code == 0  # NaN equals itself, bit for bit
    loaded = torch.load(out, weights_only=True)
    change(loaded)
    torch.save(loaded, tmp_path / "changed.pt")
    result = verify_checkpoints(source, tmp_path / "changed.pt")
    assert result.exit_code == 1
    assert any(where in d for d in result.differences), result.differences


def test_the_well_known_state_dict_wins_over_an_ema_copy(tmp_path: Path) -> None:
    ema = {key: value + 1 for key, value in weights().items()}
    checkpoint = {"ema": ema, **training(weights())}
    source, out = converted(tmp_path, checkpoint)
    loaded = torch.load(out, weights_only=True)
    assert loaded["state_dict"]["fc.weight"].shape == (5, 4, 2, 3)  # the model's weights
    assert loaded["state_dict"]["step"] == 3  # the non-tensor entry, kept in place
    assert list(loaded["state_dict"]) == ["fc.weight", "fc.bias", "step"]
    assert torch.equal(loaded["ema"]["fc.weight"], ema["fc.weight"])  # untouched


def test_several_unnamed_tensor_mappings_are_refused(tmp_path: Path) -> None:
    torch.save({"generator": weights(), "discriminator": weights()}, tmp_path / "gan.pt")
    with pytest.raises(FcconvError) as raised:
        convert_checkpoint(tmp_path / "gan.pt", tmp_path / "o.pt", layers=["fc"], patch=PATCH)
    message = str(raised.value)
    assert "several mappings of tensors (generator, discriminator)" in message
    assert "\n" not in message and not (tmp_path / "o.pt").exists()


def test_across_formats_only_tensors_are_compared(tmp_path: Path) -> None:
    save_file(weights(), str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    result = convert_checkpoint(tmp_path / "m.safetensors", tmp_path / "o.pt", layers=["fc"],
                                patch=PATCH)  # fmt: skip
    assert result and any("__metadata__" in w and "not kept" in w for w in result.warnings)
    check = verify_checkpoints(tmp_path / "m.safetensors", tmp_path / "o.pt")
    assert check.exit_code == 0
    assert any("only tensors are compared" in note for note in check.notes)


@pytest.mark.parametrize("bias_dtype", [torch.int32, torch.float16])
def test_a_bias_of_another_dtype_is_refused_not_a_difference(
    tmp_path: Path, bias_dtype: torch.dtype
) -> None:
    """Found by the header fuzzer: this gave exit 1, "not equivalent", for fcconv's own output."""
    state = weights()
    state["fc.bias"] = state["fc.bias"].to(bias_dtype)
    save_file(state, str(tmp_path / "m.safetensors"))
    with pytest.raises(FcconvError) as raised:
        convert_checkpoint(tmp_path / "m.safetensors", tmp_path / "o.safetensors",
                           layers=["fc"], patch=PATCH)  # fmt: skip
    assert "has its weight's dtype" in str(raised.value)
    assert not (tmp_path / "o.safetensors").exists()


def test_exotic_untouched_tensors(tmp_path: Path) -> None:
    """complex128, meta, uint16, packed float4 and transposed tensors ride along untouched."""
    state = {
        **weights(),
        "complex": torch.randn(3, dtype=torch.complex128),
        "meta": torch.empty(3, device="meta"),
        "uint16": torch.zeros(4, dtype=torch.uint16),
        "float4": torch.zeros(2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2),
        "transposed": torch.randn(4, 3).t(),
    }
    source, out = converted(tmp_path, state)
    assert verify_checkpoints(source, out).exit_code == 0
    with pytest.raises(FcconvError) as raised:  # safetensors has no complex128
        convert_checkpoint(source, tmp_path / "o.safetensors", layers=["fc"], patch=PATCH)
    assert "cannot write" in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "o.safetensors").exists()
