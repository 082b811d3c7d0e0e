"""Verifying a converted model in float64: the original head on every window, and the crops.

The reference cuts the original model into its trunk and its head(s), runs
each head on every window of its trunk's feature map, and compares every
cell of every output. Then it counts which cells also equal the whole
original model run on their native-size crop, runs a sample of both kinds,
and warns when no interior cell does.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from fcconv.errors import NotDenseError, SpecError
from fcconv.fcn.analyse import (
    Analysis,
    analyze,
    leaf_name,
    size_tuple,
    stride_tuple,
    trunk_nodes,
    where,
)
from fcconv.fcn.cells import CropPlan, OutputCells, crop_plan, output_cells, trunk_geometry
from fcconv.fcn.float64 import Float64Weights
from fcconv.fcn.ops import describe, shape_of
from fcconv.fcn.results import CropAccount, DenseCheck, OutputCheck
from fcconv.fcn.trace import model_dtype_device, running_eval
from fcconv.fcn.usercode import running_user_code, stack_location
from fcconv.progress import phased
from fcconv.verify.judge import Comparison, compare

RULE = "model-float64"
"""The judge's rule for a converted model checked in float64 (:mod:`fcconv.verify.judge`)."""


def _split(an: Analysis) -> tuple[fx.GraphModule, list[fx.GraphModule]]:
    """The trunk (input → every feature map, identity pools bypassed) and one head per map."""
    gm = an.gm
    keep = trunk_nodes(an)
    pools = set(an.pools)
    trunk_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node not in keep:
            continue
        if node in pools:
            env[node] = env[node.args[0]]
            continue
        env[node] = trunk_graph.node_copy(node, lambda n: env[n])
    trunk_graph.output(tuple(env[site.source] for site in an.sites))
    heads = [_head(an, site, keep) for site in an.sites]
    return fx.GraphModule(gm, trunk_graph, "Trunk"), heads


def _head(an: Analysis, site: Any, trunk: set[fx.Node]) -> fx.GraphModule:
    """The original head from one feature map (a placeholder) to its outputs."""
    graph = fx.Graph()
    env = {site.source: graph.placeholder("features")}
    for node in an.gm.graph.nodes:
        if node in trunk or node.op in ("placeholder", "output"):
            continue
        if (node is site.node and site.kind == "flatten") or node in site.squeezes:
            # the flatten as such: a traced view may read the batch size off the model's
            # input (torch.export), which the batch of windows does not have
            shape = (-1, *shape_of(node)[1:])
            env[node] = graph.call_function(torch.reshape, (env[node.args[0]], shape))
            continue
        if node.op != "get_attr" and not all(n in env for n in node.all_input_nodes):
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output([env[o.node] for o in an.outputs if o.site is site])
    return fx.GraphModule(an.gm, graph, "Head")


def windows(
    features: torch.Tensor, kernel: Sequence[int], stride: Sequence[int]
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Every ``kernel``-sized window of ``[B, C, *map]``, batched: ``[B·cells, C, *kernel]``."""
    batch, channels = features.shape[:2]
    ndim = len(kernel)
    unfolded = features
    for axis, (k, s) in enumerate(zip(kernel, stride, strict=True)):
        unfolded = unfolded.unfold(2 + axis, k, s)
    counts = tuple(unfolded.shape[2 : 2 + ndim])
    order = (0, *range(2, 2 + ndim), 1, *range(2 + ndim, 2 + 2 * ndim))
    cut = unfolded.permute(order).reshape(batch * math.prod(counts), channels, *kernel)
    return cut, counts


WINDOW_BYTES = 64 * 2**20
"""Windows cut from a feature map at once for the reference head (float64 bytes)."""
CROP_BATCH = 4
"""Native-size crops run through the original model at once by the crop account."""


def _head_maps(
    an: Analysis, trunk: fx.GraphModule, heads: list[fx.GraphModule], x: torch.Tensor, stride
) -> dict[str, torch.Tensor]:
    """The original head(s) on every window: ``name → [B, O, *cells]``.

    The windows are cut and run in batches of at most :data:`WINDOW_BYTES`,
    so a map of many cells (a stitched map's reference) never holds every
    window at once.
    """
    features = trunk(x)
    maps = {}
    for site, head, feature in zip(an.sites, heads, features, strict=True):
        names = [o.name for o in an.outputs if o.site is site]
        parts: list[list[torch.Tensor]] = [[] for _ in names]
        counts = window_counts(feature, site.window, stride)
        for cut in window_batches(feature, site.window, stride):
            for part, scores in zip(parts, head(cut), strict=True):
                part.append(scores)
        for name, part in zip(names, parts, strict=True):
            grid = torch.cat(part).reshape(x.shape[0], *counts, -1)
            maps[name] = grid.permute(0, grid.dim() - 1, *range(1, grid.dim() - 1))
    return maps


def window_counts(
    features: torch.Tensor, kernel: Sequence[int], stride: Sequence[int]
) -> tuple[int, ...]:
    """How many ``kernel``-sized windows fit along each axis of ``[B, C, *map]``."""
    sizes = features.shape[2:]
    return tuple((n - k) // s + 1 for n, k, s in zip(sizes, kernel, stride, strict=True))


def window_batches(
    features: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], limit: int = WINDOW_BYTES
) -> Iterator[torch.Tensor]:
    """:func:`windows` in batches of at most ``limit`` bytes, in the same order."""
    channels = features.shape[1]
    ndim = len(kernel)
    unfolded = features
    for axis, (k, s) in enumerate(zip(kernel, stride, strict=True)):
        unfolded = unfolded.unfold(2 + axis, k, s)
    order = (0, *range(2, 2 + ndim), 1, *range(2 + ndim, 2 + 2 * ndim))
    every = unfolded.permute(order).flatten(0, ndim)  # a view: [B·cells, C, *kernel]
    one = channels * math.prod(kernel) * features.element_size()
    step = max(1, limit // max(1, one))
    for start in range(0, every.shape[0], step):
        yield every[start : start + step].reshape(-1, channels, *kernel)


def head_on_windows(
    original: nn.Module,
    input_size: Sequence[int] | int,
    x: torch.Tensor,
    *,
    stride: Sequence[int] | int = 1,
    layers: Sequence[str] | None = None,
    in_channels: int | None = None,
    outputs: Sequence[str] | None = None,
    head: str | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The reference for a converted model: the original head on every window.

    Runs the original trunk (adaptive pools that are the identity at the
    native size bypassed) on ``x``, cuts every window of its feature map at
    ``stride``, and applies the original head (permute, flatten, Linear, …)
    to each, in eval mode and without gradients. With ``head="cam"`` the
    windows are single feature cells: the head on each cell's feature vector.

    Returns:
        ``[B, O, *cells]`` for a model with one output, else a dict from each
        output's name to its map.
    """
    with torch.no_grad(), running_eval(original):
        an = analyze(original, input_size, layers, in_channels, outputs, head)
        step = stride_tuple(stride, an.sites[0].patch.ndim)
        trunk, heads = _split(an)
        maps = _head_maps(an, trunk, heads, x, step)
    return next(iter(maps.values())) if len(maps) == 1 else maps


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def _named(structure: Any) -> dict[str, torch.Tensor]:
    """The tensors of a model's output by name, as :func:`output_leaves` names them."""
    leaves, _ = pytree.tree_flatten_with_path(structure)
    return {leaf_name(path): leaf for path, leaf in leaves if isinstance(leaf, torch.Tensor)}


def _dense_leaves(output: Any) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def _larger(native: tuple[int, ...], cells: list[OutputCells]) -> tuple[int, ...]:
    """Two window steps past the native size: a map of 3 cells per axis, one interior."""
    known = next((c.cells for c in cells if c.cells is not None), None)
    if known is None:
        return tuple(2 * n for n in native)
    return tuple(n + 2 * s for n, s in zip(native, known.stride, strict=True))


@phased("checking every cell")
def verify_dense(
    original: nn.Module,
    converted: nn.Module,
    input_size: Sequence[int] | int,
    larger_size: Sequence[int] | int | None = None,
    *,
    stride: Sequence[int] | int | None = None,
    layers: Sequence[str] | None = None,
    in_channels: int | None = None,
    outputs: Sequence[str] | None = None,
    batch: int = 2,
    seed: int = 0,
    max_crops: int = 16,
    rule: str = RULE,
) -> DenseCheck:
    """Prove ``converted`` computes the original head(s) on every window, in float64.

    1. At ``input_size`` each output ``[B, O, 1, …]`` equals the original's ``[B, O]``.
    2. At ``larger_size`` (default: two window steps larger along each axis,
       a map of 3 cells per axis) every cell of every output equals the
       original head applied to the matching window of the trunk's feature
       map.

    Both judged by ``rule`` (:mod:`fcconv.verify.judge`; default
    ``model-float64``: within ``1e-9 · max|reference|`` of each output, no
    absolute floor): float64 rounding is far below that, a wrong order or
    weight is of the size of the output, and an output too small to judge
    (all zeros) is not verified. (A map
    at a finer stride, :class:`~fcconv.fcn.stride.StitchedMap`, is checked by
    :func:`~fcconv.fcn.stride.verify_output_stride` against shifted runs.) Then
    the crop account: which cells equal the whole original model run on
    their native-size crop (their receptive field never meets padding, a
    pool's padding or a partial ``ceil_mode`` window), checked on up to
    ``max_crops`` of them and of the others; a warning when no interior
    cell is crop-exact.

    Args:
        original: the model before conversion (copied, never modified).
        converted: the model under test, e.g. from :func:`convolutionalize`.
        input_size: the native size (``T``, ``(H, W)`` or ``(D, H, W)``).
        larger_size: the larger size for the dense check.
        stride: the first convs' stride in feature-map cells; default: the one
            recorded by :func:`convolutionalize`, else 1.
        layers, in_channels: as for :func:`convolutionalize`.
        outputs: the outputs the converted model kept; default: as recorded.
        batch: inputs per check.
        seed: for the random inputs and the sample of crops.
        max_crops: at most this many crops of each kind are run per output.
        rule: the name of the judge's rule for every comparison.

    Returns:
        A :class:`DenseCheck`, truthy on pass.
    """
    own_check = getattr(type(converted), "verify_against", None)
    if own_check is not None:  # a map at a finer stride (fcn.stride.StitchedMap) checks itself
        return own_check(
            converted,
            original,
            input_size,
            larger_size,
            layers=layers,
            in_channels=in_channels,
            outputs=outputs,
            batch=batch,
            seed=seed,
            max_crops=max_crops,
            rule=rule,
        )
    native = size_tuple(input_size, "input_size")
    recorded = getattr(converted, "meta", {}).get("fcconv", {})
    kept = outputs if outputs is not None else recorded.get("selected")
    reference, candidate = original, converted  # run in float64 by Float64Weights, not copied
    channels = in_channels or recorded.get("in_channels")
    an = analyze(reference, native, layers, channels, kept, recorded.get("head"))
    native = an.layout.size  # one number for a 2-D model means a square
    ndim = an.sites[0].patch.ndim
    step = stride_tuple(stride if stride is not None else recorded.get("stride"), ndim)
    geometry = trunk_geometry(an)
    cells = output_cells(an, geometry, step)
    plan = crop_plan(an, geometry)
    larger = size_tuple(larger_size, "larger_size") if larger_size else _larger(native, cells)
    check = DenseCheck(native_size=native, larger_size=larger, rule=rule)
    check.outputs = [OutputCheck(o.name) for o in an.outputs]
    generator = torch.Generator().manual_seed(seed)
    layout = an.layout
    _, device = model_dtype_device(reference)
    with torch.no_grad(), running_eval(reference), running_eval(candidate), Float64Weights():
        x = layout.example(batch, dtype=torch.float64, device=device, generator=generator)
        with running_user_code("the original model's forward"):
            expected = _named(reference(x))
        got = _dense_leaves(candidate(x))
        trunk, heads = _split(an)
        if an.head_mode == "cam":  # a map at the native size too: every cell, as below
            wanted = _head_maps(an, trunk, heads, x, step)
            _compare_dense(check, got, wanted, check.native_size, "native")
        else:
            _compare_native(check, expected, got)
        big = layout.example(
            batch, size=larger, dtype=torch.float64, device=device, generator=generator
        )
        dense = _dense_leaves(candidate(big))
        wanted = _head_maps(an, trunk, heads, big, step)
        _compare_dense(check, dense, wanted)
        refuse_single_cell(check, trunk, partial(_example, layout, batch, device, generator))
        if not check.problems and an.head_mode == "cam":
            _account_cam(check, dense)
        elif not check.problems:
            _account_crops(check, reference, big, dense, cells, plan, native, max_crops, seed)
    return check


def judge_output(
    check: DenseCheck,
    result: OutputCheck,
    what: str,
    got: torch.Tensor,
    expected: torch.Tensor,
    where: str,
    against: str = "the original head on each window",
) -> Comparison:
    """One output compared through the judge under the check's rule; a failure is a problem."""
    found = compare(got, expected, check.rule)
    result.comparisons[what] = found
    if not found.judged:
        check.problems.append(f"output {result.name!r} {where}: {found.summary()}")
    elif not found.passed:
        check.problems.append(
            f"output {result.name!r} {where} differs from {against}: {found.summary()}"
        )
    return found


def refuse_single_cell(
    check: DenseCheck, trunk: fx.GraphModule, example: Callable[[tuple[int, ...]], torch.Tensor]
) -> None:
    """A dense program must be dense: never verify a map of one cell on the check input.

    A map of one cell on the check input proves nothing about other windows.
    When the trunk's feature maps keep their size as the input doubles (a
    global pool), the map is one cell on *every* input: the model is
    refused, naming the layer that collapses the maps and its ``file:line``.
    Otherwise the check input was too small to hold a second window, and a
    larger one is asked for. ``example(size)`` makes an input of that size.

    Raises:
        NotDenseError: the maps are one cell whatever the input.
        SpecError: the check size holds one window only.
    """
    sizes = [o.map_size for o in check.outputs if o.map_size is not None]
    if not sizes or any(math.prod(size) != 1 for size in sizes):
        return
    native = check.native_size
    doubled = tuple(2 * n for n in native)
    collapsing, grown = _collapsing_node(trunk, example(native), example(doubled))
    if grown:
        raise SpecError(
            f"the check input {_sizes(check.larger_size)} holds one window of the converted "
            "model only; give a larger {check_size} (the default is two window steps past "
            "the native size)"
        )
    what = (
        f"{describe(trunk, collapsing)}{where(collapsing)} makes"
        if collapsing is not None
        else "the trunk makes"
    )
    location = None if collapsing is None else stack_location(collapsing.meta.get("stack_trace"))
    raise NotDenseError(
        f"cannot convolutionalize: {what} every feature map 1x1 whatever the input's size "
        f"({_sizes(native)} and {_sizes(doubled)} alike), so the converted model's map is one "
        "cell on every input: not a dense map; make the pooling a sliding window over "
        "native-size windows (or convert the head's weights only with fcconv convert)",
        layer=None if collapsing is None else _layer_name(collapsing),
        where=None if location is None else location[0],
    )


def _example(layout: Any, batch: int, device: Any, generator: Any, size: tuple[int, ...]):
    """A float64 input of ``size`` (the guard's probes)."""
    return layout.example(batch, size=size, dtype=torch.float64, device=device, generator=generator)


def _layer_name(node: fx.Node) -> str:
    """A module's qualified name, else the node's (``adaptive_avg_pool2d``)."""
    return str(node.target) if node.op == "call_module" else node.name


def _sizes(size: Sequence[int]) -> str:
    return "x".join(map(str, size))


class _Shapes(fx.Interpreter):
    """Runs a graph and keeps the shape of every tensor a node returns."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if isinstance(value, torch.Tensor):
            self.shapes[n] = tuple(value.shape)
        return value


def _collapsing_node(
    trunk: fx.GraphModule, small: torch.Tensor, big: torch.Tensor
) -> tuple[fx.Node | None, bool]:
    """The first node whose input grows with the model's input while its output does not,
    and whether the trunk's feature maps grow at all."""
    runs = []
    for x in (small, big):
        interpreter = _Shapes(trunk)
        with running_user_code("the original model's forward"):
            maps = interpreter.run(x)
        runs.append((interpreter.shapes, _shapes_of(maps)))
    (before, maps_before), (after, maps_after) = runs
    if maps_before != maps_after:
        return None, True
    for node in trunk.graph.nodes:
        if node not in before or node not in after or before[node] != after[node]:
            continue
        if any(i in before and before[i] != after.get(i) for i in node.all_input_nodes):
            return node, False
    return None, False


def _shapes_of(maps: Any) -> list[tuple[int, ...]]:
    return [tuple(m.shape) for m in pytree.tree_leaves(maps) if isinstance(m, torch.Tensor)]


def _compare_native(check: DenseCheck, expected, got) -> None:
    shown = "x".join(map(str, check.native_size))
    for result, tensor in zip(check.outputs, got, strict=False):
        reference = expected[result.name]
        cells = tensor.shape[2:]
        if tensor.shape[:2] != reference.shape or math.prod(cells) != 1:
            check.problems.append(
                f"output {result.name!r} at the native size {shown} has shape "
                f"{tuple(tensor.shape)}, expected {tuple(reference.shape)} and one cell"
            )
            continue
        found = judge_output(
            check, result, "native", tensor.reshape(reference.shape), reference,
            f"at the native size {shown}", "the original model",
        )  # fmt: skip
        result.native_max_abs_diff = found.max_abs_diff
    if len(got) != len(check.outputs):
        check.problems.append(
            f"the converted model returns {len(got)} tensors, expected {len(check.outputs)}"
        )


def _compare_dense(
    check: DenseCheck, dense, wanted, size: tuple[int, ...] = (), what: str = "dense"
) -> None:
    """Every cell against the original head on its window (``what``: the comparison's name)."""
    shown = "x".join(map(str, size or check.larger_size))
    for result, tensor in zip(check.outputs, dense, strict=False):
        reference = wanted[result.name]
        result.map_size = tuple(reference.shape[2:])
        if tensor.shape != reference.shape:
            check.problems.append(
                f"output {result.name!r} at {shown} has shape {tuple(tensor.shape)}, but the "
                f"trunk's feature map holds windows for {tuple(reference.shape)}"
            )
            continue
        found = judge_output(check, result, what, tensor, reference, f"at {shown}")
        if what == "native":
            result.native_max_abs_diff = found.max_abs_diff
        else:
            result.dense_max_abs_diff = found.max_abs_diff


def _cell_kinds(
    tensor: torch.Tensor, cells: OutputCells, plan: CropPlan, native, total, phases=None
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """The map's cells (one index per input axis) that equal their crop, and the others."""
    geometry = cells.cells
    counts = [tensor.shape[axis] for axis in cells.map_axes]
    phases = phases or (1,) * len(counts)
    exact, other = [], []
    for index in _grid(counts):
        fits = all(
            exact_along(plan, a, i, native[a], total[a], geometry.stride[a], phases[a])
            for a, i in enumerate(index)
        )
        (exact if fits else other).append(index)
    return exact, other


def exact_along(
    plan: CropPlan, axis: int, index: int, native: int, total: int, step: int, phases: int = 1
) -> bool:
    """Whether cell ``index`` along ``axis`` of a map at ``step`` equals the model on its crop.

    A map stitched from ``phases`` runs (:mod:`fcconv.fcn.stride`) takes the
    cell from run ``k = index % phases``: a dense map at stride
    ``step·phases`` over the input's tail from ``k·step`` (``total − k·step``
    positions). The cell equals its crop when cell ``index // phases`` of that
    run does (:meth:`~fcconv.fcn.cells.CropPlan.exact_along`): its crop lies
    inside the run, and touches the run's borders that the model reads past.
    """
    run = total - (index % phases) * step
    return plan.exact_along(axis, index // phases, native, run, step * phases)


def _grid(counts: list[int]) -> list[tuple[int, ...]]:
    grid: list[tuple[int, ...]] = [()]
    for count in counts:
        grid = [g + (i,) for g in grid for i in range(count)]
    return grid


def _crop_fits(index, geometry, native, total) -> bool:
    return all(
        i * s + n <= t for i, s, n, t in zip(index, geometry.stride, native, total, strict=True)
    )


def _account_crops(
    check, reference, big, dense, cells, plan, native, max_crops, seed, phases=None
) -> None:
    total = check.larger_size
    accounts: list[CropAccount] = []
    sampler = random.Random(seed)
    needed: dict[str, tuple[list, list]] = {}
    for result, tensor, cell_map in zip(check.outputs, dense, cells, strict=True):
        if cell_map.cells is None or plan is None:
            reason = cell_map.unknown or "the trunk's geometry is unknown"
            result.crops = CropAccount(math.prod(tensor.shape[2:]), None, reasons=[reason])
            continue
        exact, other = _cell_kinds(tensor, cell_map, plan, native, total, phases)
        others = [i for i in other if _crop_fits(i, cell_map.cells, native, total)]
        picked = (_sample(exact, max_crops, sampler), _sample(others, max_crops, sampler))
        needed[result.name] = picked
        result.crops = CropAccount(len(exact) + len(other), len(exact), reasons=list(plan.reasons))
        if len(other) > len(others):
            result.crops.reasons.append(
                f"{len(other) - len(others)} cell(s) lie where no native-size crop fits "
                "inside the input"
            )
    scores = _run_crops(reference, big, needed, cells, native, check)
    for result, tensor, cell_map in zip(check.outputs, dense, cells, strict=True):
        if result.name not in needed:
            accounts.append(result.crops)
            continue
        exact, other = needed[result.name]
        account = result.crops
        scale = result.comparisons["dense"].reference_scale
        exact_found = _differences(tensor, cell_map, exact, scores, result.name, check.rule, scale)
        other_found = _differences(tensor, cell_map, other, scores, result.name, check.rule, scale)
        account.max_abs_diff_exact = _largest_diff(exact_found)
        account.max_abs_diff_other = _largest_diff(other_found)
        account.compared_exact, account.compared_other = len(exact), len(other)
        if not all(exact_found):
            account.reasons.append(
                f"cells fcconv expected to equal their crops differ by up to "
                f"{account.max_abs_diff_exact:.3g}: a layer depends on the input's size in "
                "a way fcconv does not see"
            )
            account.crop_exact = 0
        accounts.append(account)
    check.crops = CropAccount.total(accounts)
    check.warnings.extend(_warnings(plan, cells))


def _account_cam(check: DenseCheck, dense: list[torch.Tensor]) -> None:
    """A class activation map's cells are the head on one feature cell: no crop's output."""
    reason = (
        "a class activation map (head cam): each cell is the head on one feature cell, "
        "not the model on any crop"
    )
    for result, tensor in zip(check.outputs, dense, strict=True):
        result.crops = CropAccount(math.prod(tensor.shape[2:]), 0, reasons=[reason])
    check.crops = CropAccount.total([r.crops for r in check.outputs])


def _sample(items: list, count: int, sampler: random.Random) -> list:
    return items if len(items) <= count else sorted(sampler.sample(items, count))


def _start(index, geometry) -> tuple[int, ...]:
    return tuple(i * s for i, s in zip(index, geometry.stride, strict=True))


def _run_crops(reference, big, needed, cells, native, check) -> dict:
    """The original model on every crop the sample needs: ``start → {name: [B, O]}``."""
    by_name = {c.name: c for c in cells}
    starts = sorted(
        {
            _start(index, by_name[name].cells)
            for name, (exact, other) in needed.items()
            for index in exact + other
        }
    )
    if not starts:
        return {}
    spatial = big.dim() - len(native)
    crops = []
    for start in starts:
        cut = (slice(None),) * spatial + tuple(
            slice(s, s + n) for s, n in zip(start, native, strict=True)
        )
        crops.append(big[cut])
    parts: dict[str, list[torch.Tensor]] = {}
    with running_user_code("the original model's forward"):
        for first in range(0, len(crops), CROP_BATCH):
            for name, tensor in _named(
                reference(torch.cat(crops[first : first + CROP_BATCH]))
            ).items():
                parts.setdefault(name, []).append(tensor)
    outputs = {name: torch.cat(part) for name, part in parts.items()}
    batch = big.shape[0]
    return {
        start: {name: tensor[k * batch : (k + 1) * batch] for name, tensor in outputs.items()}
        for k, start in enumerate(starts)
    }


def _differences(tensor, cell_map, indices, scores, name, rule, scale) -> list[Comparison]:
    """Each cell against the original model on its crop, judged relative to the map's scale."""
    found = []
    for index in indices:
        position = [slice(None), slice(None)] + [0] * (tensor.dim() - 2)
        for axis, i in enumerate(index):
            position[cell_map.map_axes[axis]] = i
        cell = tensor[tuple(position)]
        crop = scores[_start(index, cell_map.cells)][name].reshape(cell.shape)
        found.append(compare(cell, crop, rule, scale=scale))
    return found


def _largest_diff(found: list[Comparison]) -> float | None:
    return max((c.max_abs_diff for c in found), default=None)


def _warnings(plan: CropPlan | None, cells: list[OutputCells]) -> list[str]:
    if plan is None:
        reason = next((c.unknown for c in cells if c.unknown), "")
        return [
            "warning: fcconv cannot tell which cells of the dense map equal the model run "
            f"on their crop: {reason}"
        ]
    if plan.interior_exact:
        return []
    shown = "; ".join(plan.reasons[:3]) + ("; …" if len(plan.reasons) > 3 else "")
    return [
        "warning: the dense map is not the model run on each crop: at the native size "
        f"{shown}; so every cell away from the input's borders differs from the model run "
        "on its crop, which sees padding or a cut-off window where the whole input has "
        "real values; each cell is the original head on its window of the whole input's "
        "feature map"
    ]
