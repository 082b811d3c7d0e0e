"""The coordinate map and the per-cell crop account (SPEC section 5), checked empirically.

The references never use fcconv's arithmetic:

- *where a cell lies*: perturb one input position at a time (float64) and
  see which cells change; a cell's box is the span of positions that change it;
- *which cells equal the model on their crop*: cut the native-size crop at
  the cell's position, run the original model, compare with the cell.

Hypothesis draws 1-D trunks from convs (stride, padding, dilation), average
pools (padding, ``ceil_mode``), ``F.pad`` (also negative: a crop), slices and
``tanh``, so that every position in a receptive field really changes the cell.
Then audio-, pitch- and video-shaped models: ``F.pad`` before every Conv1d,
raw ``[B, T]`` audio through ``(k, 1)`` Conv2d layers, a Conv3d trunk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fcn_helpers import seeded
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from torch import nn

from fcconv.errors import SpecError
from fcconv.fcn import convolutionalize, convolutionalize_detailed, verify_dense
from fcconv.geometry import CellGeometry, conv_weight_to_linear_nd

CHANNELS = 2

conv = st.tuples(
    st.just("conv"),
    st.integers(1, 4),  # kernel
    st.integers(1, 2),  # stride
    st.integers(0, 2),  # padding
    st.integers(1, 2),  # dilation
)
pool = st.tuples(
    st.just("avg"), st.integers(1, 3), st.integers(1, 3), st.integers(0, 1), st.booleans()
)
pad = st.tuples(st.just("pad"), st.integers(-1, 3), st.integers(-1, 3))
cut = st.tuples(st.just("slice"), st.integers(0, 2))
layers = st.lists(st.one_of(conv, pool, pad, cut), min_size=1, max_size=4)


class Trunk1d(nn.Module):
    """A random 1-D trunk, then flatten and Linear; ``tanh`` keeps every position alive."""

    def __init__(self, spec: list[tuple], native: int) -> None:
        super().__init__()
        self.spec = spec
        self.convs = nn.ModuleList(
            nn.Conv1d(CHANNELS, CHANNELS, k, s, p, dilation=d)
            for kind, k, s, p, d in (x for x in spec if x[0] == "conv")
        )
        with torch.no_grad():
            length = self.trunk(torch.zeros(1, CHANNELS, native)).shape[-1]
        if length < 1:
            raise RuntimeError("the trunk leaves nothing of this input")
        self.fc = nn.Linear(CHANNELS * length, 3)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        convs = iter(self.convs)
        for layer in self.spec:
            if layer[0] == "conv":
                x = next(convs)(x)
            elif layer[0] == "avg":
                _, k, s, p, ceil = layer
                x = F.avg_pool1d(x, k, s, min(p, k // 2), ceil_mode=ceil)
            elif layer[0] == "pad":
                x = F.pad(x, (layer[1], layer[2]))
            else:
                x = x[:, :, layer[1] :]
            x = torch.tanh(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.trunk(x).flatten(1))


def build(spec: list[tuple], native: int) -> Trunk1d:
    try:
        model = Trunk1d(spec, native)
    except RuntimeError:  # the trunk does not fit this native size
        assume(False)
    generator = torch.Generator().manual_seed(len(spec) * 7 + native)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model.double().eval()


def influence(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``changed[i, p]``: whether nudging input position ``i`` changes cell ``p``.

    Row ``i`` of the nudged batch is compared with row ``i`` of a batch of
    unnudged copies, never with row 0: a conv's rounding may depend on where
    a row lies in the batch (its memory alignment picks a vector lane or the
    scalar tail), so identical inputs in different rows need not give
    identical bits, and bit-exact comparison across rows would see positions
    far outside a cell's box "change" it.
    """
    length = x.shape[-1]
    same = x.repeat(length, 1, 1)
    nudged = same + torch.eye(length, dtype=x.dtype)[:, None, :]
    with torch.no_grad():
        return (model(nudged) != model(same)).any(dim=1)


FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(spec=layers, native=st.integers(6, 24))
@example(spec=[("conv", 1, 1, 0, 1)], native=6)  # rows of a batch round differently
def test_cell_boxes_are_the_spans_of_input_that_change_each_cell(spec, native) -> None:
    model = build(spec, native)
    conversion = convolutionalize_detailed(model, native, in_channels=CHANNELS)
    cells = conversion.outputs[0].cells
    assert isinstance(cells, CellGeometry)
    assert cells.stride[0] >= 1 and cells.window[0] >= 1
    # long enough that the middle band lies beyond every slice's and pad's reach
    length = native + 8 * cells.window[0] + 64 * cells.stride[0]
    x = torch.randn(1, CHANNELS, length, dtype=torch.float64, generator=torch.Generator())
    changed = influence(conversion.model, x)
    checked = 0
    for p in range(changed.shape[1]):
        positions = changed[:, p].nonzero().flatten().tolist()
        ((start, stop),) = cells.box(p)
        inside = start >= length // 4 and stop <= length // 2
        if not positions:  # a border cell computed from padding alone
            assert not inside, f"cell {p} in the middle depends on no input position"
            continue
        # nothing outside the box changes the cell, whatever the borders do
        assert start <= positions[0] and positions[-1] < stop, (p, positions, start, stop)
        # in the middle band, no layer reads its padding or a cut input: the box exactly
        if inside:
            assert (positions[0], positions[-1] + 1) == (start, stop), (p, positions)
            checked += 1
    assert checked >= 1


@FAST
@given(spec=layers, native=st.integers(6, 24))
def test_crop_exact_cells_are_exactly_those_equal_to_the_model_on_their_crop(spec, native) -> None:
    model = build(spec, native)
    # A trunk that slices away every real position at the native size reads only its
    # own padding there: its output ignores the input, and any crop equals any cell.
    probe = torch.randn(1, CHANNELS, native, dtype=torch.float64, generator=torch.Generator())
    assume(bool(influence(model, probe).any()))
    conversion = convolutionalize_detailed(model, native, in_channels=CHANNELS)
    cells, plan = conversion.outputs[0].cells, conversion.crop_plan
    step = cells.stride[0]
    total = native + 3 * step
    x = torch.randn(2, CHANNELS, total, dtype=torch.float64, generator=torch.Generator())
    with torch.no_grad():
        dense = conversion.model(x)
        for p in range(dense.shape[-1]):
            predicted = plan.exact_along(0, p, native, total, step)
            if p * step + native > total:
                assert not predicted  # no crop fits there
                continue
            crop = model(x[:, :, p * step : p * step + native])
            equal = torch.allclose(dense[:, :, p], crop, rtol=1e-10, atol=1e-12)
            assert equal == predicted, (p, predicted, (dense[:, :, p] - crop).abs().max())
    check = verify_dense(model, conversion.model, native, in_channels=CHANNELS)
    assert check, check.problems
    assert check.crops.crop_exact is not None
    if plan.interior_exact:
        assert not check.warnings
    else:
        assert check.warnings and "not the model run on each crop" in check.warnings[0]


def test_hand_computed_coordinate_map_of_a_padded_vgg_trunk() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # offset -1, stride 1, window 3
        nn.MaxPool2d(2),  # offset -1, stride 2, window 4
        nn.Conv2d(4, 6, 3, padding=1),  # offset -1 - 1*2 = -3, stride 2, window 4 + 2*2 = 8
        nn.MaxPool2d(2),  # offset -3, stride 4, window 8 + 1*2 = 10
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 5),  # the 3x3 map: window 10 + 2*4 = 18
    )
    conversion = convolutionalize_detailed(model.eval(), (12, 12), stride=(1, 2))
    cells = conversion.outputs[0].cells
    # the head's stride 2 (in feature cells) doubles the input stride along W only
    assert cells == CellGeometry(offset=(-3, -3), stride=(4, 8), window=(18, 18))
    assert cells.box(1, 2) == ((1, 19), (13, 31))
    document = json.loads(json.dumps(conversion.to_dict()))
    assert document["outputs"][0]["cells"] == {
        "offset": [-3, -3],
        "stride": [4, 8],
        "window": [18, 18],
    }
    assert document["window_stride"] == [4, 8]


def test_a_ceil_mode_window_can_exceed_the_native_size() -> None:
    # 7 -> pool(2, 2, ceil): 4 positions, the last reading 6 and the missing 7: window 8 > 7
    model = nn.Sequential(nn.MaxPool1d(2, 2, ceil_mode=True), nn.Flatten(), nn.Linear(4, 2))
    model = nn.Sequential(nn.Conv1d(1, 1, 1), *model)
    conversion = convolutionalize_detailed(model.eval(), 7)
    assert conversion.outputs[0].cells == CellGeometry((0,), (2,), (8,))
    assert conversion.crop_plan.after == [True] and conversion.crop_plan.before == [False]
    assert "has a partial ceil_mode window at the end of L" in conversion.crop_plan.reasons[0]


# ------------------------------------------------------------------ real shapes


class PaddedAudio(nn.Module):
    """Audio-style: F.pad before every Conv1d (as in pitch trackers), pools, two Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, 6, 5)
        self.conv2 = nn.Conv1d(6, 8, 3, dilation=2)
        self.fc = nn.Linear(8 * 8, 16)
        self.out = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool1d(F.relu(self.conv1(F.pad(x, (2, 2)))), 2)
        x = F.max_pool1d(F.relu(self.conv2(F.pad(x, (2, 2)))), 2)
        return torch.sigmoid(self.out(F.relu(self.fc(x.flatten(1)))))


class PitchShaped(nn.Module):
    """torchcrepe's shape: raw ``[B, T]`` audio, ``x[:, None, :, None]``, F.pad and (k, 1) convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, (32, 1), stride=(4, 1))
        self.conv1_BN = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, (8, 1))
        self.conv2_BN = nn.BatchNorm2d(8)
        self.in_features = 8 * 8
        self.classifier = nn.Linear(self.in_features, 36)

    def forward(self, x: torch.Tensor, embed: bool = False) -> torch.Tensor:
        x = x[:, None, :, None]
        x = self.layer(x, self.conv1, self.conv1_BN, (0, 0, 14, 14))
        x = self.layer(x, self.conv2, self.conv2_BN)
        if embed:
            return x
        x = x.permute(0, 2, 1, 3).reshape(-1, self.in_features)
        return torch.sigmoid(self.classifier(x))

    def layer(self, x, conv, batch_norm, padding=(0, 0, 3, 4)):
        x = F.pad(x, padding)
        return F.max_pool2d(batch_norm(F.relu(conv(x))), (2, 1), (2, 1))


class Video(nn.Module):
    """A Conv3d trunk, a channels-last flatten, BatchNorm1d in the head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 4, 3)
        self.pool = nn.MaxPool3d(2)
        self.fc = nn.Linear(4 * 2 * 3 * 3, 8)
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv(x)))
        x = x.permute(0, 2, 3, 4, 1).reshape(x.size(0), -1)
        return self.fc2(torch.relu(self.bn(self.fc(x))))


def test_audio_model_with_f_pad_before_every_conv_gets_conv1d_and_the_warning() -> None:
    model = seeded(PaddedAudio(), scale=0.5)
    conversion = convolutionalize_detailed(model, 32)  # 32 -> 36 -> 32 -> 16 -> 20 -> 16 -> 8
    assert conversion.layout.size == (32,) and conversion.layout.channels == 1
    fc = conversion.model.get_submodule("fc")
    assert isinstance(fc, nn.Conv1d) and fc.kernel_size == (8,)
    assert torch.equal(conv_weight_to_linear_nd(fc.weight, "cl"), model.fc.weight)
    # F.pad 2 (offset -2, window 5), pool 2 (stride 2, window 6), F.pad 2 (offset -6),
    # dilated conv 3 (window 6 + 4*2 = 14), pool 2 (stride 4, window 16), 8 cells: 16 + 7*4 = 44
    assert conversion.outputs[0].cells == CellGeometry((-6,), (4,), (44,))
    check = verify_dense(model, conversion.model, 32)
    assert check, check.problems
    crops = check.crops
    assert crops.cells == 3 and crops.crop_exact == 0 and crops.max_abs_diff_other > 1e-6
    (warning,) = check.warnings
    assert "not the model run on each crop" in warning
    for name in ("'pad' (torch.nn.functional.pad)", "'pad_1' (torch.nn.functional.pad)"):
        assert name in warning
    assert "tests/test_convolutionalize_cells.py:" in warning and "pads both ends of L" in warning
    x = torch.randn(1, 1, 32 + 9 * 4)
    with torch.no_grad():
        assert conversion.model(x).shape == (1, 5, 10)


def test_pitch_shaped_model_takes_raw_audio_and_its_flag_at_the_default() -> None:
    model = seeded(PitchShaped(), scale=0.5)
    conversion = convolutionalize_detailed(model, 128)
    assert conversion.layout.channels is None  # [B, T]: the model adds the channel axis
    assert any("embed=False" in note for note in conversion.notes)
    head = conversion.model.get_submodule("classifier")
    assert isinstance(head, nn.Conv2d) and head.kernel_size == (8, 1)
    assert conversion.order == "hcw"  # permute(0, 2, 1, 3) before the reshape
    cells = conversion.outputs[0].cells
    assert cells.offset[0] < 0 and conversion.outputs[0].cells_map.map_axes == (2,)
    check = verify_dense(model, conversion.model, 128)
    assert check and check.crops.crop_exact == 0 and len(check.warnings) == 1
    with torch.no_grad():
        assert conversion.model(torch.randn(2, 128 + 5 * cells.stride[0])).shape == (2, 36, 6, 1)


def test_conv3d_trunk() -> None:
    model = seeded(Video(), scale=0.5)
    conversion = convolutionalize_detailed(model, (6, 8, 8))
    fc, bn = (conversion.model.get_submodule(n) for n in ("fc", "bn"))
    assert isinstance(fc, nn.Conv3d) and fc.kernel_size == (2, 3, 3)
    assert isinstance(bn, nn.BatchNorm3d) and torch.equal(bn.running_var, model.bn.running_var)
    assert conversion.order == "dhwc"
    assert torch.equal(conv_weight_to_linear_nd(fc.weight, "dhwc"), model.fc.weight)
    assert conversion.outputs[0].cells == CellGeometry((0, 0, 0), (2, 2, 2), (6, 8, 8))
    check = verify_dense(model, conversion.model, (6, 8, 8))
    assert check and check.crops.crop_exact == check.crops.cells == 27 and not check.warnings


def test_a_single_number_is_a_square_for_a_2d_model() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    conversion = convolutionalize_detailed(model, 6)
    assert conversion.layout.size == (6, 6)
    assert verify_dense(model, conversion.model, 6)
    with pytest.raises(SpecError, match="stride must be one positive integer or 2"):
        convolutionalize(model, 6, stride=(1, 1, 1))


def test_trunk_layer_of_unknown_geometry_leaves_the_map_unknown(tmp_path: Path) -> None:
    class Upsampled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.fc = nn.Linear(2 * 8 * 8, 3)

        def forward(self, x):
            x = F.interpolate(self.conv(x), scale_factor=2.0)
            return self.fc(x.flatten(1))

    model = Upsampled().eval()
    conversion = convolutionalize_detailed(model, (6, 6))
    facts = conversion.outputs[0]
    assert facts.cells is None and "interpolate" in facts.cells_map.unknown
    check = verify_dense(model, conversion.model, (6, 6))
    assert check, check.problems  # the map is still the head on every window
    assert check.crops.crop_exact is None
    assert check.warnings and "cannot tell which cells" in check.warnings[0]
