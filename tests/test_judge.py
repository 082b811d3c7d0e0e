"""The one judge (fcconv.verify.judge): relative tolerances, no floor, 'could not judge'."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fcconv import verify_checkpoints
from fcconv.geometry import Patch, linear_weight_to_conv
from fcconv.verify import functional_check
from fcconv.verify.bits import bitwise_equal, tensor_bits
from fcconv.verify.judge import RULES, compare, rounding_bound


@pytest.mark.parametrize("size", [1e-12, 1e-9, 1.0, 1e9])
def test_a_difference_the_size_of_the_output_fails_at_every_scale(size: float) -> None:
    expected = np.array([1.0, -2.0, 3.0]) * size
    assert compare(expected * (1 + 1e-13), expected, "model-float64")
    wrong = compare(expected[::-1].copy(), expected, "model-float64")
    assert wrong.judged and not wrong and wrong.needed_tolerance == pytest.approx(2 / 3)


def test_a_reference_of_zeros_cannot_be_judged() -> None:
    found = compare(np.zeros(4), np.zeros(4), "model-float64")
    assert not found.judged and not found.passed and found.reason
    tiny = compare(np.full(3, 1e-310), np.full(3, 1e-310), "model-float64")
    assert not tiny.judged  # below the rule's floor: 1e-9 of it is no normal float64


def test_nothing_to_compare_passes() -> None:
    assert compare(np.zeros((0, 3)), np.zeros((0, 3)), "float64-sharp").passed


def test_non_finite_values_are_judged_by_kind() -> None:
    expected = np.array([1.0, math.inf, math.nan])
    assert compare(expected.copy(), expected, "model-float64")
    flipped = compare(np.array([1.0, -math.inf, math.nan]), expected, "model-float64")
    assert flipped.nonfinite_mismatches == 1 and not flipped
    gap = compare(np.array([math.nan, math.inf, math.nan]), expected, "model-float64")
    assert (
        not gap and gap.needed_tolerance == math.inf and gap.to_dict()["needed_tolerance"] is None
    )


def test_per_element_scale_is_relative_per_element() -> None:
    expected, scale = np.array([1.0, 1e-6]), np.array([1.0, 1e-6])
    assert not compare(expected + [0, 1e-12], expected, "float64-sharp", scale=scale)
    assert compare(expected + [1e-12, 0], expected, "float64-sharp", scale=scale)


def test_the_rounding_bound_is_two_gamma_n() -> None:
    rule = rounding_bound(2.0**-23, 1.17549435e-38, 99)
    u = 2.0**-24
    assert rule is not None and rule.tolerance == pytest.approx(2 * 100 * u / (1 - 100 * u))
    assert rounding_bound(2.0**-7, 1e-38, 1000) is None  # (N+1)·u ≥ 1: vacuous
    assert set(RULES) >= {"float64-sharp", "model-float64", "runtime-float32"}


def test_bits_compare_bits_not_values() -> None:
    assert bitwise_equal(torch.tensor([math.nan]), torch.tensor([math.nan]))
    assert not bitwise_equal(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert tensor_bits(torch.ones(2, 3, dtype=torch.bfloat16)).dtype == np.uint16


def test_a_wrong_order_of_a_layer_with_tiny_weights_fails() -> None:
    """The float64 rule is relative to |W|·|x|+|b| per element: 1e-12 weights change nothing."""
    patch = Patch(2, 3, 4)
    weight = torch.randn(5, 24, generator=torch.Generator().manual_seed(0)) * 1e-12
    wrong = linear_weight_to_conv(weight, patch, "hwc")
    check = functional_check(weight, None, wrong, None, patch, "chw", (2, 3))
    assert check.float64.judged and not check and check.float64.ratio > 1e6
    right = linear_weight_to_conv(weight, patch, "chw")
    assert functional_check(weight, None, right, None, patch, "chw", (2, 3))


def test_a_layer_of_zeros_is_not_verified(tmp_path) -> None:
    """Zero weights and bias: Linear-on-every-window is all zeros, nothing to judge by."""
    state = {"fc.weight": torch.zeros(5, 24), "fc.bias": torch.zeros(5)}
    torch.save(state, tmp_path / "m.pt")
    conv = {"fc.weight": torch.zeros(5, 4, 2, 3), "fc.bias": torch.zeros(5)}
    torch.save(conv, tmp_path / "c.pt")
    result = verify_checkpoints(tmp_path / "m.pt", tmp_path / "c.pt")
    (layer,) = result.layers
    assert layer.exact and not layer.functional.float64.judged
    assert not result and result.exit_code == 1
