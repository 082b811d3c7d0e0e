"""Tracing a classifier and reading its head off the trace.

The model is traced with ``torch.fx`` and run once at its native size to
learn the shapes. The flatten that feeds the first Linear, and any
``permute``/``transpose`` before it, give the patch and the flatten order;
the chain of layers from that Linear to the output is the head. What the
rewrite cannot carry is refused here, naming the node and the weight-only
way out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fcconv.errors import ConvolutionalizeError, LayerError, SpecError, UntraceableModelError
from fcconv.fcn.ops import (
    _ADAPTIVE_POOL_FUNCTIONS,
    _ADAPTIVE_POOL_MODULES,
    _SOFTMAX_MODULES,
    _is_flatten,
    _is_pointwise,
    _module,
    _permutation_step,
    _plain,
    _shape,
    _softmax_dim,
)
from fcconv.geometry import Patch

WEIGHT_ONLY_HINT = "for weight-only conversion use `fcconv convert CKPT {layers} NAME`"


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


def _refuse(what: str, layer: str | None = None, patch: str | None = None) -> ConvolutionalizeError:
    hint = WEIGHT_ONLY_HINT
    if layer:
        hint = hint.replace("NAME", layer)
        hint = hint[:-1] + (f" {{patch}} {patch}`" if patch else "`")
    return ConvolutionalizeError(f"cannot convolutionalize: {what}; {hint}", layer=layer)


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
        "BatchNorm2d found); give them with {channels}"
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
            "give the size it was trained at with {input_size} HxW (and {channels} C)"
        ) from None


def _flatten_label(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{type(_module(gm, node)).__name__} '{node.target}'"
    if node.op == "call_method":
        return f".{node.target}()"
    return f"torch.{node.target.__name__}"


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
    spec = f"{patch} {{order}} {order}" if order != "chw" else str(patch)
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
