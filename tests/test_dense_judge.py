"""Whole models judged relative to their outputs, and a dense program that must be dense.

The model rule (``model-float64``) has no absolute floor: a wrong conversion
of a model whose outputs are around 1e-9 fails like any other, an output of
all zeros cannot be judged (and is not verified), and a converted model
whose map is one cell on every input (global pooling) is refused, naming the
pooling layer and its ``file:line``.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from fcn_helpers import seeded
from torch import nn

from fcconv.errors import NotDenseError, SpecError
from fcconv.fcn import convolutionalize, verify_dense


class Tiny(nn.Module):
    """A 3x5 feature map (h and w differ) and a two-layer head; outputs scaled by ``gain``."""

    def __init__(self, gain: float = 1.0) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(2, 5, 3, stride=2), nn.Tanh())
        self.fc1 = nn.Linear(5 * 3 * 5, 9)
        self.fc2 = nn.Linear(9, 4)
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.flatten(self.trunk(x), 1)))) * self.gain


NATIVE = (7, 11)


def _transpose_first_kernel(model: nn.Module) -> None:
    """Break a converted model the classic way: the first conv's kernel read as ``cwh``."""
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 5))
    with torch.no_grad():
        flat = conv.weight.reshape(conv.weight.shape[0], -1).clone()
        conv.weight.copy_(flat.reshape(conv.weight.shape[0], 5, 5, 3).transpose(2, 3))


def test_a_wrong_conversion_of_a_model_with_outputs_around_1e_9_fails() -> None:
    model = seeded(Tiny(gain=1e-9))
    converted = convolutionalize(model, NATIVE)
    check = verify_dense(model, converted, NATIVE)
    assert check and check.judged  # the right conversion passes, judged relative to 1e-9
    largest = max(o.comparisons["dense"].reference_scale for o in check.outputs)
    assert 1e-11 < largest < 1e-7
    _transpose_first_kernel(converted)
    broken = verify_dense(model, converted, NATIVE)
    assert not broken
    dense = broken.outputs[0].comparisons["dense"]
    assert dense.judged and not dense.passed and dense.needed_tolerance > 1e-3
    # an absolute tolerance of 1e-9 (the old floor) would have accepted it
    assert dense.max_abs_diff < 1e-8


def test_an_output_of_all_zeros_cannot_be_judged_and_is_not_verified() -> None:
    model = seeded(Tiny())
    with torch.no_grad():
        model.fc2.weight.zero_()
        model.fc2.bias.zero_()
    check = verify_dense(model, convolutionalize(model, NATIVE), NATIVE)
    assert not check and not check.judged
    dense = check.outputs[0].comparisons["dense"]
    assert not dense.judged and dense.reason and dense.reference_scale == 0


class GlobalPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.trunk(x)), 1))


POOL_LINE = inspect.getsourcelines(GlobalPool.forward)[1] + 1


def test_a_map_of_one_cell_on_every_input_is_refused_naming_the_pool() -> None:
    """Until the pool is made a sliding window (then the map grows and this guard passes)."""
    model = seeded(GlobalPool())
    converted = convolutionalize(model, (16, 16))
    try:
        check = verify_dense(model, converted, (16, 16))
    except NotDenseError as error:
        assert error.layer == "pool"
        assert error.where is not None and error.where.endswith(f"test_dense_judge.py:{POOL_LINE}")
        return
    # a pool that fcconv made dense: then the map must have more than one cell
    assert check.map_size is not None and torch.Size(check.map_size).numel() > 1


def test_a_check_input_holding_one_window_asks_for_a_larger_one() -> None:
    model = seeded(Tiny())
    converted = convolutionalize(model, NATIVE)
    with pytest.raises(SpecError) as caught:
        verify_dense(model, converted, NATIVE, (8, 12))  # one window of stride 4x4 fits
    assert "check_size" in caught.value.template
