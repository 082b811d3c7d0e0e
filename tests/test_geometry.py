"""Tests for fcconv.geometry: specs, grids, and the weight permutation both ways.

Expected values come from hand arithmetic (written out in comments) or from
the independent reference in ``tests/reference.py``, never from the code
under test.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from reference import (
    bits,
    bitwise_equal,
    flat_index,
    index_table,
    linear_on_every_window,
)

from fcconv.errors import SpecError
from fcconv.geometry import (
    DEFAULT_ORDER,
    ORDERS,
    Patch,
    PatchSpec,
    candidate_patches,
    coinciding_orders,
    conv2d_line,
    conv_weight_to_linear,
    default_input,
    index_map,
    linear_weight_to_conv,
    make_grid,
    parse_order,
    parse_patch,
    parse_size,
    parse_stride,
    patch_of_kernel,
    resolve_patch,
)

FAST = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Integer dtypes of the same width, to plant arbitrary bit patterns (NaN
# payloads, -0.0, inf, subnormals) in float tensors.
SAME_WIDTH_INT = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A tensor of ``dtype`` whose elements are uniformly random bit patterns."""
    gen = torch.Generator().manual_seed(seed)
    int_dtype = SAME_WIDTH_INT[dtype]
    info = torch.iinfo(int_dtype)
    raw = torch.randint(info.min, info.max, shape, generator=gen, dtype=int_dtype)
    return raw.view(dtype)


def special_values(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Distinct-looking values including NaN, -0.0, +-inf, cycled over ``shape``."""
    pool = [float("nan"), -0.0, 0.0, float("inf"), float("-inf"), 1.5, -2.25, 3.0]
    values = []
    for k in range(math.prod(shape)):
        value = pool[k % len(pool)]
        # Shift the ordinary numbers so that repeats differ; adding 0 to -0.0
        # would make it +0.0, so zeros and non-finite values stay as they are.
        if math.isfinite(value) and value != 0:
            value += k // len(pool)
        values.append(value)
    return torch.tensor(values, dtype=dtype).reshape(shape)


@contextlib.contextmanager
def onednn_off(when: bool = True) -> Iterator[None]:
    """Run CPU convs without oneDNN (mkldnn) while the block runs, if ``when``.

    torch 2.13's oneDNN bfloat16 conv on CPU returns wrong numbers (errors of
    the size of the output, even NaN) for some small shapes whose output is
    one column wide, e.g. x [2, 2, 6, 5], kernel [1, 2, 1, 4], stride (1, 2).
    Known upstream: pytorch/pytorch#169688, #163347. The native ATen path is
    right, and it is fcconv's kernel, not torch's backend, under test here.
    """
    before = torch.backends.mkldnn.enabled
    if when:
        torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def magnitude(x, weight, bias, patch_hw, stride, order) -> torch.Tensor:
    """``|W|·|x| + |b|`` per output element, the scale of SPEC's tolerances."""
    return linear_on_every_window(
        x.abs(),
        weight.abs(),
        None if bias is None else bias.abs(),
        patch_hw,
        stride,
        order,
    )


# ---------------------------------------------------------------------------
# Hand-computed tiny cases
# ---------------------------------------------------------------------------

# Patch 2x2x2 (kh = kw = 2, C = 2), Linear 8 -> 2.
# Row 0 sums the patch (order-blind) and adds bias 100.
# Row 1 has weights 10^7 .. 10^0, so its output, read as a decimal number,
# spells the flattened vector digit by digit: the order becomes visible.
HAND_PATCH = Patch(2, 2, 2)
HAND_W = torch.tensor(
    [
        [1.0] * 8,
        [1e7, 1e6, 1e5, 1e4, 1e3, 1e2, 1e1, 1e0],
    ],
    dtype=torch.float64,
)
HAND_B = torch.tensor([100.0, 0.0], dtype=torch.float64)
# Input [1, 2, 2, 4]:
#   channel 0: [[1, 2, 3, 4],      channel 1: [[9, 8, 7, 6],
#               [5, 6, 7, 8]]                  [5, 4, 3, 1]]
HAND_X = torch.tensor(
    [[[[1, 2, 3, 4], [5, 6, 7, 8]], [[9, 8, 7, 6], [5, 4, 3, 1]]]],
    dtype=torch.float64,
)
# At stride 2x2 there are two windows, columns 0-1 and 2-3:
#   window 0: c0 [[1, 2], [5, 6]]  c1 [[9, 8], [5, 4]]  sum 14 + 26 = 40
#   window 1: c0 [[3, 4], [7, 8]]  c1 [[7, 6], [3, 1]]  sum 22 + 17 = 39
HAND_CASES = {
    # chw: all of c0 row by row, then all of c1
    #   window 0: 1 2 5 6 | 9 8 5 4 -> 12569854
    #   window 1: 3 4 7 8 | 7 6 3 1 -> 34787631
    "chw": [[140.0, 139.0], [12569854.0, 34787631.0]],
    # hwc: pixel by pixel (0,0) (0,1) (1,0) (1,1), both channels each
    #   window 0: 1 9 | 2 8 | 5 5 | 6 4 -> 19285564
    #   window 1: 3 7 | 4 6 | 7 3 | 8 1 -> 37467381
    "hwc": [[140.0, 139.0], [19285564.0, 37467381.0]],
    # whc: column by column, top pixel then bottom, both channels each
    #   window 0: (w0,h0) 1 9 | (w0,h1) 5 5 | (w1,h0) 2 8 | (w1,h1) 6 4 -> 19552864
    #   window 1: (w0,h0) 3 7 | (w0,h1) 7 3 | (w1,h0) 4 6 | (w1,h1) 8 1 -> 37734681
    "whc": [[140.0, 139.0], [19552864.0, 37734681.0]],
}


@pytest.mark.parametrize("order", sorted(HAND_CASES))
def test_hand_computed_conv_output(order):
    kernel = linear_weight_to_conv(HAND_W, HAND_PATCH, order)
    out = F.conv2d(HAND_X, kernel, HAND_B, stride=(2, 2))
    assert out.shape == (1, 2, 1, 2)
    expected = torch.tensor(HAND_CASES[order], dtype=torch.float64)
    assert torch.equal(out[0, :, 0, :], expected), (order, out[0, :, 0, :])


def test_hand_computed_overlapping_windows_hwc():
    # Stride 1 on the 2x4 input: windows at columns 0-1, 1-2, 2-3.
    #   columns 1-2: c0 [[2, 3], [6, 7]]  c1 [[8, 7], [4, 3]]
    #   hwc: 2 8 | 3 7 | 6 4 | 7 3 -> 28376473, sum 18 + 22 = 40
    kernel = linear_weight_to_conv(HAND_W, HAND_PATCH, "hwc")
    out = F.conv2d(HAND_X, kernel, HAND_B, stride=1)
    assert out.shape == (1, 2, 1, 3)
    expected = torch.tensor(
        [[140.0, 140.0, 139.0], [19285564.0, 28376473.0, 37467381.0]],
        dtype=torch.float64,
    )
    assert torch.equal(out[0, :, 0, :], expected)


def test_hand_cases_agree_with_reference():
    # Guards the reference itself against the hand arithmetic.
    for order, expected in HAND_CASES.items():
        ref = linear_on_every_window(HAND_X, HAND_W, HAND_B, (2, 2), (2, 2), order)
        assert torch.equal(ref[0, :, 0, :], torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize(
    ("order", "channel0", "channel1"),
    [
        # chw: columns 0-3 are channel 0 row by row, 4-7 channel 1
        ("chw", [[0, 1], [2, 3]], [[4, 5], [6, 7]]),
        # hwc: channel is the fastest axis, so channel 1 holds the odd columns
        ("hwc", [[0, 2], [4, 6]], [[1, 3], [5, 7]]),
        # whc: index = j*4 + i*2 + c
        ("whc", [[0, 4], [2, 6]], [[1, 5], [3, 7]]),
        # cwh: index = c*4 + j*2 + i (a transpose of chw within each channel)
        ("cwh", [[0, 2], [1, 3]], [[4, 6], [5, 7]]),
    ],
)
def test_kernel_layout_of_arange(order, channel0, channel1):
    weight = torch.arange(8.0).reshape(1, 8)
    kernel = linear_weight_to_conv(weight, Patch(2, 2, 2), order)
    assert kernel.shape == (1, 2, 2, 2)
    assert kernel[0, 0].tolist() == channel0
    assert kernel[0, 1].tolist() == channel1


def test_kernel_layout_non_square_patch():
    # Patch 1x3x2 (kh=1, kw=3, C=2), Linear 6 -> 1, columns 0..5.
    # hwc: index = j*2 + c -> c0 [[0, 2, 4]], c1 [[1, 3, 5]]
    # chw: index = c*3 + j -> c0 [[0, 1, 2]], c1 [[3, 4, 5]]
    weight = torch.arange(6.0).reshape(1, 6)
    hwc = linear_weight_to_conv(weight, Patch(1, 3, 2), "hwc")
    chw = linear_weight_to_conv(weight, Patch(1, 3, 2), "chw")
    assert hwc.shape == chw.shape == (1, 2, 1, 3)
    assert hwc[0].tolist() == [[[0.0, 2.0, 4.0]], [[1.0, 3.0, 5.0]]]
    assert chw[0].tolist() == [[[0.0, 1.0, 2.0]], [[3.0, 4.0, 5.0]]]


def test_index_map_literal():
    assert index_map(Patch(2, 2, 2), "hwc").tolist() == [
        [[0, 2], [4, 6]],
        [[1, 3], [5, 7]],
    ]
    # Patch 3x1x2 (kh=3, kw=1, C=2), chw: index = c*3 + i
    assert index_map(Patch(3, 1, 2), "chw").tolist() == [
        [[0], [1], [2]],
        [[3], [4], [5]],
    ]


def test_no_kernel_flip():
    # Cross-correlation: kernel tap (0, 0) multiplies the window's top-left
    # pixel. A Linear that picks column 0 (chw: c0, row 0, col 0) must read
    # x[0, 0, 0, 0] = 1 and the one that picks column 3 (c0, row 1, col 1)
    # must read x[0, 0, 1, 1] = 6.
    weight = torch.zeros(2, 8, dtype=torch.float64)
    weight[0, 0] = 1.0
    weight[1, 3] = 1.0
    kernel = linear_weight_to_conv(weight, HAND_PATCH, "chw")
    out = F.conv2d(HAND_X[:, :, :, :2], kernel)
    assert out.flatten().tolist() == [1.0, 6.0]


# ---------------------------------------------------------------------------
# Property: the conv twin equals "flatten in ORDER, then Linear" everywhere
# ---------------------------------------------------------------------------


@st.composite
def conv_cases(draw, dtypes=FLOAT_DTYPES):
    channels = draw(st.integers(1, 4))
    kh = draw(st.integers(1, 4))
    kw = draw(st.integers(1, 4))
    sh = draw(st.integers(1, 5))
    sw = draw(st.integers(1, 5))
    height = kh + draw(st.integers(0, 6))
    width = kw + draw(st.integers(0, 6))
    return {
        "patch": Patch(kh, kw, channels),
        "order": draw(st.sampled_from(ORDERS)),
        "stride": (sh, sw),
        "size": (height, width),
        "batch": draw(st.integers(1, 2)),
        "out": draw(st.integers(1, 3)),
        "bias": draw(st.booleans()),
        "dtype": draw(st.sampled_from(dtypes)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def make_tensors(case):
    """Random x, W, b for ``case``, in the case's dtype (exactly castable to f64)."""
    gen = torch.Generator().manual_seed(case["seed"])
    patch, dtype = case["patch"], case["dtype"]
    x = torch.randn(case["batch"], patch.channels, *case["size"], generator=gen)
    weight = torch.randn(case["out"], patch.features, generator=gen)
    bias = torch.randn(case["out"], generator=gen) if case["bias"] else None
    return (
        x.to(dtype),
        weight.to(dtype),
        None if bias is None else bias.to(dtype),
    )


def expected_shape(case):
    (height, width), patch, (sh, sw) = case["size"], case["patch"], case["stride"]
    return (
        case["batch"],
        case["out"],
        (height - patch.height) // sh + 1,
        (width - patch.width) // sw + 1,
    )


@FAST
@given(conv_cases())
def test_conv_twin_matches_reference_in_float64(case):
    x, weight, bias = make_tensors(case)
    patch, order, stride = case["patch"], case["order"], case["stride"]
    kernel = linear_weight_to_conv(weight, patch, order)
    out = F.conv2d(
        x.double(),
        kernel.double(),
        None if bias is None else bias.double(),
        stride=stride,
    )
    hw = (patch.height, patch.width)
    ref = linear_on_every_window(x, weight, bias, hw, stride, order)
    assert out.shape == ref.shape == expected_shape(case)
    scale = magnitude(x.double(), weight.double(), bias, hw, stride, order)
    err = (out - ref).abs()
    # SPEC 4: the sharp judge, 1e-9 * (|W|·|x| + |b|) per element.
    assert torch.all(err <= 1e-9 * scale), (err / scale).max()


# A 1-channel patch whose kernel comes back with odd strides on its size-1
# channel axis; torch's CPU conv then reads the wrong memory (see
# test_kernel_has_canonical_strides).
ODD_STRIDES_CASE = {
    "patch": Patch(2, 4, 1),
    "order": "hwc",
    "stride": (1, 2),
    "size": (3, 5),
    "batch": 2,
    "out": 1,
    "bias": False,
    "dtype": torch.float32,
    "seed": 0,
}


@FAST
@given(conv_cases())
@example(ODD_STRIDES_CASE)
def test_conv_twin_matches_reference_in_native_dtype(case):
    x, weight, bias = make_tensors(case)
    patch, order, stride = case["patch"], case["order"], case["stride"]
    kernel = linear_weight_to_conv(weight, patch, order)
    assert kernel.dtype == case["dtype"]
    with onednn_off(case["dtype"] == torch.bfloat16):
        out = F.conv2d(x, kernel, bias, stride=stride)
    assert out.dtype == case["dtype"]
    assert out.shape == expected_shape(case)
    hw = (patch.height, patch.width)
    ref = linear_on_every_window(x, weight, bias, hw, stride, order)
    scale = magnitude(x.double(), weight.double(), bias, hw, stride, order)
    # SPEC 4: the rigorous bound 2·γ_N · (|W|·|x| + |b|), N = C·kh·kw (+1 for
    # the bias), plus the final rounding of the output to the dtype.
    unit = torch.finfo(case["dtype"]).eps / 2
    n = patch.features + 1
    gamma = n * unit / (1 - n * unit)
    bound = (2 * gamma + unit) * scale
    err = (out.double() - ref).abs()
    assert torch.all(err <= bound), (err - bound).max()


@settings(max_examples=40, deadline=None)
@given(conv_cases(dtypes=[torch.float64]))
def test_wrong_order_is_caught_by_the_reference(case):
    # The reference must be able to tell orders apart, or the two tests
    # above would prove nothing: whenever two orders are different
    # permutations for this patch, some input separates them.
    patch, order = case["patch"], case["order"]
    x, weight, bias = make_tensors(case)
    sizes = (patch.channels, patch.height, patch.width)
    kernel = linear_weight_to_conv(weight, patch, order)
    out = F.conv2d(x, kernel, bias, stride=case["stride"])
    hw = (patch.height, patch.width)
    for other in ORDERS:
        if torch.equal(index_table(other, sizes), index_table(order, sizes)):
            continue
        ref = linear_on_every_window(x, weight, bias, hw, case["stride"], other)
        assert not torch.allclose(out, ref, rtol=1e-6, atol=1e-6), other


# ---------------------------------------------------------------------------
# The seed case of SPEC section 1
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["chw", "hwc"])
def test_seed_case_4000_to_64(order):
    gen = torch.Generator().manual_seed(2024)
    patch = Patch(20, 20, 10)
    weight = torch.randn(64, 4000, generator=gen)
    bias = torch.randn(64, generator=gen)
    x = torch.randn(1, 10, 100, 60, generator=gen)
    kernel = linear_weight_to_conv(weight, patch, order)
    assert kernel.shape == (64, 10, 20, 20)
    out = F.conv2d(x.double(), kernel.double(), bias.double(), stride=(20, 20))
    assert out.shape == (1, 64, 5, 3)
    ref = linear_on_every_window(x, weight, bias, (20, 20), (20, 20), order)
    scale = magnitude(x.double(), weight.double(), bias, (20, 20), (20, 20), order)
    for p in range(5):
        for q in range(3):
            err = (out[0, :, p, q] - ref[0, :, p, q]).abs()
            assert torch.all(err <= 1e-9 * scale[0, :, p, q]), (p, q)
    # Cell (4, 2) reads input rows 80..99 and columns 40..59, computed here
    # without the reference's loop as a cross-check of its slicing.
    window = x[0, :, 80:100, 40:60].double()
    vector = window.flatten() if order == "chw" else window.permute(1, 2, 0).flatten()
    direct = weight.double() @ vector + bias.double()
    assert torch.allclose(out[0, :, 4, 2], direct, rtol=0, atol=1e-9)
    # float32 as the user would run it, against the same reference.
    out32 = F.conv2d(x, kernel, bias, stride=(20, 20))
    assert torch.allclose(out32.double(), ref, rtol=0, atol=1e-3)


def test_seed_case_orders_differ():
    # chw and hwc are different permutations of a 20x20x10 patch: using the
    # wrong one changes the output by about its own size.
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(4, 4000, generator=gen, dtype=torch.float64)
    x = torch.randn(1, 10, 100, 60, generator=gen, dtype=torch.float64)
    out = F.conv2d(x, linear_weight_to_conv(weight, Patch(20, 20, 10), "chw"), stride=20)
    ref = linear_on_every_window(x, weight, None, (20, 20), (20, 20), "hwc")
    assert (out - ref).abs().max() > 0.1 * ref.abs().max()


# ---------------------------------------------------------------------------
# Property: the permutation is exact and invertible
# ---------------------------------------------------------------------------


@st.composite
def weight_cases(draw):
    return {
        "patch": Patch(draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 4))),
        "order": draw(st.sampled_from(ORDERS)),
        "out": draw(st.integers(1, 4)),
        "dtype": draw(st.sampled_from(FLOAT_DTYPES)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def assert_kernel_layout(kernel, weight, patch, order):
    """K[o, c, i, j] == W[o, flat_index(order, c, i, j)], bit for bit."""
    sizes = (patch.channels, patch.height, patch.width)
    assert kernel.shape == (weight.shape[0], *sizes)
    table = index_table(order, sizes).reshape(-1)
    picked = weight[:, table].reshape(kernel.shape)
    assert bitwise_equal(kernel, picked)


@FAST
@given(weight_cases())
def test_round_trip_is_bit_exact(case):
    patch, order, dtype = case["patch"], case["order"], case["dtype"]
    weight = random_bits((case["out"], patch.features), dtype, case["seed"])
    kernel = linear_weight_to_conv(weight, patch, order)
    assert kernel.dtype == dtype
    assert kernel.is_contiguous()
    assert_kernel_layout(kernel, weight, patch, order)
    back = conv_weight_to_linear(kernel, order)
    assert back.dtype == dtype
    assert back.is_contiguous()
    assert back.shape == weight.shape
    assert bitwise_equal(back, weight)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_round_trip_keeps_nan_signed_zero_and_inf(order, dtype):
    patch = Patch(2, 3, 2)
    weight = special_values((3, patch.features), dtype)
    # A NaN with a non-default payload and the sign bit set.
    weight.view(SAME_WIDTH_INT[dtype])[0, 1] = -1  # all bits set: a negative NaN
    assert torch.isnan(weight).any() and torch.isinf(weight).any()
    assert (torch.signbit(weight) & (weight == 0)).any(), "no -0.0 planted"
    kernel = linear_weight_to_conv(weight, patch, order)
    assert_kernel_layout(kernel, weight, patch, order)
    back = conv_weight_to_linear(kernel, order)
    assert bitwise_equal(back, weight)
    assert torch.equal(bits(back), bits(weight))
    # -0.0 stays negative: torch.equal alone would not notice.
    zeros = weight == 0
    assert torch.equal(torch.signbit(back[zeros]), torch.signbit(weight[zeros]))
    finite = torch.isfinite(weight)
    assert torch.equal(back[finite], weight[finite])


def non_contiguous_weights(out, features, dtype, seed):
    """The same kind of [out, features] weight, stored three awkward ways."""
    transposed = random_bits((features, out), dtype, seed).t()
    sliced = random_bits((out, 2 * features), dtype, seed + 1)[:, ::2]
    expanded = random_bits((1, features), dtype, seed + 2).expand(out, features)
    return {"transposed": transposed, "sliced": sliced, "expanded": expanded}


@FAST
@given(weight_cases())
def test_round_trip_of_non_contiguous_weights(case):
    patch, order, dtype = case["patch"], case["order"], case["dtype"]
    views = non_contiguous_weights(case["out"], patch.features, dtype, case["seed"])
    for name, weight in views.items():
        assert weight.shape == (case["out"], patch.features)
        kernel = linear_weight_to_conv(weight, patch, order)
        assert kernel.is_contiguous(), name
        assert kernel.dtype == dtype, name
        assert_kernel_layout(kernel, weight, patch, order)
        back = conv_weight_to_linear(kernel, order)
        assert back.is_contiguous(), name
        assert back.dtype == dtype, name
        assert bitwise_equal(back, weight), name


@FAST
@given(weight_cases(), st.sampled_from(["contiguous", "channels_last", "permuted"]))
def test_conv_weight_to_linear_inverts_the_layout(case, layout):
    # Start from a kernel (not from a Linear weight) stored in several ways.
    patch, order, dtype = case["patch"], case["order"], case["dtype"]
    shape = (case["out"], patch.channels, patch.height, patch.width)
    kernel = random_bits(shape, dtype, case["seed"])
    if layout == "channels_last":
        kernel = kernel.contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":
        kernel = random_bits(shape[::-1], dtype, case["seed"]).permute(3, 2, 1, 0)
    weight = conv_weight_to_linear(kernel, order)
    assert weight.shape == (case["out"], patch.features)
    assert weight.dtype == dtype
    assert weight.is_contiguous()
    assert_kernel_layout(kernel, weight, patch, order)
    assert bitwise_equal(linear_weight_to_conv(weight, patch, order), kernel)


@FAST
@given(weight_cases())
def test_index_map_matches_independent_formula(case):
    patch, order = case["patch"], case["order"]
    sizes = (patch.channels, patch.height, patch.width)
    assert torch.equal(index_map(patch, order), index_table(order, sizes))


@pytest.mark.parametrize("order", ORDERS)
def test_kernel_does_not_alias_the_weight(order):
    # The docstring promises "a new contiguous tensor": writing to the kernel
    # must not change the Linear weight it came from, whatever the order.
    # With kh = 1, chw, cwh and hcw are the identity permutation.
    weight = torch.arange(12.0).reshape(2, 6)
    original = weight.clone()
    kernel = linear_weight_to_conv(weight, Patch(1, 3, 2), order)
    kernel.zero_()
    assert torch.equal(weight, original), f"{order}: kernel is a view of the weight"


def canonical_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of a freshly allocated tensor of ``shape``."""
    strides, step = [], 1
    for length in reversed(shape):
        strides.append(step)
        step *= length
    return tuple(reversed(strides))


@FAST
@given(weight_cases())
@example({"patch": Patch(2, 4, 1), "order": "hwc", "out": 1, "dtype": torch.float32, "seed": 0})
def test_kernel_has_canonical_strides(case):
    # ``is_contiguous()`` ignores the strides of size-1 axes, so a permuted
    # view can pass it while its strides are not those of a fresh tensor.
    # torch 2.13's CPU conv (oneDNN) misreads such kernels: see
    # test_converted_kernel_with_one_channel_convolves_correctly.
    patch, order = case["patch"], case["order"]
    weight = random_bits((case["out"], patch.features), case["dtype"], case["seed"])
    kernel = linear_weight_to_conv(weight, patch, order)
    assert kernel.stride() == canonical_strides(tuple(kernel.shape)), (
        f"{order}: kernel {tuple(kernel.shape)} has strides {kernel.stride()}"
    )
    back = conv_weight_to_linear(kernel, order)
    assert back.stride() == canonical_strides(tuple(back.shape))


def test_converted_kernel_with_one_channel_convolves_correctly():
    # Patch 2x4x1 read as hwc: the kernel is [1, 1, 2, 4]. Input [2, 1, 3, 5]
    # at stride (1, 2) gives a [2, 1, 2, 1] map (one column, one left over).
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 3, 5, generator=gen)
    weight = torch.randn(1, 8, generator=gen)
    kernel = linear_weight_to_conv(weight, Patch(2, 4, 1), "hwc")
    out = F.conv2d(x, kernel, stride=(1, 2))
    ref = linear_on_every_window(x, weight, None, (2, 4), (1, 2), "hwc")
    assert out.shape == ref.shape == (2, 1, 2, 1)
    err = (out.double() - ref).abs().max().item()
    assert err < 1e-5, f"float32 conv off by {err} with kernel strides {kernel.stride()}"


def test_uppercase_order_is_accepted():
    weight = torch.arange(8.0).reshape(1, 8)
    kernel = linear_weight_to_conv(weight, Patch(2, 2, 2), "HWC")
    assert kernel[0, 1].tolist() == [[1.0, 3.0], [5.0, 7.0]]
    assert torch.equal(conv_weight_to_linear(kernel, "HWC"), weight)


@pytest.mark.parametrize(
    "shape", [(2, 7), (2, 9), (8,), (1, 2, 8)], ids=["short", "long", "1d", "3d"]
)
def test_linear_weight_to_conv_rejects_wrong_shapes(shape):
    with pytest.raises(SpecError) as info:
        linear_weight_to_conv(torch.zeros(shape), Patch(2, 2, 2), "chw")
    message = str(info.value)
    assert str(tuple(shape)) in message
    assert "8" in message and "2x2x2" in message


def test_linear_weight_to_conv_rejects_bad_order():
    with pytest.raises(SpecError, match="chc"):
        linear_weight_to_conv(torch.zeros(1, 8), Patch(2, 2, 2), "chc")


@pytest.mark.parametrize("shape", [(2, 8), (8,), (1, 2, 2, 2, 1)])
def test_conv_weight_to_linear_rejects_non_4d(shape):
    with pytest.raises(SpecError, match=r"\[out, C, kh, kw\]"):
        conv_weight_to_linear(torch.zeros(shape), "chw")


def test_patch_of_kernel():
    assert patch_of_kernel((64, 10, 20, 16)) == Patch(20, 16, 10)


def test_patch_features_and_sizes():
    patch = Patch(20, 16, 10)
    assert patch.features == 3200
    assert patch.sizes("hwc") == (20, 16, 10)
    assert patch.sizes("chw") == (10, 20, 16)
    assert patch.sizes("wch") == (16, 10, 20)
    assert str(patch) == "20x16x10"


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------


def test_orders_constant():
    assert DEFAULT_ORDER == "chw" == ORDERS[0]
    assert sorted(ORDERS) == ["chw", "cwh", "hcw", "hwc", "wch", "whc"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20x20x10", PatchSpec(20, 20, 10)),
        ("20x20", PatchSpec(20, 20, None)),
        ("20X20x10", PatchSpec(20, 20, 10)),
        (" 20 x 20 ", PatchSpec(20, 20, None)),
        ("20×16×3", PatchSpec(20, 16, 3)),
        ("1x1x4000", PatchSpec(1, 1, 4000)),
    ],
)
def test_parse_patch(text, expected):
    assert parse_patch(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "20", "20x", "0x5", "5x0", "20x20x0", "axb", "1x2x3x4", "-1x2", "2.5x2"],
)
def test_parse_patch_rejects(text):
    with pytest.raises(SpecError) as info:
        parse_patch(text)
    assert repr(text) in str(info.value)
    assert "HxWxC" in str(info.value)


def test_patch_spec_str():
    assert str(PatchSpec(20, 20)) == "20x20"
    assert str(PatchSpec(20, 20, 10)) == "20x20x10"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("20x20", (20, 20)), ("3x5", (3, 5)), ("7", (7, 7)), (" 4 X 2 ", (4, 2))],
)
def test_parse_stride_and_size(text, expected):
    assert parse_stride(text) == expected
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "0", "0x5", "5x0", "1x2x3", "x5", "a", "-2"])
def test_parse_stride_and_size_reject(text):
    with pytest.raises(SpecError) as info:
        parse_stride(text)
    assert repr(text) in str(info.value) and "stride" in str(info.value)
    with pytest.raises(SpecError) as info:
        parse_size(text)
    assert repr(text) in str(info.value) and "input size" in str(info.value)


@pytest.mark.parametrize(("text", "expected"), [("HWC", "hwc"), (" chw ", "chw")])
def test_parse_order(text, expected):
    assert parse_order(text) == expected


@pytest.mark.parametrize("order", ORDERS)
def test_parse_order_accepts_all_six(order):
    assert parse_order(order) == order


@pytest.mark.parametrize("text", ["chc", "ab", "", "chwc", "ch"])
def test_parse_order_rejects_and_lists_valid(text):
    with pytest.raises(SpecError) as info:
        parse_order(text)
    message = str(info.value)
    assert repr(text) in message
    for order in ("chw", "cwh", "hcw", "hwc", "wch", "whc"):
        assert order in message


# ---------------------------------------------------------------------------
# Resolving patches and suggesting ones that fit
# ---------------------------------------------------------------------------


def test_resolve_patch_infers_channels():
    assert resolve_patch(PatchSpec(20, 20), 4000) == Patch(20, 20, 10)
    assert resolve_patch(PatchSpec(1, 1), 4096) == Patch(1, 1, 4096)


def test_resolve_patch_accepts_exact_fit():
    assert resolve_patch(PatchSpec(20, 20, 10), 4000) == Patch(20, 20, 10)


def test_resolve_patch_mismatch_names_both_numbers_and_fits():
    with pytest.raises(SpecError) as info:
        resolve_patch(PatchSpec(20, 20, 3), 4000, layer="fc6")
    message = str(info.value)
    # 20·20·3 = 1200 elements against in_features 4000; 4000 is not a
    # multiple of 3, so the suggestions are the square patches of 4000.
    assert "1200" in message and "4000" in message
    assert "fc6" in message
    assert "20x20x10" in message


def test_resolve_patch_mismatch_suggests_same_channels_first():
    # 10·10·10 = 1000 != 4000; with C = 10 the squarest fit is 20x20x10.
    with pytest.raises(SpecError) as info:
        resolve_patch(PatchSpec(10, 10, 10), 4000)
    message = str(info.value)
    assert "1000" in message and "4000" in message
    assert "20x20x10" in message


def test_resolve_patch_area_does_not_divide():
    # 4000 / (7·7) is not an integer.
    with pytest.raises(SpecError) as info:
        resolve_patch(PatchSpec(7, 7), 4000, layer="head")
    message = str(info.value)
    assert "7x7" in message and "4000" in message and "49" in message
    assert "head" in message and "20x20x10" in message


def test_candidate_patches_without_channels():
    # 4000 = 2^5·5^3; the squares s^2 dividing it: s in {1, 2, 4, 5, 10, 20}.
    assert candidate_patches(4000) == [
        Patch(20, 20, 10),
        Patch(10, 10, 40),
        Patch(5, 5, 160),
        Patch(4, 4, 250),
        Patch(2, 2, 1000),
        Patch(1, 1, 4000),
    ]
    assert candidate_patches(4000, limit=2) == [Patch(20, 20, 10), Patch(10, 10, 40)]


def test_candidate_patches_with_channels():
    # area 400: pairs by |h - w| then taller first:
    # 20x20 (0), 25x16 and 16x25 (9), 40x10 and 10x40 (30), 50x8 (42)
    assert candidate_patches(4000, channels=10) == [
        Patch(20, 20, 10),
        Patch(25, 16, 10),
        Patch(16, 25, 10),
        Patch(40, 10, 10),
        Patch(10, 40, 10),
        Patch(50, 8, 10),
    ]
    assert candidate_patches(4000, channels=3) == []
    assert candidate_patches(4000, channels=0) == []


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 600), st.one_of(st.none(), st.integers(1, 12)))
def test_candidate_patches_are_exactly_the_fits(features, channels):
    found = candidate_patches(features, channels, limit=10_000)
    assert all(p.features == features for p in found)
    assert len(set(found)) == len(found)
    if channels is None:
        expected = {
            (s, s, features // (s * s)) for s in range(1, features + 1) if features % (s * s) == 0
        }
        heights = [p.height for p in found]
        assert heights == sorted(heights, reverse=True)
    else:
        expected = {
            (h, w, channels)
            for h in range(1, features + 1)
            for w in range(1, features + 1)
            if h * w * channels == features
        }
        gaps = [abs(p.height - p.width) for p in found]
        assert gaps == sorted(gaps)
    assert {(p.height, p.width, p.channels) for p in found} == expected


# ---------------------------------------------------------------------------
# Grids of windows
# ---------------------------------------------------------------------------


def test_make_grid_seed_case():
    grid = make_grid((100, 60), Patch(20, 20, 10))
    assert grid.stride == (20, 20)
    assert (grid.rows, grid.cols) == (5, 3)
    assert (grid.uncovered_rows, grid.uncovered_cols) == (0, 0)
    assert grid.warnings() == []
    assert grid.window(4, 2) == (slice(80, 100), slice(40, 60))


def test_make_grid_uncovered_rows_are_warned():
    # 105 rows, 20-row windows at stride 20: 5 windows reach row 100, 5 left.
    grid = make_grid((105, 60), Patch(20, 20, 10))
    assert (grid.rows, grid.cols) == (5, 3)
    assert (grid.uncovered_rows, grid.uncovered_cols) == (5, 0)
    notes = grid.warnings()
    assert len(notes) == 1
    assert "105" in notes[0] and "5 row" in notes[0]


def test_make_grid_uncovered_columns_are_warned():
    # 63 columns, 20-column windows at stride 20: 3 windows reach 60, 3 left.
    notes = make_grid((100, 63), Patch(20, 20, 10)).warnings()
    assert len(notes) == 1
    assert "63" in notes[0] and "3 column" in notes[0]


def test_make_grid_overlapping_stride():
    # 25 rows, 20-row windows at stride 3: tops 0 and 3, last row read 22,
    # so rows 23 and 24 are uncovered.
    grid = make_grid((25, 20), Patch(20, 20, 1), stride=(3, 1))
    assert (grid.rows, grid.cols) == (2, 1)
    assert grid.uncovered_rows == 2
    assert grid.window(1, 0) == (slice(3, 23), slice(0, 20))


@pytest.mark.parametrize("size", [(19, 60), (100, 19), (0, 0)])
def test_make_grid_rejects_input_smaller_than_patch(size):
    with pytest.raises(SpecError) as info:
        make_grid(size, Patch(20, 20, 10))
    message = str(info.value)
    assert f"{size[0]}x{size[1]}" in message and "20x20" in message


@FAST
@given(conv_cases(dtypes=[torch.float32]))
def test_grid_matches_brute_force(case):
    patch, (sh, sw), (height, width) = case["patch"], case["stride"], case["size"]
    grid = make_grid((height, width), patch, (sh, sw))
    tops = [t for t in range(height) if t % sh == 0 and t + patch.height <= height]
    lefts = [s for s in range(width) if s % sw == 0 and s + patch.width <= width]
    assert (grid.rows, grid.cols) == (len(tops), len(lefts))
    assert grid.uncovered_rows == height - (tops[-1] + patch.height)
    assert grid.uncovered_cols == width - (lefts[-1] + patch.width)
    assert (grid.uncovered_rows > 0) + (grid.uncovered_cols > 0) == len(grid.warnings())
    rows, cols = grid.window(len(tops) - 1, len(lefts) - 1)
    assert (rows.start, rows.stop) == (tops[-1], tops[-1] + patch.height)
    assert (cols.start, cols.stop) == (lefts[-1], lefts[-1] + patch.width)


def test_default_input_literal():
    assert default_input(Patch(20, 20, 10), (20, 20)) == (40, 40)
    assert default_input(Patch(3, 5, 1), (1, 2)) == (4, 7)


@FAST
@given(conv_cases(dtypes=[torch.float32]))
def test_default_input_is_smallest_2x2_grid(case):
    patch, stride = case["patch"], case["stride"]
    height, width = default_input(patch, stride)
    grid = make_grid((height, width), patch, stride)
    assert (grid.rows, grid.cols) == (2, 2)
    # One pixel less in either direction loses the second row or column.
    assert (height - 1 - patch.height) // stride[0] + 1 == 1
    assert (width - 1 - patch.width) // stride[1] + 1 == 1


# ---------------------------------------------------------------------------
# The nn.Conv2d line and coinciding orders
# ---------------------------------------------------------------------------


def test_conv2d_line_text():
    assert conv2d_line(Patch(20, 20, 10), 64, (20, 20)) == (
        "nn.Conv2d(10, 64, kernel_size=(20, 20), stride=(20, 20), padding=0, bias=True)"
    )
    assert conv2d_line(Patch(3, 5, 2), 7, [1, 2], bias=False) == (
        "nn.Conv2d(2, 7, kernel_size=(3, 5), stride=(1, 2), padding=0, bias=False)"
    )


def test_conv2d_line_builds_a_module_that_loads_the_kernel():
    patch = Patch(3, 5, 2)
    weight = torch.randn(7, patch.features, generator=torch.Generator().manual_seed(1))
    bias = torch.zeros(7)
    module = eval(conv2d_line(patch, 7, (1, 2)), {"nn": torch.nn})
    kernel = linear_weight_to_conv(weight, patch, "hwc")
    module.load_state_dict({"weight": kernel, "bias": bias})
    x = torch.randn(1, 2, 6, 9, generator=torch.Generator().manual_seed(2))
    ref = linear_on_every_window(x, weight, bias, (3, 5), (1, 2), "hwc")
    with torch.no_grad():
        assert torch.allclose(module(x).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", ORDERS)
def test_coinciding_orders_1x1_patch_is_all_six(order):
    assert coinciding_orders(Patch(1, 1, 5), order) == list(ORDERS)


@pytest.mark.parametrize(
    ("patch", "order", "expected"),
    [
        # kh = 1: only the relative order of c and w matters.
        (Patch(1, 4, 3), "chw", ["chw", "cwh", "hcw"]),
        (Patch(1, 4, 3), "hwc", ["hwc", "wch", "whc"]),
        # kw = 1: only the relative order of c and h matters.
        (Patch(4, 1, 3), "chw", ["chw", "cwh", "wch"]),
        (Patch(4, 1, 3), "hcw", ["hcw", "hwc", "whc"]),
        # C = 1: only the relative order of h and w matters.
        (Patch(3, 3, 1), "chw", ["chw", "hcw", "hwc"]),
        (Patch(2, 5, 1), "whc", ["cwh", "wch", "whc"]),
        # A square patch with C > 1: every order is its own permutation.
        (Patch(3, 3, 2), "hwc", ["hwc"]),
        (Patch(3, 3, 2), "chw", ["chw"]),
    ],
)
def test_coinciding_orders(patch, order, expected):
    assert coinciding_orders(patch, order) == expected


@FAST
@given(weight_cases())
def test_coinciding_orders_match_independent_tables(case):
    patch, order = case["patch"], case["order"]
    sizes = (patch.channels, patch.height, patch.width)
    mine = index_table(order, sizes)
    expected = [o for o in ORDERS if torch.equal(index_table(o, sizes), mine)]
    assert coinciding_orders(patch, order) == expected


def test_flat_index_formulas():
    # The reference's mixed-radix index against formulas written per order,
    # for a 2x3 patch of 4 channels (C=4, kh=2, kw=3).
    sizes = (C, H, W) = (4, 2, 3)
    formulas = {
        "chw": lambda c, i, j: c * H * W + i * W + j,
        "cwh": lambda c, i, j: c * W * H + j * H + i,
        "hcw": lambda c, i, j: i * C * W + c * W + j,
        "hwc": lambda c, i, j: i * W * C + j * C + c,
        "wch": lambda c, i, j: j * C * H + c * H + i,
        "whc": lambda c, i, j: j * H * C + i * C + c,
    }
    for order, formula in formulas.items():
        seen = set()
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    assert flat_index(order, sizes, c, i, j) == formula(c, i, j)
                    seen.add(formula(c, i, j))
        assert seen == set(range(C * H * W))
