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

import torch
import torch.nn.functional as F
from torch import nn

from fcconv.errors import SpecError
from fcconv.fcn.analyse import Analysis, analyze, stride_tuple
from fcconv.fcn.cells import crop_plan, output_cells, trunk_geometry
from fcconv.fcn.ops import describe, feature_reduction, module_of
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


class FeatureLayerNorm(nn.Module):
    """``nn.LayerNorm`` over the features of ``[B, N]``, on the channels of ``[B, N, *map]``."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.normalized_shape = tuple(norm.normalized_shape)
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # explicit non-negative permutations: the ONNX exporter writes movedim(-1, 1) as a
        # Transpose with a negative axis, which onnxruntime refuses
        rank = x.dim()
        last = x.permute(0, *range(2, rank), 1)
        normed = F.layer_norm(last, self.normalized_shape, self.weight, self.bias, self.eps)
        return normed.permute(0, rank - 1, *range(1, rank - 1))

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, over dim 1"


_POOLS = {
    ("avg", 1): F.avg_pool1d,
    ("avg", 2): F.avg_pool2d,
    ("avg", 3): F.avg_pool3d,
    ("max", 1): F.max_pool1d,
    ("max", 2): F.max_pool2d,
    ("max", 3): F.max_pool3d,
}


def _pool_change(gm, node, kind: str, window: tuple[int, ...], step, cam: bool) -> LayerChange:
    module = module_of(gm, node)
    name = str(node.target) if module is not None else node.name
    was = repr(module) if module is not None else describe(gm, node).split(" ", 1)[-1]
    if cam:
        return LayerChange(name, was, "removed: the head reads every feature cell (CAM)")
    pool = "AvgPool" if kind == "avg" else "MaxPool"
    sizes, steps = "x".join(map(str, window)), "x".join(map(str, step))
    return LayerChange(name, was, f"{pool}{len(window)}d(kernel {sizes}, stride {steps})")


def _rewrite_pool_site(an: Analysis, site, step: tuple[int, ...]) -> list[LayerChange]:
    """A global pool becomes the same pool over a native-size window (or goes, for CAM)."""
    gm, graph = an.gm, an.gm.graph
    cam = an.head_mode == "cam"
    changes = []
    for node in site.squeezes:
        node.replace_all_uses_with(node.args[0])
    for node, kind in site.reduces.items():
        source = node.args[0]
        changes.append(_pool_change(gm, node, kind, site.window, step, cam))
        if cam:
            node.replace_all_uses_with(source)
            continue
        pool = _POOLS[(kind, len(site.window))]
        with graph.inserting_after(node):
            windowed = graph.call_function(pool, (source, list(site.window), list(step)))
        windowed.meta["stack_trace"] = node.meta.get("stack_trace")
        node.replace_all_uses_with(windowed)
    return changes


def _set_dim(node, position: int, name: str) -> None:
    """Make the node's ``dim`` argument 1 (the channels of a map), wherever it is given."""
    if len(node.args) > position:
        node.update_arg(position, 1)
    else:
        node.update_kwarg(name, 1)


def _rewrite(an: Analysis, stride: tuple[int, ...]) -> list[LayerChange]:
    gm, graph = an.gm, an.gm.graph
    changes: list[LayerChange] = []
    ndim = an.sites[0].patch.ndim
    for site in an.sites:
        if site.kind == "pool":
            changes += _rewrite_pool_site(an, site, stride)
        else:
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
            site = an.first_of.get(node)
            kernel = site.patch if site else PatchNd((1,) * ndim, module.in_features)
            step = stride if site else (1,) * ndim
            order = site.order if site else kernel_axes(ndim)
            replace_module(gm, node.target, linear_to_conv_nd(module, kernel, order, step), True)
            changes.append(_linear_change(node, module, kernel, step))
        elif kind == "batchnorm":
            twin = batchnorm1d_to_nd(module, ndim)
            replace_module(gm, node.target, twin, inplace=True)
            changes.append(LayerChange(str(node.target), repr(module), repr(twin)))
        elif kind == "layernorm":
            twin = FeatureLayerNorm(module)
            replace_module(gm, node.target, twin, inplace=True)
            changes.append(LayerChange(str(node.target), repr(module), repr(twin)))
        elif kind == "softmax":
            if module is not None and module.dim != 1:
                twin = type(module)(dim=1)
                replace_module(gm, node.target, twin, inplace=True)
                changes.append(LayerChange(str(node.target), repr(module), repr(twin)))
            elif module is None:
                _set_dim(node, 1, "dim")
        elif kind in ("normalize", "concat"):
            _set_dim(node, 2 if kind == "normalize" else 1, "dim")
        elif kind == "reduce":
            _set_dim(node, feature_reduction(node), "dim")
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


def _head_kind(site, mode: str) -> str:
    """``flatten``, ``global_pool`` (a pool over each native-size window) or ``cam``."""
    if site.kind == "flatten":
        return "flatten"
    return "cam" if mode == "cam" else "global_pool"


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
    head: str | None = None,
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
    if output_stride is not None and head == "cam":
        raise SpecError(
            "{head} cam maps every feature cell already, at the trunk's stride; leave out "
            "{output_stride}"
        )
    if output_stride is not None:
        from fcconv.fcn.stride import with_output_stride

        plain = convolutionalize_detailed(
            model, input_size, layers=layers, stride=stride, in_channels=in_channels,
            outputs=outputs, inplace=inplace, head=head,
        )  # fmt: skip
        return with_output_stride(plain, output_stride)
    working = model if inplace else copy.deepcopy(model)
    an = analyze(working, input_size, layers, in_channels, outputs, head)
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
            head=_head_kind(o.site, an.head_mode),
            window=o.site.window,
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
        head=an.head_mode,
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
    head: str | None = None,
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
        head: what a global pool before the head becomes (``AdaptiveAvgPool2d(1)``,
            ``x.mean((2, 3))``, timm's ``SelectAdaptivePool2d``, ...): ``"pool"``
            (default) the same pool over every native-size window of the feature
            map at stride 1, so each cell is the model's head on that window;
            ``"cam"`` no pool: the head at every feature cell, a class activation
            map (Zhou et al., 2016), each cell the head on that cell's feature vector.

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
        head=head,
    ).model
