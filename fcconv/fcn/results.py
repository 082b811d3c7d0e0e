"""What convolutionalization, its verification and its export report.

Plain dataclasses, each with ``to_dict`` for the command line's JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import fx

from fcconv.geometry import CellGeometry, PatchNd

if TYPE_CHECKING:
    from fcconv.fcn.cells import CropPlan, OutputCells
    from fcconv.fcn.trace import InputLayout
    from fcconv.verify.judge import Comparison


@dataclass(frozen=True)
class LayerChange:
    """One module of the head as it was and as it is in the converted model."""

    name: str
    was: str
    now: str
    conv2d: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "was": self.was, "now": self.now, "conv2d": self.conv2d}


@dataclass(frozen=True)
class OutputFacts:
    """One output of the converted model: its feature map, order, Linear layers and cells."""

    name: str
    patch: PatchNd
    order: str
    order_from: str
    linears: list[str]
    cells_map: OutputCells
    head: str = "flatten"
    window: tuple[int, ...] = ()

    @property
    def cells(self) -> CellGeometry | None:
        """The input box of every cell (``cells.box(p, q)``), or None when unknown."""
        return self.cells_map.cells

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "feature_map": {"channels": self.patch.channels, "size": list(self.patch.sizes)},
            "order": self.order,
            "order_from": self.order_from,
            "linears": list(self.linears),
            "head": self.head,
            "window": list(self.window or self.patch.sizes),
            "cells": None if self.cells is None else self.cells.to_dict(),
            "map_axes": list(self.cells_map.map_axes),
            "cells_unknown": self.cells_map.unknown or None,
        }


@dataclass
class Conversion:
    """A convolutionalized model and the facts a report needs.

    Attributes:
        model: the converted ``fx.GraphModule``; each output ``[B, O, *cells]``.
        layout: the input (channels, native size) the original was traced at.
        tracer: ``torch.fx`` or ``torch.export`` (when fx could not trace it).
        stride: the first convs' stride, in feature-map cells.
        outputs: per output kept: its feature map, order and coordinate map.
        output_names: every output the original model returns.
        crop_plan: which borders the model reads past at the native size
            (None when the trunk's geometry is unknown).
        changes: the head's modules, and the trunk's identity pools, before and after.
        notes: plain-words remarks (size guards, identity pools, training mode).
        head: what a global pool before the head became: ``pool`` (a pool over each
            native-size window) or ``cam`` (none: the head at every feature cell).
        weights_from: where the weights came from: ``file`` (MODEL), ``factory``
            (``arch`` built a model with its own weights); None from Python.
        output_stride: the map's stride in input pixels when a denser map was
            asked for (:func:`fcconv.fcn.stride.with_output_stride`), else None.
        phases: how many shifted runs are interleaved along each axis (the
            trunk's stride over ``output_stride``); None without an output stride.
    """

    model: fx.GraphModule
    model_name: str
    layout: InputLayout
    tracer: str
    stride: tuple[int, ...]
    outputs: list[OutputFacts]
    output_names: list[str]
    crop_plan: CropPlan | None = None
    changes: list[LayerChange] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    output_stride: tuple[int, ...] | None = None
    phases: tuple[int, ...] | None = None
    head: str = "pool"
    weights_from: str | None = None

    @property
    def input_size(self) -> tuple[int, ...]:
        return self.layout.size

    @property
    def in_channels(self) -> int | None:
        return self.layout.channels

    @property
    def patch(self) -> PatchNd:
        """The first output's feature map (the first conv's kernel)."""
        return self.outputs[0].patch

    @property
    def order(self) -> str:
        return self.outputs[0].order

    @property
    def order_from(self) -> str:
        return self.outputs[0].order_from

    @property
    def window_stride(self) -> tuple[int, ...] | None:
        """How far apart the first output's windows lie, in input pixels."""
        cells = self.outputs[0].cells
        return None if cells is None else cells.stride

    def recorded(self) -> dict[str, Any]:
        """What the converted model carries in ``meta["fcconv"]`` and the ``.pt2`` metadata."""
        return {
            "input_size": list(self.input_size),
            "in_channels": self.in_channels,
            "stride": list(self.stride),
            "outputs": [
                {
                    "name": o.name,
                    "cells": None if o.cells is None else o.cells.to_dict(),
                    "map_axes": list(o.cells_map.map_axes),
                }
                for o in self.outputs
            ],
            "selected": None
            if [o.name for o in self.outputs] == self.output_names
            else [o.name for o in self.outputs],
            "reads_past": self._reads_past(),
            "output_stride": None if self.output_stride is None else list(self.output_stride),
            "phases": None if self.phases is None else list(self.phases),
            "head": self.head,
            "weights_from": self.weights_from,
        }

    def _reads_past(self) -> dict[str, list[bool]] | None:
        """Per input axis, whether the model reads past its start / end at the native size.

        None when unknown, and for a class activation map, whose cells are
        the head on one feature cell and never the model on a crop.
        """
        if self.crop_plan is None or self.head == "cam":
            return None
        return {"start": list(self.crop_plan.before), "end": list(self.crop_plan.after)}

    def to_dict(self) -> dict[str, Any]:
        first = self.outputs[0]
        return {
            "model": self.model_name,
            "tracer": self.tracer,
            "input_size": list(self.input_size),
            "in_channels": self.in_channels,
            "feature_map": {"channels": first.patch.channels, "size": list(first.patch.sizes)},
            "order": self.order,
            "order_from": self.order_from,
            "stride": list(self.stride),
            "window": list(self.input_size),
            "window_stride": None if self.window_stride is None else list(self.window_stride),
            "outputs": [o.to_dict() for o in self.outputs],
            "changes": [c.to_dict() for c in self.changes],
            "notes": list(self.notes),
            "output_stride": None if self.output_stride is None else list(self.output_stride),
            "phases": None if self.phases is None else list(self.phases),
            "head": self.head,
            "weights_from": self.weights_from,
        }


@dataclass
class CropAccount:
    """Which cells equal the original model run on their native-size crop, and how far the rest are.

    Attributes:
        cells: cells of the checked map.
        crop_exact: how many of them equal the model on their crop (None: unknown).
        max_abs_diff_exact: the largest difference on a sample of those, in float64.
        max_abs_diff_other: the largest difference on a sample of the others.
        reasons: why the others differ.
        compared_exact, compared_other: how many of each were run.
    """

    cells: int
    crop_exact: int | None
    max_abs_diff_exact: float | None = None
    max_abs_diff_other: float | None = None
    reasons: list[str] = field(default_factory=list)
    compared_exact: int = 0
    compared_other: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "cells": self.cells,
            "crop_exact": self.crop_exact,
            "max_abs_diff_exact": self.max_abs_diff_exact,
            "max_abs_diff_other": self.max_abs_diff_other,
            "reasons": list(self.reasons),
            "compared": {"exact": self.compared_exact, "other": self.compared_other},
        }

    @classmethod
    def total(cls, accounts: list[CropAccount]) -> CropAccount:
        """All outputs' accounts summed (their worst differences, their reasons once)."""
        exact = [a.crop_exact for a in accounts]
        return cls(
            cells=sum(a.cells for a in accounts),
            crop_exact=None if None in exact else sum(exact),  # type: ignore[arg-type]
            max_abs_diff_exact=_largest(a.max_abs_diff_exact for a in accounts),
            max_abs_diff_other=_largest(a.max_abs_diff_other for a in accounts),
            reasons=list(dict.fromkeys(r for a in accounts for r in a.reasons)),
            compared_exact=sum(a.compared_exact for a in accounts),
            compared_other=sum(a.compared_other for a in accounts),
        )


def _largest(values: Any) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


@dataclass
class OutputCheck:
    """The checks of one output: native size, every cell of the dense map, the crops."""

    name: str
    map_size: tuple[int, ...] | None = None
    native_max_abs_diff: float | None = None
    dense_max_abs_diff: float | None = None
    crops: CropAccount | None = None
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    """What the judge found: ``native``, ``dense`` (and ``smallest`` for a stitched map)."""

    @property
    def tolerance(self) -> float | None:
        """The rule's tolerance, relative to each reference's scale."""
        return max((c.tolerance for c in self.comparisons.values()), default=None)

    @property
    def needed_tolerance(self) -> float | None:
        """The smallest relative tolerance that would have passed every comparison."""
        return _largest(c.needed_tolerance for c in self.comparisons.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "map_size": None if self.map_size is None else list(self.map_size),
            "native_max_abs_diff": self.native_max_abs_diff,
            "dense_max_abs_diff": self.dense_max_abs_diff,
            "tolerance": self.tolerance,
            "needed_tolerance": self.needed_tolerance,
            "comparisons": {k: c.to_dict() for k, c in self.comparisons.items()},
            "crops": None if self.crops is None else self.crops.to_dict(),
        }


@dataclass
class DenseCheck:
    """The outcome of :func:`verify_dense`; truthy when the converted model passed.

    The judge runs in float64: each output at the native size must equal the
    original's, and every cell of each output's dense map on a larger input
    must equal the original head applied to the corresponding window of the
    trunk's feature map, each within ``tolerance``. The crop account (the
    whole original model run on native-size crops) says which cells also
    equal that, and warns when no interior cell does; it never fails the check.
    """

    native_size: tuple[int, ...]
    larger_size: tuple[int, ...]
    rule: str = "model-float64"
    """The judge's rule every comparison used (:mod:`fcconv.verify.judge`)."""
    outputs: list[OutputCheck] = field(default_factory=list)
    crops: CropAccount | None = None
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def __bool__(self) -> bool:
        return self.passed

    @property
    def map_size(self) -> tuple[int, ...] | None:
        return self.outputs[0].map_size if self.outputs else None

    @property
    def native_max_abs_diff(self) -> float | None:
        return _largest(o.native_max_abs_diff for o in self.outputs)

    @property
    def dense_max_abs_diff(self) -> float | None:
        return _largest(o.dense_max_abs_diff for o in self.outputs)

    @property
    def tolerance(self) -> float:
        """The rule's tolerance, relative to the scale of each output's reference."""
        from fcconv.verify.judge import RULES

        return RULES[self.rule].tolerance

    @property
    def needed_tolerance(self) -> float | None:
        """The smallest relative tolerance that would have passed every comparison."""
        return _largest(o.needed_tolerance for o in self.outputs)

    @property
    def judged(self) -> bool:
        """Whether every comparison had a reference large enough to judge."""
        return all(c.judged for o in self.outputs for c in o.comparisons.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "compute_dtype": "float64",
            "native_size": list(self.native_size),
            "native_max_abs_diff": self.native_max_abs_diff,
            "larger_size": list(self.larger_size),
            "map_size": None if self.map_size is None else list(self.map_size),
            "dense_max_abs_diff": self.dense_max_abs_diff,
            "rule": self.rule,
            "tolerance": self.tolerance,
            "needed_tolerance": self.needed_tolerance,
            "judged": self.judged,
            "outputs": [o.to_dict() for o in self.outputs],
            "crops": None if self.crops is None else self.crops.to_dict(),
            "warnings": list(self.warnings),
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
    metadata: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "dynamic": self.dynamic,
            "ranges": {k: list(v) for k, v in self.ranges.items()},
            "example_shape": list(self.example_shape),
            "roundtrip_max_abs_diff": self.roundtrip_max_abs_diff,
            "probed_shapes": [list(s) for s in self.probed_shapes],
            "rejected_shapes": [list(s) for s in self.rejected_shapes],
            "metadata": self.metadata,
            "note": self.note,
        }
