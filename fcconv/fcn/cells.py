"""Where each cell of a dense map lies on the input, and which cells equal the model on a crop.

Forward through the trunk, every layer's arithmetic is composed
(:func:`fcconv.geometry.through_layer`): convs and pools (``ceil_mode``
included), module padding and ``F.pad``, dilation, slicing, axes moved by
``permute``/``unsqueeze``/indexing. The first conv of each head adds the
feature-map window, giving every output its :class:`~fcconv.geometry.CellGeometry`.

Backward from the feature map at the native size, the span each layer
really reads is checked against its input: a layer that reads before the
start or past the end (zero padding, ``F.pad``, pool padding, a partial
``ceil_mode`` window) makes the cells away from that border differ from
"the model run on that crop", because the crop saw padding where the whole
input has real pixels.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from fcconv.fcn.analyse import Analysis, trunk_nodes, where
from fcconv.fcn.ops import (
    describe,
    global_reduce,
    keeps_cells,
    permutation_step,
    shape_of,
    sliding_window,
)
from fcconv.geometry import SPATIAL_AXES, AxisField, CellGeometry, merge_fields, through_layer

aten = torch.ops.aten


@dataclass(frozen=True)
class _Place:
    """A tensor's axes: which input axis each runs along (None: batch, channels, unit)."""

    axes: tuple[int | None, ...]
    fields: dict[int, AxisField]


@dataclass
class _Move:
    """How an axis-moving node maps its output axes to its input's, with slice offsets."""

    source: tuple[int | None, ...]
    shift: tuple[int, ...]


@dataclass
class TrunkGeometry:
    """Each trunk node's place, or why the coordinates are unknown."""

    places: dict[fx.Node, _Place] = field(default_factory=dict)
    moves: dict[fx.Node, _Move] = field(default_factory=dict)
    globals: set[fx.Node] = field(default_factory=set)
    unknown: str = ""


@dataclass(frozen=True)
class OutputCells:
    """The coordinate map of one output: its cells' input boxes, and which map axes index them.

    ``map_axes[i]`` is the output tensor axis that steps along input axis ``i``
    (``2`` and ``3`` for an NCHW map). ``cells`` is None when the trunk holds a
    layer whose geometry fcconv does not know (``unknown`` says which).
    """

    name: str
    cells: CellGeometry | None
    map_axes: tuple[int, ...] = ()
    unknown: str = ""


@dataclass
class CropPlan:
    """Which borders the model reads past at the native size, per input axis, and why."""

    before: list[bool]
    after: list[bool]
    reads: dict[tuple[int, str, str, str, str], dict[int, set[str]]] = field(default_factory=dict)

    @property
    def interior_exact(self) -> bool:
        """Whether cells away from every border equal the model run on their crop."""
        return not any(self.before) and not any(self.after)

    @property
    def reasons(self) -> list[str]:
        """One line per kind of reading and source line, naming its layers.

        ``'conv1' (Conv2d) at model.py:12 (`…`) pads its input at both ends of H
        and W``; layers that share a verb, a line and the borders they read are
        named together (a VGG's convs all called from ``x = self.features(x)``)
        so that the line is not repeated per layer.
        """
        names = axis_names(len(self.before))
        groups: dict[tuple[str, str, str, str], list[str]] = {}
        for (_, name, kind, location, verb), axes in sorted(self.reads.items()):
            phrases: dict[str, list[str]] = {}
            for axis, sides in sorted(axes.items()):
                phrase = "both ends" if len(sides) == 2 else f"the {next(iter(sides))}"
                phrases.setdefault(phrase, []).append(names[axis])
            where_ = ", ".join(f"{p} of {' and '.join(n)}" for p, n in phrases.items())
            groups.setdefault((kind, location, verb, where_), []).append(name)
        lines = []
        for (kind, location, verb, where_), layers in groups.items():
            shown = ", ".join(layers[:4]) + (
                f" and {len(layers) - 4} more" if len(layers) > 4 else ""
            )
            lines.append(f"{shown}{f' ({kind})' if kind else ''}{location} {verb} {where_}")
        return lines

    def note(
        self, position: int, label: str, verb: str, axis: int, side: str, location: str = ""
    ) -> None:
        """Layer number ``position`` (in graph order) reads past ``side`` of ``axis``.

        ``label`` is the layer as :func:`~fcconv.fcn.ops.describe` names it
        (``'conv1' (Conv2d)``), ``location`` the user's line (`` at model.py:12 …``).
        """
        (self.before if side == "start" else self.after)[axis] = True
        name, _, kind = label.partition(" (")
        key = (position, name, kind.removesuffix(")"), location, verb)
        self.reads.setdefault(key, {}).setdefault(axis, set()).add(side)

    def exact_along(self, axis: int, index: int, native: int, total: int, step: int) -> bool:
        """Whether cell ``index`` along ``axis`` equals the model on its crop.

        Its crop starts at ``index·step`` and must fit in the ``total``-long
        input. A border the model reads past at the native size is the same
        in the crop and the whole input only where the crop touches that
        border of the whole input too: the first cell for the start, a crop
        ending at the input's end for the end.
        """
        start = index * step
        if start + native > total:
            return False
        if self.before[axis] and index != 0:
            return False
        return not self.after[axis] or start + native == total


def axis_names(ndim: int) -> str:
    return SPATIAL_AXES[ndim].upper()


# ------------------------------------------------------------------ forward


def _input_place(an: Analysis) -> _Place:
    leading: tuple[int | None, ...] = (None,) if an.layout.channels is None else (None, None)
    axes = leading + tuple(range(an.layout.ndim))
    return _Place(axes, {a: AxisField() for a in range(an.layout.ndim)})


def _windowed(place: _Place, node: fx.Node, gm: fx.GraphModule) -> _Place | str:
    window = sliding_window(gm, node)
    assert window is not None
    fields = dict(place.fields)
    first = len(place.axes) - len(window.kernel)
    for offset, (k, s, (before, _), d) in enumerate(
        zip(window.kernel, window.stride, window.padding, window.dilation, strict=True)
    ):
        axis = place.axes[first + offset]
        if axis is None:
            if (k, s) != (1, 1):
                return f"{describe(gm, node)}{where(node)} slides along a non-spatial axis"
            continue
        fields[axis] = through_layer(fields[axis], k, s, before, d)
    return _Place(place.axes, fields)


def _merged(places: list[_Place], node: fx.Node, gm: fx.GraphModule) -> _Place | str:
    # a whole-map pool's values broadcast over the map: they add no axis of their own
    spatial = [p for p in places if any(a is not None for a in p.axes)]
    places = spatial or places[:1]
    axes = places[0].axes
    fields = dict(places[0].fields)
    for place in places[1:]:
        if place.axes != axes:
            return f"{describe(gm, node)}{where(node)} combines maps whose axes differ"
        for axis, value in place.fields.items():
            merged = merge_fields(fields[axis], value)
            if merged is None:
                return f"{describe(gm, node)}{where(node)} combines maps of different strides"
            fields[axis] = merged
    return _Place(axes, fields)


def _index_move(index: Any, rank: int) -> tuple[_Move, list[int]] | None:
    """``x[index]`` as an axis move, and the input axes an integer index drops.

    Slices must start at a fixed offset (``1:``, ``2:-2``), with step 1; ``None``
    adds an axis, ``...`` stands for the rest.
    """
    entries = list(index) if isinstance(index, tuple) else [index]
    if entries.count(Ellipsis) > 1:
        return None
    consumed = sum(1 for e in entries if e is not None and e is not Ellipsis)
    rest = [slice(None)] * (rank - consumed)
    if Ellipsis in entries:
        position = entries.index(Ellipsis)
        entries[position : position + 1] = rest
    else:
        entries += rest
    source: list[int | None] = []
    shift: list[int] = []
    dropped: list[int] = []
    axis = 0
    for entry in entries:
        if entry is None:
            source.append(None)
            shift.append(0)
            continue
        if isinstance(entry, int):
            dropped.append(axis)
        elif isinstance(entry, slice) and entry.step in (None, 1):
            start = 0 if entry.start is None else entry.start
            if not isinstance(start, int) or start < 0:
                return None
            source.append(axis)
            shift.append(start)
        else:
            return None
        axis += 1
    return _Move(tuple(source), tuple(shift)), dropped


def _reshape_move(
    before: tuple[int, ...], after: tuple[int, ...]
) -> tuple[_Move, list[int]] | None:
    """A view or reshape that only adds or removes axes of length 1."""
    kept_before = [i for i, n in enumerate(before) if n != 1]
    kept_after = [i for i, n in enumerate(after) if n != 1]
    if [before[i] for i in kept_before] != [after[i] for i in kept_after]:
        return None
    source: list[int | None] = [None] * len(after)
    for old, new in zip(kept_before, kept_after, strict=True):
        source[new] = old
    dropped = [i for i, n in enumerate(before) if n == 1]
    return _Move(tuple(source), (0,) * len(after)), dropped


def _move_of(gm: fx.GraphModule, node: fx.Node) -> tuple[_Move, list[int]] | None | str:
    """How ``node`` moves its input's axes; None if it does not; a reason if unknown."""
    before, after = shape_of(node.args[0]) if node.args else None, shape_of(node)
    if before is None or after is None:
        return None
    rank = len(before)
    step = permutation_step(node, rank)
    if step is not None:
        return _Move(tuple(step[0]), (0,) * rank), []
    target, method = node.target, node.op == "call_method"
    if (method and target == "__getitem__") or target is operator.getitem:
        moved = _index_move(node.args[1], rank)
    elif target is aten.slice.Tensor:
        dim, start = node.args[1] % rank, node.args[2] if len(node.args) > 2 else 0
        index = [slice(None)] * rank
        index[dim] = slice(start or 0, None)
        moved = _index_move(tuple(index), rank)
    elif (
        target is aten.select.int
        or (method and target in ("view", "reshape", "unsqueeze", "squeeze", "flatten"))
        or target
        in (
            torch.reshape,
            torch.unsqueeze,
            torch.squeeze,
            torch.flatten,
            aten.view.default,
            aten.reshape.default,
            aten._unsafe_view.default,
            aten.unsqueeze.default,
            aten.squeeze.dim,
            aten.squeeze.dims,
            aten.squeeze.default,
            aten.flatten.using_ints,
        )
    ):
        moved = _reshape_move(before, after)
    else:
        return None
    if moved is None:
        return (
            f"{describe(gm, node)}{where(node)} moves the map's axes in a way fcconv cannot follow"
        )
    return moved


def _moved(place: _Place, move: _Move, dropped: list[int], node, gm) -> _Place | str:
    if any(place.axes[i] is not None for i in dropped):
        return f"{describe(gm, node)}{where(node)} removes a spatial axis of the map"
    axes = tuple(None if s is None else place.axes[s] for s in move.source)
    fields = dict(place.fields)
    for out_axis, source in enumerate(move.source):
        axis = None if source is None else place.axes[source]
        if axis is not None and move.shift[out_axis]:
            fields[axis] = through_layer(fields[axis], padding=-move.shift[out_axis])
    return _Place(axes, fields)


def _is_concat(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch.cat, torch.concat, aten.cat.default)


def trunk_geometry(an: Analysis) -> TrunkGeometry:
    """Compose every trunk layer's arithmetic, input to feature maps."""
    gm, result = an.gm, TrunkGeometry()
    trunk, pools = trunk_nodes(an), set(an.pools)
    for node in gm.graph.nodes:
        if node not in trunk:
            continue
        if node.op == "placeholder":
            if not result.places:
                result.places[node] = _input_place(an)
            continue
        inputs = [n for n in node.all_input_nodes if n in result.places]
        if not inputs or shape_of(node) is None:
            continue
        place = _place_of(gm, node, inputs, result, pools)
        if isinstance(place, str):
            result.unknown = place
            return result
        result.places[node] = place
    return result


def _place_of(gm, node, inputs, result: TrunkGeometry, pools) -> _Place | str:
    places = [result.places[n] for n in inputs]
    if node in pools:
        return places[0]
    if global_reduce(gm, node) is not None and len(inputs) == 1:
        # a squeeze-and-excitation pool: one value per map, broadcast back over it
        result.globals.add(node)
        return _Place(tuple(None for _ in shape_of(node)), {})
    if sliding_window(gm, node) is not None:
        if len(inputs) != 1 or node.args[0] is not inputs[0]:
            return f"{describe(gm, node)}{where(node)} slides over more than one map"
        return _windowed(places[0], node, gm)
    if keeps_cells(gm, node) or (_is_concat(node) and _concat_keeps_cells(node)):
        return places[0] if len(places) == 1 else _merged(places, node, gm)
    moved = _move_of(gm, node) if len(inputs) == 1 else None
    if isinstance(moved, str):
        return moved
    if moved is not None:
        move, dropped = moved
        result.moves[node] = move
        return _moved(places[0], move, dropped, node, gm)
    return (
        f"{describe(gm, node)}{where(node)} in the trunk is not a layer whose geometry "
        "fcconv knows (convs, pools, pads, element-wise layers, norms, slicing, permutes)"
    )


def _concat_keeps_cells(node: fx.Node) -> bool:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return dim == 1


def output_cells(
    an: Analysis, geometry: TrunkGeometry, stride: tuple[int, ...]
) -> list[OutputCells]:
    """Each output's coordinate map: the trunk's fields through its first conv."""
    maps = []
    for output in an.outputs:
        if geometry.unknown:
            maps.append(OutputCells(output.name, None, (), geometry.unknown))
            continue
        place = geometry.places[output.site.source]
        spatial = place.axes[2:]
        missing = [a for a in range(an.layout.ndim) if a not in spatial]
        if missing:
            text = f"the feature map has no axis along input axis {missing[0]}"
            maps.append(OutputCells(output.name, None, (), text))
            continue
        fields, axes = [], []
        for axis in range(an.layout.ndim):
            t = spatial.index(axis)
            kernel = output.site.window[t]
            fields.append(through_layer(place.fields[axis], kernel, stride[t]))
            axes.append(2 + t)
        maps.append(OutputCells(output.name, CellGeometry.from_fields(tuple(fields)), tuple(axes)))
    return maps


# ------------------------------------------------------------------ backward


def crop_plan(an: Analysis, geometry: TrunkGeometry) -> CropPlan | None:
    """Which borders the trunk reads past at the native size; None if the geometry is unknown."""
    if geometry.unknown:
        return None
    gm, ndim = an.gm, an.layout.ndim
    plan = CropPlan([False] * ndim, [False] * ndim)
    used: dict[fx.Node, dict[int, tuple[int, int]]] = {}
    for site in an.sites:
        place = geometry.places[site.source]
        shape = shape_of(site.source)
        spans = {a: (0, shape[t] - 1) for t, a in enumerate(place.axes) if a is not None}
        _widen(used, site.source, spans)
    nodes = list(gm.graph.nodes)
    for position, node in reversed(list(enumerate(nodes))):
        if node not in used or node.op == "placeholder":
            continue
        spans = used[node]
        inputs = [n for n in node.all_input_nodes if n in geometry.places]
        if node in geometry.globals:
            spans = _read_whole(gm, node, geometry, plan, position)
        elif sliding_window(gm, node) is not None and node not in an.pools:
            spans = _read_by_window(gm, node, spans, geometry, plan, position)
        elif node in geometry.moves:
            spans = _read_by_move(node, spans, geometry)
        for parent in inputs:
            _widen(used, parent, spans)
    return plan


def _widen(used, node: fx.Node, spans: dict[int, tuple[int, int]]) -> None:
    current = used.setdefault(node, {})
    for axis, (low, high) in spans.items():
        if axis in current:
            low, high = min(low, current[axis][0]), max(high, current[axis][1])
        current[axis] = (low, high)


def _read_whole(gm, node: fx.Node, geometry: TrunkGeometry, plan: CropPlan, position: int):
    """A whole-map pool reads every cell of its input: past both ends of a crop's map."""
    source = node.args[0]
    place, shape = geometry.places[source], shape_of(source)
    label, location = describe(gm, node), where(node)
    verb = "pools its whole input into every cell, reaching"
    spans = {}
    for t, axis in enumerate(place.axes):
        if axis is None:
            continue
        spans[axis] = (0, shape[t] - 1)
        for side in ("start", "end"):
            plan.note(position, label, verb, axis, side, location)
    return spans


def _read_by_move(node: fx.Node, spans, geometry: TrunkGeometry) -> dict[int, tuple[int, int]]:
    move, place = geometry.moves[node], geometry.places[node]
    shifted = dict(spans)
    for out_axis, axis in enumerate(place.axes):
        if axis is not None and axis in spans and move.shift[out_axis]:
            low, high = spans[axis]
            shifted[axis] = (low + move.shift[out_axis], high + move.shift[out_axis])
    return shifted


def _read_by_window(gm, node: fx.Node, spans, geometry: TrunkGeometry, plan: CropPlan, position):
    window = sliding_window(gm, node)
    place = geometry.places[node]
    source_shape = shape_of(node.args[0])
    first = len(place.axes) - len(window.kernel)
    label, location = describe(gm, node), where(node)
    verb = {"pad": "pads", "conv": "pads its input at", "pool": "pools over padding at"}
    read = dict(spans)
    for offset, (k, s, (before, after), d) in enumerate(
        zip(window.kernel, window.stride, window.padding, window.dilation, strict=True)
    ):
        axis = place.axes[first + offset]
        if axis is None or axis not in spans:
            continue
        low, high = spans[axis]
        start, stop = low * s - before, high * s - before + (k - 1) * d
        length = source_shape[first + offset]
        if start < 0:
            plan.note(position, label, verb[window.kind], axis, "start", location)
        if stop > length - 1:
            partial = window.kind == "pool" and window.ceil_mode and after <= 0
            reading = "has a partial ceil_mode window at" if partial else verb[window.kind]
            plan.note(position, label, reading, axis, "end", location)
        read[axis] = (max(start, 0), min(stop, length - 1))
    return read
