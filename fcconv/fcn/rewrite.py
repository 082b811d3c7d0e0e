"""Rewriting the analysed head as convolutions: :func:`convolutionalize`.

Each flatten is removed, identity adaptive pools are bypassed, the first
Linear of every branch becomes a conv whose kernel is its feature map
(``Conv1d``/``Conv2d``/``Conv3d`` as the map has 1, 2 or 3 spatial axes),
every later Linear a 1×1 conv, BatchNorm1d the BatchNorm of the map, and
softmax acts over the channels. The outputs keep their structure.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from fcconv.errors import SpecError
from fcconv.fcn.analyse import Analysis, analyze, stride_tuple
from fcconv.fcn.cells import crop_plan, output_cells, trunk_geometry
from fcconv.fcn.ops import module_of
from fcconv.fcn.results import Conversion, LayerChange, OutputFacts
from fcconv.geometry import PatchNd, kernel_axes
from fcconv.progress import phased
from fcconv.surgery import batchnorm1d_to_nd, linear_to_conv_nd, replace_module
from fcconv.windows import conv_line


def _linear_change(node, module: nn.Linear, kernel: PatchNd, step: tuple[int, ...]) -> LayerChange:
    sizes = "x".join(map(str, kernel.sizes))
    strides = "x".join(map(str, step))
    now = (
        f"Conv{kernel.ndim}d({kernel.channels} → {module.out_features}, kernel {sizes}, "
        f"stride {strides})"
    )
    was = f"Linear({module.in_features} → {module.out_features})"
    line = conv_line(kernel, module.out_features, step, module.bias is not None)
    return LayerChange(str(node.target), was, now, line)


def _rewrite(an: Analysis, stride: tuple[int, ...]) -> list[LayerChange]:
    gm, graph = an.gm, an.gm.graph
    changes: list[LayerChange] = []
    site_of = {o.linears[0]: o.site for o in an.outputs}
    ndim = an.sites[0].patch.ndim
    for site in an.sites:
        site.node.replace_all_uses_with(site.source)
    for node in an.pools:
        module = module_of(gm, node)
        was = repr(module) if module is not None else node.name
        changes.append(LayerChange(str(node.target) if module else node.name, was, "identity"))
        node.replace_all_uses_with(node.args[0])
        graph.erase_node(node)
    for node, kind in an.head.items():
        module = module_of(gm, node)
        if kind == "linear":
            site = site_of.get(node)
            kernel = site.patch if site else PatchNd((1,) * ndim, module.in_features)
            step = stride if site else (1,) * ndim
            order = site.order if site else kernel_axes(ndim)
            replace_module(gm, node.target, linear_to_conv_nd(module, kernel, order, step), True)
            changes.append(_linear_change(node, module, kernel, step))
        elif kind == "batchnorm":
            twin = batchnorm1d_to_nd(module, ndim)
            replace_module(gm, node.target, twin, inplace=True)
            changes.append(LayerChange(str(node.target), repr(module), repr(twin)))
        elif kind == "softmax":
            if module is not None and module.dim != 1:
                twin = type(module)(dim=1)
                replace_module(gm, node.target, twin, inplace=True)
                changes.append(LayerChange(str(node.target), repr(module), repr(twin)))
            elif module is None and len(node.args) > 1:
                node.update_arg(1, 1)
            elif module is None:
                node.update_kwarg("dim", 1)
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    graph.lint()
    gm.recompile()
    return changes


def _notes_for(an: Analysis, model: nn.Module) -> list[str]:
    notes = list(an.notes)
    if "batchnorm" in an.head.values():
        notes.append(
            "BatchNorm1d became the map's BatchNorm with the same parameters and running "
            "statistics: in eval mode they agree cell by cell; in training mode it would "
            "also average over the map's cells"
        )
    if any(module.training for module in model.modules()):
        notes.append(
            "the model was in training mode; the converted model is in eval mode, as "
            "for inference (Dropout off, BatchNorm on its running statistics); call "
            ".train() on it to change that"
        )
    return notes


@phased("tracing and rewriting")
def convolutionalize_detailed(
    model: nn.Module,
    input_size: Sequence[int] | int,
    *,
    layers: Sequence[str] | None = None,
    stride: Sequence[int] | int | None = None,
    in_channels: int | None = None,
    outputs: Sequence[str] | None = None,
    inplace: bool = False,
    output_stride: Sequence[int] | int | None = None,
) -> Conversion:
    """Like :func:`convolutionalize`, returning the model with a report of what changed.

    The report holds, per output, its coordinate map (``Conversion.outputs[i].cells``,
    a :class:`~fcconv.geometry.CellGeometry`) and which borders the model
    reads past at the native size (``Conversion.crop_plan``).

    Raises:
        UntraceableModelError: neither ``torch.fx`` nor ``torch.export`` can trace it.
        ConvolutionalizeError: a head layer has no convolutional twin, or the
            flatten is not directly before the first Linear.
        LayerError: ``layers`` or ``outputs`` name something the head does not hold.
        SpecError: the model does not run at ``input_size``.
        UserCodeError: the model's code raised.
    """
    if output_stride is not None:
        from fcconv.fcn.stride import with_output_stride

        plain = convolutionalize_detailed(
            model, input_size, layers=layers, stride=stride, in_channels=in_channels,
            outputs=outputs, inplace=inplace,
        )  # fmt: skip
        return with_output_stride(plain, output_stride)
    working = model if inplace else copy.deepcopy(model)
    an = analyze(working, input_size, layers, in_channels, outputs)
    ndim = an.sites[0].patch.ndim
    if any(site.patch.ndim != ndim for site in an.sites):
        raise SpecError("the head's flattens read feature maps of different dimensions")
    step = stride_tuple(stride, ndim)
    geometry = trunk_geometry(an)
    maps = {m.name: m for m in output_cells(an, geometry, step)}
    plan = crop_plan(an, geometry)
    notes = _notes_for(an, working)
    facts = [
        OutputFacts(
            name=o.name,
            patch=o.site.patch,
            order=o.site.order,
            order_from=o.site.order_from,
            linears=[str(n.target) for n in o.linears],
            cells_map=maps[o.name],
        )
        for o in an.outputs
    ]
    changes = _rewrite(an, step)
    converted = an.gm.eval()
    conversion = Conversion(
        model=converted,
        model_name=type(model).__name__,
        layout=an.layout,
        tracer=an.tracer,
        stride=step,
        outputs=facts,
        output_names=an.output_names,
        crop_plan=plan,
        changes=changes,
        notes=notes,
    )
    converted.meta["fcconv"] = conversion.recorded()
    return conversion


def convolutionalize(
    model: nn.Module,
    input_size: Sequence[int] | int,
    *,
    layers: Sequence[str] | None = None,
    stride: Sequence[int] | int | None = None,
    in_channels: int | None = None,
    outputs: Sequence[str] | None = None,
    inplace: bool = False,
    output_stride: Sequence[int] | int | None = None,
) -> nn.Module:
    """Turn a model's ``flatten → Linear → …`` head(s) into convolutions.

    The model is traced with ``torch.fx`` (``torch.export`` when fx fails) and
    run once at ``input_size`` to learn the shapes. The flatten feeding each
    head (``nn.Flatten``, ``torch.flatten``, ``x.view(x.size(0), -1)``,
    ``reshape``, after any ``permute``/``transpose``) gives the patch and the
    flatten order, so the user never states them. The flatten is removed; the
    first Linear of each branch becomes a conv whose kernel is the feature
    map, each later Linear a 1×1 conv; ReLU & co., PReLU, Dropout,
    BatchNorm1d and Softmax over the class dimension are carried. Heads that
    fan out into several outputs (a tuple, list or dict, nested) are
    converted together and keep the output's structure. Adaptive pools that
    are the identity at the native size are removed.

    Args:
        model: the model; not modified unless ``inplace``.
        input_size: the native size: ``T`` (1-D), ``(H, W)`` (one int: square)
            or ``(D, H, W)``.
        layers: names of head Linear layers, checked to be in the head.
        stride: the first convs' stride in feature-map cells; default 1 (a
            window at every offset of the feature map).
        in_channels: the input's channels; default: the first conv's.
        outputs: keep only these outputs (names as ``0``, ``boxes``,
            ``out.landmarks``); one name returns that tensor alone.
        inplace: reuse the model's modules instead of copying them.
        output_stride: a denser map: its stride in input pixels, a divisor of
            the trunk's (:func:`fcconv.fcn.stride.with_output_stride`,
            shift-and-stitch); the result is then a
            :class:`~fcconv.fcn.stride.StitchedMap` around the dense model.

    Returns:
        An ``fx.GraphModule`` whose every output on a larger input is the map
        ``[B, O, *cells]`` of the original head on every window, returned in
        eval mode, as for inference; call ``.train()`` to change it.

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
        outputs=outputs,
        inplace=inplace,
        output_stride=output_stride,
    ).model
