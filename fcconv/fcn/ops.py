"""The operations a traced model may hold, and what each does to shapes and coordinates.

Every question about one fx node is answered here, whichever way the node
was written: a module call (``self.fc``), a function (``F.pad``), a tensor
method (``x.flatten(1)``) or an ATen call from a ``torch.export`` graph
(``aten.max_pool2d.default``). The head asks which nodes are element-wise,
softmax, flatten or permute; the trunk asks which are sliding windows
(convs, pools, pads) and which move axes around.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten

# Element-wise layers commute with flattening, so they can stay where they are:
# on a [B, N] vector or on the [B, N, *map] map they compute the same cells.
POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
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
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
)

POINTWISE_FUNCTIONS: frozenset[Any] = frozenset(
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

POINTWISE_METHODS = frozenset(
    {"relu", "sigmoid", "tanh", "exp", "abs", "clamp", "contiguous", "neg", "float", "double"}
)

SCALAR_OPERATORS = frozenset(
    {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.mul}
)

_ATEN_IDENTITIES = frozenset({aten.dropout.default, aten.contiguous.default, aten.clone.default})

SOFTMAX_MODULES = (nn.Softmax, nn.LogSoftmax, nn.Softmin)

_SOFTMAX_FUNCTIONS = frozenset(
    {
        torch.softmax,
        torch.log_softmax,
        F.softmax,
        F.log_softmax,
        F.softmin,
        aten.softmax.int,
        aten._softmax.default,
        aten.log_softmax.int,
        aten._log_softmax.default,
    }
)

_SOFTMAX_METHODS = frozenset({"softmax", "log_softmax"})

_FLATTEN_FUNCTIONS = frozenset(
    {
        torch.flatten,
        torch.reshape,
        aten.view.default,
        aten.reshape.default,
        aten._unsafe_view.default,
        aten.flatten.using_ints,
    }
)

_FLATTEN_METHODS = frozenset({"flatten", "view", "reshape"})

ADAPTIVE_POOL_MODULES = (
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)

ADAPTIVE_POOL_FUNCTIONS = frozenset(
    {
        F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d,
        F.adaptive_avg_pool3d,
        F.adaptive_max_pool1d,
        F.adaptive_max_pool2d,
        F.adaptive_max_pool3d,
        aten.adaptive_avg_pool1d.default,
        aten.adaptive_avg_pool2d.default,
        aten.adaptive_avg_pool3d.default,
        aten._adaptive_avg_pool2d.default,
    }
)

_ADAPTIVE_MAX_FUNCTIONS = frozenset(
    {F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d}
)

_MEANS = frozenset({torch.mean, aten.mean.dim})
_MAXES = frozenset({torch.amax, aten.amax.default})


def _reduced_dims(node: fx.Node) -> list[int] | None:
    """The dims a ``mean``/``amax`` call reduces over, as written (None: not given)."""
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if isinstance(dims, int):
        return [dims]
    if isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims):
        return list(dims)
    return None


def global_reduce(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """``"avg"`` or ``"max"`` for a pool of a ``[B, C, *map]`` map over all of its map, else None.

    ``AdaptiveAvgPool2d(1)``, ``AdaptiveMaxPool2d((1, 1))``, ``F.adaptive_avg_pool2d(x, 1)``,
    ``x.mean((2, 3))`` (keepdim or not), ``x.amax((-2, -1))`` and their 1-D and 3-D forms:
    each cell of the result is one pool over the whole map.
    """
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    before, after = shape_of(node.args[0]), shape_of(node)
    if before is None or after is None or not 3 <= len(before) <= 5:
        return None
    if tuple(after[:2]) != tuple(before[:2]) or any(n != 1 for n in after[2:]):
        return None
    module = module_of(gm, node)
    if module is not None:
        if isinstance(module, nn.modules.pooling._AdaptiveAvgPoolNd):
            return "avg" if plain(module, ADAPTIVE_POOL_MODULES) else None
        if isinstance(module, nn.modules.pooling._AdaptiveMaxPoolNd):
            plain_max = plain(module, ADAPTIVE_POOL_MODULES) and not module.return_indices
            return "max" if plain_max else None
        return None
    if node.op == "call_function" and node.target in ADAPTIVE_POOL_FUNCTIONS:
        if node.target in _ADAPTIVE_MAX_FUNCTIONS:
            indices = node.args[2] if len(node.args) > 2 else node.kwargs.get("return_indices")
            return None if indices else "max"
        return "avg"
    if node.op == "call_method" and node.target in ("mean", "amax"):
        kind = "avg" if node.target == "mean" else "max"
    elif node.op == "call_function" and node.target in _MEANS | _MAXES:
        kind = "avg" if node.target in _MEANS else "max"
    else:
        return None
    dims = _reduced_dims(node)
    rank = len(before)
    if dims is None or sorted(d % rank for d in dims) != list(range(2, rank)):
        return None
    return kind


_UNIT_AXIS_FUNCTIONS = frozenset(
    {
        torch.squeeze,
        torch.flatten,
        torch.reshape,
        operator.getitem,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.squeeze.default,
        aten.view.default,
        aten.reshape.default,
        aten._unsafe_view.default,
        aten.flatten.using_ints,
        aten.select.int,
    }
)
_UNIT_AXIS_METHODS = frozenset({"squeeze", "flatten", "view", "reshape", "__getitem__"})


def drops_unit_axes(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A squeeze, flatten, view or index that only removes a ``[B, C, 1, …]`` map's unit axes."""
    if node.op == "call_module":
        kind_ok = isinstance(module_of(gm, node), nn.Flatten)
    elif node.op == "call_function":
        kind_ok = node.target in _UNIT_AXIS_FUNCTIONS
    elif node.op == "call_method":
        kind_ok = node.target in _UNIT_AXIS_METHODS
    else:
        kind_ok = False
    if not kind_ok or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    before, after = shape_of(node.args[0]), shape_of(node)
    if before is None or after is None or len(before) < 3 or len(after) < 2:
        return False
    return (
        tuple(after[:2]) == tuple(before[:2])
        and len(after) < len(before)
        and all(n == 1 for n in before[2:])
        and all(n == 1 for n in after[2:])
    )


ELEMENTWISE_BINARY_FUNCTIONS = frozenset(
    {
        operator.add,
        operator.sub,
        operator.mul,
        operator.truediv,
        torch.add,
        torch.sub,
        torch.mul,
        torch.div,
        torch.maximum,
        torch.minimum,
    }
)
_ELEMENTWISE_BINARY_METHODS = frozenset({"add", "sub", "mul", "div", "maximum", "minimum"})


def combines_tensors(node: fx.Node) -> bool:
    """An element-wise ``a + b``, ``a * b``, … whose operands are all tensors of the graph."""
    if node.op == "call_function":
        kind_ok = node.target in ELEMENTWISE_BINARY_FUNCTIONS
    elif node.op == "call_method":
        kind_ok = node.target in _ELEMENTWISE_BINARY_METHODS
    else:
        kind_ok = False
    if not kind_ok or len(node.args) != 2 or node.kwargs:
        return False
    operands = list(node.args)
    return all(
        isinstance(a, fx.Node) and a.op != "get_attr" and shape_of(a) is not None for a in operands
    )


def concat_dim(node: fx.Node) -> int | None:
    """The dim of a ``torch.cat`` of graph tensors, else None."""
    if not (
        node.op == "call_function" and node.target in (torch.cat, torch.concat, aten.cat.default)
    ):
        return None
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    if not isinstance(parts, (list, tuple)) or not all(isinstance(p, fx.Node) for p in parts):
        return None
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim if isinstance(dim, int) else None


# Reductions over the feature axis that keep it (``x.norm(dim=1, keepdim=True)``): per
# cell on a map. Name -> position of ``dim`` and of ``keepdim`` in the call's args.
_FEATURE_REDUCTIONS: dict[str, tuple[int, int]] = {
    "sum": (1, 2),
    "mean": (1, 2),
    "amax": (1, 2),
    "amin": (1, 2),
    "logsumexp": (1, 2),
    "norm": (2, 3),
}
_REDUCTION_FUNCTIONS = {
    torch.sum: "sum",
    torch.mean: "mean",
    torch.amax: "amax",
    torch.amin: "amin",
    torch.logsumexp: "logsumexp",
    torch.norm: "norm",
}


def feature_reduction(node: fx.Node) -> int | None:
    """The position of ``dim`` in a keepdim reduction over the last axis of a 2-D tensor."""
    if node.op == "call_method":
        name = node.target if node.target in _FEATURE_REDUCTIONS else None
    elif node.op == "call_function":
        name = _REDUCTION_FUNCTIONS.get(node.target)
    else:
        name = None
    if name is None:
        return None
    dim_at, keep_at = _FEATURE_REDUCTIONS[name]
    values = dict(enumerate(node.args))
    dim = values.get(dim_at, node.kwargs.get("dim"))
    keepdim = values.get(keep_at, node.kwargs.get("keepdim", False))
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    if dim not in (1, -1) or keepdim is not True:
        return None
    return dim_at


# Layers that keep every cell where it is: the trunk's geometry passes through them.
_IN_PLACE_MODULES: tuple[type[nn.Module], ...] = (
    *POINTWISE_MODULES,
    nn.PReLU,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def shape_of(node: Any) -> tuple[int, ...] | None:
    """The shape recorded at the native size (``fcconv.fcn.trace.record_shapes``)."""
    return node.meta.get("fcconv_shape") if isinstance(node, fx.Node) else None


def plain(module: nn.Module | None, kinds: tuple[type[nn.Module], ...]) -> bool:
    """An instance of one of ``kinds`` that does not override its ``forward``."""
    if not isinstance(module, kinds):
        return False
    base = next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn."))
    return type(module).forward is base.forward


def _aten(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload)


def _reach(node: fx.Node, step: Any) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        for neighbour in step(stack.pop()):
            if neighbour not in seen:
                seen.add(neighbour)
                stack.append(neighbour)
    return seen


def ancestors(node: fx.Node) -> set[fx.Node]:
    """Every node ``node`` is computed from (not itself)."""
    return _reach(node, lambda n: n.all_input_nodes)


def descendants(node: fx.Node) -> set[fx.Node]:
    """Every node computed from ``node`` (not itself)."""
    return _reach(node, lambda n: n.users)


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The nodes ``node`` reads that carry tensors (not sizes, not parameters)."""
    return [
        n
        for n in node.all_input_nodes
        if n.op != "get_attr" and (shape_of(n) is not None or n.op == "placeholder")
    ]


def is_pointwise(gm: fx.GraphModule, node: fx.Node, channels: int | None) -> bool:
    """True for element-wise nodes whose only tensor input is ``node.args[0]``.

    A number with a tensor (``0.5 * x``, ``x - 1``) counts, in either order.
    """
    if (
        node.op == "call_function"
        and node.target in SCALAR_OPERATORS
        and len(node.args) == 2
        and not node.kwargs
    ):
        kinds = sorted(isinstance(a, fx.Node) for a in node.args)
        numbers = [a for a in node.args if isinstance(a, (int, float))]
        return kinds == [False, True] and len(numbers) == 1
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    others = list(node.args[1:]) + list(node.kwargs.values())
    if any(isinstance(a, fx.Node) for a in others):
        return False
    if node.op == "call_module":
        module = module_of(gm, node)
        if isinstance(module, nn.PReLU):
            # one slope, or one per feature: on the map the features are channels
            return module.num_parameters == 1 or module.num_parameters == channels
        return plain(module, POINTWISE_MODULES)
    if node.op == "call_function":
        if node.target in SCALAR_OPERATORS:
            return len(node.args) == 2 and isinstance(node.args[1], (int, float))
        if _aten(node.target):
            return node.target in _ATEN_IDENTITIES or torch.Tag.pointwise in node.target.tags
        return node.target in POINTWISE_FUNCTIONS
    if node.op == "call_method":
        return node.target in POINTWISE_METHODS
    return False


def softmax_dim(node: fx.Node) -> tuple[bool, Any]:
    """``(is_softmax, dim)`` for softmax-family function and method calls."""
    function = node.op == "call_function" and node.target in _SOFTMAX_FUNCTIONS
    method = node.op == "call_method" and node.target in _SOFTMAX_METHODS
    if not (function or method):
        return False, None
    if len(node.args) > 1:
        return True, node.args[1]
    return True, node.kwargs.get("dim")


def is_flatten(node: fx.Node, gm: fx.GraphModule) -> bool:
    """A node that turns a ``[B, a, b, …]`` tensor (3-D to 5-D) into ``[B, a·b·…]``."""
    if node.op == "call_module":
        kind_ok = isinstance(module_of(gm, node), nn.Flatten)
    elif node.op == "call_function":
        kind_ok = node.target in _FLATTEN_FUNCTIONS
    elif node.op == "call_method":
        kind_ok = node.target in _FLATTEN_METHODS
    else:
        kind_ok = False
    if not kind_ok or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    before, after = shape_of(node.args[0]), shape_of(node)
    return (
        before is not None
        and after is not None
        and 3 <= len(before) <= 5
        and len(after) == 2
        and after[0] == before[0]
        and after[1] == math.prod(before[1:])
    )


_PERMUTE_NAMES = ("permute", "transpose", "swapaxes", "swapdims", "contiguous", "clone")
_PERMUTE_FUNCTIONS = {
    torch.permute: "permute",
    torch.transpose: "transpose",
    torch.swapaxes: "transpose",
    torch.swapdims: "transpose",
    aten.permute.default: "permute",
    aten.transpose.int: "transpose",
    aten.contiguous.default: "contiguous",
    aten.clone.default: "contiguous",
}


def permutation_step(node: fx.Node, rank: int) -> tuple[list[int], str] | None:
    """The axis map and text of a permute/transpose/contiguous node, else None."""
    if node.op == "call_method" and node.target in _PERMUTE_NAMES:
        name = {"swapaxes": "transpose", "swapdims": "transpose", "clone": "contiguous"}.get(
            node.target, node.target
        )
    elif node.op == "call_function" and node.target in _PERMUTE_FUNCTIONS:
        name = _PERMUTE_FUNCTIONS[node.target]
    else:
        return None
    rest = list(node.args[1:])
    identity = list(range(rank))
    if name == "contiguous":
        return identity, "contiguous()"
    if name == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        dims = dims or node.kwargs.get("dims", [])
        if len(dims) != rank or not all(isinstance(d, int) for d in dims):
            return None
        dims = [d % rank for d in dims]
        return dims, f"permute({', '.join(map(str, dims))})"
    pair = rest or [node.kwargs.get("dim0"), node.kwargs.get("dim1")]
    if len(pair) != 2 or not all(isinstance(d, int) for d in pair):
        return None
    first, second = (d % rank for d in pair)
    identity[first], identity[second] = identity[second], identity[first]
    return identity, f"transpose({first}, {second})"


# ------------------------------------------------------------------ trunk geometry


@dataclass(frozen=True)
class Window:
    """A sliding window over the last ``len(kernel)`` axes: a conv, a pool or a pad.

    ``padding`` is ``(before, after)`` per axis (negative: the layer crops).
    """

    kind: str  # "conv", "pool" or "pad"
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    ceil_mode: bool = False


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_MAX_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode")
_AVG_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "ceil_mode")
_PAD_ARGS = ("input", "pad", "mode", "value")

_WINDOW_FUNCTIONS: dict[Any, tuple[str, tuple[str, ...]]] = {
    **{f: ("conv", _CONV_ARGS) for f in (F.conv1d, F.conv2d, F.conv3d)},
    **{
        f: ("pool", _MAX_POOL_ARGS)
        for f in (F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool1d, torch.max_pool2d)
    },
    **{f: ("pool", _AVG_POOL_ARGS) for f in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)},
    torch.avg_pool1d: ("pool", _AVG_POOL_ARGS),
    F.pad: ("pad", _PAD_ARGS),
}

_ATEN_WINDOWS = {
    "conv1d": "conv",
    "conv2d": "conv",
    "conv3d": "conv",
    "max_pool1d": "pool",
    "max_pool2d": "pool",
    "max_pool3d": "pool",
    "max_pool2d_with_indices": "pool",
    "max_pool3d_with_indices": "pool",
    "avg_pool1d": "pool",
    "avg_pool2d": "pool",
    "avg_pool3d": "pool",
    "pad": "pad",
    "constant_pad_nd": "pad",
}

_ATEN_NAMES = {"self": "input", "pad": "pad"}


def _arguments(node: fx.Node, names: Sequence[str]) -> dict[str, Any]:
    values = dict(zip(names, node.args, strict=False))
    values.update(node.kwargs)
    return values


def _aten_arguments(node: fx.Node) -> dict[str, Any]:
    schema = node.target._schema
    values: dict[str, Any] = {}
    for index, argument in enumerate(schema.arguments):
        name = _ATEN_NAMES.get(argument.name, argument.name)
        if index < len(node.args):
            values[name] = node.args[index]
        elif argument.name in node.kwargs:
            values[name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            values[name] = argument.default_value
    return values


def _tuple(value: Any, length: int, default: int) -> tuple[int, ...] | None:
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return (default,) * length
    if isinstance(value, int):
        return (value,) * length
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        values = tuple(value)
        return values * length if len(values) == 1 else values
    return None


def _conv_padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> Any:
    if padding == "valid":
        return ((0, 0),) * len(kernel)
    if padding == "same":  # PyTorch puts the odd pixel after, as below
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return tuple((t // 2, t - t // 2) for t in totals)
    symmetric = _tuple(padding, len(kernel), 0)
    return None if symmetric is None else tuple((p, p) for p in symmetric)


def _module_window(module: nn.Module) -> Window | None:
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        kernel = tuple(module.kernel_size)
        padding = _conv_padding(module.padding, kernel, tuple(module.dilation))
        return Window("conv", kernel, tuple(module.stride), padding, tuple(module.dilation))
    if isinstance(module, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)):
        dims = {"1d": 1, "2d": 2, "3d": 3}.get(type(module).__name__[-2:].lower(), 2)
        return _pool_window(
            dims,
            module.kernel_size,
            module.stride,
            module.padding,
            getattr(module, "dilation", 1),
            module.ceil_mode,
        )
    return None


def _pool_window(
    dims: int, kernel: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: Any
) -> Window | None:
    k = _tuple(kernel, dims, 1)
    s = _tuple(stride, dims, 0)
    p = _tuple(padding, dims, 0)
    d = _tuple(dilation, dims, 1)
    if None in (k, s, p, d) or not isinstance(ceil_mode, bool):
        return None
    s = tuple(si or ki for si, ki in zip(s, k, strict=True))  # stride None: the kernel
    return Window("pool", k, s, tuple((x, x) for x in p), d, ceil_mode)


def _pad_window(pad: Any) -> Window | None:
    if (
        not isinstance(pad, (list, tuple))
        or len(pad) % 2
        or not all(isinstance(p, int) for p in pad)
    ):
        return None
    # F.pad lists (before, after) pairs from the last axis backwards
    pairs = tuple((pad[i], pad[i + 1]) for i in range(0, len(pad), 2))[::-1]
    ones = (1,) * len(pairs)
    return Window("pad", ones, ones, pairs, ones)


def _dims_of(node: fx.Node) -> int | None:
    shape = shape_of(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    return None if shape is None else len(shape) - 2


def sliding_window(gm: fx.GraphModule, node: fx.Node) -> Window | None:
    """The node as a conv, pool or pad over its input's last axes, if it is one."""
    if node.op == "call_module":
        return _module_window(module_of(gm, node))
    if node.op != "call_function":
        return None
    if _aten(node.target):
        kind = _ATEN_WINDOWS.get(node.target._schema.name.removeprefix("aten::"))
        values = _aten_arguments(node) if kind else {}
    elif node.target in _WINDOW_FUNCTIONS:
        kind, names = _WINDOW_FUNCTIONS[node.target]
        values = _arguments(node, names)
    else:
        return None
    if kind is None:
        return None
    if kind == "pad":
        return _pad_window(values.get("pad"))
    dims = _dims_of(node)
    if dims is None or dims < 1:
        return None
    if kind == "pool":
        return _pool_window(
            dims,
            values.get("kernel_size"),
            values.get("stride"),
            values.get("padding", 0),
            values.get("dilation", 1),
            values.get("ceil_mode", False),
        )
    weight = values.get("weight")
    kernel_shape = shape_of(weight) or _attribute_shape(gm, weight)
    if kernel_shape is None:
        return None
    kernel = tuple(kernel_shape[2:])
    dilation = _tuple(values.get("dilation", 1), dims, 1)
    stride = _tuple(values.get("stride", 1), dims, 1)
    if dilation is None or stride is None:
        return None
    padding = _conv_padding(values.get("padding", 0), kernel, dilation)
    return None if padding is None else Window("conv", kernel, stride, padding, dilation)


def _attribute_shape(gm: fx.GraphModule, node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value: Any = gm
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


_CELL_METHODS = frozenset({"add", "mul", "sub", "div", "to", "type", "clone"})


def keeps_cells(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Layers that leave every cell where it is (activations, norms, element-wise math)."""
    if node.op == "call_module":
        module = module_of(gm, node)
        return plain(module, _IN_PLACE_MODULES) or isinstance(module, nn.PReLU)
    if node.op == "call_function":
        if node.target in SCALAR_OPERATORS or node.target in POINTWISE_FUNCTIONS:
            return True
        if _aten(node.target):
            name = node.target._schema.name.removeprefix("aten::")
            return (
                node.target in _ATEN_IDENTITIES
                or torch.Tag.pointwise in node.target.tags
                or name in ("batch_norm", "_native_batch_norm_legit_no_training", "prelu")
            )
        return node.target in (F.batch_norm, F.instance_norm, F.prelu, operator.neg)
    if node.op == "call_method":
        return node.target in POINTWISE_METHODS or node.target in _CELL_METHODS
    return False


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """A node as a user recognises it: its module name and type, or its function."""
    if node.op == "call_module":
        return f"'{node.target}' ({type(module_of(gm, node)).__name__})"
    if node.op == "call_function":
        target = node.target
        if _aten(target):
            return f"'{node.name}' ({target})"
        owner = getattr(target, "__module__", None) or ""
        owner = {
            "torch._C._VariableFunctions": "torch",
            "torch._C._nn": "torch.nn.functional",
            "_operator": "operator",
        }.get(owner, owner)
        name = getattr(target, "__name__", str(target))
        return f"'{node.name}' ({owner + '.' if owner else ''}{name})"
    if node.op == "call_method":
        return f"'{node.name}' (Tensor.{node.target})"
    if node.op == "placeholder":
        return f"the model input '{node.name}'"
    return f"'{node.name}' ({node.op})"
