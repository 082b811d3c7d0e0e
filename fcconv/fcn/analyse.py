"""Reading the head off a traced model: which outputs, fed by which flatten, through which layers.

Every output the model returns (a tensor, or the leaves of a tuple, list or
dict, nested) is followed back to the flatten that feeds it. The nodes on
the way are the head: Linear layers, BatchNorm1d, element-wise layers and
softmax over the class dimension, each with one tensor input. The flatten,
and any ``permute``/``transpose`` before it, give the patch and the flatten
order. Branches that reach no output are dropped first, so a wrapper that
keeps one output of a multi-head model works; ``outputs`` keeps a subset.
What the rewrite cannot carry is refused here, naming the node, its line and
the weight-only way out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import fx, nn

from fcconv.errors import ConvolutionalizeError, LayerError, SpecError
from fcconv.fcn.ops import (
    ADAPTIVE_POOL_FUNCTIONS,
    ADAPTIVE_POOL_MODULES,
    SCALAR_OPERATORS,
    SOFTMAX_MODULES,
    ancestors,
    combines_tensors,
    concat_dim,
    describe,
    drops_unit_axes,
    feature_reduction,
    global_reduce,
    is_flatten,
    is_pointwise,
    module_of,
    permutation_step,
    plain,
    shape_of,
    softmax_dim,
)
from fcconv.fcn.trace import WEIGHT_ONLY_HINT, InputLayout, trace_model
from fcconv.fcn.usercode import at, stack_location
from fcconv.geometry import SPATIAL_AXES, PatchNd, kernel_axes

SINGLE_OUTPUT = "output"
"""The name of a model's output when it returns one tensor."""


HEAD_MODES = ("pool", "cam")
"""What a global pool before the head becomes: a pool over a native-size window at
stride 1 (``pool``), or nothing, the head then reading every feature cell (``cam``)."""


@dataclass(eq=False)
class FlattenSite:
    """Where the head starts: the feature map it reads, its patch and order.

    ``kind`` is ``flatten`` (a flatten of the whole map feeds the first Linear)
    or ``pool`` (a global pool of the map does; ``reduces`` are the pools,
    ``squeezes`` the flattens and squeezes of their ``[B, C, 1, 1]`` result,
    ``stage`` every node from the map to the pooled vector). ``window`` is the
    part of the feature map one cell of the dense map reads: the native map,
    or one feature cell for a class activation map (``head="cam"``).
    """

    node: fx.Node
    source: fx.Node
    order: str
    order_from: str
    patch: PatchNd
    kind: str = "flatten"
    reduces: dict[fx.Node, str] = field(default_factory=dict)
    squeezes: list[fx.Node] = field(default_factory=list)
    stage: list[fx.Node] = field(default_factory=list)
    window: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.window:
            self.window = tuple(self.patch.sizes)


@dataclass
class HeadOutput:
    """One output of the model, the head layers on its way and the flatten it starts at."""

    name: str
    node: fx.Node
    site: FlattenSite
    linears: list[fx.Node]


@dataclass
class Analysis:
    """Everything the rewrite and the checks need to know of a traced model."""

    gm: fx.GraphModule
    layout: InputLayout
    tracer: str
    sites: list[FlattenSite]
    head: dict[fx.Node, str]
    first_linears: set[fx.Node]
    outputs: list[HeadOutput]
    output_names: list[str]
    pools: list[fx.Node] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    head_mode: str = "pool"
    first_of: dict[fx.Node, FlattenSite] = field(default_factory=dict)

    @property
    def input_size(self) -> tuple[int, ...]:
        return self.layout.size

    @property
    def linears(self) -> list[fx.Node]:
        return [node for node, kind in self.head.items() if kind == "linear"]


def refuse(what: str, layer: str | None = None, patch: str | None = None) -> ConvolutionalizeError:
    """A refusal that ends with the weight-only way out, naming the layer if known."""
    hint = WEIGHT_ONLY_HINT
    if layer:
        hint = hint.replace("NAME", layer)
        hint = hint[:-1] + (f" {{patch}} {patch}`" if patch else "`")
    return ConvolutionalizeError(f"cannot convolutionalize: {what}; {hint}", layer=layer)


def where(node: fx.Node) -> str:
    """`` at model.py:12 (`code`)`` for a node that kept its stack trace."""
    return at(stack_location(node.meta.get("stack_trace")))


def size_tuple(value: Sequence[int] | int, what: str) -> tuple[int, ...]:
    """One to three positive sizes (``T``, ``(H, W)``, ``(D, H, W)``)."""
    sizes = (value,) if isinstance(value, int) else tuple(value)
    if not 1 <= len(sizes) <= 3 or not all(isinstance(v, int) and v > 0 for v in sizes):
        raise SpecError(f"{what} must be one to three positive integers, got {value!r}")
    return tuple(int(v) for v in sizes)


def stride_tuple(stride: Sequence[int] | int | None, ndim: int) -> tuple[int, ...]:
    """One stride per axis of an ``ndim``-D feature map; one number means every axis."""
    if stride is None:
        return (1,) * ndim
    values = (stride,) if isinstance(stride, int) else tuple(stride)
    if len(values) == 1:
        values = values * ndim
    if len(values) != ndim or not all(isinstance(v, int) and v > 0 for v in values):
        raise SpecError(
            f"stride must be one positive integer or {ndim} (one per axis of the feature "
            f"map), got {stride!r}"
        )
    return tuple(values)


# ------------------------------------------------------------------ outputs


def leaf_name(path: Sequence[Any]) -> str:
    """An output's name from its pytree path: ``0``, ``boxes``, ``out.landmarks``."""
    parts = []
    for key in path:
        attribute = next((a for a in ("key", "idx", "name") if hasattr(key, a)), None)
        parts.append(str(getattr(key, attribute)) if attribute else str(key))
    return ".".join(parts) or SINGLE_OUTPUT


def output_leaves(gm: fx.GraphModule) -> list[tuple[str, fx.Node]]:
    """``(name, node)`` for every tensor the model returns: ``0``, ``boxes``, ``out.landmarks``."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    leaves, _ = pytree.tree_flatten_with_path(output.args[0])
    named = []
    for path, leaf in leaves:
        if isinstance(leaf, fx.Node):
            named.append((leaf_name(path), leaf))
    return named


def _prune(structure: Any, keep: set[int], counter: list[int]) -> Any:
    """``structure`` with the leaves whose position is not in ``keep`` left out."""
    if isinstance(structure, (list, tuple)):
        kept = [_prune(item, keep, counter) for item in structure]
        kept = [item for item in kept if item is not _GONE]
        return (list if isinstance(structure, list) else tuple)(kept) if kept else _GONE
    if isinstance(structure, dict):
        kept = {k: _prune(v, keep, counter) for k, v in structure.items()}
        kept = {k: v for k, v in kept.items() if v is not _GONE}
        return type(structure)(kept) if kept else _GONE
    index = counter[0]
    counter[0] += 1
    return structure if index in keep else _GONE


_GONE = object()


def select_outputs(gm: fx.GraphModule, wanted: Sequence[str]) -> list[str]:
    """Keep only the ``wanted`` outputs (one: the bare tensor); drop what feeds the others.

    Returns the kept outputs' names in the order the pruned model returns them.
    """
    names = [name for name, _ in output_leaves(gm)]
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise LayerError(
            f"the model has no output {', '.join(repr(u) for u in unknown)}; its outputs "
            f"are: {', '.join(names)} (give them to {{outputs}})"
        )
    output = next(n for n in gm.graph.nodes if n.op == "output")
    leaves, _ = pytree.tree_flatten(output.args[0])
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, fx.Node)]
    keep = {positions[names.index(w)] for w in wanted}
    if len(keep) == 1:
        output.args = (leaves[next(iter(keep))],)
    else:
        output.args = (_prune(_plain_containers(output.args[0]), keep, [0]),)
    gm.graph.eliminate_dead_code()
    return [name for name in names if name in wanted]


def _plain_containers(structure: Any) -> Any:
    """fx's immutable containers as plain lists, tuples and dicts."""
    if isinstance(structure, dict):
        return {k: _plain_containers(v) for k, v in structure.items()}
    if isinstance(structure, tuple):  # a namedtuple's fields become a plain tuple
        return tuple(_plain_containers(v) for v in structure)
    if isinstance(structure, list):
        return [_plain_containers(v) for v in structure]
    return structure


# ------------------------------------------------------------------ the head


def tensor_operands(node: fx.Node) -> list[fx.Node]:
    """The graph tensors ``node`` reads (not sizes, not parameters)."""
    return [n for n in node.all_input_nodes if n.op != "get_attr" and shape_of(n) is not None]


def _two_d(node: Any) -> bool:
    return len(shape_of(node) or ()) == 2


def _classify(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The head role of ``node`` (an op on ``[B, N]`` vectors), or None if it has no twin."""
    if not _two_d(node) or not node.args:
        return None
    dim = concat_dim(node)
    if dim is not None:
        parts = node.args[0]
        return "concat" if dim in (1, -1) and all(_two_d(p) for p in parts) else None
    if combines_tensors(node):
        return "combine" if all(_two_d(a) for a in node.args) else None
    if node.op == "call_function" and node.target in SCALAR_OPERATORS:
        operand = [a for a in node.args if isinstance(a, fx.Node)]
        return "pointwise" if is_pointwise(gm, node, None) and _two_d(operand[0]) else None
    if not isinstance(node.args[0], fx.Node) or not _two_d(node.args[0]):
        return None
    features = (shape_of(node) or (0, 0))[1]
    module = module_of(gm, node)
    if plain(module, (nn.Linear,)):
        return "linear"
    if plain(module, (nn.BatchNorm1d,)):
        return "batchnorm"
    if plain(module, (nn.LayerNorm,)):
        return "layernorm" if tuple(module.normalized_shape) == (features,) else None
    if isinstance(module, SOFTMAX_MODULES):
        return "softmax" if module.dim in (None, 1, -1) else None
    is_softmax, dim = softmax_dim(node)
    if is_softmax:
        return "softmax" if dim in (None, 1, -1) else None
    if node.op == "call_function" and node.target is F.normalize:
        given = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 1)
        return "normalize" if given in (1, -1) else None
    if feature_reduction(node) is not None:
        return "reduce"
    if is_pointwise(gm, node, features):
        return "pointwise"
    return None


def _pool_stage(gm: fx.GraphModule, end: fx.Node) -> tuple[fx.Node, FlattenSite] | None:
    """A global pool of one ``[B, C, *map]`` map ending at ``end``: its map and its site.

    The stage holds the pools, the squeezes and flattens of their ``[B, C, 1, …]``
    results, and what combines them cell by cell (timm's ``0.5 * (avg + max)``,
    ``cat([avg, max], 1)``, a Dropout).
    """
    reduces: dict[fx.Node, str] = {}
    squeezes: list[fx.Node] = []
    stage: list[fx.Node] = []
    sources: set[fx.Node] = set()
    stack = [end]
    while stack:
        node = stack.pop()
        if node in stage:
            continue
        kind = global_reduce(gm, node)
        shape = shape_of(node)
        if kind is not None:
            reduces[node] = kind
            sources.add(node.args[0])
        elif shape is None or len(shape) < 2 or any(n != 1 for n in shape[2:]):
            return None
        elif drops_unit_axes(gm, node):
            squeezes.append(node)
            stack.append(node.args[0])
        elif (
            is_pointwise(gm, node, shape[1])
            or combines_tensors(node)
            or (concat_dim(node) is not None and concat_dim(node) % len(shape) == 1)
        ):
            stack.extend(tensor_operands(node))
        else:
            return None
        stage.append(node)
    if len(sources) != 1 or not reduces:
        return None
    source = next(iter(sources))
    shape = shape_of(source)
    patch = PatchNd(tuple(shape[2:]), shape[1])
    order = kernel_axes(len(shape) - 2)
    site = FlattenSite(end, source, order, "model", patch, "pool", reduces, squeezes, stage)
    return source, site


def _site_at(gm: fx.GraphModule, node: fx.Node, sites: dict[Any, FlattenSite]) -> Any:
    """The site the head starts at if ``node`` ends a flatten or a global pool, else None."""
    if not _two_d(node):
        return None
    pooled = _pool_stage(gm, node)
    if pooled is not None:
        source, site = pooled
        known = sites.get(("pool", source))
        if known is None:
            return sites.setdefault(("pool", source), site)
        for extra in site.stage:
            if extra not in known.stage:
                known.stage.append(extra)
        known.reduces.update(site.reduces)
        known.squeezes.extend(n for n in site.squeezes if n not in known.squeezes)
        return known
    if is_flatten(node, gm):
        return sites.get(node) or sites.setdefault(node, _site(gm, node))
    return None


def _walk(
    gm: fx.GraphModule, name: str, leaf: fx.Node, sites: dict[Any, FlattenSite]
) -> tuple[FlattenSite, dict[fx.Node, str]]:
    """Walk back from an output to where its head starts: that site and the head's nodes."""
    path: dict[fx.Node, str] = {}
    found: list[FlattenSite] = []
    stack, seen = [leaf], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        site = _site_at(gm, current, sites)
        if site is not None:
            if site not in found:
                found.append(site)
            continue
        kind = _classify(gm, current)
        if kind is None:
            raise _no_twin(gm, name, current, path)
        path[current] = kind
        stack.extend(tensor_operands(current))
    if len(found) != 1:
        shown = " and ".join(describe(gm, s.node) for s in found)
        raise refuse(f"the model's output {name!r} reads several feature maps ({shown})")
    site = found[0]
    path = {n: path[n] for n in gm.graph.nodes if n in path}
    linears = [node for node, kind in path.items() if kind == "linear"]
    if site.kind == "flatten":
        _check_flatten_head(gm, name, site, path, linears)
    return site, path


def _check_flatten_head(gm, name: str, site: FlattenSite, path: dict, linears: list) -> None:
    """Only element-wise layers may lie between a flatten and the first Linear(s).

    A node reading the flattened vector (directly or through such layers) is
    either a Linear, which becomes the map-sized conv, or element-wise; the
    output itself must come after a Linear.
    """
    if not linears:
        raise refuse(
            f"the model's output {name!r} is the flattened feature map "
            f"{describe(gm, site.source)}{where(site.source)} with no Linear layer after it"
        )
    before: set[fx.Node] = {site.node}
    for node, kind in path.items():
        if not any(operand in before for operand in tensor_operands(node)):
            continue
        if kind == "linear":
            continue
        if kind != "pointwise" or not is_pointwise(gm, node, None):
            following = [n for n in linears if node in ancestors(n)]
            if following:
                raise _fed_by(gm, following[0], node)
            raise refuse(
                f"{describe(gm, node)}{where(node)} in the head of output {name!r} reads the "
                f"flattened feature map {describe(gm, site.node)} itself; only a Linear "
                "(after element-wise layers at most) may read it, since only a Linear has "
                "a twin on every window"
            )
        before.add(node)
    leaf = next(reversed(path)) if path else site.node
    if leaf in before:
        raise refuse(
            f"the model's output {name!r} is the flattened feature map "
            f"{describe(gm, site.source)}{where(site.source)} with no Linear layer after it"
        )


def first_linears(path: dict[fx.Node, str]) -> list[fx.Node]:
    """The head's Linears that no other Linear of the head feeds."""
    linears = [node for node, kind in path.items() if kind == "linear"]
    return [n for n in linears if not ancestors(n) & set(linears)]


def _fed_by(gm: fx.GraphModule, linear: fx.Node, source: fx.Node) -> ConvolutionalizeError:
    return refuse(
        f"the head's first Linear {describe(gm, linear)} is fed by {describe(gm, source)}"
        f"{where(linear)}, not by a flatten of a feature map (nn.Flatten, torch.flatten, "
        "x.view(x.size(0), -1), reshape) or a global pool directly before it",
        layer=str(linear.target),
    )


def _flatten_above(node: fx.Node, gm: fx.GraphModule) -> bool:
    return any(is_flatten(parent, gm) or global_reduce(gm, parent) for parent in ancestors(node))


def _no_twin(gm: fx.GraphModule, name: str, node: fx.Node, path: dict) -> ConvolutionalizeError:
    linears = [n for n, kind in path.items() if kind == "linear"]
    in_head = _flatten_above(node, gm) and _two_d(node)
    if not in_head:
        if linears:
            return _fed_by(gm, linears[0], node)
        return refuse(
            f"the model's output {name!r} comes from {describe(gm, node)}{where(node)}, not "
            "from a flatten → Linear head or a global pool; keep only the head's outputs "
            "with {outputs}"
        )
    after = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    following = f" after {describe(gm, after)}" if after is not None else ""
    return refuse(
        f"node {describe(gm, node)}{following} in the head of output {name!r}{where(node)} "
        "does not act on each cell's feature vector alone, so it has no convolutional twin "
        "(fcconv carries Linear, BatchNorm1d, LayerNorm over the features, F.normalize, "
        "activations, PReLU, Dropout, Softmax/LogSoftmax over the features, element-wise "
        "sums and products of head tensors, concatenation along the features)",
        layer=str(linears[0].target) if linears else None,
    )


def _derive_order(flatten: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, str, str]:
    """Walk back from the flatten through permutes to the ``[B, C, *map]`` feature map."""
    rank = len(shape_of(flatten.args[0]))
    axes = list(range(rank))  # flatten input position -> axis of the current node
    steps: list[str] = []
    current = flatten.args[0]
    while len(shape_of(current) or ()) == rank:
        step = permutation_step(current, rank)
        if step is None:
            break
        dims, text = step
        axes = [dims[a] for a in axes]
        if text != "contiguous()":
            steps.insert(0, text)
        current = current.args[0]
    if axes[0] != 0:
        raise refuse(
            f"the permute before the flatten {describe(gm, flatten)}{where(flatten)} moves "
            "the batch axis"
        )
    letters = "nc" + SPATIAL_AXES[rank - 2]
    order = "".join(letters[a] for a in axes[1:])
    derived = " → ".join([*steps, _flatten_label(flatten, gm)])
    return current, order, derived


def _flatten_label(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{type(module_of(gm, node)).__name__} '{node.target}'"
    if node.op == "call_method":
        return f".{node.target}()"
    return f"{getattr(node.target, '__name__', node.target)}"


def _site(gm: fx.GraphModule, flatten: fx.Node) -> FlattenSite:
    source, order, order_from = _derive_order(flatten, gm)
    shape = shape_of(source)
    return FlattenSite(flatten, source, order, order_from, PatchNd(tuple(shape[2:]), shape[1]))


def reads_size(node: fx.Node) -> bool:
    """Whether ``node`` reads only sizes: ``x.shape``, ``x.size()`` (``x.view(x.shape[0], -1)``)."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return (
        node.op == "call_function"
        and node.target is getattr
        and len(node.args) > 1
        and node.args[1] in ("shape", "ndim")
    )


def _check_users(gm: fx.GraphModule, head: dict[fx.Node, str], sites: list[FlattenSite]) -> None:
    for site in sites:
        inner = set(site.stage)
        for end in site.stage if site.kind == "pool" else [site.node]:
            others = [
                u
                for u in end.users
                if u not in head and u not in inner and u.op != "output" and not reads_size(u)
            ]
            if others:
                shown = ", ".join(describe(gm, u) for u in others)
                what = "the flatten" if site.kind == "flatten" else "the global pool's"
                raise refuse(
                    f"{what} {describe(gm, end)}{where(end)} feeds {shown} besides the head"
                )
    for node in head:
        others = [u for u in node.users if u not in head and u.op != "output"]
        if others:
            shown = ", ".join(describe(gm, u) for u in others)
            raise refuse(
                f"{describe(gm, node)}{where(node)} in the head also feeds {shown}, which "
                "is not a head layer",
                layer=str(node.target) if node.op == "call_module" else None,
            )


def _check_single_call_sites(gm: fx.GraphModule, head: dict[fx.Node, str]) -> None:
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node, kind in head.items():
        if kind != "pointwise" and node.op == "call_module" and calls[node.target] > 1:
            raise refuse(
                f"module '{node.target}' is called at {calls[node.target]} places; "
                "converting it would change all of them"
            )
        if kind == "linear" and not plain(module_of(gm, node), (nn.Linear,)):
            raise refuse(
                f"{describe(gm, node)} overrides nn.Linear.forward, so its computation is "
                "not known to be a Linear layer's",
                layer=str(node.target),
            )


def _check_layers(gm: fx.GraphModule, layers: Sequence[str], head_linears: list[fx.Node]) -> None:
    model_linears = [name for name, m in gm.named_modules() if isinstance(m, nn.Linear)]
    unknown = [name for name in layers if name not in model_linears]
    if unknown:
        raise LayerError(
            f"no nn.Linear named {', '.join(repr(u) for u in unknown)} in the model; its "
            f"Linear layers are: {', '.join(model_linears)}"
        )
    converted = [str(n.target) for n in head_linears]
    outside = [name for name in layers if name not in converted]
    if outside:
        raise LayerError(
            f"layer {', '.join(repr(o) for o in outside)} is not in the head of the outputs "
            f"converted (its Linear layers: {', '.join(converted)}); name the Linear layers "
            "of a flatten → Linear → … head, or choose outputs with {outputs}"
        )


def trunk_nodes(an: Analysis) -> set[fx.Node]:
    """Every node the feature maps are computed from, the maps included."""
    nodes: set[fx.Node] = set()
    for site in an.sites:
        nodes |= ancestors(site.source) | {site.source}
    return nodes


def _adaptive_pools(an: Analysis) -> None:
    """Find the trunk's adaptive pools; those that are the identity here get removed."""
    gm = an.gm
    trunk = trunk_nodes(an)
    context: list[str] = []
    for node in gm.graph.nodes:
        if node not in trunk:
            continue
        module = module_of(gm, node)
        is_pool = isinstance(module, ADAPTIVE_POOL_MODULES) or (
            node.op == "call_function" and node.target in ADAPTIVE_POOL_FUNCTIONS
        )
        if global_reduce(gm, node) is not None:
            context.append(str(node.target) if module is not None else node.name)
            continue
        if not is_pool or getattr(module, "return_indices", False):
            continue
        before, after = shape_of(node.args[0]), shape_of(node)
        if before is None or after is None:
            continue
        label = repr(module) if module is not None else describe(gm, node)
        name = str(node.target) if module is not None else node.name
        shown = "x".join(map(str, after[2:]))
        if before[2:] == after[2:]:
            an.pools.append(node)
            an.notes.append(
                f"adaptive pool '{name}' ({label}) is the identity at the native {shown} "
                "feature map and was replaced by the identity, so that larger inputs keep "
                f"their larger maps instead of being squeezed back to {shown}"
            )
        else:
            an.notes.append(
                f"adaptive pool '{name}' ({label}) maps every input to {shown}: it is not "
                "the identity at the native size, so the converted model's map stays "
                f"{shown} on larger inputs (pooling to a fixed size, not a sliding window)"
            )
    if context:
        an.notes.append(
            f"the trunk pools whole maps ({_listed(context)}, e.g. squeeze-and-excitation): "
            "on a larger input each of them pools the whole input, so every cell also "
            "depends on the input outside its box and equals no crop of it"
        )


def _listed(names: list[str], most: int = 4) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def analyze(
    model: nn.Module,
    input_size: Sequence[int] | int,
    layers: Sequence[str] | None = None,
    in_channels: int | None = None,
    outputs: Sequence[str] | None = None,
    head: str | None = None,
) -> Analysis:
    """Trace ``model`` at ``input_size`` and read its head; refusals name node and line.

    ``head`` says what a global pool before the head becomes (:data:`HEAD_MODES`):
    ``pool`` (default) a pool over a native-size window of the feature map at
    stride 1, ``cam`` nothing (the head at every feature cell).
    """
    mode = head or "pool"
    if mode not in HEAD_MODES:
        raise SpecError(f"{{head}} must be one of {', '.join(HEAD_MODES)}, not {head!r}")
    size = size_tuple(input_size, "input_size")
    traced = trace_model(model, size, in_channels)
    gm = traced.gm
    leaves = output_leaves(gm)
    names = [name for name, _ in leaves]
    if outputs:
        kept = select_outputs(gm, list(outputs))
        leaves = list(zip(kept, [leaf for _, leaf in output_leaves(gm)], strict=True))
    gm.graph.eliminate_dead_code()
    found: dict[fx.Node, str] = {}
    sites: dict[Any, FlattenSite] = {}
    results: list[HeadOutput] = []
    first_of: dict[fx.Node, FlattenSite] = {}
    for name, leaf in leaves:
        site, path = _walk(gm, name, leaf, sites)
        found.update(path)
        linears = [node for node, kind in path.items() if kind == "linear"]
        for node in first_linears(path):
            first_of[node] = site
        results.append(HeadOutput(name, leaf, site, linears))
    if not results:
        raise refuse(f"{type(model).__name__} returns no tensor")
    ordered = {n: found[n] for n in gm.graph.nodes if n in found}
    unique = list(dict.fromkeys(sites.values()))
    _check_users(gm, ordered, unique)
    _check_single_call_sites(gm, ordered)
    _check_pool_maps(gm, unique, traced.layout)
    if mode == "cam":
        _as_cam(gm, unique)
    an = Analysis(
        gm=gm,
        layout=traced.layout,
        tracer=traced.tracer,
        sites=unique,
        head=ordered,
        first_linears=set(first_of),
        outputs=results,
        output_names=names,
        notes=list(traced.notes),
        head_mode=mode,
        first_of={n: s for n, s in first_of.items() if s.kind == "flatten"},
    )
    if layers:
        _check_layers(gm, layers, an.linears)
    _adaptive_pools(an)
    return an


def _check_pool_maps(gm: fx.GraphModule, sites: list[FlattenSite], layout: InputLayout) -> None:
    """A global pool slides only over a map with one axis per input axis."""
    for site in sites:
        if site.kind == "pool" and site.patch.ndim != layout.ndim:
            pool = next(iter(site.reduces))
            raise refuse(
                f"the global pool {describe(gm, pool)}{where(pool)} reads a map of "
                f"{site.patch.ndim} spatial axis(es) from a {layout.ndim}-D input "
                f"({describe(gm, site.source)}{where(site.source)} made it), so a window "
                "of it is no region of the input"
            )


def _as_cam(gm: fx.GraphModule, sites: list[FlattenSite]) -> None:
    """A class activation map reads one feature cell per map cell: only after a global pool."""
    flattens = [site for site in sites if site.kind == "flatten"]
    if flattens:
        site = flattens[0]
        raise SpecError(
            f"{{head}} cam needs a global pool before the head, but the head reads the "
            f"flattened feature map {describe(gm, site.node)}{where(site.node)}; leave "
            "{head} out"
        )
    for site in sites:
        site.window = (1,) * site.patch.ndim
