"""Module-level surgery: the Conv2d twin behaves like the Linear on every window."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fcconv.errors import LayerError, SpecError
from fcconv.geometry import ORDERS, Patch
from fcconv.surgery import conv_to_linear, linear_to_conv, replace_module


def _windows_then_linear(x: torch.Tensor, linear: nn.Linear, kh: int, kw: int, order: str):
    """Reference: cut each window by slicing, flatten it in `order`, apply the Linear."""
    axis = {"c": 0, "h": 1, "w": 2}
    rows, cols = x.shape[2] // kh, x.shape[3] // kw
    out = torch.empty(x.shape[0], linear.out_features, rows, cols, dtype=torch.float64)
    for p in range(rows):
        for q in range(cols):
            for b in range(x.shape[0]):
                window = x[b, :, p * kh : (p + 1) * kh, q * kw : (q + 1) * kw]
                vector = window.permute(*(axis[a] for a in order)).reshape(-1).double()
                out[b, :, p, q] = linear.weight.double() @ vector + linear.bias.double()
    return out


@pytest.mark.parametrize("order", ORDERS)
def test_conv_twin_equals_linear_on_each_window(order: str) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(3 * 4 * 5, 7)
    conv = linear_to_conv(linear, "4x5x3", order=order)
    x = torch.randn(2, 3, 8, 15)
    expected = _windows_then_linear(x, linear, 4, 5, order)
    assert conv(x).shape == (2, 7, 2, 3)
    torch.testing.assert_close(conv(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_seed_case_module() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(4000, 64)
    conv = linear_to_conv(linear, Patch(20, 20, 10))
    assert (conv.in_channels, conv.out_channels) == (10, 64)
    assert conv.kernel_size == (20, 20) and conv.stride == (20, 20)
    x = torch.randn(1, 10, 100, 60)
    torch.testing.assert_close(
        conv(x).double(), _windows_then_linear(x, linear, 20, 20, "chw"), rtol=1e-5, atol=1e-4
    )


def test_round_trip_module_is_bit_exact_and_keeps_dtype_and_grad() -> None:
    linear = nn.Linear(2 * 3 * 3, 4, dtype=torch.float64)
    linear.weight.requires_grad_(False)
    conv = linear_to_conv(linear, "3x3", order="hwc", stride=(1, 1))
    assert conv.weight.dtype == torch.float64 and conv.stride == (1, 1)
    assert not conv.weight.requires_grad and conv.bias.requires_grad
    back = conv_to_linear(conv, order="hwc")
    assert torch.equal(back.weight, linear.weight) and torch.equal(back.bias, linear.bias)


def test_no_bias_linear_gives_no_bias_conv() -> None:
    conv = linear_to_conv(nn.Linear(8, 2, bias=False), "2x2x2")
    assert conv.bias is None


def test_wrong_patch_and_wrong_module_are_user_errors() -> None:
    with pytest.raises(SpecError, match="4400 elements"):
        linear_to_conv(nn.Linear(4000, 2), "20x20x11")
    with pytest.raises(LayerError, match="nn.Linear"):
        linear_to_conv(nn.Conv2d(1, 1, 1), "1x1")  # type: ignore[arg-type]


def test_replace_module_copies_by_default() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(8, 2)))
    conv = linear_to_conv(model[1][0], "2x2x2")
    changed = replace_module(model, "1.0", conv)
    assert isinstance(changed[1][0], nn.Conv2d)
    assert isinstance(model[1][0], nn.Linear)
    same = replace_module(model, "1.0", conv, inplace=True)
    assert same is model and model[1][0] is conv
    with pytest.raises(LayerError, match="no submodule"):
        replace_module(model, "2.0", conv)
