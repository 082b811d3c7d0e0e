"""1-D and 3-D patches and receptive-field arithmetic in :mod:`fcconv.geometry`.

The permutation is checked bit for bit (it only moves elements) and against
the one equation, in float64: a Conv1d/Conv3d with the rearranged kernel, at
every window, equals the Linear on that window flattened in the order.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcconv.errors import SpecError
from fcconv.geometry import (
    AxisField,
    CellGeometry,
    Patch,
    PatchNd,
    conv_weight_to_linear_nd,
    index_map,
    index_map_nd,
    kernel_axes,
    linear_weight_to_conv,
    linear_weight_to_conv_nd,
    merge_fields,
    orders_for,
    parse_extent,
    parse_order_nd,
    through_layer,
)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CONV = {1: F.conv1d, 3: F.conv3d}


@st.composite
def patches(draw, ndim: int) -> tuple[PatchNd, str]:
    sizes = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    patch = PatchNd(sizes, draw(st.integers(1, 3)))
    return patch, draw(st.sampled_from(orders_for(ndim)))


def flatten_in_order(window: torch.Tensor, order: str, axes: str) -> torch.Tensor:
    """``[B, C, *sizes]`` flattened with its axes in ``order`` (the reference)."""
    return window.permute(0, *(1 + axes.index(a) for a in order)).reshape(window.shape[0], -1)


@FAST
@given(case=st.one_of(patches(1), patches(3)), out=st.integers(1, 3))
def test_conv_twin_is_the_linear_on_every_window(case, out: int) -> None:
    patch, order = case
    generator = torch.Generator().manual_seed(patch.features)
    weight = torch.randn(out, patch.features, generator=generator, dtype=torch.float64)
    bias = torch.randn(out, generator=generator, dtype=torch.float64)
    kernel = linear_weight_to_conv_nd(weight, patch, order)
    assert kernel.shape == (out, patch.channels, *patch.sizes)
    size = tuple(s + 2 for s in patch.sizes)
    x = torch.randn(2, patch.channels, *size, generator=generator, dtype=torch.float64)
    dense = CONV[patch.ndim](x, kernel, bias)
    axes = kernel_axes(patch.ndim)
    for start in itertools.product(range(3), repeat=patch.ndim):
        cut = (slice(None), slice(None)) + tuple(
            slice(s, s + n) for s, n in zip(start, patch.sizes, strict=True)
        )
        expected = flatten_in_order(x[cut], order, axes) @ weight.T + bias
        torch.testing.assert_close(dense[(slice(None), slice(None), *start)], expected)


@FAST
@given(case=st.one_of(patches(1), patches(2), patches(3)))
def test_round_trip_is_bit_exact_and_2d_agrees_with_the_2d_functions(case) -> None:
    patch, order = case
    weight = torch.randn(3, patch.features, generator=torch.Generator().manual_seed(1))
    kernel = linear_weight_to_conv_nd(weight, patch, order)
    back = conv_weight_to_linear_nd(kernel, order)
    assert torch.equal(back.view(torch.int32), weight.view(torch.int32))
    assert kernel.data_ptr() != weight.data_ptr() and kernel.is_contiguous()
    if patch.ndim == 2:
        flat = Patch(*patch.sizes, patch.channels)
        assert torch.equal(kernel, linear_weight_to_conv(weight, flat, order))
        assert torch.equal(index_map_nd(patch, order), index_map(flat, order))


def test_index_map_nd_literal() -> None:
    # 1-D, order lc: the columns run l-major, c-minor: column = l * C + c
    assert index_map_nd(PatchNd((3,), 2), "lc").tolist() == [[0, 2, 4], [1, 3, 5]]
    # 3-D channels-last: column = ((d * H + h) * W + w) * C + c
    table = index_map_nd(PatchNd((2, 2, 2), 2), "dhwc")
    assert table[1, 1, 0, 1].item() == ((1 * 2 + 0) * 2 + 1) * 2 + 1


def test_orders_and_their_errors() -> None:
    assert orders_for(1) == ("cl", "lc")
    assert len(orders_for(3)) == 24 and orders_for(3)[0] == "cdhw"
    assert parse_order_nd(" DHWC ", 3) == "dhwc"
    with pytest.raises(SpecError, match="for a 1-D patch: expected a permutation of c, l"):
        parse_order_nd("chw", 1)
    with pytest.raises(SpecError, match="not a Linear weight for the patch 4 × 3 \\(C × L\\)"):
        linear_weight_to_conv_nd(torch.zeros(2, 5), PatchNd((3,), 4), "cl")
    with pytest.raises(SpecError, match="not a Conv1d, Conv2d or Conv3d weight"):
        conv_weight_to_linear_nd(torch.zeros(2, 3), "cl")
    assert str(PatchNd((4,), 16)) == "l=4,c=16" and str(PatchNd((3, 5), 2)) == "3x5x2"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1024", (1024,)), ("24x24", (24, 24)), ("8 x 32 × 32", (8, 32, 32))],
)
def test_parse_extent(text: str, expected: tuple[int, ...]) -> None:
    assert parse_extent(text) == expected


@pytest.mark.parametrize("text", ["", "0", "1x2x3x4", "24by24", "-3", "2x0"])
def test_parse_extent_refuses(text: str) -> None:
    with pytest.raises(SpecError, match="expected T, HxW or DxHxW"):
        parse_extent(text)


def test_receptive_field_arithmetic_by_hand() -> None:
    # AlexNet's conv1: 11x11 at stride 4, padding 2: cells 4 apart, each seeing 11 pixels
    conv1 = through_layer(AxisField(), kernel=11, stride=4, padding=2)
    assert conv1 == AxisField(-2, 4, 11)
    # then a 3x3 max pool at stride 2: 2 cells of conv1 apart, 11 + 2 * 4 = 19 wide
    assert through_layer(conv1, kernel=3, stride=2) == AxisField(-2, 8, 19)
    # dilation 2 spreads a 3-tap kernel over 5 positions of its input
    assert through_layer(AxisField(0, 2, 3), kernel=3, dilation=2) == AxisField(0, 2, 3 + 2 * 2 * 2)
    # F.pad(x, (-1, ...)) crops: the first cell starts one input stride later
    assert through_layer(AxisField(-2, 4, 11), padding=-1) == AxisField(2, 4, 11)
    assert merge_fields(AxisField(0, 2, 5), AxisField(-1, 2, 3)) == AxisField(-1, 2, 6)
    assert merge_fields(AxisField(0, 2, 5), AxisField(0, 4, 5)) is None
    cells = CellGeometry.from_fields((AxisField(-2, 8, 19), AxisField(0, 4, 7)))
    assert cells.box(2, 3) == ((14, 33), (12, 19)) and cells.fields[1] == AxisField(0, 4, 7)
    with pytest.raises(SpecError, match="a cell of this map has 2 indices"):
        cells.box(1)
