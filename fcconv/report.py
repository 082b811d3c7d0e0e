"""Results rendered for people (rich, on stderr) and for scripts (JSON, on stdout).

Text that comes from files (tensor and layer names, paths, metadata) is
printed as text: never parsed as rich markup, and with control characters
(terminal escapes) shown as ``\\x1b``-style escapes instead of reaching the
terminal.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from fcconv.geometry import Grid, default_input, make_grid

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

    from fcconv.api import ConvertResult, ConvolutionalizeResult, InspectResult
    from fcconv.plan import LayerPlan
    from fcconv.verify import LayerCheck, VerifyResult


def printable(text: object) -> str:
    r"""``text`` with every control or unprintable character written as an escape.

    >>> printable("fc\x1b[31m\n")
    'fc\\x1b[31m\\n'
    """
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in str(text)
    )


def _text(*parts: object | tuple[object, str]) -> Text:
    """A rich ``Text`` from plain parts or ``(part, style)`` pairs; no markup is parsed."""
    from rich.text import Text

    text = Text()
    for part in parts:
        if isinstance(part, tuple):
            text.append(printable(part[0]), style=part[1])
        else:
            text.append(printable(part))
    return text


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


def _shape(shape: Iterable[int]) -> str:
    return "×".join(map(str, shape))


def _size(pair: Any) -> str:
    return "?" if pair is None else f"{pair[0]}x{pair[1]}"


def _table(title: Text, rows: Iterable[tuple[object, object]]) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for label, value in rows:
        table.add_row(_text(label), _text(value))
    return table


# ------------------------------------------------------------------ geometry


def geometry_lines(plan: LayerPlan, input_size: tuple[int, int] | None) -> list[str]:
    """Input → output grid, the receptive field of one cell, and what is left uncovered."""
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


# ------------------------------------------------------------------- convert


def render_plans(
    console: Console, plans: list[LayerPlan], input_size: tuple[int, int] | None
) -> None:
    """What each layer became and the module that loads it."""
    from fcconv.plan import layer_inputs

    for plan, size in zip(plans, layer_inputs(plans, input_size), strict=True):
        console.print(
            _text(
                (plan.name, "bold"),
                f": Linear {plan.linear_shape[0]}←{plan.linear_shape[1]} → conv "
                f"{_shape(plan.conv_shape)}, patch {plan.patch}, order {plan.order}, "
                f"stride {plan.stride[0]}x{plan.stride[1]}",
            )
        )
        console.print(_text(f"  build it with: {plan.conv2d_line()}"))
        for line in geometry_lines(plan, size):
            console.print(_text((f"  {line}", "yellow" if "uncovered" in line else "")))


def render_convert(console: Console, result: ConvertResult) -> None:
    """The plans, the checks, and what was written (or why not)."""
    if not result.written:
        if result.verification is not None:
            render_verification(console, result.verification)
        console.print(_text(("not written", "red"), ": the conversion failed verification"))
        return
    render_plans(console, result.plans, result.input_size)
    if result.verification is not None:
        render_verification(console, result.verification)
    where = "stdout" if result.output == "-" else result.output
    console.print(_text(f"wrote {where} ({result.format}, {result.mode})"))


# -------------------------------------------------------------------- verify


def render_verification(console: Console, result: VerifyResult) -> None:
    """One small table per layer (fits any terminal), then the verdict in words."""
    for check in result.layers:
        verdict = ("pass", "green") if check else ("FAIL", "red")
        console.print(_table(_text(f"{check.plan.name}: ", verdict), _check_rows(check)))
        functional_notes = check.functional.notes if check.functional is not None else []
        for line in [*check.notes, *functional_notes]:
            console.print(_text(f"note: {line}"))
        for problem in check.problems:
            console.print(_text(("difference", "red"), f": {problem}"))
    for note in result.notes:
        console.print(_text(f"note: {note}"))
    for difference in result.differences:
        console.print(_text(("difference", "red"), f": {difference}"))
    if result:
        console.print(
            _text(("equivalent", "green"), ": every layer is an exact permutation and matches")
        )
    else:
        console.print(_text(("NOT equivalent", "red"), ": see the differences above"))


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


# ------------------------------------------------------------------- inspect


def render_inspect(console: Console, result: InspectResult) -> None:
    """The Linear-shaped entries of a checkpoint, the patches that fit, the order evidence."""
    from rich.table import Table

    table = Table(
        title=_text(f"{result.source} ({result.format}): Linear-shaped entries"),
        title_justify="left",
    )
    for column in ("name", "out × in", "dtype", "bias", "patches that fit (HxWxC)"):
        table.add_column(column)
    for entry in result.entries:
        table.add_row(
            _text(entry.name),
            _text(f"{entry.out_features} × {entry.in_features}"),
            _text(entry.dtype),
            _text("yes" if entry.bias_key else "no"),
            _text(", ".join(result.fits[entry.name]) or "—"),
        )
    console.print(table)
    if not result.entries:
        console.print(_text("no Linear-shaped entries (2-D weights) in this checkpoint"))
    for layer in result.converted:
        details = f", patch {layer['patch']}, order {layer['order']}" if "order" in layer else ""
        console.print(
            _text(f"converted: {layer['layer']} conv {_shape(layer['conv_shape'])}{details}")
        )
    for name, evidence in result.evidence.items():
        verdict = f"order {evidence.winner}" if evidence.winner else "undecided"
        console.print(_text(f"{name} (patch {evidence.patch}): {verdict}: {evidence.reason}"))
        console.print(_text(f"  ranking: {evidence.ranking_text()}"))


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
        ("native input", f"{_size(conversion.input_size)} × {conversion.in_channels} channels"),
        (
            "feature map / patch",
            f"{patch.channels} × {patch.height} × {patch.width} (HxWxC {patch})",
        ),
        ("order", f"{conversion.order} (from {conversion.order_from})"),
        (
            "stride",
            f"{_size(conversion.stride)} feature-map cells = windows "
            f"{_size(conversion.window_stride)} input pixels apart, each "
            f"{_size(conversion.input_size)}",
        ),
    ]
    console.print(_table(_text(f"fcconv convolutionalize {result.model}"), facts))

    layers = Table(title="layers")
    for column in ("name", "was", "now"):
        layers.add_column(column)
    for change in conversion.changes:
        layers.add_row(_text(change.name), _text(change.was), _text(change.now))
    console.print(layers)
    lines = [(c.name, c.conv2d) for c in conversion.changes if c.conv2d]
    if lines:
        console.print(_text("the modules that load the converted weights:"))
        for name, line in lines:
            console.print(_text(f"  {name}: {line}"))

    rows = [
        (
            "native size",
            "?"
            if check.native_max_abs_diff is None
            else f"{_size(check.native_size)}: max |Δ| {check.native_max_abs_diff:.3g}",
        ),
        (
            "dense map",
            "?"
            if check.dense_max_abs_diff is None
            else f"{_size(check.larger_size)} → {_size(check.map_size)} map: max |Δ| "
            f"{check.dense_max_abs_diff:.3g} vs the original head on each window",
        ),
        ("tolerance", f"{check.tolerance:.3g}"),
    ]
    if check.crop_note:
        rows.append(("whole model on crops", check.crop_note))
    verdict = "equivalent" if check else "DIFFERENT: " + "; ".join(check.problems)
    rows.append(("result", verdict))
    console.print(_table(_text("verification (float64)"), rows))

    for note in conversion.notes:
        console.print(_text(f"note: {note}"))
    if exported is not None:
        ranges = ", ".join(f"{k} {_range(v)}" for k, v in exported.ranges.items())
        kind = "dynamic" if exported.dynamic else "static"
        console.print(_text(f"wrote {exported.path} ({kind} shapes: {ranges})"))
        if exported.note:
            console.print(_text(f"note: {exported.note}"))
    else:
        console.print(_text("nothing written: the converted model failed verification"))
    if result.state_dict is not None:
        console.print(
            _text(f"wrote {result.state_dict} (state dict for the conv layers listed above)")
        )


# ------------------------------------------------------------------ progress


@contextlib.contextmanager
def progress_bar(
    description: str, *, enabled: bool | None = None
) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on stderr as a ``progress(done, total)`` callback, or None.

    Enabled by default only when stderr is a terminal, so pipes and logs stay clean.

    Example:
        >>> with progress_bar("converting", enabled=False) as progress:
        ...     progress is None
        True
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
