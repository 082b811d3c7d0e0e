"""Keras's layouts and flipped kernels: permutations, checked against hand-made references.

A Keras Dense kernel ``[N, O]`` fed NHWC-flattened patches is, by Keras's
definition, ``kernel.reshape(kh, kw, C, O)`` as a Conv2D kernel: that is the
reference the geometry is held to. A flipped kernel is judged by true
convolution written out as a loop (tap ``(i, j)`` multiplies the pixel
``(kh-1-i, kw-1-j)`` of the window).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import bitwise_equal, linear_on_every_window

from fcconv.geometry import (
    ORDERS,
    Patch,
    conv_weight_to_linear,
    flip_kernel,
    keras_conv_to_oihw,
    keras_dense_to_linear,
    linear_to_keras_dense,
    linear_weight_to_conv,
    oihw_to_keras_conv,
)

sides = st.integers(1, 4)


@settings(max_examples=40, deadline=None)
@given(kh=sides, kw=sides, channels=sides, out=sides)
def test_keras_dense_kernel_becomes_its_reshape_as_a_conv2d_kernel(kh, kw, channels, out):
    dense = torch.randn(kh * kw * channels, out)  # Keras: [N, O], N flattened NHWC
    kernel = linear_weight_to_conv(keras_dense_to_linear(dense), Patch(kh, kw, channels), "hwc")
    assert bitwise_equal(oihw_to_keras_conv(kernel), dense.reshape(kh, kw, channels, out))


@settings(max_examples=40, deadline=None)
@given(shape=st.tuples(sides, sides, sides, sides))
def test_keras_layouts_round_trip_bit_for_bit(shape):
    kernel = torch.randn(shape)
    assert bitwise_equal(oihw_to_keras_conv(keras_conv_to_oihw(kernel)), kernel)
    dense = torch.randn(shape[:2])
    assert bitwise_equal(linear_to_keras_dense(keras_dense_to_linear(dense)), dense)
    assert bitwise_equal(keras_dense_to_linear(dense), dense.T.contiguous())


def test_keras_conv_kernel_axes_by_hand():
    keras_kernel = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)  # [kh, kw, C, O]
    oihw = keras_conv_to_oihw(keras_kernel)
    assert oihw.shape == (5, 4, 2, 3)
    assert oihw[4, 3, 1, 2] == keras_kernel[1, 2, 3, 4]
    assert oihw[0, 1, 1, 0] == keras_kernel[1, 0, 1, 0]


def _true_convolution(x: torch.Tensor, kernel: torch.Tensor, stride: tuple[int, int]):
    """Textbook convolution, as Theano computes it: the kernel reversed as it slides."""
    _, _, height, width = x.shape
    out, _, kh, kw = kernel.shape
    rows, cols = (height - kh) // stride[0] + 1, (width - kw) // stride[1] + 1
    y = torch.zeros(x.shape[0], out, rows, cols, dtype=torch.float64)
    for p in range(rows):
        for q in range(cols):
            window = x[:, :, p * stride[0] : p * stride[0] + kh, q * stride[1] : q * stride[1] + kw]
            for i in range(kh):
                for j in range(kw):
                    tap = kernel[:, :, i, j].double()  # [O, C]
                    y[:, :, p, q] += window[:, :, kh - 1 - i, kw - 1 - j].double() @ tap.T
    return y


@settings(max_examples=25, deadline=None)
@given(kh=sides, kw=sides, channels=st.integers(1, 3), order=st.sampled_from(ORDERS))
def test_a_flipped_kernel_under_true_convolution_is_the_linear_on_every_window(
    kh, kw, channels, order
):
    patch = Patch(kh, kw, channels)
    weight = torch.randn(3, patch.features, dtype=torch.float64)
    x = torch.randn(1, channels, kh + 2, kw + 1, dtype=torch.float64)
    flipped = linear_weight_to_conv(weight, patch, order, flip=True)
    expected = linear_on_every_window(x, weight, None, (kh, kw), (1, 1), order)
    torch.testing.assert_close(_true_convolution(x, flipped, (1, 1)), expected)
    assert bitwise_equal(conv_weight_to_linear(flipped, order, flip=True), weight)
    assert bitwise_equal(flip_kernel(flipped), linear_weight_to_conv(weight, patch, order))


def test_a_flip_reverses_both_spatial_axes_by_hand():
    weight = torch.arange(6.0).reshape(1, 6)  # chw on a 2x3 patch of one channel
    flipped = linear_weight_to_conv(weight, Patch(2, 3, 1), "chw", flip=True)
    assert flipped[0, 0].tolist() == [[5.0, 4.0, 3.0], [2.0, 1.0, 0.0]]
