"""Results rendered for people (rich, on stderr) and for scripts (JSON, on stdout)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from fcconv.geometry import Grid, make_grid

if TYPE_CHECKING:
    from rich.console import Console

    from fcconv.layers import LayerPlan, LinearEntry
    from fcconv.verify import LayerCheck, VerifyResult


def stderr_console() -> Console:
    """The console for people: stderr, so stdout stays clean for data."""
    from rich.console import Console

    # soft_wrap: long lines (the nn.Conv2d(...) call) stay whole, ready to copy.
    return Console(stderr=True, highlight=False, soft_wrap=True)


def emit_json(document: Mapping[str, Any]) -> None:
    """Write exactly one JSON document to stdout."""
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def geometry_lines(plan: LayerPlan, input_size: tuple[int, int] | None) -> list[str]:
    """Input → output grid, the receptive field of one cell, and what is left uncovered."""
    from fcconv.geometry import default_input

    size = input_size or default_input(plan.patch, plan.stride)
    grid = make_grid(size, plan.patch, plan.stride)
    return [_grid_line(plan, grid), _field_line(grid), *grid.warnings()]


def _grid_line(plan: LayerPlan, grid: Grid) -> str:
    return (
        f"input {grid.height}×{grid.width}×{plan.patch.channels} → output map "
        f"{grid.rows}×{grid.cols}×{plan.out_features} ({grid.rows * grid.cols} windows)"
    )


def _field_line(grid: Grid) -> str:
    sh, sw = grid.stride
    kh, kw = grid.patch.height, grid.patch.width
    return (
        f"cell (p, q) sees input rows {sh}p … {sh}p+{kh - 1}, "
        f"columns {sw}q … {sw}q+{kw - 1} (a {kh}×{kw} receptive field)"
    )


def geometry_dict(plan: LayerPlan, input_size: tuple[int, int] | None) -> dict[str, Any]:
    """The same geometry facts as :func:`geometry_lines`, for JSON."""
    from fcconv.geometry import default_input

    size = input_size or default_input(plan.patch, plan.stride)
    grid = make_grid(size, plan.patch, plan.stride)
    return {
        "input": [grid.height, grid.width, plan.patch.channels],
        "output_map": [grid.rows, grid.cols, plan.out_features],
        "receptive_field": [plan.patch.height, plan.patch.width],
        "uncovered_rows": grid.uncovered_rows,
        "uncovered_cols": grid.uncovered_cols,
        "warnings": grid.warnings(),
    }


def plan_dict(plan: LayerPlan, input_size: tuple[int, int] | None) -> dict[str, Any]:
    """One converted layer, for JSON."""
    return {
        **plan.to_dict(),
        "geometry": geometry_dict(plan, input_size),
    }


def render_plans(
    console: Console, plans: list[LayerPlan], input_size: tuple[int, int] | None
) -> None:
    """What each layer became and the module that loads it."""
    from fcconv.layers import layer_inputs

    for plan, size in zip(plans, layer_inputs(plans, input_size), strict=True):
        console.print(
            f"[bold]{plan.name}[/]: Linear {plan.linear_shape[0]}←{plan.linear_shape[1]} → "
            f"conv {'×'.join(map(str, plan.conv_shape))}, patch {plan.patch}, "
            f"order {plan.order}, stride {plan.stride[0]}x{plan.stride[1]}"
        )
        console.print(f"  build it with: {plan.conv2d_line()}", markup=False)
        for line in geometry_lines(plan, size):
            style = "yellow" if "uncovered" in line else None
            console.print(f"  {line}", style=style, markup=False)


def render_verification(console: Console, result: VerifyResult) -> None:
    """One small table per layer (fits any terminal), then the verdict in words."""
    from rich.table import Table

    for check in result.layers:
        verdict = "[green]pass[/]" if check else "[red]FAIL[/]"
        table = Table(
            title=f"{check.plan.name}: {verdict}", title_justify="left", show_header=False
        )
        table.add_column(style="bold")
        table.add_column()
        for label, value in _check_rows(check):
            table.add_row(label, value)
        console.print(table)
        for line in [
            *check.notes,
            *(check.functional.notes if check.functional is not None else []),
        ]:
            console.print(f"note: {line}", markup=False)
        for problem in check.problems:
            console.print(f"[red]difference[/]: {problem}", highlight=False)
    for note in result.notes:
        console.print(f"note: {note}", markup=False)
    for difference in result.differences:
        console.print(f"[red]difference[/]: {difference}")
    if result:
        console.print("[green]equivalent[/]: every layer is an exact permutation and matches")
    else:
        console.print("[red]NOT equivalent[/]: see the differences above")


def _check_rows(check: LayerCheck) -> list[tuple[str, str]]:
    plan, functional = check.plan, check.functional
    rows = [
        ("linear → conv", f"{_shape(plan.linear_shape)} → {_shape(plan.conv_shape)}"),
        (
            "patch · order · stride",
            f"{plan.patch} · {plan.order} · {plan.stride[0]}x{plan.stride[1]}",
        ),
        ("exact (bit for bit)", "yes" if check.exact else "no"),
        ("build it with", plan.conv2d_line()),
    ]
    if functional is None:
        return rows
    height, width = functional.input_size
    grid_rows, grid_cols = functional.output_grid
    return [
        *rows,
        ("input → output map", f"{height}×{width} → {grid_rows}×{grid_cols}×{plan.out_features}"),
        ("receptive field", _field_line(make_grid(functional.input_size, plan.patch, plan.stride))),
        (f"max abs error ({functional.dtype})", _num(functional.max_abs_error)),
        ("error / bound 2·γ_N·scale", _num(functional.bound_ratio)),
        ("error / u·scale", _num(functional.roundoff_units)),
        ("rtol that would pass", _num(functional.needed_rtol)),
        ("float64 error / 1e-9·scale", _num(functional.float64_ratio)),
    ]


def _shape(shape: Iterable[int]) -> str:
    return "×".join(map(str, shape))


def render_inspect(
    console: Console,
    source: str,
    fmt: str,
    entries: list[LinearEntry],
    fits: Mapping[str, list[str]],
    converted: list[dict[str, Any]],
) -> None:
    """The Linear-shaped entries of a checkpoint and the patches that fit each."""
    from rich.table import Table

    table = Table(title=f"{source} ({fmt}): Linear-shaped entries", title_justify="left")
    for column in ("name", "out × in", "dtype", "bias", "patches that fit (HxWxC)"):
        table.add_column(column)
    for entry in entries:
        table.add_row(
            entry.name,
            f"{entry.out_features} × {entry.in_features}",
            entry.dtype,
            "yes" if entry.bias_key else "no",
            ", ".join(fits[entry.name]) or "—",
        )
    console.print(table)
    if not entries:
        console.print("no Linear-shaped entries (2-D weights) in this checkpoint")
    for layer in converted:
        console.print(
            f"converted: {layer['layer']} conv {'×'.join(map(str, layer['conv_shape']))}"
            + (f", patch {layer['patch']}, order {layer['order']}" if "order" in layer else ""),
            markup=False,
        )
