"""A converted model checked in its own runtime (Keras, onnxruntime): the map vs. the head.

Both runtimes are judged alike. At the native size the converted model's
``1 × 1`` map must equal the original's output; on a larger input every cell
of its map must equal the original model's head applied to the matching
window of the trunk's feature map (the trunk and the head both run in the
runtime, on the original graph). The runtimes compute in float32, so the
judge is the rule ``runtime-float32`` of :mod:`fcconv.verify.judge`, a
tolerance relative to the outputs' size: a wrong order or weight is off by
the size of the output itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fcconv.verify.judge import RULES, Comparison, compare

if TYPE_CHECKING:
    import numpy as np

    from fcconv.geometry import Patch

RULE = "runtime-float32"
"""The rule every runtime comparison is judged by."""
FLOAT32_RTOL = RULES[RULE].tolerance
"""|map − head on window| ≤ 1e-4 · max |head on window|."""


@dataclass
class RuntimeCheck:
    """The converted model run in its runtime; truthy when every comparison passed."""

    runtime: str
    native_size: tuple[int, int]
    larger_size: tuple[int, int] | None = None
    map_size: tuple[int, int] | None = None
    windows: int = 0
    native_max_abs_diff: float | None = None
    dense_max_abs_diff: float | None = None
    tolerance: float = FLOAT32_RTOL
    """Relative to the scale of each reference (its largest magnitude)."""
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    """``native`` and ``dense``: what the judge found for each."""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems and self.dense_max_abs_diff is not None

    def __bool__(self) -> bool:
        return self.passed

    @property
    def needed_tolerance(self) -> float | None:
        """The smallest relative tolerance that would have passed both comparisons."""
        needed = [c.needed_tolerance for c in self.comparisons.values()]
        return max(needed) if needed else None

    def summary(self) -> str:
        """One line for people: what ran, and how close the map came."""
        if self.dense_max_abs_diff is None:
            return f"{self.runtime}: " + "; ".join(self.problems)
        height, width = self.larger_size or (0, 0)
        rows, cols = self.map_size or (0, 0)
        verdict = "equals" if self.passed else "DIFFERS from"
        return (
            f"{self.runtime}: on {height}x{width} the converted model's {rows}x{cols} map "
            f"{verdict} the original head on each of its {self.windows} windows (max |Δ| "
            f"{self.dense_max_abs_diff:.3g}, native size max |Δ| "
            f"{_num(self.native_max_abs_diff)}, tolerance {self.tolerance:.3g} relative)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "passed": self.passed,
            "native_size": list(self.native_size),
            "native_max_abs_diff": self.native_max_abs_diff,
            "larger_size": None if self.larger_size is None else list(self.larger_size),
            "map_size": None if self.map_size is None else list(self.map_size),
            "windows": self.windows,
            "dense_max_abs_diff": self.dense_max_abs_diff,
            "tolerance": self.tolerance,
            "needed_tolerance": self.needed_tolerance,
            "rule": RULE,
            "comparisons": {k: c.to_dict() for k, c in self.comparisons.items()},
            "problems": list(self.problems),
            "notes": list(self.notes),
        }


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def grid(
    features: tuple[int, int], patch: Patch, stride: tuple[int, int]
) -> tuple[list[tuple[int, int]], int, int]:
    """The top-left corners of every window of a feature map, row by row, and the grid."""
    rows = (features[0] - patch.height) // stride[0] + 1
    cols = (features[1] - patch.width) // stride[1] + 1
    corners = [(p * stride[0], q * stride[1]) for p in range(rows) for q in range(cols)]
    return corners, max(rows, 0), max(cols, 0)


def cut_windows(
    features: np.ndarray, patch: Patch, stride: tuple[int, int], *, channels_last: bool
) -> tuple[np.ndarray, int, int]:
    """Every ``kh × kw`` window of a feature map, batched cell by cell: ``[B·P·Q, …]``."""
    import numpy as np

    height, width = features.shape[1:3] if channels_last else features.shape[2:4]
    corners, rows, cols = grid((height, width), patch, stride)
    cells = []
    for top, left in corners:
        if channels_last:
            cells.append(features[:, top : top + patch.height, left : left + patch.width, :])
        else:
            cells.append(features[:, :, top : top + patch.height, left : left + patch.width])
    stacked = np.stack(cells, axis=1)  # [B, P·Q, …]
    return stacked.reshape(-1, *stacked.shape[2:]), rows, cols


def judge(
    check: RuntimeCheck,
    native: tuple[np.ndarray, np.ndarray],
    dense: tuple[np.ndarray, np.ndarray],
) -> RuntimeCheck:
    """Compare (got, expected) at the native size and on the larger input; fill ``check``.

    ``native``: the converted model's ``[B, O]`` cells and the original's
    output. ``dense``: the map and the head on every window, both
    ``[B, P, Q, O]``. A map of one cell on the larger input is no dense map (a
    global pool before the head): a problem, never "verified".
    """
    if dense[0].ndim == 4 and dense[0].shape[1] * dense[0].shape[2] == 1:
        height, width = check.larger_size or (0, 0)
        check.problems.append(
            f"the converted model's map is 1x1 on the larger {height}x{width} input: not a "
            "dense map (a global pool before the head keeps it one cell on every input)"
        )
    for (got, expected), what in ((native, "native"), (dense, "dense")):
        if got.shape != expected.shape:
            check.problems.append(
                f"at the {what} size the converted model gives shape {got.shape}, "
                f"expected {expected.shape}"
            )
            continue
        found = compare(got, expected, RULE)
        check.comparisons[what] = found
        setattr(check, f"{what}_max_abs_diff", found.max_abs_diff)
        if not found.passed:
            check.problems.append(f"at the {what} size the converted model: {found.summary()}")
    return check
