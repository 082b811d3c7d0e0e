"""The whole-model job for people: the model's facts, each output's cells, the head, the checks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fcconv.report.console import num, table, text

if TYPE_CHECKING:
    from rich.console import Console

    from fcconv.api import ConvolutionalizeResult


# ---------------------------------------------------------- convolutionalize


def _range(bounds: tuple[int | None, int | None]) -> str:
    low, high = bounds
    if low == high:
        return str(low)
    return f"{low}…{high if high is not None else '∞'}"


def _sizes(values: Any) -> str:
    return "?" if values is None else "x".join(str(v) for v in values)


def _input(conversion: Any) -> str:
    layout = conversion.layout
    if layout.channels is None:
        return f"{_sizes(layout.size)} (no channel axis)"
    return f"{_sizes(layout.size)} × {layout.channels} channels"


def _cells(output: Any) -> str:
    cells = output.cells
    if cells is None:
        return f"unknown: {output.cells_map.unknown}"
    return (
        f"offset {_sizes(cells.offset)}, stride {_sizes(cells.stride)}, "
        f"window {_sizes(cells.window)}"
    )


HEADS = {
    "global_pool": "global pool over each {window} window at stride 1",
    "cam": "CAM: the head on each feature cell (pool removed)",
}


def _head(output: Any) -> str:
    """How the head reads the feature map: a flatten in an order, or a pool over a window."""
    kind = getattr(output, "head", "flatten")
    if kind == "flatten":
        return f"flatten, order {output.order}"
    return HEADS[kind].format(window=_sizes(output.window))


def _crops(account: Any) -> str:
    if account is None:
        return "not compared"
    if account.crop_exact is None:
        return f"{account.cells} cells; which equal their crop is unknown"
    text = f"{account.crop_exact} of {account.cells} cells equal the model on their crop"
    if account.compared_exact:
        text += f" (max |Δ| {num(account.max_abs_diff_exact)} on {account.compared_exact} run)"
    if account.compared_other:
        text += (
            f"; the others differ by up to {num(account.max_abs_diff_other)} "
            f"({account.compared_other} run)"
        )
    return text


def _outputs_table(conversion: Any, check: Any) -> Any:
    from rich.table import Table

    checks = {o.name: o for o in check.outputs}
    outputs = Table(title=text("outputs: each cell's input box and its crop"), title_justify="left")
    columns = ("output", "feature map", "head", "cells (input coordinates)", "map", "crops")
    for column in columns:
        outputs.add_column(column)
    for output in conversion.outputs:
        checked = checks.get(output.name)
        outputs.add_row(
            text(output.name),
            text(output.patch.describe()),
            text(_head(output)),
            text(_cells(output)),
            text(_sizes(checked.map_size) if checked else "?"),
            text(_crops(checked.crops) if checked else "?"),
        )
    return outputs


def render_convolutionalize(console: Console, result: ConvolutionalizeResult) -> None:
    """The model's facts, its outputs' cells, the head before and after, the checks, the files."""
    from rich.table import Table

    conversion, check, exported = result.conversion, result.verification, result.export
    facts = [
        ("model", f"{conversion.model_name} (traced with {conversion.tracer})"),
        ("native input", _input(conversion)),
        ("stride", f"{_sizes(conversion.stride)} feature-map cells"),
        ("outputs", ", ".join(o.name for o in conversion.outputs)),
    ]
    if conversion.weights_from == "factory":
        facts.append(("weights", "built by the --arch factory (no MODEL file)"))
    if conversion.output_stride is not None:
        facts.append(
            (
                "output stride",
                f"{_sizes(conversion.output_stride)} input pixels "
                f"({_sizes(conversion.phases)} shifted runs interleaved)",
            )
        )
    shown = result.model if result.model is not None else "(the --arch factory's model)"
    console.print(table(text(f"fcconv convolutionalize {shown}"), facts))
    console.print(_outputs_table(conversion, check))

    layers = Table(title="layers")
    for column in ("name", "was", "now"):
        layers.add_column(column)
    for change in conversion.changes:
        layers.add_row(text(change.name), text(change.was), text(change.now))
    console.print(layers)
    lines = [(c.name, c.conv2d) for c in conversion.changes if c.conv2d]
    if lines:
        console.print(text("the modules that load the converted weights:"))
        for name, line in lines:
            console.print(text(f"  {name}: {line}"))

    rows = [
        ("native size", f"{_sizes(check.native_size)}: max |Δ| {num(check.native_max_abs_diff)}"),
        (
            "dense maps",
            f"{_sizes(check.larger_size)} input: max |Δ| {num(check.dense_max_abs_diff)} vs the "
            "original head on each window, every cell of every output",
        ),
        (
            "tolerance",
            f"{num(check.tolerance)} × each output's largest value ({check.rule}); "
            f"needed {num(check.needed_tolerance)}",
        ),
    ]
    if getattr(check, "smallest_size", None):
        rows[1] = (
            "dense maps",
            f"{_sizes(check.larger_size)} input: max |Δ| {num(check.dense_max_abs_diff)}, and "
            f"{_sizes(check.smallest_size)} (the smallest it takes): max |Δ| "
            f"{num(check.smallest_max_abs_diff)}, vs the original head on each window of the "
            "trunk run on each shifted input, every cell of every output",
        )
    if check.crops is not None:
        rows.append(("whole model on crops", _crops(check.crops)))
        rows.extend(("  because", reason) for reason in check.crops.reasons[:6])
    verdict = "equivalent" if check else "DIFFERENT: " + "; ".join(check.problems)
    rows.append(("result", verdict))
    console.print(table(text("verification (float64)"), rows))

    if result.cost is not None:
        console.print(cost_table(result.cost))
    for note in conversion.notes:
        console.print(text(f"note: {note}"))
    for warning in check.warnings:
        console.print(text((warning, "bold yellow")))
    if exported is not None:
        ranges = ", ".join(f"{k} {_range(v)}" for k, v in exported.ranges.items())
        kind = "dynamic" if exported.dynamic else "static"
        console.print(text(f"wrote {exported.path} ({kind} shapes: {ranges})"))
        if exported.note:
            console.print(text(f"note: {exported.note}"))
    else:
        console.print(text("nothing written: the converted model failed verification"))
    if result.state_dict is not None:
        console.print(
            text(f"wrote {result.state_dict} (state dict for the conv layers listed above)")
        )


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}×"


def cost_table(cost: Any) -> Any:
    """The cost of the denser map beside the coarse map and the crops (FLOPs, time)."""
    from rich.table import Table

    title = text(
        f"cost on a {_sizes(cost.input_size)} input (FLOPs of convs and matmuls; "
        "median time, this machine)"
    )
    table = Table(title=title, title_justify="left")
    for column in ("path", "cells", "GFLOP", "× FLOPs", "time", "× time", "note"):
        table.add_column(column)
    for row in cost.rows:
        flops, seconds = cost.ratios(row)
        table.add_row(
            text(row.path),
            text(str(row.cells)),
            text(f"{row.flops / 1e9:.3g}"),
            text(_ratio(flops)),
            text(f"{row.seconds * 1e3:.3g} ms"),
            text(_ratio(seconds)),
            text(row.note),
        )
    return table
