"""The patch read from the checkpoint: the conv before a Linear says its C (#20.4).

A patch spelt C first (``16x8x8``, as PyTorch prints a feature map) where the
conv before the layer has 16 output channels is refused with the spelling
that fits; ``inspect`` proposes it. Nothing is refused where the checkpoint
does not make the conv clear.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fcconv.errors import PatchSpellingError
from fcconv.plan import TensorInfo, feeding_conv, key_order, linear_entries


def state(*layers: tuple[str, tuple[int, ...]]) -> OrderedDict[str, torch.Tensor]:
    """A state dict in the given order: each ``(name, weight shape)`` with its bias."""
    generator = torch.Generator().manual_seed(0)
    tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, shape in layers:
        tensors[f"{name}.weight"] = torch.randn(shape, generator=generator)
        tensors[f"{name}.bias"] = torch.randn(shape[0], generator=generator)
    return tensors


CONV2D = state(("features.0", (8, 3, 3, 3)), ("features.2", (16, 8, 3, 3)), ("head", (10, 1024)))


def save(tensors, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(dict(tensors), path)
    else:
        torch.save(tensors, path)
    return path


def refusal(invoke, *args) -> dict:
    result = invoke(*args, "--json", exit=2)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return json.loads(result.stdout)["error"]


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_c_first_is_refused_with_the_spelling_that_fits(invoke, tmp_path, suffix) -> None:
    model = save(CONV2D, tmp_path / f"m{suffix}")
    out = tmp_path / f"out{suffix}"
    error = refusal(invoke, "convert", model, "-o", out, "--layer", "head", "--patch", "16x8x8")
    assert error["kind"] == "PatchSpellingError" and "SpecError" in error["kinds"]
    assert (error["proposed"], error["channels"], error["conv"]) == ("8x8x16", 16, "features.2")
    assert error["layer"] == "head" and not out.exists()
    # HxW with C inferred reads the same wrong way: 16x8 -> 16x8x8
    error = refusal(invoke, "convert", model, "-o", out, "--layer", "head=16x8")
    assert error["proposed"] == "8x8x16"
    # the proposal converts, and says where C came from
    document = json.loads(
        invoke("convert", model, "-o", out, "--layer", "head", "--patch", "8x8x16", "--json").stdout
    )
    source = document["layers"][0]["channels_from"]
    assert (source["conv"], source["out_channels"], source["agrees"]) == ("features.2", 16, True)


def test_inspect_proposes_the_patch(invoke, tmp_path) -> None:
    model = save(CONV2D, tmp_path / "m.pt")
    document = json.loads(invoke("inspect", model, "--json").stdout)
    (head,) = document["layers"]
    assert head["proposed_patch"] == "8x8x16"
    assert head["channels_from"]["weight"] == "features.2.weight"
    assert all(patch.endswith("x16") for patch in head["patches"])
    # the user's C wins over the conv's in the patches listed
    document = json.loads(invoke("inspect", model, "--channels", "4", "--json").stdout)
    assert all(patch.endswith("x4") for patch in document["layers"][0]["patches"])
    assert document["layers"][0]["proposed_patch"] is None


def test_one_and_three_d(invoke, tmp_path) -> None:
    one = save(state(("conv", (16, 4, 5)), ("fc", (3, 128))), tmp_path / "one.pt")
    error = refusal(invoke, "convert", one, "-o", tmp_path / "o1.pt", "--layer", "fc",
                    "--patch", "l=16,c=8")  # fmt: skip
    assert error["proposed"] == "l=8,c=16"
    error = refusal(invoke, "convert", one, "-o", tmp_path / "o1.pt", "--layer", "fc=16")
    assert error["proposed"] == "l=8,c=16"
    invoke("convert", one, "-o", tmp_path / "o1.pt", "--layer", "fc", "--patch", "l=8,c=16")
    three = save(state(("conv", (16, 2, 3, 3, 3)), ("fc", (3, 512))), tmp_path / "three.pt")
    error = refusal(invoke, "convert", three, "-o", tmp_path / "o3.pt", "--layer", "fc",
                    "--patch", "16x2x4x4")  # fmt: skip
    assert error["proposed"] == "2x4x4x16"
    invoke("convert", three, "-o", tmp_path / "o3.pt", "--layer", "fc", "--patch", "2x4x4x16")
    document = json.loads(invoke("inspect", three, "--rank", "3", "--json").stdout)
    assert document["layers"][0]["channels_from"]["rank"] == 3


# ------------------------------------------------------------ when it is not clear


def info_of(tensors) -> dict[str, TensorInfo]:
    return {k: TensorInfo(tuple(t.shape), "float32") for k, t in tensors.items()}


def feeder(tensors, layer: str):
    info = info_of(tensors)
    (entry,) = [e for e in linear_entries(info) if e.name == layer]
    return feeding_conv(info, entry)


def test_no_conv_is_read_where_the_checkpoint_does_not_make_it_clear() -> None:
    # a Linear between: fc7 reads fc6, not the conv
    head = state(("conv", (16, 3, 3, 3)), ("fc6", (32, 1024)), ("fc7", (10, 32)))
    assert feeder(head, "fc6").channels == 16 and feeder(head, "fc7") is None
    # out_channels that do not divide in_features: something else stands between
    assert feeder(state(("conv", (24, 3, 3, 3)), ("fc", (10, 1000))), "fc") is None
    # the conv after the Linear in the file's order (torchvision's VGG names, sorted)
    vgg = dict(sorted(state(("features.0", (16, 3, 3, 3)), ("classifier.0", (10, 256))).items()))
    assert feeder(vgg, "classifier.0") is None
    # no conv at all
    assert feeder(state(("fc", (10, 64))), "fc") is None


def test_sorted_names_are_read_in_natural_order() -> None:
    # a safetensors header sorts names as text: trunk.10 before trunk.9
    tensors = dict(sorted(state(("trunk.9", (8, 3, 3, 3)), ("trunk.10", (16, 8, 3, 3)),
                                ("z", (10, 1024))).items()))  # fmt: skip
    assert list(tensors).index("trunk.10.weight") < list(tensors).index("trunk.9.weight")
    assert key_order(tensors).index("trunk.10.weight") > key_order(tensors).index("trunk.9.weight")
    assert feeder(tensors, "z").conv == "trunk.10"


def test_another_c_is_recorded_not_refused(invoke, tmp_path) -> None:
    model = save(CONV2D, tmp_path / "m.pt")
    # 4x4x64: C 64 is not the conv's 16, and 16 is no side: something may stand between
    document = json.loads(invoke("convert", model, "-o", tmp_path / "o.pt", "--layer", "head",
                                 "--patch", "4x4x64", "--json").stdout)  # fmt: skip
    assert document["layers"][0]["channels_from"]["agrees"] is False
    # 8x16x8: the conv's 16 is a side, but not the first: no sign of a C-first spelling
    document = json.loads(invoke("convert", model, "-o", tmp_path / "q.pt", "--layer", "head",
                                 "--patch", "8x16x8", "--json").stdout)  # fmt: skip
    assert document["layers"][0]["channels_from"]["agrees"] is False
    # a 1-D patch on a Conv2d's output: other ranks are not compared
    document = json.loads(invoke("convert", model, "-o", tmp_path / "p.pt", "--layer", "head",
                                 "--patch", "l=64,c=16", "--json").stdout)  # fmt: skip
    assert document["layers"][0]["channels_from"] is None


def test_the_library_raises_the_same(tmp_path) -> None:
    import fcconv

    model = save(CONV2D, tmp_path / "m.pt")
    with pytest.raises(PatchSpellingError) as caught:
        fcconv.convert_checkpoint(model, tmp_path / "o.pt", layers=["head"], patch="16x8x8")
    assert caught.value.proposed == "8x8x16" and caught.value.to_dict()["conv"] == "features.2"
