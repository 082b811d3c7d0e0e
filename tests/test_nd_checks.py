"""The exact and functional checks on 1-D and 3-D layers, against independent references.

The exact check's column map is compared with the mixed-radix number written
out by hand in ``tests/reference_nd.py``; the functional check must pass
right kernels and fail wrong ones, and its conv must equal the reference's
"cut every window by slicing, read it in the order, apply the Linear".
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_nd import column_of, kernel_by_definition, linear_on_every_window_nd

from fcconv.errors import SpecError
from fcconv.geometry import linear_weight_to_conv_nd
from fcconv.patches import PatchNd, orders_for
from fcconv.plan import LayerPlan
from fcconv.verify import check_layer, verify_conversion
from fcconv.verify.exact import MemoryTensors, linear_columns, permuted_mismatch
from fcconv.verify.windows import MAX_CHECK_ELEMENTS, check_work, functional_check

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CONV = {1: F.conv1d, 3: F.conv3d}
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@st.composite
def layers(draw, side: int = 3) -> tuple[PatchNd, str, tuple[int, ...], tuple[int, ...]]:
    """A 1-D or 3-D patch, an order, a stride and an input size that holds a window or more."""
    ndim = draw(st.sampled_from([1, 3]))
    sizes = tuple(draw(st.integers(1, side)) for _ in range(ndim))
    patch = PatchNd(sizes, draw(st.integers(1, 3)))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    size = tuple(k + draw(st.integers(0, 4)) for k in sizes)
    return patch, draw(st.sampled_from(orders_for(ndim))), stride, size


def distinct_orders(patch: PatchNd) -> list[tuple[str, str]]:
    """Pairs of orders that are different permutations of ``patch``."""
    orders = orders_for(patch.ndim)
    columns = {o: tuple(linear_columns(patch, o).tolist()) for o in orders}
    return [(a, b) for a in orders for b in orders if columns[a] != columns[b]]


# ------------------------------------------------------------------ exact


@FAST
@given(case=layers(), flip=st.booleans())
def test_the_column_map_is_the_mixed_radix_number(case, flip: bool) -> None:
    patch, order, _, _ = case
    axes = "c" + {1: "l", 3: "dhw"}[patch.ndim]
    lengths = dict(zip(axes, patch.kernel_shape, strict=True))
    columns = linear_columns(patch, order, flip).tolist()
    taps = torch.arange(patch.features).reshape(patch.kernel_shape)
    for tap, column in zip(torch.nonzero(taps >= 0).tolist(), columns, strict=True):
        coordinate = dict(zip(axes, tap, strict=True))
        if flip:
            for axis in axes[1:]:
                coordinate[axis] = lengths[axis] - 1 - coordinate[axis]
        assert column == column_of(order, lengths, coordinate)


@pytest.mark.parametrize(
    ("sizes", "order"), [((5,), "lc"), ((2, 3, 2), "dhwc"), ((2, 2, 3), "wcdh")]
)
def test_one_moved_element_is_found_where_it_is(sizes, order) -> None:
    patch = PatchNd(sizes, 3)
    weight = torch.randn(4, patch.features, generator=torch.Generator().manual_seed(1))
    kernel = linear_weight_to_conv_nd(weight, patch, order)
    assert (
        permuted_mismatch(
            MemoryTensors({"w": weight}), MemoryTensors({"w": kernel}), "w", patch, order, 4
        )
        is None
    )
    damaged = kernel.clone()
    flat = damaged.view(4, -1)
    flat[2, 5], flat[2, 7] = kernel.view(4, -1)[2, 7], kernel.view(4, -1)[2, 5]
    found = permuted_mismatch(
        MemoryTensors({"w": weight}), MemoryTensors({"w": damaged}), "w", patch, order, 4
    )
    assert (found.count, found.row, found.tap) == (2, 2, 5)
    assert found.column == int(linear_columns(patch, order)[5])


# ------------------------------------------------------------------ functional


@FAST
@given(case=layers(), dtype=st.sampled_from(DTYPES), flip=st.booleans(), rows=st.integers(1, 4))
def test_a_right_kernel_passes_and_its_conv_is_the_reference(case, dtype, flip, rows) -> None:
    patch, order, stride, size = case
    generator = torch.Generator().manual_seed(patch.features * 7 + rows)
    weight = torch.randn(rows, patch.features, generator=generator).to(dtype)
    bias = torch.randn(rows, generator=generator).to(dtype)
    kernel = kernel_by_definition(weight, patch.channels, patch.sizes, order, flip)
    check = functional_check(weight, bias, kernel, bias, patch, order, stride, size, flip=flip)
    assert check, (check.float64.ratio, check.in_dtype.ratio, check.notes)
    assert check.input_size == size and check.channels_checked == rows
    x = torch.randn(1, patch.channels, *size, generator=generator, dtype=torch.float64)
    run = kernel.double().flip(tuple(range(2, kernel.dim()))) if flip else kernel.double()
    dense = CONV[patch.ndim](x, run, bias.double(), stride=stride)
    expected = linear_on_every_window_nd(x, weight, bias, patch.sizes, stride, order)
    assert check.output_grid == tuple(expected.shape[2:])
    torch.testing.assert_close(dense, expected, rtol=1e-12, atol=1e-12)


@FAST
@given(case=layers(side=4), data=st.data())
def test_a_kernel_in_another_order_fails(case, data) -> None:
    patch, _, stride, size = case
    pairs = distinct_orders(patch)
    if not pairs:
        return  # every order is one permutation of this patch: nothing can be wrong
    right, wrong = data.draw(st.sampled_from(pairs))
    weight = torch.randn(3, patch.features, generator=torch.Generator().manual_seed(3))
    kernel = linear_weight_to_conv_nd(weight, patch, wrong)
    check = functional_check(weight, None, kernel, None, patch, right, stride, size)
    assert not check and check.float64.ratio > 1e3


def test_a_hand_computed_1d_layer() -> None:
    # C=2, L=3, order lc, W = 10 … 15 and bias 1; x: c0 = 1 2 3 4, c1 = 5 6 7 8, stride 1:
    # window 0 reads 1 5 2 6 3 7 → 314 + 1; window 1 reads 2 6 3 7 4 8 → 389 + 1
    patch = PatchNd((3,), 2)
    weight, bias = torch.arange(10.0, 16.0).reshape(1, 6), torch.tensor([1.0])
    x = torch.tensor([[[1.0, 2, 3, 4], [5, 6, 7, 8]]])
    assert linear_on_every_window_nd(x, weight, bias, (3,), (1,), "lc").flatten().tolist() == [
        315,
        390,
    ]
    kernel = linear_weight_to_conv_nd(weight, patch, "lc")
    assert F.conv1d(x, kernel, bias).flatten().tolist() == [315, 390]
    assert functional_check(weight, bias, kernel, bias, patch, "lc", (1,), (4,))
    assert not functional_check(weight, bias, kernel, bias, patch, "cl", (1,), (4,))


def test_non_finite_weights_permuted_exactly_pass_in_3d() -> None:
    patch = PatchNd((2, 2, 3), 2)
    weight = torch.randn(3, patch.features, generator=torch.Generator().manual_seed(2))
    weight[0, 4], weight[1, 9], weight[2, 0] = float("inf"), float("nan"), float("-inf")
    kernel = linear_weight_to_conv_nd(weight, patch, "dhwc")
    check = functional_check(weight, None, kernel, None, patch, "dhwc", (1, 1, 1), (3, 3, 4))
    assert check and check.float64.nonfinite > 0 and check.float64.nonfinite_mismatches == 0
    wrong = linear_weight_to_conv_nd(weight, patch, "cdhw")
    assert not functional_check(weight, None, wrong, None, patch, "dhwc", (1, 1, 1), (3, 3, 4))


def test_float8_1d_layers_are_judged_in_float64() -> None:
    patch = PatchNd((4,), 3)
    weight = torch.randn(5, 12, generator=torch.Generator().manual_seed(4)).to(torch.float8_e4m3fn)
    kernel = linear_weight_to_conv_nd(weight, patch, "lc")
    check = functional_check(weight, None, kernel, None, patch, "lc", (2,), (10,))
    assert check and check.in_dtype is None
    assert any("judged in float64 from the same float8_e4m3fn" in note for note in check.notes)


def test_the_work_of_a_3d_check_is_bounded_before_anything_is_allocated() -> None:
    patch = PatchNd((2, 3, 3), 8)
    with pytest.raises(SpecError) as raised:
        check_work(patch, 64, (1, 1, 1), (400, 400, 400), "fc", skippable=True)
    message = str(raised.value)
    assert message.startswith("the functional check of fc on a 400x400x400 input (")
    assert "windows at stride 1x1x1) is too large to run" in message
    assert "input_size=" in message and "verify=False" in message
    side = round((MAX_CHECK_ELEMENTS / 8) ** (1 / 3)) - 2  # within every bound
    check_work(patch, 1, (2, 3, 3), (side, side, side), "fc")


# ------------------------------------------------------------------ whole layers


def _plan(patch: PatchNd, order: str, stride: tuple[int, ...], flip: bool = False) -> LayerPlan:
    return LayerPlan("fc", "fc.weight", "fc.bias", 4, patch, order, stride, "float32", flip)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize(
    ("patch", "order"), [(PatchNd((6,), 3), "lc"), (PatchNd((2, 3, 2), 2), "hdwc")]
)
def test_check_layer_of_a_1d_and_a_3d_conversion(patch, order, flip) -> None:
    generator = torch.Generator().manual_seed(6)
    original = {
        "fc.weight": torch.randn(4, patch.features, generator=generator),
        "fc.bias": torch.randn(4, generator=generator),
    }
    kernel = kernel_by_definition(original["fc.weight"], patch.channels, patch.sizes, order, flip)
    converted = {**original, "fc.weight": kernel}
    plan = _plan(patch, order, patch.sizes, flip)
    check = check_layer(plan, original, converted)
    assert check, check.problems
    assert check.functional.output_grid == (2,) * patch.ndim  # the default: two windows per axis
    # one element moved: the exact check names the conv index in the kernel's own rank
    damaged = kernel.clone()
    damaged.view(4, -1)[1, 0] += 1
    failed = check_layer(plan, original, {**original, "fc.weight": damaged})
    assert not failed.exact
    index = ", ".join(["1", *["0"] * (patch.ndim + 1)])
    assert f"first at conv [{index}] = Linear [1, " in failed.problems[0]


def test_verify_conversion_fits_one_input_size_to_every_axis() -> None:
    patch = PatchNd((2, 2, 2), 3)
    weight = torch.randn(4, patch.features, generator=torch.Generator().manual_seed(8))
    original = {"fc.weight": weight, "fc.bias": torch.zeros(4)}
    converted = {**original, "fc.weight": linear_weight_to_conv_nd(weight, patch, "cdhw")}
    result = verify_conversion([_plan(patch, "cdhw", (2, 2, 2))], original, converted, (6,))
    assert result and result.layers[0].functional.input_size == (6, 6, 6)
    assert result.layers[0].functional.output_grid == (3, 3, 3)
    with pytest.raises(SpecError, match="input size 6x6 has 2 numbers, but the patch of fc is 3-D"):
        verify_conversion([_plan(patch, "cdhw", (2, 2, 2))], original, converted, (6, 6))
