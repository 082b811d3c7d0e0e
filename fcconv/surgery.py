"""Module-level surgery: the conv twins of a head's layers, and swapping modules by name.

The one place modules are built: ``fcconv convert`` rearranges weights with
:mod:`fcconv.geometry`, and whole-model convolutionalization builds its conv
and BatchNorm twins here.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fcconv.errors import LayerError, SpecError
from fcconv.geometry import (
    DEFAULT_ORDER,
    Patch,
    PatchNd,
    PatchSpec,
    conv_weight_to_linear_nd,
    kernel_axes,
    linear_weight_to_conv_nd,
    resolve_patch,
)
from fcconv.patches import as_nd, order_text, parse_order_nd, spec_from

_CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCHNORMS: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _patch(patch: object, in_features: int) -> PatchNd:
    """Any patch the library takes (text, spec, patch, tuple), fitted to ``in_features``."""
    return as_nd(resolve_patch(spec_from(patch), in_features))


def _stride(stride: object, ndim: int) -> tuple[int, ...] | None:
    """A stride as one int for every axis, or a tuple of one per axis; None: the patch."""
    if stride is None:
        return None
    numbers = (stride,) * ndim if isinstance(stride, int) else stride
    if (
        not isinstance(numbers, tuple | list)
        or len(numbers) != ndim
        or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in numbers)
    ):
        raise SpecError(
            f"a stride of a {ndim}-D patch is a positive int or {ndim} of them, not {stride!r}"
        )
    return tuple(numbers)


def linear_to_conv(
    linear: nn.Linear,
    patch: Patch | PatchNd | PatchSpec | str | tuple[int, ...],
    order: str | None = None,
    stride: int | tuple[int, ...] | None = None,
) -> nn.Conv1d | nn.Conv2d | nn.Conv3d:
    """The conv (``nn.Conv2d``; ``Conv1d``/``Conv3d`` for 1-D/3-D patches) that applies
    ``linear`` to every ``patch``-sized window.

    ``patch`` is text (``"20x20x10"``, ``"l=16,c=4"``), a :class:`Patch`, or the
    same numbers as a tuple (``(20, 20, 10)``; ``(20, 20)`` infers C). ``order``
    defaults to PyTorch's (``chw``, ``cl``, ``cdhw``); ``stride`` to the patch.
    The kernel is ``linear``'s weight rearranged (no arithmetic); dtype,
    device, ``requires_grad`` and the training flag are kept. The conv is
    built on the meta device, so no random initialisation runs and the
    global RNG is left as it was.

    Example:
        >>> conv = linear_to_conv(nn.Linear(4000, 64), "20x20x10")
        >>> conv(torch.zeros(1, 10, 100, 60)).shape
        torch.Size([1, 64, 5, 3])
        >>> linear_to_conv(nn.Linear(1024, 8), (8, 8, 16), "hwc", stride=4)
        Conv2d(16, 8, kernel_size=(8, 8), stride=(4, 4))

    Raises:
        LayerError: ``linear`` is not an ``nn.Linear``.
        SpecError: the patch, order or stride is malformed or does not fit.
    """
    _expect_linear(linear)
    nd = _patch(patch, linear.in_features)
    order = kernel_axes(nd.ndim) if order is None else parse_order_nd(order_text(order), nd.ndim)
    return linear_to_conv_nd(linear, nd, order, _stride(stride, nd.ndim))


def _expect_linear(module: nn.Module) -> None:
    if not isinstance(module, nn.Linear):
        raise LayerError(f"expected an nn.Linear, got {type(module).__name__}")


def linear_to_conv_nd(
    linear: nn.Linear,
    patch: PatchNd,
    order: str | None = None,
    stride: tuple[int, ...] | None = None,
) -> nn.Conv1d | nn.Conv2d | nn.Conv3d:
    """The ``nn.Conv1d``/``Conv2d``/``Conv3d`` that applies ``linear`` to every window.

    The 1-D and 3-D counterpart of :func:`linear_to_conv`: the kernel is
    ``[O, C, *patch.sizes]``, rearranged from the weight in ``order``
    (default ``cl``, ``chw`` or ``cdhw``), and ``stride`` defaults to the
    patch (non-overlapping windows).

    Example:
        >>> conv = linear_to_conv_nd(nn.Linear(64, 8), PatchNd((4,), 16), "lc", (1,))
        >>> conv, tuple(conv(torch.zeros(1, 16, 10)).shape)
        (Conv1d(16, 8, kernel_size=(4,), stride=(1,)), (1, 8, 7))
    """
    _expect_linear(linear)
    order = order or kernel_axes(patch.ndim)
    weight = linear.weight
    conv = _CONVS[patch.ndim](
        patch.channels,
        linear.out_features,
        kernel_size=patch.sizes,
        stride=tuple(stride) if stride else patch.sizes,
        padding=0,
        bias=linear.bias is not None,
        device="meta",
        dtype=weight.dtype,
    ).to_empty(device=weight.device)
    with torch.no_grad():
        conv.weight.copy_(linear_weight_to_conv_nd(weight.detach(), patch, order))
        if linear.bias is not None:
            conv.bias.copy_(linear.bias.detach())
    _keep_flags(linear, conv)
    return conv


def batchnorm1d_to_2d(bn: nn.BatchNorm1d) -> nn.BatchNorm2d:
    """The ``nn.BatchNorm2d`` with ``bn``'s parameters and running statistics.

    In eval mode it normalises every cell of a ``[B, C, H, W]`` map exactly as
    ``bn`` normalises ``[B, C]``; in training mode it would also average over
    the cells.
    """
    return batchnorm1d_to_nd(bn, 2)  # type: ignore[return-value]


def batchnorm1d_to_nd(bn: nn.BatchNorm1d, ndim: int) -> nn.Module:
    """The ``BatchNorm1d``/``2d``/``3d`` for an ``ndim``-D map, with ``bn``'s state.

    A ``[B, C, L]`` map keeps a BatchNorm1d (a copy); in eval mode every cell
    is normalised exactly as ``bn`` normalises ``[B, C]``.
    """
    state = bn.state_dict()
    floating = [t for t in state.values() if t.is_floating_point()]
    twin = _BATCHNORMS[ndim](
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device="meta",
        dtype=floating[0].dtype if floating else None,
    )
    device = next((t.device for t in state.values()), torch.device("cpu"))
    twin = twin.to_empty(device=device)
    twin.load_state_dict(state)
    _keep_flags(bn, twin)
    return twin


def _keep_flags(before: nn.Module, after: nn.Module) -> None:
    """Give ``after`` the ``requires_grad`` of each parameter and the mode of ``before``."""
    for name, parameter in before.named_parameters():
        getattr(after, name).requires_grad_(parameter.requires_grad)
    after.train(before.training)


def conv_to_linear(conv: nn.Module, order: str = DEFAULT_ORDER) -> nn.Linear:
    """The ``nn.Linear`` that a converted conv came from (the inverse of :func:`linear_to_conv`).

    Conv1d and Conv3d twins invert too, given their order (``cl``, ``cdhw``, ...).
    """
    kernel = conv.weight
    if kernel.dim() != 4 and order == DEFAULT_ORDER:
        order = kernel_axes(kernel.dim() - 2)
    linear = nn.Linear(
        kernel[0].numel(),
        conv.out_channels,
        bias=conv.bias is not None,
        device="meta",
        dtype=kernel.dtype,
    ).to_empty(device=kernel.device)
    with torch.no_grad():
        linear.weight.copy_(conv_weight_to_linear_nd(kernel.detach(), order))
        if conv.bias is not None:
            linear.bias.copy_(conv.bias.detach())
    _keep_flags(conv, linear)
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
