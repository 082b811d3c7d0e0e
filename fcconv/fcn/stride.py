"""Denser maps at exact equivalence: a stride-``S`` map by shift-and-stitch.

A convolutionalized model's map has the trunk's stride ``M`` (32 pixels for
a VGG): cell ``i`` reads the input box starting at ``offset + i·M``. For a
map at stride ``S`` (``S`` dividing ``M``), the model is run on ``f = M / S``
shifted copies of the input per axis, ``x[k·S : k·S + n − (f−1)·S]`` for
``k = 0 … f−1`` (all of one length, so they run as one batch), and the runs
are interleaved: cell ``j = f·i + k`` of the denser map is cell ``i`` of run
``k``, whose box starts at ``offset + k·S + i·M = offset + j·S``. Every cell
is therefore *exactly* the original head on a window of the trunk's feature
map of a shifted input, whatever the trunk holds (padding, ``ceil_mode``
pools, ``F.pad``, slices): no layer is changed, nothing is re-derived. The
runs being of one length, the map may end up to ``f − 1`` cells short of
the last window that would fit along an axis.

Why not filter rarefaction (removing the last strides and dilating every
later kernel, as DeepLab does)? It is cheaper (the layers before the last
removed stride run once), but it equals the shifted runs only where no layer
up to the removed strides pads: at a padded trunk's start border a shifted
run pads where the dilated model reads real pixels, so the two maps differ
there. Shift-and-stitch is exact on every cell of every trunk fcconv
converts, costs ``f`` runs per axis (batched), and its cost is reported
(:mod:`fcconv.fcn.cost`).

>>> import torch
>>> from torch import nn
>>> from fcconv.fcn import convolutionalize_detailed
>>> net = nn.Sequential(nn.Conv2d(1, 2, 2, stride=2), nn.Flatten(), nn.Linear(2 * 2 * 2, 3))
>>> finer = with_output_stride(convolutionalize_detailed(net, (4, 4)), (1, 1))
>>> finer.outputs[0].cells
CellGeometry(offset=(0, 0), stride=(1, 1), window=(4, 4))
>>> tuple(finer.model(torch.zeros(1, 1, 7, 5)).shape)
(1, 3, 4, 2)
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from fcconv.errors import ConvolutionalizeError, SpecError
from fcconv.fcn.analyse import analyze, size_tuple
from fcconv.fcn.cells import OutputCells, crop_plan, output_cells, trunk_geometry
from fcconv.fcn.check import (
    RULE,
    _account_crops,
    _compare_native,
    _dense_leaves,
    _example,
    _head_maps,
    _named,
    _split,
    judge_output,
    refuse_single_cell,
)
from fcconv.fcn.results import Conversion, DenseCheck, OutputCheck, OutputFacts
from fcconv.fcn.trace import model_dtype_device
from fcconv.fcn.usercode import running_user_code
from fcconv.geometry import CellGeometry

METHOD = "shift-and-stitch"


def shifted_runs(x: torch.Tensor, step: Sequence[int], phases: Sequence[int]) -> list[torch.Tensor]:
    """The input shifted by every ``k·step`` (``k < phases``, per axis), all of one length.

    Run ``k`` along an axis of length ``n`` is ``x[k·S : k·S + n − (f−1)·S]``:
    as long as the last run can be, so the runs batch together. Runs are
    listed with the last axis's shift fastest.

    >>> [r.tolist() for r in shifted_runs(torch.arange(7), (2,), (3,))]
    [[0, 1, 2], [2, 3, 4], [4, 5, 6]]
    """
    ndim = len(phases)
    sizes = x.shape[x.dim() - ndim :]
    runs = []
    for shift in itertools.product(*(range(f) for f in phases)):
        cut = tuple(
            slice(k * s, k * s + n - (f - 1) * s)
            for k, s, f, n in zip(shift, step, phases, sizes, strict=True)
        )
        runs.append(x[(Ellipsis, *cut)])
    return runs


def interleave(maps: torch.Tensor, phases: Sequence[int], map_axes: Sequence[int]) -> torch.Tensor:
    """The maps of the shifted runs (batched run-major, as :func:`shifted_runs` lists them) as one.

    ``maps`` is ``[runs·B, …]``; along input axis ``a`` (tensor axis
    ``map_axes[a]``), cell ``i`` of the run shifted by ``k`` goes to ``k + f·i``.

    >>> interleave(torch.tensor([[[0, 2, 4]], [[1, 3, 5]]]), (2,), (2,)).tolist()
    [[[0, 1, 2, 3, 4, 5]]]
    """
    ndim = len(phases)
    shape = maps.shape
    batch = shape[0] // math.prod(phases)
    grid = maps.reshape(*phases, batch, *shape[1:])
    order: list[int] = []
    merged = [batch, *shape[1:]]
    for axis in range(len(shape)):
        order.append(ndim + axis)
        if axis in map_axes:
            which = list(map_axes).index(axis)
            order.append(which)
            merged[axis] = shape[axis] * phases[which]
    return grid.permute(*order).reshape(merged)


class StitchedMap(nn.Module):
    """A dense model run once on a batch of shifted inputs, its maps interleaved: a finer stride.

    Args:
        dense: the convolutionalized model (stride ``M`` per axis).
        step: the finer stride ``S`` in input pixels, per spatial axis.
        phases: ``M / S`` per axis: the shifted runs along that axis.
        map_axes: for each output tensor (in ``pytree`` leaf order), the
            tensor axis that steps along each input axis.
        smallest: the smallest input size (every run at least the native size).
    """

    def __init__(
        self,
        dense: nn.Module,
        step: Sequence[int],
        phases: Sequence[int],
        map_axes: Sequence[Sequence[int]],
        smallest: Sequence[int],
    ) -> None:
        super().__init__()
        self.dense = dense
        self.step = tuple(step)
        self.phases = tuple(phases)
        self.map_axes = [tuple(axes) for axes in map_axes]
        self.smallest = tuple(smallest)
        self.meta: dict[str, Any] = {}

    def forward(self, x: torch.Tensor) -> Any:
        ndim = len(self.phases)
        if not torch.jit.is_tracing():  # torch.export learns the smallest size from it
            for axis, least in enumerate(self.smallest):
                torch._check(x.shape[x.dim() - ndim + axis] >= least)
        maps = self.dense(torch.cat(shifted_runs(x, self.step, self.phases)))
        leaves, spec = pytree.tree_flatten(maps)
        stitched = [
            interleave(leaf, self.phases, axes)
            for leaf, axes in zip(leaves, self.map_axes, strict=True)
        ]
        return pytree.tree_unflatten(stitched, spec)

    def verify_against(
        self,
        original: nn.Module,
        input_size: Sequence[int] | int,
        larger_size: Sequence[int] | int | None = None,
        **options: Any,
    ) -> StrideCheck:
        """:func:`~fcconv.fcn.check.verify_dense` of this map: :func:`verify_output_stride`
        (``fcn.check`` calls it through the type, without importing this module)."""
        return verify_output_stride(original, self, input_size, larger_size, **options)


def _per_axis(value: Sequence[int] | int, ndim: int) -> tuple[int, ...]:
    values = (value,) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(values) == 1:
        values = values * ndim
    if len(values) != ndim or min(values) < 1:
        shown = "x".join(map(str, values))
        raise SpecError(
            f"output stride {shown} does not fit a {ndim}-D map: give one positive number "
            "or one per axis with {output_stride}"
        )
    return values


def map_stride(conversion: Conversion) -> tuple[int, ...]:
    """The stride of every output's map in input pixels (they must agree)."""
    unknown = next((o for o in conversion.outputs if o.cells is None), None)
    if unknown is not None:
        raise ConvolutionalizeError(
            f"{{output_stride}} needs the map's coordinates, but output {unknown.name!r} has "
            f"none: {unknown.cells_map.unknown}"
        )
    strides = {o.cells.stride for o in conversion.outputs if o.cells is not None}
    if len(strides) > 1:
        shown = ", ".join("x".join(map(str, s)) for s in sorted(strides))
        raise ConvolutionalizeError(
            f"the outputs' maps have different strides ({shown}); keep the outputs of one "
            "stride with {outputs} to give an {output_stride}"
        )
    return next(iter(strides))


def with_output_stride(conversion: Conversion, output_stride: Sequence[int] | int) -> Conversion:
    """The conversion with its map at ``output_stride`` input pixels, by shift-and-stitch.

    Each output keeps its cells' offset and window; their stride becomes
    ``output_stride``. When that is already the map's stride the model is
    kept as it is.

    Raises:
        SpecError: the stride does not divide the map's stride, or the head's
            stride (``stride``) is not 1.
        ConvolutionalizeError: the map's coordinates are unknown, or the
            outputs' strides differ.
    """
    ndim = len(conversion.input_size)
    step = _per_axis(output_stride, ndim)
    if any(s != 1 for s in conversion.stride):
        raise SpecError(
            "give either {stride} (the head's stride in feature-map cells) or "
            "{output_stride} (the map's stride in input pixels), not both"
        )
    coarse = map_stride(conversion)
    if any(m % s for m, s in zip(coarse, step, strict=True)):
        raise SpecError(
            f"output stride {'x'.join(map(str, step))} must divide the trunk's stride "
            f"{'x'.join(map(str, coarse))} along every axis; choose one of "
            f"{_divisors(coarse)} with {{output_stride}}"
        )
    phases = tuple(m // s for m, s in zip(coarse, step, strict=True))
    outputs = [_finer(o, step) for o in conversion.outputs]
    model: nn.Module = conversion.model
    notes = list(conversion.notes)
    if math.prod(phases) > 1:
        axes = [o.cells_map.map_axes for o in outputs]
        smallest = smallest_size(conversion.input_size, step, phases)
        model = StitchedMap(conversion.model, step, phases, axes, smallest)
        runs = "×".join(map(str, phases))
        notes.append(
            f"the map at stride {'x'.join(map(str, step))} interleaves {runs} runs of the "
            f"stride-{'x'.join(map(str, coarse))} map on the input shifted by multiples of "
            f"{'x'.join(map(str, step))} pixels ({METHOD}); it takes inputs of at least "
            f"{'x'.join(map(str, smallest_size(conversion.input_size, step, phases)))}"
        )
    finer = dataclasses.replace(
        conversion,
        model=model,
        outputs=outputs,
        notes=notes,
        output_stride=step,
        phases=phases,
    )
    model.meta["fcconv"] = finer.recorded()
    return finer


def _divisors(stride: tuple[int, ...]) -> str:
    return ", ".join(str(d) for d in range(1, min(stride) + 1) if all(s % d == 0 for s in stride))


def _finer(output: OutputFacts, step: tuple[int, ...]) -> OutputFacts:
    cells = output.cells
    assert cells is not None
    finer = CellGeometry(cells.offset, step, cells.window)
    cells_map = OutputCells(output.name, finer, output.cells_map.map_axes)
    return dataclasses.replace(output, cells_map=cells_map)


def smallest_size(
    native: Sequence[int], step: Sequence[int], phases: Sequence[int]
) -> tuple[int, ...]:
    """The smallest input of a stitched map: every shifted run at least the native size."""
    return tuple(n + (f - 1) * s for n, s, f in zip(native, step, phases, strict=True))


# ------------------------------------------------------------------ verification


@dataclasses.dataclass
class StrideCheck(DenseCheck):
    """:class:`DenseCheck` of a stitched map; truthy on pass.

    ``native_*``: the dense model inside at the native size against the
    original. ``dense_*``: every cell of the stride-``S`` map on the larger
    input against the independent reference (the original trunk run on each
    shifted input, every window cut, the original head applied, the results
    interleaved by index); the same on the smallest input it takes
    (``smallest_*``). The crop account counts the cells that also equal the
    model on their crop.
    """

    output_stride: tuple[int, ...] = ()
    phases: tuple[int, ...] = ()
    smallest_size: tuple[int, ...] = ()
    smallest_max_abs_diff: float | None = None

    def to_dict(self) -> dict[str, Any]:
        document = super().to_dict()
        document.update(
            method=METHOD,
            output_stride=list(self.output_stride),
            phases=list(self.phases),
            runs=math.prod(self.phases),
            smallest_size=list(self.smallest_size),
            smallest_max_abs_diff=self.smallest_max_abs_diff,
        )
        return document


def shifted_reference(
    an: Any,
    trunk: nn.Module,
    heads: list[nn.Module],
    x: torch.Tensor,
    step: Sequence[int],
    phases: Sequence[int],
    map_axes: dict[str, tuple[int, ...]],
) -> dict[str, torch.Tensor]:
    """The original head on every window of the trunk run on every shifted input, by index.

    Run ``k`` (one shift per axis) reads ``x[k·S : k·S + n − (f−1)·S]`` along
    an axis of length ``n``; the original trunk runs on it, every window of its
    feature map is cut and the original head applied; cell ``i`` of the run
    is placed at ``k + f·i``. Places no run fills stay NaN, so a gap in the
    tiling fails the comparison.
    """
    ndim = len(phases)
    lengths = x.shape[x.dim() - ndim :]
    runs = {}
    for shift in itertools.product(*(range(f) for f in phases)):
        cut = tuple(
            slice(k * s, n - (f - 1 - k) * s)
            for k, s, f, n in zip(shift, step, phases, lengths, strict=True)
        )
        runs[shift] = _head_maps(an, trunk, heads, x[(Ellipsis, *cut)], (1,) * ndim)
    first = runs[(0,) * ndim]
    maps = {}
    for name, axes in map_axes.items():
        shape = list(first[name].shape)
        for axis, dim in enumerate(axes):
            along = [tuple(k if a == axis else 0 for a in range(ndim)) for k in range(phases[axis])]
            shape[dim] = sum(runs[shift][name].shape[dim] for shift in along)
        out = first[name].new_full(shape, math.nan)
        for shift, run in runs.items():
            part = run[name]
            place = [slice(None)] * part.dim()
            for axis, dim in enumerate(axes):
                place[dim] = slice(shift[axis], None, phases[axis])
            target = out[tuple(place)]
            target[tuple(slice(0, n) for n in part.shape)] = part
        maps[name] = out
    return maps


def verify_output_stride(
    original: nn.Module,
    stitched: StitchedMap,
    input_size: Sequence[int] | int,
    larger_size: Sequence[int] | int | None = None,
    *,
    layers: Sequence[str] | None = None,
    in_channels: int | None = None,
    outputs: Sequence[str] | None = None,
    batch: int = 2,
    seed: int = 0,
    max_crops: int = 16,
    rule: str = RULE,
) -> StrideCheck:
    """Prove a stitched map equals the original head on every window of every shifted input.

    In float64: the dense model inside at the native size against the
    original model; then every cell of every output, on the smallest input the
    stitched map takes and on ``larger_size`` (default: two coarse steps past
    the native size), against :func:`shifted_reference`, each within
    judged by ``rule`` (as for :func:`~fcconv.fcn.verify_dense`); then the crop account.
    :func:`fcconv.fcn.verify_dense` hands a :class:`StitchedMap` here.

    Args:
        original: the model before conversion (copied, never modified).
        stitched: the map at the finer stride, from :func:`with_output_stride`.
        input_size: the native size.
        larger_size: the larger size of the check.
        layers, in_channels: as for :func:`~fcconv.fcn.convolutionalize`.
        outputs: the outputs kept; default: as recorded.
        batch, seed, max_crops, rule: as for :func:`~fcconv.fcn.verify_dense`.
    """
    recorded = stitched.meta.get("fcconv", {})
    kept = outputs if outputs is not None else recorded.get("selected")
    step, phases = stitched.step, stitched.phases
    reference = copy.deepcopy(original).double().eval()
    an = analyze(reference, input_size, layers, in_channels or recorded.get("in_channels"), kept)
    native = an.layout.size  # one number for a 2-D model means a square
    coarse = tuple(s * f for s, f in zip(step, phases, strict=True))
    smallest = smallest_size(native, step, phases)
    larger = (
        size_tuple(larger_size, "larger_size")
        if larger_size
        else tuple(n + 2 * m for n, m in zip(native, coarse, strict=True))
    )
    if any(b < s for b, s in zip(larger, smallest, strict=True)):
        raise SpecError(
            f"the check size {'x'.join(map(str, larger))} is smaller than the stitched map's "
            f"smallest input {'x'.join(map(str, smallest))}; give a larger {{check_size}}"
        )
    candidate = copy.deepcopy(stitched).double().eval()
    geometry = trunk_geometry(an)
    cells = [_finer_cells(c, step) for c in output_cells(an, geometry, (1,) * len(native))]
    check = StrideCheck(
        rule=rule,
        native_size=native,
        larger_size=larger,
        output_stride=step,
        phases=phases,
        smallest_size=smallest,
    )
    check.outputs = [OutputCheck(o.name) for o in an.outputs]
    generator = torch.Generator().manual_seed(seed)
    _, device = model_dtype_device(reference)
    trunk, heads = _split(an)
    axes = {c.name: c.map_axes for c in cells}
    with torch.no_grad():
        x = an.layout.example(batch, dtype=torch.float64, device=device, generator=generator)
        with running_user_code("the original model's forward"):
            expected = _named(reference(x))
        _compare_native(check, expected, _dense_leaves(candidate.dense(x)))
        for size in (smallest, larger):
            x = an.layout.example(
                batch, size=size, dtype=torch.float64, device=device, generator=generator
            )
            got = _dense_leaves(candidate(x))
            wanted = shifted_reference(an, trunk, heads, x, step, phases, axes)
            _compare(check, got, wanted, size, larger=size == larger)
        example = partial(_example, an.layout, batch, device, generator)
        refuse_single_cell(check, trunk, example)
        if not check.problems:
            plan = crop_plan(an, geometry)
            _account_crops(check, reference, x, got, cells, plan, native, max_crops, seed, phases)
    return check


def _finer_cells(cells: OutputCells, step: tuple[int, ...]) -> OutputCells:
    if cells.cells is None:
        return cells
    finer = CellGeometry(cells.cells.offset, step, cells.cells.window)
    return OutputCells(cells.name, finer, cells.map_axes)


def _compare(check: StrideCheck, got, wanted, size, *, larger: bool) -> None:
    shown = "x".join(map(str, size))
    if len(got) != len(check.outputs):
        check.problems.append(
            f"the stitched model returns {len(got)} tensors, expected {len(check.outputs)}"
        )
    against = "the original head on the windows of the shifted inputs"
    for result, tensor in zip(check.outputs, got, strict=False):
        reference = wanted[result.name]
        if larger:
            result.map_size = tuple(reference.shape[2:])
        if tensor.shape != reference.shape:
            check.problems.append(
                f"output {result.name!r} at {shown} has shape {tuple(tensor.shape)}, but the "
                f"shifted runs hold windows for {tuple(reference.shape)}"
            )
            continue
        what = "dense" if larger else "smallest"
        # a gap (NaN where the reference has a number) is an infinite difference
        found = judge_output(check, result, what, tensor, reference, f"at {shown}", against)
        if larger:
            result.dense_max_abs_diff = found.max_abs_diff
        else:
            check.smallest_max_abs_diff = max(
                check.smallest_max_abs_diff or 0.0, found.max_abs_diff
            )
