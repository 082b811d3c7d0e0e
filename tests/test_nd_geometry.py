"""1-D and 3-D patches: how they are written, what fits, where windows fall, the permutation.

Expected values are hand arithmetic (written out in comments) or the
independent reference in ``tests/reference_nd.py``, never fcconv's own code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_nd import kernel_by_definition, linear_on_every_window_nd
from torch import nn

from fcconv.errors import SpecError
from fcconv.geometry import (
    conv_weight_to_linear_nd,
    flip_kernel,
    index_map_nd,
    kernel_transpose,
    linear_weight_to_conv_nd,
    patch_of_kernel,
)
from fcconv.patches import (
    Patch,
    PatchNd,
    PatchSpec,
    PatchSpecNd,
    candidate_patches_nd,
    fit_extent,
    kernel_axes,
    order_rank,
    orders_for,
    parse_patch,
    parse_patch_spec,
    resolve_patch,
)
from fcconv.windows import conv_line, default_input, make_grid

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@st.composite
def nd_patches(draw, ranks=(1, 3), side=4, channels=3) -> tuple[PatchNd, str]:
    ndim = draw(st.sampled_from(ranks))
    sizes = tuple(draw(st.integers(1, side)) for _ in range(ndim))
    patch = PatchNd(sizes, draw(st.integers(1, channels)))
    return patch, draw(st.sampled_from(orders_for(ndim)))


# ------------------------------------------------------------------ specs

SPECS = [
    ("16", PatchSpecNd((16,))),
    (" 16 ", PatchSpecNd((16,))),
    ("l=16,c=64", PatchSpecNd((16,), 64)),
    ("t=16", PatchSpecNd((16,))),
    ("T = 16 , C = 64", PatchSpecNd((16,), 64)),
    ("c=64,l=16", PatchSpecNd((16,), 64)),
    ("2x3x3x8", PatchSpecNd((2, 3, 3), 8)),
    ("2×3×3×8", PatchSpecNd((2, 3, 3), 8)),
    ("d=2,h=3,w=3", PatchSpecNd((2, 3, 3))),
    ("w=3,d=2,c=8,h=4", PatchSpecNd((2, 4, 3), 8)),
    ("h=20,w=16,c=10", PatchSpec(20, 16, 10)),
    ("h=20,w=16", PatchSpec(20, 16)),
    ("20x16x10", PatchSpec(20, 16, 10)),
    ("20x16", PatchSpec(20, 16)),
]


@pytest.mark.parametrize(("text", "expected"), SPECS, ids=[t for t, _ in SPECS])
def test_patch_spellings(text, expected) -> None:
    assert parse_patch_spec(text) == expected


BAD_SPECS = [
    "", "0", "16x", "1x2x3x4x5", "0x3x3x8", "l=0", "l=16,c=0", "l=16,l=8", "l=16,t=8",
    "d=2,h=3", "l=4,h=3", "c=64", "x=3", "l=16,", "l=", "l=16;c=4", "d=2,h=3,w=3,c=8,l=2",
]  # fmt: skip


@pytest.mark.parametrize("text", BAD_SPECS)
def test_malformed_patch_spellings_say_what_is_expected(text) -> None:
    with pytest.raises(SpecError) as raised:
        parse_patch_spec(text)
    message = str(raised.value)
    assert message.startswith(f"malformed patch {text!r}: expected HxWxC")
    assert "l=16,c=64" in message and "d=2,h=3,w=3" in message and "\n" not in message


def test_the_2d_parser_refuses_other_ranks_naming_them() -> None:
    with pytest.raises(SpecError, match="expected a 2-D patch.*this one is 1-D"):
        parse_patch("16")
    with pytest.raises(SpecError, match="this one is 3-D"):
        parse_patch("d=2,h=3,w=3")
    assert parse_patch("h=3,w=4,c=2") == PatchSpec(3, 4, 2)


@FAST
@given(case=nd_patches(ranks=(1, 2, 3), side=40, channels=600))
def test_every_resolved_patch_reads_back_from_its_own_spelling(case) -> None:
    """What reports and provenance print (``str``) is a spec that gives the same patch."""
    patch, _ = case
    spelled = patch.to_patch() if patch.ndim == 2 else patch
    assert resolve_patch(parse_patch_spec(str(spelled)), patch.features) == spelled


def test_str_of_nd_patches_and_specs() -> None:
    assert str(PatchNd((16,), 64)) == "l=16,c=64"
    assert str(PatchNd((2, 3, 3), 8)) == "d=2,h=3,w=3,c=8"
    assert str(PatchSpecNd((16,))) == "l=16" and str(PatchSpecNd((2, 3, 3))) == "d=2,h=3,w=3"


def test_order_ranks() -> None:
    assert [order_rank(o) for o in ("cl", "LC", "hwc", "cdhw", "whdc")] == [1, 1, 2, 3, 3]
    for bad in ("ch", "cll", "cdh", "xyz", "", "chwdl"):
        with pytest.raises(SpecError, match=f"malformed order {bad!r}: expected"):
            order_rank(bad)


# ------------------------------------------------------------------ fitting


def test_resolve_infers_the_channels_of_1d_and_3d_patches() -> None:
    # 512 = 16 positions × 32 channels; 144 = (2·3·3) positions × 8 channels
    assert resolve_patch(PatchSpecNd((16,)), 512) == PatchNd((16,), 32)
    assert resolve_patch(PatchSpecNd((2, 3, 3)), 144) == PatchNd((2, 3, 3), 8)
    assert resolve_patch(PatchSpecNd((2, 3, 3), 8), 144) == PatchNd((2, 3, 3), 8)


def test_resolve_explains_a_1d_mismatch_with_what_fits() -> None:
    with pytest.raises(SpecError) as raised:
        resolve_patch(PatchSpecNd((7,)), 512, "fc1")
    # 512 = 2^9 is no multiple of 7; every length that divides it fits, longest first
    assert str(raised.value) == (
        "patch l=7 does not fit fc1: in_features 512 is not a multiple of 7 = 7; 1-D patches "
        "that fit: l=512,c=1, l=256,c=2, l=128,c=4, l=64,c=8, l=32,c=16, l=16,c=32"
    )
    assert raised.value.layer == "fc1"


def test_resolve_explains_a_3d_mismatch_with_the_same_channels_first() -> None:
    with pytest.raises(SpecError) as raised:
        resolve_patch(PatchSpecNd((2, 3, 4), 8), 144, "fc")
    # 2·3·4·8 = 192 ≠ 144; with 8 channels 18 positions remain: 2×3×3 first (square frames)
    message = str(raised.value)
    assert message.startswith("patch d=2,h=3,w=4,c=8 has 192 elements but fc has in_features 144")
    assert "3-D patches that fit: d=2,h=3,w=3,c=8, d=18,h=1,w=1,c=8" in message


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3000), st.one_of(st.none(), st.integers(1, 40)), st.sampled_from([1, 3]))
def test_candidates_are_exactly_the_fits(features: int, channels: int | None, ndim: int) -> None:
    """Brute force over every divisor: the listed patches are fits, and every fit is listed."""
    found = candidate_patches_nd(features, ndim, channels, limit=10**6)
    assert all(p.features == features and p.ndim == ndim for p in found)
    assert len(set(found)) == len(found)
    if channels is not None and features % channels:
        assert found == []
        return
    if ndim == 1:
        lengths = [n for n in range(1, features + 1) if features % n == 0]
        if channels is not None:
            lengths = [features // channels]
        assert [p.sizes[0] for p in found] == sorted(lengths, reverse=True)
    elif channels is None:
        cubes = [s for s in range(1, features + 1) if features % s**3 == 0]
        assert [p.sizes for p in found] == [(s, s, s) for s in sorted(cubes, reverse=True)]
    else:
        area = features // channels
        every = {
            (d, h, area // (d * h))
            for d in range(1, min(area, 64) + 1)
            for h in range(1, area + 1)
            if area % (d * h) == 0
        }
        assert {p.sizes for p in found} == every
        frames = [abs(h - w) for _, h, w in (p.sizes for p in found)]
        assert frames == sorted(frames)  # squarest frames first


def test_candidate_search_is_bounded_whatever_the_size() -> None:
    import time

    started = time.perf_counter()
    for features in (2**60, 2**61 - 1, 10**18, 2**62 * 3, math.factorial(20)):
        for ndim in (1, 3):
            candidate_patches_nd(features, ndim)
            candidate_patches_nd(features, ndim, channels=1)
            candidate_patches_nd(features, ndim, channels=3)
    assert time.perf_counter() - started < 20


def test_fit_extent() -> None:
    assert fit_extent((1024,), 1) == (1024,)
    assert fit_extent((7,), 3) == (7, 7, 7)
    assert fit_extent((8, 32, 32), 3) == (8, 32, 32)
    with pytest.raises(SpecError) as raised:
        fit_extent((24, 24), 1, layer="fc1")
    assert str(raised.value) == (
        "input size 24x24 has 2 numbers, but the patch of fc1 is 1-D; give T (e.g. 1024)"
    )
    with pytest.raises(SpecError, match="stride 2x2 has 2 numbers.*3-D; give S, or one number"):
        fit_extent((2, 2), 3, "stride")


# ------------------------------------------------------------------ windows


def test_grid_of_a_1d_patch_by_hand() -> None:
    # windows of 16 at stride 16 over 130: starts 0, 16, …, 112 (8 windows), 130 − 128 = 2 left
    grid = make_grid((130,), PatchNd((16,), 32))
    assert grid.counts == (8,) and grid.cells == 8 and grid.uncovered == (2,)
    assert grid.window(7) == (slice(112, 128),)
    assert grid.warnings() == [
        "input length 130 leaves the last 2 position(s) uncovered by 16-position windows "
        "at stride 16"
    ]


def test_grid_of_a_3d_patch_by_hand() -> None:
    # depth: (9 − 2) // 2 + 1 = 4 windows, 9 − 8 = 1 frame left; rows (8 − 3) // 3 + 1 = 2,
    # 8 − 6 = 2 left; columns (6 − 3) // 1 + 1 = 4, nothing left
    grid = make_grid((9, 8, 6), PatchNd((2, 3, 3), 8), (2, 3, 1))
    assert grid.counts == (4, 2, 4) and grid.uncovered == (1, 2, 0)
    assert grid.window(3, 1, 2) == (slice(6, 8), slice(3, 6), slice(2, 5))
    assert grid.warnings() == [
        "input depth 9 leaves the last 1 frame(s) uncovered by 2-frame windows at stride 2",
        "input height 8 leaves the last 2 row(s) uncovered by 3-row windows at stride 3",
    ]


@FAST
@given(case=nd_patches(ranks=(1, 2, 3)), data=st.data())
def test_grid_matches_brute_force(case, data) -> None:
    patch, _ = case
    stride = tuple(data.draw(st.integers(1, 4)) for _ in patch.sizes)
    size = tuple(k + data.draw(st.integers(0, 9)) for k in patch.sizes)
    grid = make_grid(size, patch, stride)
    starts = [
        list(range(0, n - k + 1, s)) for n, k, s in zip(size, patch.sizes, stride, strict=True)
    ]
    assert grid.counts == tuple(map(len, starts))
    assert grid.uncovered == tuple(
        n - (last[-1] + k) for n, last, k in zip(size, starts, patch.sizes, strict=True)
    )
    assert len(grid.warnings()) == sum(u > 0 for u in grid.uncovered)
    last = tuple(len(s) - 1 for s in starts)
    assert grid.window(*last) == tuple(
        slice(s[-1], s[-1] + k) for s, k in zip(starts, patch.sizes, strict=True)
    )
    assert make_grid(default_input(patch, stride), patch, stride).counts == (2,) * patch.ndim


def test_input_smaller_than_a_patch_is_refused_in_its_own_terms() -> None:
    with pytest.raises(SpecError, match="input 8 is smaller than one 16 patch"):
        make_grid((8,), PatchNd((16,), 4))
    with pytest.raises(SpecError, match="input 2x9x9 is smaller than one 3x3x3 patch"):
        make_grid((2, 9, 9), PatchNd((3, 3, 3), 4))


# ------------------------------------------------------------------ permutation


def test_1d_kernel_and_conv_output_by_hand() -> None:
    # C=2, L=3. Order lc puts column 2l + c at tap (c, l); cl puts c·3 + l there.
    weight = torch.arange(10.0, 16.0).reshape(1, 6)
    lc = linear_weight_to_conv_nd(weight, PatchNd((3,), 2), "lc")
    cl = linear_weight_to_conv_nd(weight, PatchNd((3,), 2), "cl")
    assert lc[0].tolist() == [[10, 12, 14], [11, 13, 15]]
    assert cl[0].tolist() == [[10, 11, 12], [13, 14, 15]]
    # x: c0 = 1 2 3 4, c1 = 5 6 7 8; two windows at stride 1.
    #   lc window 0 reads 1 5 2 6 3 7 → 10+55+24+78+42+105 = 314; window 1: 2 6 3 7 4 8 → 389
    #   cl window 0 reads 1 2 3 5 6 7 → 10+22+36+65+84+105 = 322; window 1: 2 3 4 6 7 8 → 397
    x = torch.tensor([[[1.0, 2, 3, 4], [5, 6, 7, 8]]])
    assert F.conv1d(x, lc).flatten().tolist() == [314, 389]
    assert F.conv1d(x, cl).flatten().tolist() == [322, 397]


def test_3d_kernel_by_hand() -> None:
    # C=2, D=2, H=1, W=2 and W = 0 … 7.
    weight = torch.arange(8.0).reshape(1, 8)
    patch = PatchNd((2, 1, 2), 2)
    # dhwc: column = ((d·1 + h)·2 + w)·2 + c = 4d + 2w + c
    dhwc = linear_weight_to_conv_nd(weight, patch, "dhwc")[0]
    assert dhwc[:, :, 0, :].tolist() == [[[0, 2], [4, 6]], [[1, 3], [5, 7]]]
    # wdhc: column = w·(D·H·C) + d·(H·C) + h·C + c = 4w + 2d + c
    wdhc = linear_weight_to_conv_nd(weight, patch, "wdhc")[0]
    assert wdhc[:, :, 0, :].tolist() == [[[0, 4], [2, 6]], [[1, 5], [3, 7]]]
    # cdhw is PyTorch's own layout: the identity
    assert linear_weight_to_conv_nd(weight, patch, "cdhw").flatten().tolist() == list(range(8))


@FAST
@given(case=nd_patches(), out=st.integers(1, 3), flip=st.booleans())
def test_kernel_is_the_definition_tap_by_tap(case, out: int, flip: bool) -> None:
    patch, order = case
    weight = torch.randn(out, patch.features, generator=torch.Generator().manual_seed(out))
    kernel = linear_weight_to_conv_nd(weight, patch, order, flip=flip)
    expected = kernel_by_definition(weight, patch.channels, patch.sizes, order, flip)
    assert torch.equal(kernel, expected)
    assert torch.equal(conv_weight_to_linear_nd(kernel, order, flip=flip), weight)
    if flip:
        assert torch.equal(flip_kernel(kernel), linear_weight_to_conv_nd(weight, patch, order))


@FAST
@given(case=nd_patches(), data=st.data())
def test_conv_with_the_kernel_is_the_linear_on_every_window(case, data) -> None:
    patch, order = case
    stride = tuple(data.draw(st.integers(1, 3)) for _ in patch.sizes)
    size = tuple(k + data.draw(st.integers(0, 4)) for k in patch.sizes)
    generator = torch.Generator().manual_seed(patch.features)
    weight = torch.randn(2, patch.features, generator=generator, dtype=torch.float64)
    bias = torch.randn(2, generator=generator, dtype=torch.float64)
    x = torch.randn(1, patch.channels, *size, generator=generator, dtype=torch.float64)
    kernel = linear_weight_to_conv_nd(weight, patch, order)
    dense = CONV[patch.ndim](x, kernel, bias, stride=stride)
    expected = linear_on_every_window_nd(x, weight, bias, patch.sizes, stride, order)
    torch.testing.assert_close(dense, expected, rtol=1e-12, atol=1e-12)


@FAST
@given(case=nd_patches(ranks=(1, 2, 3)), width=st.sampled_from([1, 2, 4]))
def test_the_streamed_permutation_is_the_in_memory_one(case, width: int) -> None:
    """:func:`kernel_transpose` applied to raw bits, as the streamed writers apply it."""
    patch, order = case
    raw = np.random.default_rng(patch.features).integers(0, 255, (3, patch.features * width))
    bits = raw.astype(np.uint8).view(f"<u{width}")
    sizes, transpose = kernel_transpose(patch, order)
    moved = bits.reshape(3, *sizes).transpose(0, *(1 + a for a in transpose)).reshape(3, -1)
    as_torch = torch.from_numpy(bits.astype(np.int64))
    expected = kernel_by_definition(as_torch, patch.channels, patch.sizes, order)
    assert np.array_equal(moved, expected.reshape(3, -1).numpy())
    identity = torch.equal(index_map_nd(patch, order).flatten(), torch.arange(patch.features))
    assert (transpose == tuple(range(len(transpose)))) == identity


def test_patch_of_kernel_of_every_rank() -> None:
    assert patch_of_kernel((5, 32, 16)) == PatchNd((16,), 32)
    assert patch_of_kernel((5, 10, 20, 20)) == Patch(20, 20, 10)
    assert patch_of_kernel((5, 8, 2, 3, 3)) == PatchNd((2, 3, 3), 8)


CONV1D = "nn.Conv1d(32, 24, kernel_size=(16,), stride=(8,), padding=0, bias=True)"
CONV3D = "nn.Conv3d(8, 24, kernel_size=(2, 3, 3), stride=(1, 3, 3), padding=0, bias=True)"


@pytest.mark.parametrize(
    ("patch", "stride", "line"),
    [(PatchNd((16,), 32), (8,), CONV1D), (PatchNd((2, 3, 3), 8), (1, 3, 3), CONV3D)],
)
def test_the_conv_line_builds_the_module_that_loads_the_kernel(patch, stride, line) -> None:
    assert conv_line(patch, 24, stride) == line
    module = eval(line, {"nn": nn})  # noqa: S307 - our own output
    weight = torch.randn(24, patch.features)
    kernel = linear_weight_to_conv_nd(weight, patch, kernel_axes(patch.ndim))
    module.load_state_dict({"weight": kernel, "bias": torch.zeros(24)})
    x = torch.randn(1, patch.channels, *(k + s for k, s in zip(patch.sizes, stride, strict=True)))
    assert module(x).shape == (1, 24, *(2,) * patch.ndim)


def test_relabellings_of_equal_sides() -> None:
    from fcconv.geometry import spatial_relabellings

    assert spatial_relabellings(PatchNd((4,), 2)) == []
    assert len(spatial_relabellings(PatchNd((2, 3, 4), 2))) == 0
    assert len(spatial_relabellings(PatchNd((2, 3, 3), 2))) == 1  # h ↔ w
    assert len(spatial_relabellings(PatchNd((3, 3, 3), 2))) == 5  # 3! − 1
