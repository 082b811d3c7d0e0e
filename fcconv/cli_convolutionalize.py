"""``fcconv convolutionalize``: a whole classifier in, a fully convolutional ``.pt2`` out.

Thin on purpose: parse the options, call :mod:`fcconv.fcn`,
render the report (a rich table on stderr, or one JSON document on stdout),
and choose the exit code: 0 converted and verified, 1 verification found a
difference (nothing written), 2 the command could not run (raised as an
:class:`~fcconv.errors.FcconvError`, which ``fcconv.cli.main`` prints as one
line).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import click

from fcconv.geometry import parse_size, parse_stride

EPILOG = """\b
Examples:
  fcconv convolutionalize weights.pt --arch fcconv.samples_models:tiny_vgg \\
      --input 32x32 -o tiny_vgg.pt2
  fcconv convolutionalize model.pt --trust-pickle --input 224x224 -o dense.pt2 \\
      --stride 2x2 --state-dict-out dense.safetensors --json

\b
The .pt2 program loads without your code:
  torch.export.load("dense.pt2").module()(images)  # [B, classes, H', W']
"""


@click.command("convolutionalize", epilog=EPILOG)
@click.argument("model", metavar="MODEL")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The .pt2 torch.export program to write.",
)
@click.option(
    "--input",
    "input_size",
    required=True,
    metavar="HxW",
    help="The native input size the classifier was trained at (e.g. 224x224).",
)
@click.option(
    "--arch",
    metavar="PKG.MOD:FN",
    help="A callable that builds the model; MODEL then holds its weights "
    "(any checkpoint fcconv reads).",
)
@click.option(
    "--layer",
    "layers",
    multiple=True,
    metavar="NAME",
    help="A Linear layer of the head (repeatable); the first must follow the "
    "flatten. Default: found from the trace.",
)
@click.option(
    "--stride",
    metavar="SHxSW",
    help="The first conv's stride in feature-map cells (default 1x1: a window at every offset).",
)
@click.option(
    "--channels",
    type=click.IntRange(min=1),
    help="Input channels, when the model does not start with a conv.",
)
@click.option(
    "--check-size",
    metavar="HxW",
    help="The larger input the dense map is verified on (default: one window step "
    "larger each way) and the export's example size.",
)
@click.option(
    "--state-dict-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the converted weights (.safetensors or .pt) for your own conv architecture.",
)
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Allow unpickling MODEL (runs code from the file): only for files you trust.",
)
@click.option("--force", is_flag=True, help="Replace existing output files.")
@click.option("--debug", is_flag=True, expose_value=False, help="Show tracebacks for errors.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def convolutionalize(
    model: str,
    output: Path,
    input_size: str,
    arch: str | None,
    layers: tuple[str, ...],
    stride: str | None,
    channels: int | None,
    check_size: str | None,
    state_dict_out: Path | None,
    trust_pickle: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Make a classifier fully convolutional and save it as a .pt2 program.

    MODEL is a pickled nn.Module (only with --trust-pickle) or, with --arch,
    the weights for the model the factory builds. The flatten before the first
    Linear (and any permute before it) gives the patch and the order; the
    Linear layers become convolutions and the result is verified on the native
    size and on a larger input before anything is written.
    """
    from fcconv.atomic import check_output_path

    lib = library()

    native = parse_size(input_size)
    step = parse_stride(stride) if stride else None
    larger = parse_size(check_size) if check_size else None
    if str(output) == "-" or (state_dict_out is not None and str(state_dict_out) == "-"):
        raise click.UsageError("convolutionalize writes files; give a file name, not -")
    if state_dict_out is not None and state_dict_out.resolve() == output.resolve():
        raise click.UsageError("--state-dict-out must differ from -o")
    # Fail before the slow part: an output that would be refused is refused now.
    check_output_path(output, force)
    if state_dict_out is not None:
        check_output_path(state_dict_out, force)

    original = lib.load_model(model, arch=arch, trust_pickle=trust_pickle)
    conversion = lib.convolutionalize_detailed(
        original, native, layers=layers or None, stride=step, in_channels=channels
    )
    check = lib.verify_dense(original, conversion.model, native, larger, layers=layers or None)
    exported = saved = None
    if check:
        example = larger or check.larger_size
        exported = lib.save_exported(
            conversion.model,
            output,
            example,
            in_channels=conversion.in_channels,
            native_size=conversion.input_size,
            force=force,
        )
        if state_dict_out is not None:
            saved = lib.save_state_dict(conversion.model, state_dict_out, force=force)

    if as_json:
        click.echo(json.dumps(_document(model, conversion, check, exported, saved), indent=2))
    else:
        _render(model, conversion, check, exported, saved)
    if not check:
        raise click.exceptions.Exit(1)


def library() -> ModuleType:
    """The library module, imported on first use (torch takes a second to import).

    Looked up by name, not as ``fcconv.convolutionalize``: a package that
    re-exports the function under that name would shadow the module.
    """
    return importlib.import_module("fcconv.fcn")


def _document(model: str, conversion: Any, check: Any, exported: Any, saved: Any) -> dict:
    return {
        "command": "convolutionalize",
        "model": model,
        "ok": bool(check),
        "conversion": conversion.to_dict(),
        "verification": check.to_dict(),
        "export": exported.to_dict() if exported is not None else None,
        "state_dict": saved,
    }


def _size(pair: Any) -> str:
    return "?" if pair is None else f"{pair[0]}x{pair[1]}"


def _range(bounds: tuple[int | None, int | None]) -> str:
    low, high = bounds
    if low == high:
        return str(low)
    return f"{low}…{high if high is not None else '∞'}"


def _render(model: str, conversion: Any, check: Any, exported: Any, saved: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, highlight=False)
    patch = conversion.patch
    facts = Table(title=f"fcconv convolutionalize {model}", show_header=False)
    facts.add_column(style="bold")
    facts.add_column()
    facts.add_row("model", conversion.model_name)
    facts.add_row(
        "native input", f"{_size(conversion.input_size)} × {conversion.in_channels} channels"
    )
    facts.add_row(
        "feature map / patch",
        f"{patch.channels} × {patch.height} × {patch.width} (HxWxC {patch})",
    )
    facts.add_row("order", f"{conversion.order} (from {conversion.order_from})")
    facts.add_row(
        "stride",
        f"{_size(conversion.stride)} feature-map cells = windows "
        f"{_size(conversion.window_stride)} input pixels apart, each "
        f"{_size(conversion.input_size)}",
    )
    console.print(facts)

    layers = Table(title="layers")
    layers.add_column("name")
    layers.add_column("was")
    layers.add_column("now")
    for change in conversion.changes:
        layers.add_row(change.name, change.was, change.now)
    console.print(layers)
    lines = [(c.name, c.conv2d) for c in conversion.changes if c.conv2d]
    if lines:
        console.print("the modules that load the converted weights:")
        for name, line in lines:
            console.print(f"  {name}: {line}", soft_wrap=True, markup=False)

    verdict = Table(title="verification (float64)", show_header=False)
    verdict.add_column(style="bold")
    verdict.add_column()
    verdict.add_row(
        "native size",
        "?"
        if check.native_max_abs_diff is None
        else f"{_size(check.native_size)}: max |Δ| {check.native_max_abs_diff:.3g}",
    )
    verdict.add_row(
        "dense map",
        "?"
        if check.dense_max_abs_diff is None
        else f"{_size(check.larger_size)} → {_size(check.map_size)} map: max |Δ| "
        f"{check.dense_max_abs_diff:.3g} vs the original head on each window",
    )
    verdict.add_row("tolerance", f"{check.tolerance:.3g}")
    if check.crop_note:
        verdict.add_row("whole model on crops", check.crop_note)
    verdict.add_row(
        "result",
        "[green]equivalent[/green]"
        if check
        else "[red]DIFFERENT[/red]: " + "; ".join(check.problems),
    )
    console.print(verdict)

    for note in conversion.notes:
        console.print(f"note: {note}")
    if exported is not None:
        ranges = ", ".join(f"{k} {_range(v)}" for k, v in exported.ranges.items())
        kind = "dynamic" if exported.dynamic else "static"
        console.print(f"wrote {exported.path} ({kind} shapes: {ranges})", soft_wrap=True)
        if exported.note:
            console.print(f"note: {exported.note}")
    else:
        console.print("nothing written: the converted model failed verification")
    if saved is not None:
        console.print(f"wrote {saved} (state dict for the conv layers listed above)")
