"""The Python API: its names show in ``dir(fcconv)``; it takes typed values (a Patch,
tuples, ints) as well as strings and a state dict where it takes a path; a wrong type
is refused with the library's own error, never a raw TypeError or AttributeError."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import fcconv
from fcconv.errors import CheckpointError, FcconvError, LayerError, SpecError


def test_dir_shows_the_public_api() -> None:
    names = dir(fcconv)
    assert set(fcconv.__all__) <= set(names)
    for name in ("convert_checkpoint", "convolutionalize", "verify_checkpoints", "map_image"):
        assert name in names
    for name in fcconv.__all__:
        assert getattr(fcconv, name) is not None, name


def head() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.Flatten(), nn.Linear(16 * 8 * 8, 5))


@pytest.mark.parametrize("patch", ["8x8x16", (8, 8, 16), [8, 8], fcconv.Patch(8, 8, 16)])
def test_linear_to_conv_takes_a_patch_in_any_form(patch) -> None:
    linear = head()[2]
    conv = fcconv.linear_to_conv(linear, patch)
    assert isinstance(conv, nn.Conv2d) and tuple(conv.weight.shape) == (5, 16, 8, 8)
    x = torch.randn(1, 16, 8, 8)
    torch.testing.assert_close(conv(x).flatten(1), linear(x.flatten(1)))


def test_linear_to_conv_of_other_ranks_and_strides() -> None:
    conv = fcconv.linear_to_conv(nn.Linear(64, 3), (16,), "lc", stride=2)
    assert isinstance(conv, nn.Conv1d) and conv.stride == (2,) and conv.in_channels == 4
    conv = fcconv.linear_to_conv(nn.Linear(64, 3), (2, 2, 2, 8), stride=(1, 2, 2))
    assert isinstance(conv, nn.Conv3d) and conv.stride == (1, 2, 2)


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ((nn.Linear(1024, 5), (8.0, 8, 16)), SpecError),
        ((nn.Linear(1024, 5), 8), SpecError),
        ((nn.Linear(1024, 5), torch.zeros(3)), SpecError),
        ((nn.Linear(1024, 5), None), SpecError),
        ((nn.Linear(1024, 5), (8, 8, 16), 3), SpecError),  # an order that is no text
        ((nn.Conv2d(3, 3, 1), (8, 8, 16)), LayerError),
        (("fc", (8, 8, 16)), LayerError),
    ],
)
def test_wrong_types_are_refused_with_the_library_error(arguments, error) -> None:
    with pytest.raises(error):
        fcconv.linear_to_conv(*arguments)


def test_linear_to_conv_refuses_a_bad_stride() -> None:
    for stride in ((1,), "2", 0, (2.0, 2)):
        with pytest.raises(SpecError):
            fcconv.linear_to_conv(nn.Linear(1024, 5), (8, 8, 16), stride=stride)


def test_linear_weight_to_conv_takes_tuples_and_text() -> None:
    weight = torch.randn(5, 1024)
    kernel = fcconv.linear_weight_to_conv(weight, fcconv.Patch(8, 8, 16), "hwc")
    assert torch.equal(fcconv.linear_weight_to_conv(weight, (8, 8, 16), "hwc"), kernel)
    assert torch.equal(fcconv.linear_weight_to_conv(weight, "8x8", "hwc"), kernel)
    with pytest.raises(SpecError):
        fcconv.linear_weight_to_conv(weight, 8, "hwc")


# ------------------------------------------------------------ a state dict in memory


def test_convert_a_state_dict_in_memory() -> None:
    model = head()
    state = model.state_dict()
    before = {k: v.clone() for k, v in state.items()}
    result = fcconv.convert_checkpoint(state, layers=[("2", (8, 8, 16))], stride=4)
    assert result and result.exit_code == 0 and not result.written
    converted = result.state_dict
    assert list(converted) == list(state)
    assert tuple(converted["2.weight"].shape) == (5, 16, 8, 8)
    assert converted["0.weight"] is state["0.weight"]  # untouched tensors are the same
    assert all(torch.equal(state[k], before[k]) for k in state)  # the input is kept
    # the converted head loads into the conv and computes the Linear on each window
    conv = nn.Conv2d(16, 5, 8, stride=4)
    conv.load_state_dict({"weight": converted["2.weight"], "bias": converted["2.bias"]})
    x = torch.randn(2, 3, 10, 10)
    torch.testing.assert_close(conv(model[0](x)).flatten(1), model(x))
    # the result verifies against the original, both in memory
    assert fcconv.verify_checkpoints(state, converted)


def test_a_training_checkpoint_in_memory_and_to_a_file(tmp_path: Path) -> None:
    state = {"state_dict": head().state_dict(), "epoch": 3}
    result = fcconv.convert_checkpoint(state, layers=["2"], patch="8x8x16")
    assert result.state_dict["epoch"] == 3
    assert tuple(result.state_dict["state_dict"]["2.weight"].shape) == (5, 16, 8, 8)
    out = tmp_path / "converted.pt"
    result = fcconv.convert_checkpoint(state, out, layers=["2"], patch="8x8x16")
    assert result.written and out.is_file()
    assert fcconv.inspect_checkpoint(state).to_dict()["layers"][0]["proposed_patch"] == "8x8x16"


@pytest.mark.parametrize("source", [42, {"a": 1}, [torch.zeros(2)], None])
def test_what_is_no_checkpoint_is_refused(source) -> None:
    with pytest.raises(CheckpointError):
        fcconv.convert_checkpoint(source, layers=["fc"], patch="8x8x16")


def test_layers_strides_and_sizes_of_the_wrong_type() -> None:
    state = head().state_dict()
    for arguments in (
        {"layers": [3]},
        {"layers": ["2"], "patch": 8},
        {"layers": ["2"], "patch": "8x8x16", "stride": 2.5},
        {"layers": ["2"], "patch": "8x8x16", "input_size": object()},
        {"layers": ["2"], "patch": "8x8x16", "order": 1},
    ):
        with pytest.raises(FcconvError):
            fcconv.convert_checkpoint(state, **arguments)
