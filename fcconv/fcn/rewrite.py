"""Rewriting the analysed head as convolutions: :func:`convolutionalize`.

The flatten is removed, identity adaptive pools are bypassed, the first
Linear becomes ``Conv2d(C, O, (kh, kw), stride)``, every later Linear a 1×1
conv, BatchNorm1d a BatchNorm2d, and softmax acts over the channels.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from fcconv.fcn.analyse import _Analysis, _analyze, _size_pair
from fcconv.fcn.check import _guess, window_stride
from fcconv.fcn.ops import _module
from fcconv.fcn.results import Conversion, LayerChange
from fcconv.geometry import Patch, conv2d_line
from fcconv.surgery import batchnorm1d_to_2d, linear_to_conv, replace_module


def _rewrite(an: _Analysis, stride: tuple[int, int]) -> list[LayerChange]:
    gm, graph = an.gm, an.gm.graph
    changes: list[LayerChange] = []
    consumer = an.pre_ops[0] if an.pre_ops else an.chain[0][0]
    consumer.replace_input_with(an.flatten, an.source)
    for node in an.pools:
        module = _module(gm, node)
        was = repr(module) if module is not None else node.name
        changes.append(LayerChange(str(node.target) if module else node.name, was, "identity"))
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
    patch = an.patch
    for index, (node, kind) in enumerate(an.chain):
        module = _module(gm, node)
        if kind == "linear":
            first = index == 0
            kernel = patch if first else Patch(1, 1, module.in_features)
            step = stride if first else (1, 1)
            conv = linear_to_conv(module, kernel, an.order if first else "chw", step)
            replace_module(gm, node.target, conv, inplace=True)
            line = conv2d_line(kernel, module.out_features, step, module.bias is not None)
            was = f"Linear({module.in_features} → {module.out_features})"
            now = (
                f"Conv2d({kernel.channels} → {module.out_features}, kernel "
                f"{kernel.height}x{kernel.width}, stride {step[0]}x{step[1]})"
            )
            changes.append(LayerChange(str(node.target), was, now, line))
        elif kind == "batchnorm":
            twin = batchnorm1d_to_2d(module)
            replace_module(gm, node.target, twin, inplace=True)
            changes.append(LayerChange(str(node.target), repr(module), repr(twin)))
        elif kind == "softmax":
            if module is not None:
                twin = type(module)(dim=1)
                replace_module(gm, node.target, twin, inplace=True)
                changes.append(LayerChange(str(node.target), repr(module), repr(twin)))
            elif len(node.args) > 1:
                node.update_arg(1, 1)
            else:
                node.update_kwarg("dim", 1)
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    graph.lint()
    gm.recompile()
    return changes


def _notes_for(an: _Analysis, model: nn.Module) -> list[str]:
    notes = list(an.notes)
    kinds = {kind for _, kind in an.chain}
    if "batchnorm" in kinds:
        notes.append(
            "BatchNorm1d became BatchNorm2d with the same parameters and running "
            "statistics: in eval mode they agree cell by cell; in training mode "
            "BatchNorm2d would also average over the map's cells"
        )
    if any(module.training for module in model.modules()):
        notes.append(
            "the model was in training mode; the converted model is in eval mode, as "
            "for inference (Dropout off, BatchNorm on its running statistics); call "
            ".train() on it to change that"
        )
    return notes


def convolutionalize_detailed(
    model: nn.Module,
    input_size: Sequence[int] | int,
    *,
    layers: Sequence[str] | None = None,
    stride: Sequence[int] | int | None = None,
    in_channels: int | None = None,
    inplace: bool = False,
) -> Conversion:
    """Like :func:`convolutionalize`, returning the model with a report of what changed.

    The model in the report is returned in eval mode, as for inference; call
    ``.train()`` to change it.

    Raises:
        UntraceableModelError: ``torch.fx`` cannot trace the model.
        ConvolutionalizeError: the head has a layer without a convolutional
            twin, or the flatten is not directly before the first Linear.
        LayerError: ``layers`` names something that is not a Linear of the head.
        SpecError: the model does not run at ``input_size``.
    """
    step = _size_pair(1 if stride is None else stride, "stride")
    working = model if inplace else copy.deepcopy(model)
    an = _analyze(working, input_size, layers, in_channels)
    notes = _notes_for(an, working)
    changes = _rewrite(an, step)
    converted = an.gm.eval()
    converted.meta["fcconv"] = {
        "input_size": list(an.input_size),
        "in_channels": an.in_channels,
        "patch": [an.patch.height, an.patch.width, an.patch.channels],
        "order": an.order,
        "stride": list(step),
    }
    return Conversion(
        model=converted,
        model_name=type(model).__name__,
        input_size=an.input_size,
        in_channels=an.in_channels,
        patch=an.patch,
        order=an.order,
        order_from=an.order_from,
        stride=step,
        window_stride=window_stride(
            converted, an.input_size, an.in_channels, _guess(an.input_size, an.patch, step)
        ),
        changes=changes,
        notes=notes,
    )


def convolutionalize(
    model: nn.Module,
    input_size: Sequence[int] | int,
    *,
    layers: Sequence[str] | None = None,
    stride: Sequence[int] | int | None = None,
    in_channels: int | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Turn a classifier's ``flatten → Linear → … → Linear`` head into convolutions.

    The model is traced with ``torch.fx`` and run once at ``input_size`` to
    learn the shapes. The flatten feeding the first Linear (``nn.Flatten``,
    ``torch.flatten``, ``x.view(x.size(0), -1)``, ``reshape``, after any
    ``permute``/``transpose``) gives the patch and the flatten order, so the
    user never states them. The flatten is removed; the first Linear becomes
    a Conv2d whose kernel is the feature map's size, each later Linear a 1×1
    conv; ReLU & co., Dropout, BatchNorm1d (as BatchNorm2d) and Softmax over
    the class dimension are carried. Adaptive pools that are the identity at
    the native size are removed.

    Args:
        model: the classifier; not modified unless ``inplace``.
        input_size: the native ``(H, W)`` (or one int for square inputs).
        layers: names of the head's Linear layers; the first one named must be
            fed by the flatten. Default: the first Linear that is.
        stride: the first conv's stride in feature-map cells; default 1 (a
            window at every offset of the feature map).
        in_channels: the input's channels; default: the first conv's.
        inplace: reuse the model's modules instead of copying them; the trunk
            then shares its parameters with the original (and is put in eval
            mode with the result).

    Returns:
        An ``fx.GraphModule`` whose output on a ``[B, C, H, W]`` input is the
        map ``[B, O, H', W']`` of the original head on every window, returned
        in eval mode, as for inference; call ``.train()`` to change it.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
        >>> dense = convolutionalize(net, (6, 6))
        >>> dense.get_submodule("2")
        Conv2d(2, 3, kernel_size=(4, 4), stride=(1, 1))
    """
    return convolutionalize_detailed(
        model,
        input_size,
        layers=layers,
        stride=stride,
        in_channels=in_channels,
        inplace=inplace,
    ).model
