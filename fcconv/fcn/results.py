"""What convolutionalization, its verification and its export report.

Plain dataclasses, each with ``to_dict`` for the command line's JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx

from fcconv.geometry import Patch


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
