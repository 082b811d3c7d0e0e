"""The checkpoint commands: ``inspect``, ``convert`` and ``verify``."""

from __future__ import annotations

from typing import Any

import click

from fcconv.cli import DEBUG, JSON, TRUST, cli, finish, with_options
from fcconv.errors import SpecError
from fcconv.io import stdio
from fcconv.report import printable

LAYER_OPTIONS = with_options(
    click.option(
        "--layer",
        "layers",
        multiple=True,
        metavar="NAME[=PATCH]",
        help="Layer to convert, e.g. fc, fc6=7x7x512, fc1=16 (1-D) (repeatable).",
    ),
    click.option(
        "--patch",
        metavar="PATCH",
        help="Patch of every --layer without its own: HxWxC or HxW (C inferred); "
        "1-D: T (C inferred) or l=T,c=C; 3-D: DxHxWxC or d=D,h=H,w=W[,c=C].",
    ),
    click.option(
        "--order",
        metavar="ORDER",
        help="Flatten order of the patch, slowest axis first: chw (default), hwc, whc, ...; "
        "1-D: cl (default), lc; 3-D: cdhw (default), dhwc, ...; or auto.",
    ),
    click.option(
        "--stride",
        metavar="S|SHxSW|SDxSHxSW",
        help="Window stride, one number or one per axis (default: the patch size).",
    ),
    click.option(
        "--input",
        "input_size",
        metavar="T|HxW|DxHxW",
        help="Input size for the geometry and the functional check (default: two windows "
        "per axis).",
    ),
    click.option(
        "--flip",
        is_flag=True,
        help="Kernels flipped for a framework that convolves (Theano, textbook convolution); "
        "verify reads it from the file when not given.",
    ),
    JSON,
    TRUST,
    DEBUG,
)


@cli.command()
@click.argument("checkpoint", metavar="CKPT")
@click.option("--channels", type=click.IntRange(min=1), help="Channels C of the patch, if known.")
@click.option(
    "--rank",
    type=click.IntRange(1, 3),
    help="Spatial axes of the patches listed: 1 (Conv1d), 2 (default), 3 (Conv3d).",
)
@click.option(
    "--input",
    "feature_map",
    metavar="HxWxC",
    help="Feature map fed to the layer, if known (HxWxC, l=T,c=C, d=D,h=H,w=W,c=C): "
    "limits the patches listed.",
)
@click.option("--patch", metavar="PATCH", help="Rank the flatten orders by the weights' evidence.")
@with_options(JSON, TRUST, DEBUG)
def inspect(checkpoint: str, as_json: bool, **options: Any) -> None:
    """List the Linear-shaped entries of CKPT and the patches that fit each."""
    from fcconv import api, report

    finish(api.inspect_checkpoint(checkpoint, **options), as_json, report.render_inspect)


@cli.command()
@click.argument("checkpoint", metavar="CKPT")
@click.option(
    "-o",
    "--output",
    metavar="OUT",
    help="Output path (default: <stem>.conv<suffix> beside the input; - = stdout).",
)
@LAYER_OPTIONS
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--no-verify", is_flag=True, help="Skip the checks before writing.")
@click.option(
    "--format",
    type=click.Choice(["torch", "safetensors"]),
    help="Output format (default: from the output's extension, else the input's).",
)
@click.option(
    "--link", is_flag=True, help="Sharded input: hard-link untouched shards instead of copying."
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def convert(
    checkpoint: str,
    output: str | None,
    as_json: bool,
    no_verify: bool,
    quiet: bool,
    **options: Any,
) -> None:
    """Convert Linear layers of CKPT into Conv2d (Conv1d, Conv3d) weights; write a new checkpoint.

    CKPT is a .pt/.pth/.bin/.ckpt or .safetensors file, - for stdin, a
    sharded checkpoint's folder (or its *.safetensors.index.json), or a Keras
    file (.keras, .weights.h5, .h5: Dense kernels become Conv2D kernels, and a
    model's head is read off its config when no --layer is given).
    """
    from fcconv import api, report

    if (output or (checkpoint if checkpoint == "-" else None)) == "-":
        _check_stdout_takes_data(as_json)
    with report.progress_bar("converting", enabled=False if quiet else None) as progress:
        result = api.convert_checkpoint(
            checkpoint, output, verify=not no_verify, progress=progress, **options
        )
    for line in result.notes:
        click.echo(f"fcconv: {printable(line)}", err=True)
    for line in result.warnings:
        click.echo(f"fcconv: warning: {printable(line)}", err=True)
    finish(result, as_json, report.render_convert)


def _check_stdout_takes_data(as_json: bool) -> None:
    if as_json:
        raise SpecError(
            "--json puts its report on stdout, so the checkpoint cannot go there too; "
            "write it to a file with -o"
        )
    if stdio.is_terminal(stdio.STDOUT):
        raise SpecError(
            "refusing to write a binary checkpoint to the terminal; redirect stdout "
            "or write to a file with -o"
        )


@cli.command()
@click.argument("original", metavar="ORIGINAL")
@click.argument("converted", metavar="CONVERTED")
@LAYER_OPTIONS
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random input.")
def verify(original: str, converted: str, as_json: bool, **options: Any) -> None:
    """Check that CONVERTED holds exactly ORIGINAL's layers as convolutions.

    Two .keras models are also run in Keras; two .onnx graphs are compared in
    onnxruntime (the dense map against the original head on every window).
    Exit 0 when equivalent, 1 when a difference is found.
    """
    from fcconv import api, report

    if original.lower().endswith(".onnx"):
        from fcconv.api.onnx import verify_onnx
        from fcconv.geometry import parse_size, parse_stride

        size, stride = options["input_size"], options["stride"]
        result = verify_onnx(
            original,
            converted,
            input_size=parse_size(size) if size else None,
            stride=parse_stride(stride) if stride else None,
            seed=options["seed"],
        )
        finish(result, as_json, report.render_onnx_verification)
    flip = options.pop("flip") or None  # not given: as the converted file records it
    result = api.verify_checkpoints(original, converted, flip=flip, **options)
    finish(result, as_json, report.render_verification)
