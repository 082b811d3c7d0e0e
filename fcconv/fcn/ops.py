"""The operations a traced head may hold, and small predicates over fx nodes.

The tables say which modules, functions and tensor methods are element-wise
(they commute with flattening), which are softmax, flatten or adaptive pools;
the predicates ask them about one node of a ``torch.fx`` graph.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

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


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


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
