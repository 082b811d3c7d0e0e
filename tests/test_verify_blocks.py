"""The functional check works a block of output rows at a time: every block is judged."""

from __future__ import annotations

import pytest
import torch

import fcconv.verify.windows
from fcconv.geometry import Patch, linear_weight_to_conv
from fcconv.verify import functional_check

PATCH = Patch(2, 3, 4)


@pytest.fixture
def tiny_blocks(monkeypatch) -> None:
    # 24 features per row: blocks of 2 rows, so 10 rows make 5 blocks.
    monkeypatch.setattr(fcconv.verify.windows, "BLOCK_ELEMENTS", 48)


def _layer(order: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(10, PATCH.features, generator=generator)
    bias = torch.randn(10, generator=generator)
    return weight, bias, linear_weight_to_conv(weight, PATCH, order)


@pytest.mark.parametrize("order", ["chw", "whc"])
def test_blocked_check_passes_a_right_kernel(tiny_blocks, order) -> None:
    weight, bias, kernel = _layer(order)
    check = functional_check(weight, bias, kernel, bias, PATCH, order, (1, 2), (5, 9))
    assert check and check.float64.ratio <= 1
    assert check.output_grid == (4, 4)


def test_blocked_check_catches_a_wrong_row_in_the_last_block(tiny_blocks) -> None:
    weight, bias, kernel = _layer("chw")
    kernel = kernel.clone()
    kernel[9, 3, 1, 2] += 0.5
    check = functional_check(weight, bias, kernel, bias, PATCH, "chw", (2, 3), None)
    assert not check and check.float64.ratio > 1e6


def test_blocks_agree_with_one_block(monkeypatch) -> None:
    weight, bias, kernel = _layer("hwc")
    whole = functional_check(weight, bias, kernel, bias, PATCH, "hwc", (2, 3), (6, 9))
    monkeypatch.setattr(fcconv.verify.windows, "BLOCK_ELEMENTS", 24)
    blocked = functional_check(weight, bias, kernel, bias, PATCH, "hwc", (2, 3), (6, 9))
    assert blocked.in_dtype.max_abs_diff == pytest.approx(whole.in_dtype.max_abs_diff, abs=1e-12)
    assert blocked.float64.max_abs_diff == pytest.approx(whole.float64.max_abs_diff, abs=1e-12)
