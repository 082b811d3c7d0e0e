"""Whole-model surgery: a classifier's ``flatten → Linear → … → Linear`` head as convolutions.

This is what the FCN paper calls *convolutionalization* and OverFeat calls
dense sliding-window evaluation. The model is traced with ``torch.fx`` at its
native input size; the flatten that feeds the first Linear, and any
``permute``/``transpose`` before it, tell the patch (the feature map's
``C × kh × kw``) and the flatten order. The flatten is removed, the first
Linear becomes ``Conv2d(C, O, (kh, kw), stride)``, every later Linear a 1×1
conv, and the layers between them are carried over. On a larger input the
result emits a map whose every cell equals the original head applied to one
``kh × kw`` window of the trunk's feature map.

The weights are only permuted (:func:`fcconv.geometry.linear_weight_to_conv`);
nothing is recomputed. :func:`verify_dense` proves the equivalence on random
inputs, :func:`save_exported` writes a ``torch.export`` program (``.pt2``)
with dynamic batch, height and width that loads without the model's code.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
>>> dense = convolutionalize(net, (8, 8))
>>> tuple(dense(torch.zeros(1, 3, 8, 8)).shape), tuple(dense(torch.zeros(1, 3, 12, 10)).shape)
((1, 5, 1, 1), (1, 5, 5, 3))
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
import operator
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fcconv.atomic import atomic_output, check_output_path
from fcconv.errors import (
    ArchitectureError,
    CheckpointError,
    ConvolutionalizeError,
    LayerError,
    SpecError,
    UnsafeCheckpointError,
    UntraceableModelError,
)
from fcconv.geometry import Patch, conv2d_line, linear_weight_to_conv

__all__ = [
    "ArchitectureError",
    "Conversion",
    "ConvolutionalizeError",
    "DenseCheck",
    "ExportInfo",
    "LayerChange",
    "UntraceableModelError",
    "convolutionalize",
    "convolutionalize_detailed",
    "head_on_windows",
    "load_model",
    "save_exported",
    "save_state_dict",
    "verify_dense",
    "window_stride",
]

WEIGHT_ONLY_HINT = "for weight-only conversion use `fcconv convert CKPT --layer NAME`"


# ----------------------------------------------------------------- layer kinds

# Element-wise layers commute with flattening, so they can stay where they are:
# on a [B, N] vector or on the [B, N, H', W'] map they compute the same cells.
_POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Tanhshrink,
    nn.Threshold,
    nn.Sigmoid,
    nn.LogSigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.Identity,
    nn.Dropout,
    nn.AlphaDropout,
)
_POINTWISE_FUNCTIONS: frozenset[Any] = frozenset(
    {
        torch.relu,
        torch.sigmoid,
        torch.tanh,
        torch.exp,
        torch.abs,
        torch.clamp,
        F.relu,
        F.relu6,
        F.leaky_relu,
        F.elu,
        F.selu,
        F.celu,
        F.gelu,
        F.silu,
        F.mish,
        F.hardswish,
        F.hardsigmoid,
        F.hardtanh,
        F.sigmoid,
        F.tanh,
        F.softplus,
        F.softsign,
        F.logsigmoid,
        F.dropout,
        F.alpha_dropout,
    }
)
_POINTWISE_METHODS = frozenset(
    {"relu", "sigmoid", "tanh", "exp", "abs", "clamp", "contiguous", "neg"}
)
_SCALAR_OPERATORS = frozenset(
    {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.mul}
)
_SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmin)
_SOFTMAX_FUNCTIONS = frozenset(
    {torch.softmax, torch.log_softmax, F.softmax, F.log_softmax, F.softmin}
)
_SOFTMAX_METHODS = frozenset({"softmax", "log_softmax"})
_FLATTEN_FUNCTIONS = frozenset({torch.flatten, torch.reshape})
_FLATTEN_METHODS = frozenset({"flatten", "view", "reshape"})
_ADAPTIVE_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_ADAPTIVE_POOL_FUNCTIONS = frozenset({F.adaptive_avg_pool2d, F.adaptive_max_pool2d})


# ------------------------------------------------------------------- results


@dataclass(frozen=True)
class LayerChange:
    """One module of the head as it was and as it is in the converted model."""

    name: str
    was: str
    now: str
    conv2d: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "was": self.was, "now": self.now, "conv2d": self.conv2d}


@dataclass
class Conversion:
    """A convolutionalized model and the facts a report needs.

    Attributes:
        model: the converted ``fx.GraphModule``; output ``[B, O, H', W']``.
        input_size: the native ``(H, W)`` the original was traced at.
        in_channels: the input's channel count.
        patch: the trunk's feature map at the native size (the first conv's kernel).
        order: the flatten order derived from the trace (``chw``, ``hwc``, …).
        order_from: how the order was derived, e.g. ``permute(0, 2, 3, 1) → reshape``.
        stride: the first conv's stride, in feature-map cells.
        window_stride: how far apart the windows lie in input pixels, or ``None``.
        changes: the head's modules, and the trunk's identity pools, before and after.
        notes: plain-words remarks (identity pools, training mode, BatchNorm).
    """

    model: fx.GraphModule
    model_name: str
    input_size: tuple[int, int]
    in_channels: int
    patch: Patch
    order: str
    order_from: str
    stride: tuple[int, int]
    window_stride: tuple[int, int] | None
    changes: list[LayerChange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "input_size": list(self.input_size),
            "in_channels": self.in_channels,
            "feature_map": {
                "channels": self.patch.channels,
                "height": self.patch.height,
                "width": self.patch.width,
            },
            "order": self.order,
            "order_from": self.order_from,
            "stride": list(self.stride),
            "window": list(self.input_size),
            "window_stride": None if self.window_stride is None else list(self.window_stride),
            "changes": [c.to_dict() for c in self.changes],
            "notes": list(self.notes),
        }


@dataclass
class DenseCheck:
    """The outcome of :func:`verify_dense`; truthy when the converted model passed.

    The judge runs in float64: the native-size output must equal the
    original's, and every cell of the dense map on a larger input must equal
    the original head applied to the corresponding window of the trunk's
    feature map, each within ``tolerance``. The crop comparison (the whole
    original model run on each native-size crop of the input) is reported for
    information only: a trunk that pads sees zeros at a crop's borders where
    the whole input has real pixels.
    """

    native_size: tuple[int, int]
    larger_size: tuple[int, int]
    map_size: tuple[int, int] | None
    native_max_abs_diff: float | None
    dense_max_abs_diff: float | None
    tolerance: float
    window_stride: tuple[int, int] | None
    crops_compared: int = 0
    crop_max_abs_diff: float | None = None
    crop_note: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def __bool__(self) -> bool:
        return self.passed

    @property
    def needed_tolerance(self) -> float | None:
        """The smallest tolerance that would have passed both equality checks."""
        diffs = [d for d in (self.native_max_abs_diff, self.dense_max_abs_diff) if d is not None]
        return max(diffs) if diffs else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "compute_dtype": "float64",
            "native_size": list(self.native_size),
            "native_max_abs_diff": self.native_max_abs_diff,
            "larger_size": list(self.larger_size),
            "map_size": None if self.map_size is None else list(self.map_size),
            "dense_max_abs_diff": self.dense_max_abs_diff,
            "tolerance": self.tolerance,
            "needed_tolerance": self.needed_tolerance,
            "window_stride": None if self.window_stride is None else list(self.window_stride),
            "crops_compared": self.crops_compared,
            "crop_max_abs_diff": self.crop_max_abs_diff,
            "crop_note": self.crop_note,
            "problems": list(self.problems),
        }


@dataclass(frozen=True)
class ExportInfo:
    """What :func:`save_exported` wrote and which input shapes the program accepts."""

    path: str
    dynamic: bool
    ranges: dict[str, tuple[int | None, int | None]]
    example_shape: tuple[int, ...]
    roundtrip_max_abs_diff: float
    probed_shapes: list[tuple[int, ...]] = field(default_factory=list)
    rejected_shapes: list[tuple[int, ...]] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "dynamic": self.dynamic,
            "ranges": {k: list(v) for k, v in self.ranges.items()},
            "example_shape": list(self.example_shape),
            "roundtrip_max_abs_diff": self.roundtrip_max_abs_diff,
            "probed_shapes": [list(s) for s in self.probed_shapes],
            "rejected_shapes": [list(s) for s in self.rejected_shapes],
            "note": self.note,
        }


# ------------------------------------------------------------------ analysis


@dataclass
class _Analysis:
    gm: fx.GraphModule
    in_channels: int
    input_size: tuple[int, int]
    source: fx.Node
    flatten: fx.Node
    order: str
    order_from: str
    patch: Patch
    pre_ops: list[fx.Node]
    chain: list[tuple[fx.Node, str]]
    pools: list[fx.Node]
    notes: list[str]

    @property
    def linears(self) -> list[fx.Node]:
        return [node for node, kind in self.chain if kind == "linear"]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode, then give every submodule its own flag back."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def _size_pair(value: Sequence[int] | int, what: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise SpecError(f"{what} must be two positive integers (H, W), got {value!r}")
    return int(pair[0]), int(pair[1])


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """A node as a user recognises it: its module name and type, or its function."""
    if node.op == "call_module":
        return f"'{node.target}' ({type(_module(gm, node)).__name__})"
    if node.op == "call_function":
        target = node.target
        owner = getattr(target, "__module__", None) or ""
        owner = {"torch._C._VariableFunctions": "torch", "_operator": "operator"}.get(owner, owner)
        name = getattr(target, "__name__", str(target))
        return f"'{node.name}' ({owner + '.' if owner else ''}{name})"
    if node.op == "call_method":
        return f"'{node.name}' (Tensor.{node.target})"
    if node.op == "placeholder":
        return f"the model input '{node.name}'"
    return f"'{node.name}' ({node.op})"


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _refuse(what: str, layer: str | None = None, patch: str | None = None) -> ConvolutionalizeError:
    hint = WEIGHT_ONLY_HINT
    if layer:
        hint = hint.replace("NAME", layer)
        hint = hint[:-1] + (f" --patch {patch}`" if patch else "`")
    return ConvolutionalizeError(f"cannot convolutionalize: {what}; {hint}")


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as error:  # any failure of tracing is the model's, not ours
        raise UntraceableModelError(
            f"cannot convolutionalize: torch.fx cannot trace {type(model).__name__} "
            f"({type(error).__name__}: {_first_line(error)}); fcconv convolutionalize "
            f"needs an fx-traceable model; {WEIGHT_ONLY_HINT}"
        ) from None


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return torch.get_default_dtype(), torch.device("cpu")


def _infer_channels(gm: fx.GraphModule) -> int:
    for node in gm.graph.nodes:
        module = _module(gm, node)
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.in_channels
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return module.num_features
    raise SpecError(
        "cannot tell how many channels the model's input has (no Conv2d or "
        "BatchNorm2d found); pass in_channels= (--channels on the command line)"
    )


def _shape_propagate(gm: fx.GraphModule, example: torch.Tensor, model_name: str) -> None:
    try:
        with torch.no_grad(), _eval_mode(gm):
            ShapeProp(gm).propagate(example)
    except Exception as error:
        shape = "x".join(str(s) for s in example.shape)
        cause = error.__cause__ or error
        raise SpecError(
            f"{model_name} does not run on a {shape} input ({_first_line(cause)}); "
            "give the size it was trained at with --input HxW (and --channels C)"
        ) from None


def _plain(module: nn.Module | None, kinds: tuple[type[nn.Module], ...]) -> bool:
    """An instance of one of ``kinds`` that does not override its ``forward``."""
    if not isinstance(module, kinds):
        return False
    base = next(c for c in type(module).__mro__ if c in kinds)
    return type(module).forward is base.forward


def _is_pointwise(gm: fx.GraphModule, node: fx.Node, channels: int | None) -> bool:
    """True for element-wise nodes whose only tensor input is ``node.args[0]``."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    others = list(node.args[1:]) + list(node.kwargs.values())
    if any(isinstance(a, fx.Node) for a in others):
        return False
    if node.op == "call_module":
        module = _module(gm, node)
        if isinstance(module, nn.PReLU):
            # one slope, or one per feature: on the map the features are channels
            return module.num_parameters == 1 or module.num_parameters == channels
        return _plain(module, _POINTWISE_MODULES)
    if node.op == "call_function":
        if node.target in _SCALAR_OPERATORS:
            return len(node.args) == 2 and isinstance(node.args[1], (int, float))
        return node.target in _POINTWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in _POINTWISE_METHODS
    return False


def _softmax_dim(node: fx.Node) -> tuple[bool, Any]:
    """``(is_softmax, dim)`` for softmax-family function and method calls."""
    if node.op == "call_function" and node.target in _SOFTMAX_FUNCTIONS:
        pass
    elif node.op == "call_method" and node.target in _SOFTMAX_METHODS:
        pass
    else:
        return False, None
    if len(node.args) > 1:
        return True, node.args[1]
    return True, node.kwargs.get("dim")


def _is_flatten(node: fx.Node, gm: fx.GraphModule) -> bool:
    """A node that turns a 4-D ``[B, a, b, c]`` tensor into ``[B, a·b·c]``."""
    if node.op == "call_module":
        kind_ok = isinstance(_module(gm, node), nn.Flatten)
    elif node.op == "call_function":
        kind_ok = node.target in _FLATTEN_FUNCTIONS
    elif node.op == "call_method":
        kind_ok = node.target in _FLATTEN_METHODS
    else:
        kind_ok = False
    if not kind_ok or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    before, after = _shape(node.args[0]), _shape(node)
    return (
        before is not None
        and after is not None
        and len(before) == 4
        and len(after) == 2
        and after[0] == before[0]
        and after[1] == math.prod(before[1:])
    )


def _flatten_label(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{type(_module(gm, node)).__name__} '{node.target}'"
    if node.op == "call_method":
        return f".{node.target}()"
    return f"torch.{node.target.__name__}"


def _permutation_step(node: fx.Node) -> tuple[list[int], str] | None:
    """The axis map and text of a permute/transpose/contiguous node, else None."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op not in ("call_method", "call_function") or name not in (
        "permute",
        "transpose",
        "swapaxes",
        "swapdims",
        "contiguous",
    ):
        return None
    if node.op == "call_function" and node.target not in (
        torch.permute,
        torch.transpose,
        torch.swapaxes,
        torch.swapdims,
    ):
        return None
    rest = list(node.args[1:])
    if name == "contiguous":
        return [0, 1, 2, 3], "contiguous()"
    if name == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        dims = dims or node.kwargs.get("dims", [])
        if len(dims) != 4 or not all(isinstance(d, int) for d in dims):
            return None
        dims = [d % 4 for d in dims]
        return dims, f"permute({', '.join(map(str, dims))})"
    pair = rest or [node.kwargs.get("dim0"), node.kwargs.get("dim1")]
    if len(pair) != 2 or not all(isinstance(d, int) for d in pair):
        return None
    first, second = (d % 4 for d in pair)
    dims = [0, 1, 2, 3]
    dims[first], dims[second] = dims[second], dims[first]
    return dims, f"{name}({first}, {second})"


def _derive_order(flatten: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, str, str]:
    """Walk back from the flatten through permutes to the NCHW feature map.

    Returns the feature-map node, the order, and how the order was derived.
    """
    axes = [0, 1, 2, 3]  # flatten input position -> axis of the current node
    steps: list[str] = []
    current = flatten.args[0]
    while True:
        step = _permutation_step(current) if len(_shape(current) or ()) == 4 else None
        if step is None:
            break
        dims, text = step
        axes = [dims[a] for a in axes]
        if text != "contiguous()":
            steps.insert(0, text)
        current = current.args[0]
    if axes[0] != 0:
        raise _refuse(
            f"the permute before the flatten {_describe(gm, flatten)} moves the batch axis"
        )
    order = "".join("nchw"[a] for a in axes[1:])
    shape = _shape(current)
    if shape is None or len(shape) != 4:
        raise _refuse(f"the flatten {_describe(gm, flatten)} does not read a 4-D feature map")
    derived = " → ".join([*steps, _flatten_label(flatten, gm)])
    return current, order, derived


def _feeding_flatten(gm: fx.GraphModule, linear: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """The flatten that feeds ``linear`` through element-wise nodes, or a refusal."""
    pre_ops: list[fx.Node] = []
    current = linear.args[0]
    while (
        isinstance(current, fx.Node)
        and _is_pointwise(gm, current, channels=None)
        and len(current.users) == 1
    ):
        pre_ops.insert(0, current)
        current = current.args[0]
    if not isinstance(current, fx.Node) or not _is_flatten(current, gm):
        source = _describe(gm, current) if isinstance(current, fx.Node) else repr(current)
        raise _refuse(
            f"the head's first Linear {_describe(gm, linear)} is fed by {source}, not by a "
            "flatten of a 4-D feature map (nn.Flatten, torch.flatten, "
            "x.view(x.size(0), -1), reshape) directly before it",
            layer=str(linear.target),
        )
    if len(current.users) != 1:
        others = ", ".join(_describe(gm, u) for u in current.users)
        raise _refuse(
            f"the flatten {_describe(gm, current)} feeds several nodes ({others}), "
            "not only the head",
            layer=str(linear.target),
        )
    return current, pre_ops


def _classify(gm: fx.GraphModule, node: fx.Node, previous: fx.Node, channels: int) -> str | None:
    """The head role of ``node`` (consuming ``previous``), or None if it has no twin."""
    if not node.args or node.args[0] is not previous:
        return None
    module = _module(gm, node)
    if _plain(module, (nn.Linear,)):
        return "linear"
    if _plain(module, (nn.BatchNorm1d,)):
        return "batchnorm"
    if isinstance(module, _SOFTMAX_MODULES):
        return "softmax" if module.dim in (None, 1, -1) else None
    is_softmax, dim = _softmax_dim(node)
    if is_softmax:
        return "softmax" if dim in (None, 1, -1) else None
    if _is_pointwise(gm, node, channels):
        return "pointwise"
    return None


def _head_chain(gm: fx.GraphModule, linear: fx.Node, patch_text: str) -> list[tuple[fx.Node, str]]:
    """Follow the head from the first Linear to the model's output."""
    chain = [(linear, "linear")]
    current = linear
    channels = _module(gm, linear).out_features
    while True:
        users = list(current.users)
        if len(users) != 1:
            names = ", ".join(_describe(gm, u) for u in users)
            raise _refuse(
                f"{_describe(gm, current)} in the head feeds several nodes ({names}); "
                "the head must be a single chain of layers ending at the model's output",
                layer=str(linear.target),
                patch=patch_text,
            )
        following = users[0]
        if following.op == "output":
            if following.args[0] is not current:
                raise _refuse(
                    "the model returns more than the head's output (a tuple, list or "
                    "dict); fcconv convolutionalize handles models that return one tensor",
                    layer=str(linear.target),
                    patch=patch_text,
                )
            return chain
        kind = _classify(gm, following, current, channels)
        if kind is None or len(_shape(following) or ()) != 2:
            after = _describe(gm, current)
            raise _refuse(
                f"node {_describe(gm, following)} after {after} in the head has no "
                "convolutional twin (fcconv carries Linear, BatchNorm1d, activations, "
                "Dropout and Softmax/LogSoftmax over the class dimension)",
                layer=str(linear.target),
                patch=patch_text,
            )
        if kind == "linear":
            channels = _module(gm, following).out_features
        chain.append((following, kind))
        current = following


def _check_single_call_sites(gm: fx.GraphModule, chain: list[tuple[fx.Node, str]]) -> None:
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node, kind in chain:
        if kind != "pointwise" and node.op == "call_module" and calls[node.target] > 1:
            raise _refuse(
                f"module '{node.target}' is called at {calls[node.target]} places; "
                "converting it would change all of them"
            )


def _analyze_head(
    gm: fx.GraphModule, linear: fx.Node, in_channels: int, input_size: tuple[int, int]
) -> _Analysis:
    flatten, pre_ops = _feeding_flatten(gm, linear)
    source, order, order_from = _derive_order(flatten, gm)
    _, channels, height, width = _shape(source)
    patch = Patch(height, width, channels)
    spec = f"{patch} --order {order}" if order != "chw" else str(patch)
    if not _plain(_module(gm, linear), (nn.Linear,)):
        raise _refuse(
            f"{_describe(gm, linear)} overrides nn.Linear.forward, so its computation is "
            "not known to be a Linear layer's",
            layer=str(linear.target),
            patch=spec,
        )
    chain = _head_chain(gm, linear, spec)
    _check_single_call_sites(gm, chain)
    return _Analysis(
        gm=gm,
        in_channels=in_channels,
        input_size=input_size,
        source=source,
        flatten=flatten,
        order=order,
        order_from=order_from,
        patch=patch,
        pre_ops=pre_ops,
        chain=chain,
        pools=[],
        notes=[],
    )


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        for parent in current.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def _adaptive_pools(an: _Analysis) -> None:
    """Find the trunk's adaptive pools; those that are the identity here get removed."""
    gm = an.gm
    trunk = _ancestors(an.source) | {an.source}
    for node in gm.graph.nodes:
        if node not in trunk:
            continue
        module = _module(gm, node)
        is_pool = isinstance(module, _ADAPTIVE_POOL_MODULES) or (
            node.op == "call_function" and node.target in _ADAPTIVE_POOL_FUNCTIONS
        )
        if not is_pool or getattr(module, "return_indices", False):
            continue
        before, after = _shape(node.args[0]), _shape(node)
        if before is None or after is None:
            continue
        label = repr(module) if module is not None else f"{node.target.__name__}(…)"
        name = str(node.target) if module is not None else node.name
        if before[-2:] == after[-2:]:
            an.pools.append(node)
            an.notes.append(
                f"adaptive pool '{name}' ({label}) is the identity at the native "
                f"{after[-2]}x{after[-1]} feature map and was replaced by the identity, "
                "so that larger inputs keep their larger maps instead of being squeezed "
                f"back to {after[-2]}x{after[-1]}"
            )
        else:
            an.notes.append(
                f"adaptive pool '{name}' ({label}) maps every input to "
                f"{after[-2]}x{after[-1]}: it is not the identity at the native size, so "
                "the converted model's map stays 1x1 on larger inputs (global pooling, "
                "not a sliding window)"
            )


def _analyze(
    model: nn.Module,
    input_size: Sequence[int] | int,
    layers: Sequence[str] | None,
    in_channels: int | None,
) -> _Analysis:
    size = _size_pair(input_size, "input_size")
    gm = _trace(model)
    channels = in_channels or _infer_channels(gm)
    dtype, device = _model_dtype_device(model)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, channels, *size, generator=generator, dtype=dtype).to(device)
    _shape_propagate(gm, example, type(model).__name__)

    linears = [
        node
        for node in gm.graph.nodes
        if node.op == "call_module" and isinstance(_module(gm, node), nn.Linear)
    ]
    names = [str(node.target) for node in linears]
    if not linears:
        raise _refuse(f"{type(model).__name__} has no nn.Linear layer to convert")
    if layers:
        unknown = [name for name in layers if name not in names]
        if unknown:
            raise LayerError(
                f"no nn.Linear named {', '.join(repr(u) for u in unknown)} in "
                f"{type(model).__name__}; its Linear layers are: {', '.join(names)}"
            )
        start = next(node for node in linears if node.target in layers)
        an = _analyze_head(gm, start, channels, size)
        converted = {str(node.target) for node in an.linears}
        outside = [name for name in layers if name not in converted]
        if outside:
            head = " → ".join(str(n.target) for n in an.linears)
            raise LayerError(
                f"layer {', '.join(repr(o) for o in outside)} is not in the head that "
                f"starts at '{start.target}' (its Linear layers: {head}); name the "
                "Linear layers of one flatten → Linear → … → Linear head"
            )
    else:
        # The first Linear fed by a flatten whose head converts; failing that, the
        # most telling refusal: a head that reached its flatten beats one that did not.
        an = None
        no_flatten: ConvolutionalizeError | None = None
        bad_head: ConvolutionalizeError | None = None
        for node in linears:
            try:
                _feeding_flatten(gm, node)
            except ConvolutionalizeError as error:
                no_flatten = error
                continue
            try:
                an = _analyze_head(gm, node, channels, size)
                break
            except ConvolutionalizeError as error:
                bad_head = error
        if an is None:
            failure = bad_head or no_flatten
            assert failure is not None
            raise failure
    _adaptive_pools(an)
    return an


# ------------------------------------------------------------------ rewriting


def _set_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, attribute = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, attribute, module)


def _conv_like(linear: nn.Linear, patch: Patch, order: str, stride: tuple[int, int]) -> nn.Conv2d:
    weight = linear.weight
    # Built on the meta device: no random init to waste time on or to draw from the RNG.
    conv = nn.Conv2d(
        patch.channels,
        linear.out_features,
        kernel_size=(patch.height, patch.width),
        stride=stride,
        padding=0,
        bias=linear.bias is not None,
        device="meta",
        dtype=weight.dtype,
    ).to_empty(device=weight.device)
    with torch.no_grad():
        conv.weight.copy_(linear_weight_to_conv(weight.detach(), patch, order))
        if linear.bias is not None:
            conv.bias.copy_(linear.bias.detach())
    conv.weight.requires_grad_(weight.requires_grad)
    if linear.bias is not None:
        conv.bias.requires_grad_(linear.bias.requires_grad)
    conv.train(linear.training)
    return conv


def _batchnorm2d_like(bn: nn.BatchNorm1d) -> nn.BatchNorm2d:
    twin = nn.BatchNorm2d(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        device="meta",
        dtype=(bn.weight if bn.affine else bn.running_mean).dtype
        if (bn.affine or bn.track_running_stats)
        else None,
    )
    device = next((t.device for t in bn.state_dict().values()), torch.device("cpu"))
    twin = twin.to_empty(device=device)
    twin.load_state_dict(bn.state_dict())
    for name, parameter in bn.named_parameters():
        getattr(twin, name).requires_grad_(parameter.requires_grad)
    twin.train(bn.training)
    return twin


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
            conv = _conv_like(module, kernel, an.order if first else "chw", step)
            _set_submodule(gm, node.target, conv)
            line = conv2d_line(kernel, module.out_features, step, module.bias is not None)
            was = f"Linear({module.in_features} → {module.out_features})"
            now = (
                f"Conv2d({kernel.channels} → {module.out_features}, kernel "
                f"{kernel.height}x{kernel.width}, stride {step[0]}x{step[1]})"
            )
            changes.append(LayerChange(str(node.target), was, now, line))
        elif kind == "batchnorm":
            twin = _batchnorm2d_like(module)
            _set_submodule(gm, node.target, twin)
            changes.append(LayerChange(str(node.target), repr(module), repr(twin)))
        elif kind == "softmax":
            if module is not None:
                twin = type(module)(dim=1)
                _set_submodule(gm, node.target, twin)
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
            "the model is in training mode (Dropout and BatchNorm act differently); "
            "call model.eval() before exporting for inference"
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
    converted = an.gm
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
            then shares its parameters with the original.

    Returns:
        An ``fx.GraphModule`` whose output on a ``[B, C, H, W]`` input is the
        map ``[B, O, H', W']`` of the original head on every window.

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


# --------------------------------------------------------------- verification


def _output_size(model: nn.Module, channels: int, size: tuple[int, int]) -> tuple[int, int] | None:
    """The spatial size of ``model``'s output at ``size``, computed on meta tensors."""
    dtype, _ = _model_dtype_device(model)
    state = {name: t.to("meta") for name, t in model.named_parameters()}
    state.update({name: t.to("meta") for name, t in model.named_buffers()})
    probe = torch.empty(1, channels, *size, device="meta", dtype=dtype)
    try:
        out = torch.func.functional_call(model, state, (probe,))
    except Exception:  # a layer without meta support: no stride report, no crops
        return None
    return tuple(out.shape[-2:]) if out.dim() == 4 else None


def _guess(size: tuple[int, int], patch: Patch, stride: tuple[int, int]) -> tuple[int, int]:
    """The window stride of a trunk that divides its input evenly (VGG: 224 → 7)."""
    return (
        stride[0] * (size[0] // patch.height) if size[0] % patch.height == 0 else 0,
        stride[1] * (size[1] // patch.width) if size[1] % patch.width == 0 else 0,
    )


def window_stride(
    model: nn.Module,
    input_size: Sequence[int],
    in_channels: int,
    guess: Sequence[int] | None = None,
) -> tuple[int, int] | None:
    """How many input pixels apart the windows of a converted model's cells lie.

    Found by growing the input until the output map gains a row (a column),
    then another: the distance between the two jumps. ``None`` when the map
    does not grow (e.g. a global pool) or a layer cannot run on meta tensors.
    A ``guess`` (per axis) is confirmed with four probes instead of a search.

    >>> from torch import nn
    >>> window_stride(nn.Conv2d(3, 4, 8, stride=4), (8, 8), 3)
    (4, 4)
    """
    native = _size_pair(tuple(input_size), "input_size")
    base = _output_size(model, in_channels, native)
    if base is None:
        return None
    result = []
    for axis in (0, 1):

        def cells(extra: int, axis: int = axis) -> int:
            size = list(native)
            size[axis] += extra
            out = _output_size(model, in_channels, (size[0], size[1]))
            return -1 if out is None else out[axis]

        limit = 8 * native[axis]

        def first_reaching(count: int, cells=cells, limit=limit) -> int | None:
            low, high = 1, limit
            if cells(high) < count:
                return None
            while low < high:
                middle = (low + high) // 2
                if cells(middle) >= count:
                    high = middle
                else:
                    low = middle + 1
            return low

        if guess is not None and guess[axis] > 0:
            g = guess[axis]
            if (
                cells(g - 1) == base[axis]
                and cells(g) == base[axis] + 1
                and cells(2 * g - 1) == base[axis] + 1
                and cells(2 * g) == base[axis] + 2
            ):
                result.append(g)
                continue
        one = first_reaching(base[axis] + 1)
        two = first_reaching(base[axis] + 2) if one is not None else None
        if one is None or two is None:
            return None
        result.append(two - one)
    return result[0], result[1]


def _split(an: _Analysis) -> tuple[fx.GraphModule, fx.GraphModule]:
    """The trunk (input → feature map, identity pools bypassed) and the original head."""
    gm = an.gm
    keep = _ancestors(an.source) | {an.source}
    trunk_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    pools = set(an.pools)
    for node in gm.graph.nodes:
        if node not in keep:
            continue
        if node in pools:
            env[node] = env[node.args[0]]
            continue
        env[node] = trunk_graph.node_copy(node, lambda n: env[n])
    trunk_graph.output(env[an.source])
    head_graph = fx.Graph()
    head_env = {an.source: head_graph.placeholder("features")}
    for node in gm.graph.nodes:
        if node in keep or node.op == "placeholder":
            continue
        if node.op != "get_attr" and not all(n in head_env for n in node.all_input_nodes):
            continue
        head_env[node] = head_graph.node_copy(node, lambda n: head_env[n])
    trunk = fx.GraphModule(gm, trunk_graph, "Trunk")
    head = fx.GraphModule(gm, head_graph, "Head")
    return trunk, head


def _windows(
    features: torch.Tensor, patch: Patch, stride: tuple[int, int]
) -> tuple[torch.Tensor, int, int]:
    """Every ``kh × kw`` window of ``features``, batched: ``[B·P·Q, C, kh, kw]``."""
    batch, channels, height, width = features.shape
    rows = (height - patch.height) // stride[0] + 1
    cols = (width - patch.width) // stride[1] + 1
    cells = [
        features[
            :,
            :,
            p * stride[0] : p * stride[0] + patch.height,
            q * stride[1] : q * stride[1] + patch.width,
        ]
        for p in range(rows)
        for q in range(cols)
    ]
    stacked = torch.stack(cells, dim=1)
    return stacked.reshape(batch * rows * cols, channels, patch.height, patch.width), rows, cols


def head_on_windows(
    original: nn.Module,
    input_size: Sequence[int] | int,
    x: torch.Tensor,
    *,
    stride: Sequence[int] | int = 1,
    layers: Sequence[str] | None = None,
    in_channels: int | None = None,
) -> torch.Tensor:
    """The reference for a converted model: the original head on every window.

    Runs the original trunk (adaptive pools that are the identity at the
    native size bypassed) on ``x``, cuts every ``kh × kw`` window of its
    feature map at ``stride``, and applies the original head (permute,
    flatten, Linear, …) to each, in eval mode and without gradients.

    Returns:
        ``[B, O, P, Q]``: cell ``(p, q)`` is the head on window ``(p, q)``.
    """
    step = _size_pair(stride, "stride")
    with torch.no_grad(), _eval_mode(original):
        an = _analyze(original, input_size, layers, in_channels)
        trunk, head = _split(an)
        windows, rows, cols = _windows(trunk(x), an.patch, step)
        scores = head(windows)
    return scores.reshape(x.shape[0], rows, cols, -1).permute(0, 3, 1, 2)


def _padding_layers(trunk: fx.GraphModule) -> list[str]:
    found = []
    for name, module in trunk.named_modules():
        padding = getattr(module, "padding", 0)
        if isinstance(
            module,
            (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd),
        ):
            flat = (padding,) if isinstance(padding, (int, str)) else tuple(padding)
            if any(p not in (0, "valid") for p in flat):
                found.append(name)
    return found


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def verify_dense(
    original: nn.Module,
    converted: nn.Module,
    input_size: Sequence[int] | int,
    larger_size: Sequence[int] | int | None = None,
    *,
    stride: Sequence[int] | int | None = None,
    layers: Sequence[str] | None = None,
    in_channels: int | None = None,
    batch: int = 2,
    seed: int = 0,
    max_crops: int = 16,
    rtol: float = 1e-9,
) -> DenseCheck:
    """Prove ``converted`` computes the original head on every window, in float64.

    1. At ``input_size`` its output ``[B, O, 1, 1]`` equals the original's ``[B, O]``.
    2. At ``larger_size`` (default: one window step larger each way, a 2×2
       map) every cell equals the original head applied to the matching
       window of the trunk's feature map (:func:`head_on_windows`).

    Both within ``rtol · max(1, max|reference|)``: float64 rounding is far
    below that, a wrong order or weight is of the size of the output. Then,
    for information, the whole original model is run on up to ``max_crops``
    native-size crops at the window positions; a trunk that pads differs
    there, and the result says so in words.

    Args:
        original: the model before conversion (copied, never modified).
        converted: the model under test, e.g. from :func:`convolutionalize`.
        input_size: the native ``(H, W)``.
        larger_size: the larger ``(H, W)`` for the dense check.
        stride: the first conv's stride in feature-map cells; default: the one
            recorded by :func:`convolutionalize`, else 1.
        layers: as for :func:`convolutionalize`.
        in_channels: as for :func:`convolutionalize`.
        batch: inputs per check.
        seed: for the random inputs.
        max_crops: at most this many whole-model crops are run.
        rtol: the relative tolerance of the float64 judge.

    Returns:
        A :class:`DenseCheck`, truthy on pass.
    """
    native = _size_pair(input_size, "input_size")
    recorded = (
        getattr(converted, "meta", {}).get("fcconv", {}) if hasattr(converted, "meta") else {}
    )
    step = _size_pair(
        stride if stride is not None else tuple(recorded.get("stride", (1, 1))), "stride"
    )
    reference = copy.deepcopy(original).double().eval()
    candidate = copy.deepcopy(converted).double().eval()
    an = _analyze(reference, native, layers, in_channels or recorded.get("in_channels"))
    channels = an.in_channels
    trunk, head = _split(an)
    spacing = window_stride(candidate, native, channels, _guess(native, an.patch, step))
    if larger_size is None:
        grow = spacing if spacing is not None else native
        larger = (native[0] + grow[0], native[1] + grow[1])
    else:
        larger = _size_pair(larger_size, "larger_size")
    generator = torch.Generator().manual_seed(seed)
    problems: list[str] = []
    check = DenseCheck(
        native_size=native,
        larger_size=larger,
        map_size=None,
        native_max_abs_diff=None,
        dense_max_abs_diff=None,
        tolerance=0.0,
        window_stride=spacing,
        problems=problems,
    )
    with torch.no_grad():
        x = torch.randn(batch, channels, *native, generator=generator, dtype=torch.float64)
        expected = reference(x)
        got = candidate(x)
        tolerance = rtol * max(1.0, float(expected.abs().max()))
        if got.shape != (*expected.shape, 1, 1):
            problems.append(
                f"at the native size {native[0]}x{native[1]} the converted model gives "
                f"shape {tuple(got.shape)}, expected {(*expected.shape, 1, 1)}"
            )
        else:
            check.native_max_abs_diff = _max_abs(got.flatten(1), expected)
            if check.native_max_abs_diff > tolerance:
                problems.append(
                    f"at the native size the outputs differ by up to "
                    f"{check.native_max_abs_diff:.3g} (tolerance {tolerance:.3g})"
                )
        big = torch.randn(batch, channels, *larger, generator=generator, dtype=torch.float64)
        dense = candidate(big)
        features = trunk(big)
        windows, rows, cols = _windows(features, an.patch, step)
        wanted = head(windows).reshape(batch, rows, cols, -1).permute(0, 3, 1, 2)
        tolerance = max(tolerance, rtol * max(1.0, float(wanted.abs().max())))
        check.tolerance = tolerance
        check.map_size = (rows, cols)
        if dense.shape != wanted.shape:
            problems.append(
                f"at {larger[0]}x{larger[1]} the converted model gives a map of shape "
                f"{tuple(dense.shape)}, but the trunk's {features.shape[-2]}x"
                f"{features.shape[-1]} feature map holds {rows}x{cols} windows "
                f"(expected {tuple(wanted.shape)})"
            )
        else:
            check.dense_max_abs_diff = _max_abs(dense, wanted)
            if check.dense_max_abs_diff > tolerance:
                problems.append(
                    f"at {larger[0]}x{larger[1]} the map differs from the original head "
                    f"on each window by up to {check.dense_max_abs_diff:.3g} "
                    f"(tolerance {tolerance:.3g})"
                )
            _compare_crops(check, reference, big, dense, native, spacing, max_crops, trunk)
    return check


def _compare_crops(
    check: DenseCheck,
    reference: nn.Module,
    big: torch.Tensor,
    dense: torch.Tensor,
    native: tuple[int, int],
    spacing: tuple[int, int] | None,
    max_crops: int,
    trunk: fx.GraphModule,
) -> None:
    if spacing is None:
        check.crop_note = (
            "the whole original model was not run on crops: the map does not grow with "
            "the input (a global pool, see the notes) or the distance between windows "
            "could not be determined"
        )
        return
    height, width = big.shape[-2:]
    cells = [
        (p, q)
        for p in range(dense.shape[2])
        for q in range(dense.shape[3])
        if p * spacing[0] + native[0] <= height and q * spacing[1] + native[1] <= width
    ][:max_crops]
    if not cells:
        return
    crops = torch.cat(
        [
            big[
                :,
                :,
                p * spacing[0] : p * spacing[0] + native[0],
                q * spacing[1] : q * spacing[1] + native[1],
            ]
            for p, q in cells
        ]
    )
    scores = reference(crops).reshape(len(cells), big.shape[0], -1)
    expected = torch.stack([dense[:, :, p, q] for p, q in cells])
    check.crops_compared = len(cells)
    check.crop_max_abs_diff = _max_abs(scores, expected)
    where = (
        f"running the whole original model on each {native[0]}x{native[1]} crop "
        f"(windows {spacing[0]}x{spacing[1]} pixels apart)"
    )
    if check.crop_max_abs_diff <= check.tolerance:
        check.crop_note = f"{where} gives the same scores as the dense map"
        return
    padded = _padding_layers(trunk)
    if padded:
        shown = ", ".join(padded[:3]) + (", …" if len(padded) > 3 else "")
        check.crop_note = (
            f"{where} differs from the dense map by up to {check.crop_max_abs_diff:.3g}, "
            f"as expected: the trunk pads ({shown}), so a crop sees zeros at its own "
            "borders where the whole input has real pixels, and the cells near each "
            "crop's border differ; the dense map is the original head on every window "
            "of the whole input's feature map, as verified above"
        )
    else:
        check.crop_note = (
            f"{where} differs from the dense map by up to {check.crop_max_abs_diff:.3g}; "
            "the trunk does not pad, so a layer whose output depends on the input size "
            "(or pooling that does not align with the window stride) makes crops see "
            "other feature maps than the whole input"
        )


# ------------------------------------------------------------------- output


def _backed_size_oblivious() -> contextlib.AbstractContextManager[Any]:
    """Keep export from specializing sizes that are 1 in no example, e.g. a 1×1 map.

    ``torch.export`` adds ``size != 1`` guards in its contiguity checks when
    the example's sizes are not 1, which would reject the native size (a 1×1
    map). The size-oblivious setting is private torch configuration; where it
    is missing, export runs without it.
    """
    try:
        from torch.fx.experimental import _config as fx_config
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    if not hasattr(fx_config, "backed_size_oblivious"):
        return contextlib.nullcontext()
    return fx_config.patch(backed_size_oblivious=True)


def _finite(value: Any) -> int | None:
    """A sympy bound as an int, or None for torch's symbolic infinity."""
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None
    return number if abs(number) < 2**62 else None


def _input_ranges(
    program: torch.export.ExportedProgram,
) -> dict[str, tuple[int | None, int | None]]:
    user_input = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.name == user_input)
    ranges: dict[str, tuple[int | None, int | None]] = {}
    for label, size in zip(
        ("batch", "channels", "height", "width"), node.meta["val"].shape, strict=False
    ):
        if isinstance(size, torch.SymInt):
            bounds = program.range_constraints.get(size.node.expr)
            low = _finite(bounds.lower) if bounds is not None else None
            high = _finite(bounds.upper) if bounds is not None else None
            ranges[label] = (max(low or 1, 1), high)
        else:
            ranges[label] = (int(size), int(size))
    return ranges


def _probe_shapes(example: torch.Tensor, native: tuple[int, int] | None) -> list[tuple[int, ...]]:
    """Input shapes an exported program must accept: native (a 1×1 map), odd sizes, batch 1."""
    batch, channels, height, width = example.shape
    shapes = [tuple(example.shape), (1, channels, height + 1, width + 3)]
    if native is not None:
        shapes += [(1, channels, *native), (batch + 1, channels, native[0] + 1, native[1] + 2)]
    return list(dict.fromkeys(shapes))


def _rejected(
    program: torch.export.ExportedProgram,
    model: nn.Module,
    shapes: list[tuple[int, ...]],
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[list[tuple[int, ...]], float]:
    """The probe shapes the program refuses or gets wrong, and the largest difference."""
    runnable = program.module()
    generator = torch.Generator().manual_seed(1)
    rejected, largest = [], 0.0
    for shape in shapes:
        x = torch.randn(shape, generator=generator, dtype=dtype).to(device)
        try:
            got = runnable(x)
        except Exception:  # a guard of the program refused this shape
            rejected.append(shape)
            continue
        expected = model(x)
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-5, atol=1e-6):
            rejected.append(shape)
        elif got.numel():
            largest = max(largest, _max_abs(got, expected))
    return rejected, largest


def save_exported(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_size: Sequence[int] | int,
    *,
    in_channels: int | None = None,
    native_size: Sequence[int] | None = None,
    batch: int = 2,
    force: bool = False,
) -> ExportInfo:
    """Save ``model`` as a ``torch.export`` program with dynamic batch, height and width.

    The program loads with ``torch.export.load(path).module()`` in a process
    that has none of the model's code. Export needs an example input
    (``[batch, C, *example_size]``); the sizes the program accepts are found
    by export itself from the model's arithmetic (for a VGG-style net: any
    height and width at least the native size) and returned in
    :attr:`ExportInfo.ranges`.

    Export may add guards of its own (``size != 1`` for sizes that are not 1
    in the example, divisibility on some torch versions), so every candidate
    program is run on probe shapes (the example, the native size with its
    1×1 map, odd sizes, batch 1) against the model; the first that accepts
    them all is written, else the one that accepts most, and the note names
    the shapes it refuses. Candidates: dynamic shapes with size-oblivious
    reasoning, dynamic shapes without it, and the example's static shape.

    Args:
        model: the converted model (any ``nn.Module`` taking one NCHW tensor).
        path: the ``.pt2`` file to write.
        example_size: ``(H, W)`` of the example input; a size giving a map of
            at least 2×2 cells is best.
        in_channels: default: recorded by :func:`convolutionalize`.
        native_size: the native ``(H, W)``, probed; default: recorded.
        batch: the example's batch size.
        force: replace an existing file.

    The file is written atomically: a temporary file beside it, then a
    rename. An existing file is kept unless ``force``.
    """
    target = Path(path)
    check_output_path(target, force)
    size = _size_pair(example_size, "example_size")
    meta = getattr(model, "meta", None)
    recorded = meta.get("fcconv", {}) if isinstance(meta, dict) else {}
    channels = in_channels or recorded.get("in_channels")
    if channels is None:
        channels = _infer_channels(_trace(model))
    native = native_size or recorded.get("input_size")
    native = _size_pair(tuple(native), "native_size") if native else None
    dtype, device = _model_dtype_device(model)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(batch, channels, *size, generator=generator, dtype=dtype).to(device)
    shapes = _probe_shapes(example, native)
    dynamic = torch.export.Dim.DYNAMIC
    dims = ({0: dynamic, 2: dynamic, 3: dynamic},)
    candidates = [
        ("dynamic", _backed_size_oblivious, dims),
        ("dynamic", contextlib.nullcontext, dims),
        ("static", contextlib.nullcontext, None),
    ]
    best = None
    errors = []
    with _eval_mode(model), torch.no_grad():
        for kind, setting, dynamic_shapes in candidates:
            try:
                with setting():
                    program = torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes)
            except Exception as error:  # this kind of export failed: try the next
                errors.append(f"{kind} export failed ({_first_line(error)})")
                continue
            rejected, largest = _rejected(program, model, shapes, dtype, device)
            if best is None or len(rejected) < len(best[2]):
                best = (kind, program, rejected, largest)
            if not rejected:
                break
    if best is None:
        raise ConvolutionalizeError(
            f"torch.export cannot export the converted model: {'; '.join(errors)}"
        )
    kind, program, rejected, largest = best
    notes = []
    if kind == "static":
        notes.append(f"the program accepts only inputs of shape {tuple(example.shape)}")
    if rejected:
        shown = ", ".join("x".join(map(str, shape)) for shape in rejected)
        notes.append(f"the program refuses or mis-computes probe input(s) {shown}")
    ranges = _input_ranges(program)
    with atomic_output(target) as temporary, open(temporary, "wb") as handle:
        torch.export.save(program, handle)
    return ExportInfo(
        path=str(target),
        dynamic=kind == "dynamic",
        ranges=ranges,
        example_shape=tuple(example.shape),
        roundtrip_max_abs_diff=largest,
        probed_shapes=[s for s in shapes if s not in rejected],
        rejected_shapes=rejected,
        note="; ".join(notes),
    )


def save_state_dict(model: nn.Module, path: str | os.PathLike[str], *, force: bool = False) -> str:
    """Write the converted model's state dict (``.safetensors`` or torch pickle), atomically.

    Keys keep the original module names (``classifier.0.weight`` is now the
    4-D conv kernel), so a hand-written conv architecture loads it directly.
    """
    target = Path(path)
    check_output_path(target, force)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_output(target) as temporary:
        if target.suffix == ".safetensors":
            from safetensors.torch import save

            # bytes into the prepared file: it keeps the permissions atomic_output gave it
            temporary.write_bytes(save(state, metadata={"fcconv": "convolutionalize"}))
        else:
            torch.save(state, temporary)
    return str(target)


# ------------------------------------------------------------------- loading


def _import_factory(spec: str) -> Any:
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise ArchitectureError(
            f"malformed --arch {spec!r}: expected package.module:callable "
            "(e.g. fcconv.samples_models:tiny_vgg)"
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        # like `python -m`, let a factory from the working folder be found
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ArchitectureError(
            f"cannot import {module_name!r} for --arch {spec} ({_first_line(error)}); "
            "run from the folder that holds it or install its package"
        ) from None
    factory = module
    for part in attribute.split("."):
        if not hasattr(factory, part):
            raise ArchitectureError(
                f"module {module_name!r} has no attribute {attribute!r} (--arch {spec})"
            )
        factory = getattr(factory, part)
    if not callable(factory):
        raise ArchitectureError(f"--arch {spec} is not callable")
    return factory


def _build(spec: str) -> nn.Module:
    factory = _import_factory(spec)
    try:
        model = factory()
    except TypeError as error:
        raise ArchitectureError(
            f"--arch {spec} cannot be called without arguments ({_first_line(error)}); "
            "wrap it in a function that takes none"
        ) from None
    if not isinstance(model, nn.Module):
        raise ArchitectureError(f"--arch {spec} returned {type(model).__name__}, not an nn.Module")
    return model


def _strip_prefix(state: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    wanted = set(model.state_dict())
    if set(state) & wanted:
        return state
    for prefix in ("module.", "model."):
        if all(key.startswith(prefix) for key in state):
            return {key[len(prefix) :]: value for key, value in state.items()}
    return state


def _load_weights(model: nn.Module, state: dict[str, Any], source: str, spec: str) -> None:
    state = _strip_prefix(state, model)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {', '.join(result.missing_keys[:4])}")
        if result.unexpected_keys:
            parts.append(f"unexpected {', '.join(result.unexpected_keys[:4])}")
        raise CheckpointError(
            f"{source} does not fit --arch {spec}: {'; '.join(parts)}; check that the "
            "factory builds the architecture the weights were trained for"
        )


def load_model(
    source: str | os.PathLike[str], *, arch: str | None = None, trust_pickle: bool = False
) -> nn.Module:
    """Load the model to convolutionalize, in eval mode.

    With ``arch`` (``package.module:callable``) the callable builds the model
    and ``source`` provides its weights, read through the safe checkpoint
    loaders. Without it, ``source`` must be a pickled ``nn.Module``, which
    only ``trust_pickle=True`` may unpickle, since unpickling runs code.
    ``-`` reads the file from stdin.

    Raises:
        UnsafeCheckpointError: a pickled module without ``trust_pickle``.
        ArchitectureError: ``arch`` cannot be imported, called, or built.
        CheckpointError: unreadable file, or weights that do not fit ``arch``.
    """
    from fcconv.checkpoint import load_state_dict

    with _readable_path(source) as path:
        if arch is not None:
            model = _build(arch)
            _load_weights(
                model, load_state_dict(path, trust_pickle=trust_pickle), str(source), arch
            )
            return model.eval()
        if not trust_pickle:
            try:
                load_state_dict(path)
            except UnsafeCheckpointError:
                raise UnsafeCheckpointError(
                    f"{source} is a pickled model: loading it runs code from the file; "
                    "pass --trust-pickle if you trust where it came from, or give "
                    "--arch package.module:callable to build the model and load only "
                    "its weights"
                ) from None
            raise CheckpointError(
                f"{source} holds only weights, not a model; give --arch "
                "package.module:callable to build the architecture they belong to"
            )
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=False)
        except (ImportError, AttributeError) as error:
            raise CheckpointError(
                f"{source} refers to code that cannot be imported here "
                f"({_first_line(error)}); run where the model's classes are importable, "
                "or save a state dict and use --arch"
            ) from None
        except Exception as error:
            raise CheckpointError(f"cannot read {source}: {_first_line(error)}") from None
        if not isinstance(loaded, nn.Module):
            raise CheckpointError(
                f"{source} holds a {type(loaded).__name__}, not an nn.Module; give "
                "--arch package.module:callable to build the model for these weights"
            )
        return loaded.eval()


@contextlib.contextmanager
def _readable_path(source: str | os.PathLike[str]) -> Iterator[str]:
    if str(source) != "-":
        yield str(source)
        return
    data = sys.stdin.buffer.read()
    handle, name = tempfile.mkstemp(suffix=".pt")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        yield name
    finally:
        os.unlink(name)
