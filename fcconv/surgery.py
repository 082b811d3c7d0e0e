"""Module-level surgery: build the ``nn.Conv2d`` twin of an ``nn.Linear`` and swap it in."""

from __future__ import annotations

import copy

import torch
from torch import nn

from fcconv.errors import LayerError
from fcconv.geometry import (
    DEFAULT_ORDER,
    Patch,
    PatchSpec,
    conv_weight_to_linear,
    linear_weight_to_conv,
    parse_patch,
    patch_of_kernel,
    resolve_patch,
)


def _patch(patch: Patch | PatchSpec | str, in_features: int) -> Patch:
    if isinstance(patch, Patch):
        return resolve_patch(PatchSpec(patch.height, patch.width, patch.channels), in_features)
    spec = parse_patch(patch) if isinstance(patch, str) else patch
    return resolve_patch(spec, in_features)


def linear_to_conv(
    linear: nn.Linear,
    patch: Patch | PatchSpec | str,
    order: str = DEFAULT_ORDER,
    stride: tuple[int, int] | None = None,
) -> nn.Conv2d:
    """The ``nn.Conv2d`` that applies ``linear`` to every ``patch``-sized window.

    The kernel is ``linear``'s weight rearranged (no arithmetic); dtype,
    device and ``requires_grad`` are kept.

    Example:
        >>> conv = linear_to_conv(nn.Linear(4000, 64), "20x20x10")
        >>> conv(torch.zeros(1, 10, 100, 60)).shape
        torch.Size([1, 64, 5, 3])
    """
    if not isinstance(linear, nn.Linear):
        raise LayerError(f"expected an nn.Linear, got {type(linear).__name__}")
    resolved = _patch(patch, linear.in_features)
    stride = stride or (resolved.height, resolved.width)
    conv = nn.Conv2d(
        resolved.channels,
        linear.out_features,
        kernel_size=(resolved.height, resolved.width),
        stride=stride,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(linear_weight_to_conv(linear.weight, resolved, order))
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    conv.weight.requires_grad_(linear.weight.requires_grad)
    if linear.bias is not None:
        conv.bias.requires_grad_(linear.bias.requires_grad)
    return conv


def conv_to_linear(conv: nn.Conv2d, order: str = DEFAULT_ORDER) -> nn.Linear:
    """The ``nn.Linear`` that a converted conv came from (the inverse of :func:`linear_to_conv`)."""
    patch = patch_of_kernel(tuple(conv.weight.shape))
    linear = nn.Linear(
        patch.features,
        conv.out_channels,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        linear.weight.copy_(conv_weight_to_linear(conv.weight, order))
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def replace_module(
    model: nn.Module, name: str, module: nn.Module, inplace: bool = False
) -> nn.Module:
    """Put ``module`` at the qualified ``name`` (``classifier.0``) of ``model``.

    Works on a deep copy unless ``inplace``; returns the model that was changed.
    """
    target = model if inplace else copy.deepcopy(model)
    parent_name, _, attribute = name.rpartition(".")
    try:
        parent = target.get_submodule(parent_name) if parent_name else target
        target.get_submodule(name)
    except AttributeError as error:
        raise LayerError(f"no submodule {name!r} in the model ({error})") from None
    setattr(parent, attribute, module)
    return target
