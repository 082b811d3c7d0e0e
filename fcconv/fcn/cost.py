"""What a denser map costs: FLOPs and time, side by side, on one input.

Three ways to score every window at stride ``S``: the stitched map
(:mod:`fcconv.fcn.stride`), the coarse map it is stitched from (stride
``M``: ``(M/S)^d`` times fewer cells), and the original model run on every
native-size crop at stride ``S`` (what a sliding-window user runs). FLOPs are
counted by :class:`torch.utils.flop_counter.FlopCounterMode` (convolutions and
matrix products: 2 per multiply-add); times are medians of a few runs in the
model's own dtype, measured in this process, so they are for comparison,
not for the record.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fcconv.fcn.trace import InputLayout, model_dtype_device, running_eval
from fcconv.progress import phased


@dataclass(frozen=True)
class CostRow:
    """One way to compute the map: its cells, FLOPs and time."""

    path: str
    cells: int
    flops: int
    seconds: float
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "cells": self.cells,
            "flops": self.flops,
            "seconds": self.seconds,
            "note": self.note,
        }


@dataclass
class MapCost:
    """The cost table: the stitched map first, then what it is compared with."""

    input_size: tuple[int, ...]
    output_stride: tuple[int, ...]
    rows: list[CostRow] = field(default_factory=list)

    def ratios(self, row: CostRow) -> tuple[float | None, float | None]:
        """``row``'s FLOPs and time over the stitched map's."""
        first = self.rows[0]
        flops = row.flops / first.flops if first.flops else None
        seconds = row.seconds / first.seconds if first.seconds else None
        return flops, seconds

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for row in self.rows:
            flops, seconds = self.ratios(row)
            rows.append(row.to_dict() | {"flops_ratio": flops, "time_ratio": seconds})
        return {
            "input_size": list(self.input_size),
            "output_stride": list(self.output_stride),
            "rows": rows,
        }


def count_flops(run: Callable[[], Any]) -> int:
    """FLOPs of the convolutions and matrix products ``run`` performs."""
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def median_seconds(run: Callable[[], Any], repeats: int = 3) -> float:
    """The median wall time of ``repeats`` calls of ``run``, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cells(output: Any, map_axes: Sequence[int]) -> int:
    first = next(leaf for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor))
    return math.prod(first.shape[axis] for axis in map_axes)


def crop_starts(size: Sequence[int], native: Sequence[int], step: Sequence[int]) -> list[tuple]:
    """Where every native-size crop at ``step`` starts inside an input of ``size``."""
    ranges = [range(0, n - k + 1, s) for n, k, s in zip(size, native, step, strict=True)]
    grid: list[tuple[int, ...]] = [()]
    for axis in ranges:
        grid = [(*g, i) for g in grid for i in axis]
    return grid


@phased("measuring the cost")
def measure_cost(
    original: nn.Module,
    coarse: nn.Module,
    stitched: nn.Module,
    layout: InputLayout,
    size: Sequence[int],
    step: Sequence[int],
    map_axes: Sequence[int],
    *,
    repeats: int = 3,
    max_crops: int = 8,
) -> MapCost:
    """FLOPs and time of the stitched map, the coarse map and the crops, on one input.

    The crops are timed on at most ``max_crops`` of them in one batch and the
    time scaled to all of them (the note says so); their FLOPs are one crop's
    times their number.
    """
    dtype, device = model_dtype_device(stitched)
    generator = torch.Generator().manual_seed(0)
    x = layout.example(1, size=size, dtype=dtype, device=device, generator=generator)
    native = layout.size
    starts = crop_starts(size, native, step)
    sample = starts[:max_crops]
    spatial = x.dim() - len(native)

    def crop(start: tuple[int, ...]) -> torch.Tensor:
        cut = tuple(slice(s, s + n) for s, n in zip(start, native, strict=True))
        return x[(slice(None),) * spatial + cut]

    batch = torch.cat([crop(start) for start in sample])
    rows = []
    with torch.no_grad(), running_eval(original), running_eval(stitched):
        for label, model in (("stitched", stitched), ("coarse", coarse)):
            cells = _cells(model(x), map_axes)
            rows.append((label, cells, count_flops(lambda m=model: m(x)), model))
        one = count_flops(lambda: original(crop(starts[0])))
        crops_time = median_seconds(lambda: original(batch), repeats) * len(starts) / len(sample)
        timed = [median_seconds(lambda m=model: m(x), repeats) for *_, model in rows]
    shown = "x".join(map(str, step))
    coarse_stride = "x".join(map(str, _coarse_stride(stitched, step)))
    runs = math.prod(getattr(stitched, "phases", (1,)))
    result = MapCost(tuple(size), tuple(step))
    result.rows = [
        CostRow(f"map at stride {shown} (fcconv, {runs} runs)", rows[0][1], rows[0][2], timed[0]),
        CostRow(f"map at stride {coarse_stride} (fcconv, 1 run)", rows[1][1], rows[1][2], timed[1]),
        CostRow(
            f"crops at stride {shown} (original model)",
            len(starts),
            one * len(starts),
            crops_time,
            f"time measured on {len(sample)} of {len(starts)} crops, in one batch, and scaled"
            if len(sample) < len(starts)
            else f"{len(starts)} crops in one batch",
        ),
    ]
    return result


def _coarse_stride(stitched: nn.Module, step: Sequence[int]) -> tuple[int, ...]:
    phases = getattr(stitched, "phases", (1,) * len(step))
    return tuple(s * f for s, f in zip(step, phases, strict=True))
