"""The whole-model job for people: the model's facts, the head before and after, the checks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fcconv.report import size, table, text

if TYPE_CHECKING:
    from rich.console import Console

    from fcconv.api import ConvolutionalizeResult


# ---------------------------------------------------------- convolutionalize


def _range(bounds: tuple[int | None, int | None]) -> str:
    low, high = bounds
    if low == high:
        return str(low)
    return f"{low}…{high if high is not None else '∞'}"


def render_convolutionalize(console: Console, result: ConvolutionalizeResult) -> None:
    """The model's facts, its head before and after, the verification, what was written."""
    from rich.table import Table

    conversion, check, exported = result.conversion, result.verification, result.export
    patch = conversion.patch
    facts = [
        ("model", conversion.model_name),
        ("native input", f"{size(conversion.input_size)} × {conversion.in_channels} channels"),
        (
            "feature map / patch",
            f"{patch.channels} × {patch.height} × {patch.width} (HxWxC {patch})",
        ),
        ("order", f"{conversion.order} (from {conversion.order_from})"),
        (
            "stride",
            f"{size(conversion.stride)} feature-map cells = windows "
            f"{size(conversion.window_stride)} input pixels apart, each "
            f"{size(conversion.input_size)}",
        ),
    ]
    console.print(table(text(f"fcconv convolutionalize {result.model}"), facts))

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
        (
            "native size",
            "?"
            if check.native_max_abs_diff is None
            else f"{size(check.native_size)}: max |Δ| {check.native_max_abs_diff:.3g}",
        ),
        (
            "dense map",
            "?"
            if check.dense_max_abs_diff is None
            else f"{size(check.larger_size)} → {size(check.map_size)} map: max |Δ| "
            f"{check.dense_max_abs_diff:.3g} vs the original head on each window",
        ),
        ("tolerance", f"{check.tolerance:.3g}"),
    ]
    if check.crop_note:
        rows.append(("whole model on crops", check.crop_note))
    verdict = "equivalent" if check else "DIFFERENT: " + "; ".join(check.problems)
    rows.append(("result", verdict))
    console.print(table(text("verification (float64)"), rows))

    for note in conversion.notes:
        console.print(text(f"note: {note}"))
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
