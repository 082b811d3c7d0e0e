"""The checkpoint jobs for people: what each layer became, the checks, the entries."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fcconv.patches import SPATIAL_AXES
from fcconv.report.console import num, shape, table, text
from fcconv.windows import AXIS_NOUNS, Grid, default_input, make_grid

if TYPE_CHECKING:
    from rich.console import Console

    from fcconv.api import ConvertResult, InspectResult
    from fcconv.plan import LayerPlan
    from fcconv.verify import LayerCheck, VerifyResult
    from fcconv.verify.windows import FunctionalCheck


# ------------------------------------------------------------------ geometry


def geometry_lines(plan: LayerPlan, input_size: tuple[int, ...] | None) -> list[str]:
    """Input → output grid, the receptive field of one cell, and what is left uncovered."""
    size = input_size or default_input(plan.patch, plan.stride)
    grid = make_grid(size, plan.patch, plan.stride)
    return [_grid_line(plan, grid), _field_line(grid), *grid.warnings()]


def _times(numbers: tuple[int, ...] | list[int]) -> str:
    return "×".join(map(str, numbers))


def _grid_line(plan: LayerPlan, grid: Grid) -> str:
    return (
        f"input {_times([*grid.size, grid.patch.channels])} → output map "
        f"{_times([*grid.counts, plan.out_features])} ({grid.cells} windows)"
    )


def _field_line(grid: Grid) -> str:
    """``cell (p, q) sees input rows 20p … 20p+19, columns …`` (``cell p`` in 1-D)."""
    letters = "pqr"[: grid.patch.ndim]
    cell = f"({', '.join(letters)})" if len(letters) > 1 else letters
    spans = ", ".join(
        f"{AXIS_NOUNS[axis][1]}s {s}{i} … {s}{i}+{k - 1}"
        for axis, i, s, k in zip(
            SPATIAL_AXES[grid.patch.ndim], letters, grid.stride, grid.patch.sizes, strict=True
        )
    )
    field = _times(grid.patch.sizes) + ("-position" if grid.patch.ndim == 1 else "")
    return f"cell {cell} sees input {spans} (a {field} receptive field)"


def order_words(plan: LayerPlan) -> str:
    """``chw (default)``, ``hwc (flag)``, ``hwc (weights, margin 0.319)``: where it came from."""
    came = plan.order_from
    if came == "weights" and plan.order_margin is not None:
        came = f"weights, margin {plan.order_margin:.3g}"
    return f"{plan.order} ({came})"


# ------------------------------------------------------------------- convert


def render_plans(
    console: Console, plans: list[LayerPlan], input_size: tuple[int, ...] | None
) -> None:
    """What each layer became and the module that loads it."""
    from fcconv.plan import layer_inputs

    for plan, size in zip(plans, layer_inputs(plans, input_size), strict=True):
        console.print(
            text(
                (plan.name, "bold"),
                f": Linear {plan.linear_shape[0]}←{plan.linear_shape[1]} → conv "
                f"{shape(plan.conv_shape)}, patch {plan.patch}, order {order_words(plan)}, "
                f"stride {'x'.join(map(str, plan.stride))}",
            )
        )
        console.print(text(f"  build it with: {plan.conv_line()}"))
        for line in geometry_lines(plan, size):
            console.print(text((f"  {line}", "yellow" if "uncovered" in line else "")))


def render_convert(console: Console, result: ConvertResult) -> None:
    """The plans, the checks, and what was written (or why not)."""
    if not result.written:
        if result.verification is not None:
            render_verification(console, result.verification)
        console.print(text(("not written", "red"), ": the conversion failed verification"))
        return
    render_plans(console, result.plans, result.input_size)
    if result.verification is not None:
        render_verification(console, result.verification)
    where = "stdout" if result.output == "-" else result.output
    console.print(text(f"wrote {where} ({result.format}, {result.mode})"))


# -------------------------------------------------------------------- verify


def render_verification(console: Console, result: VerifyResult) -> None:
    """One small table per layer (fits any terminal), then the verdict in words."""
    for check in result.layers:
        verdict = ("pass", "green") if check else ("FAIL", "red")
        console.print(table(text(f"{check.plan.name}: ", verdict), _check_rows(check)))
        functional_notes = check.functional.notes if check.functional is not None else []
        for line in [*check.notes, *functional_notes]:
            console.print(text(f"note: {line}"))
        for problem in check.problems:
            console.print(text(("difference", "red"), f": {problem}"))
    for note in result.notes:
        console.print(text(f"note: {note}"))
    for difference in result.differences:
        console.print(text(("difference", "red"), f": {difference}"))
    for check in result.runtime:
        verdict = ("pass", "green") if check else ("FAIL", "red")
        console.print(text(verdict, f": {check.summary()}"))
        for problem in check.problems:
            console.print(text(("difference", "red"), f": {problem}"))
    if result:
        console.print(
            text(("equivalent", "green"), ": every layer is an exact permutation and matches")
        )
    else:
        console.print(text(("NOT equivalent", "red"), ": see the differences above"))


def _check_rows(check: LayerCheck) -> list[tuple[str, str]]:
    plan, functional = check.plan, check.functional
    rows = [
        ("linear → conv", f"{shape(plan.linear_shape)} → {shape(plan.conv_shape)}"),
        (
            "patch · order · stride",
            f"{plan.patch} · {order_words(plan)} · {'x'.join(map(str, plan.stride))}",
        ),
        ("exact (bit for bit)", "yes" if check.exact else "no"),
        ("build it with", plan.conv_line()),
    ]
    if functional is None:
        return rows
    cells = [*functional.output_grid, plan.out_features]
    return [
        *rows,
        ("input → output map", f"{_times(functional.input_size)} → {_times(cells)}"),
        ("receptive field", _field_line(make_grid(functional.input_size, plan.patch, plan.stride))),
        *_comparison_rows(functional),
    ]


def _comparison_rows(functional: FunctionalCheck) -> list[tuple[str, str]]:
    """The judge's findings: float64 (the sharp rule), then the layer's own dtype."""
    float64, in_dtype = functional.float64, functional.in_dtype
    if not float64.judged:
        return [("float64 check", f"could not judge: {float64.reason}")]
    rows = [("float64 error / 1e-9·scale", num(float64.ratio))]
    if in_dtype is None:
        return rows
    if not in_dtype.judged:
        return [*rows, (f"{functional.dtype} check", f"could not judge: {in_dtype.reason}")]
    return [
        *rows,
        (f"max abs error ({functional.dtype})", num(in_dtype.max_abs_diff)),
        ("error / bound 2·γ_N·scale", num(in_dtype.ratio)),
        ("error / u·scale", num(in_dtype.units)),
        ("tolerance that would pass", num(in_dtype.needed_tolerance)),
    ]


# ------------------------------------------------------------------- inspect


def render_inspect(console: Console, result: InspectResult) -> None:
    """The Linear-shaped entries of a checkpoint, the patches that fit, the order evidence."""
    from rich.table import Table

    table = Table(
        title=text(f"{result.source} ({result.format}): Linear-shaped entries"),
        title_justify="left",
    )
    spelling = {1: "l=L,c=C", 2: "HxWxC", 3: "d=D,h=H,w=W,c=C"}[result.rank]
    for column in ("name", "out × in", "dtype", "bias", f"patches that fit ({spelling})"):
        table.add_column(column)
    for entry in result.entries:
        table.add_row(
            text(entry.name),
            text(f"{entry.out_features} × {entry.in_features}"),
            text(entry.dtype),
            text("yes" if entry.bias_key else "no"),
            text(", ".join(result.fits[entry.name]) or "—"),
        )
    console.print(table)
    if not result.entries:
        console.print(text("no Linear-shaped entries (2-D weights) in this checkpoint"))
    for name, feeder in result.feeders.items():
        proposal = result.proposed.get(name)
        console.print(
            text(
                f"{name}: C = {feeder.channels}, the out_channels of {feeder.conv} (the conv "
                f"before it)" + (f"; proposed patch {proposal}" if proposal else "")
            )
        )
    for layer in result.converted:
        details = (
            f", patch {layer.get('patch')}, order {layer['order']} ({layer['order_from']})"
            if "order" in layer and "order_from" in layer
            else ""
        )
        console.print(
            text(f"converted: {layer['layer']} conv {shape(layer['conv_shape'])}{details}")
        )
    for name, evidence in result.evidence.items():
        verdict = f"order {evidence.winner}" if evidence.winner else "undecided"
        console.print(text(f"{name} (patch {evidence.patch}): {verdict}: {evidence.reason}"))
        console.print(text(f"  ranking: {evidence.ranking_text()}"))
    from fcconv.report.onnx import head_lines

    for line in head_lines(result.head):
        console.print(text(line))
    if result.evidence:
        from fcconv.evidence import FLIP_UNSEEN

        console.print(text(f"note: {FLIP_UNSEEN}"))
