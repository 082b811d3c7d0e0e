"""The checkpoint commands: ``inspect``, ``convert`` and ``verify``."""

from __future__ import annotations

from typing import Any

import click

from fcconv.cli.group import DEBUG, JSON, TRUST, cli, finish, phases, say, warn, with_options
from fcconv.errors import SpecError
from fcconv.io import stdio


def layer_options(command: str) -> Any:
    """The layer, patch, order, stride, input and flip options, with help true for
    ``command``: ``convert`` chooses what to convert; ``verify`` checks what it is told
    against the files (which need no flags: the converted layers and their provenance)."""
    converting = command == "convert"
    return with_options(
        click.option(
            "--layer",
            "layers",
            multiple=True,
            metavar="NAME[=PATCH]",
            help=(
                "Layer to convert, e.g. fc, fc6=7x7x512, fc1=16 (1-D) (repeatable)."
                if converting
                else "Layer to check, e.g. fc or fc6=7x7x512 (repeatable); default: every "
                "converted layer found."
            ),
        ),
        click.option(
            "--patch",
            metavar="PATCH",
            help=(
                "Patch of every --layer without its own: HxWxC or HxW (C inferred); "
                "1-D: T (C inferred) or l=T,c=C; 3-D: DxHxWxC or d=D,h=H,w=W[,c=C]."
                + ("" if converting else " Default: as the converted file records it.")
            ),
        ),
        click.option(
            "--order",
            metavar="ORDER",
            help=(
                "Flatten order of the patch, slowest axis first: chw (default), hwc, whc, "
                "...; 1-D: cl (default), lc; 3-D: cdhw (default), dhwc, ...; or auto (from "
                "the weights)."
                if converting
                else "The flatten order to assert (chw, hwc, ...; 1-D cl, lc; 3-D cdhw, ...), "
                "checked, not trusted; default: the recorded one, else the model's."
            ),
        ),
        click.option(
            "--stride",
            metavar="S|SHxSW|SDxSHxSW",
            help="Window stride, one number or one per axis (default: the patch size"
            + ("" if converting else ", or as recorded")
            + ").",
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
            help=(
                "Flip the kernels for a framework that convolves (Theano, textbook "
                "convolution); recorded in the output."
                if converting
                else "The kernels are flipped (Theano, textbook convolution); default: as "
                "the converted file records it."
            ),
        ),
        JSON,
        TRUST,
        DEBUG,
    )


INSPECT_EPILOG = """\b
Examples:
  fcconv inspect sample_checkpoints/seed_fc.safetensors
  fcconv inspect sample_checkpoints/seed_fc.safetensors --channels 10
  fcconv inspect sample_checkpoints/trained_nhwc.safetensors --patch 8x8x6 --json
  fcconv inspect sample_checkpoints/seq_head.safetensors --rank 1
"""

CONVERT_EPILOG = """\b
Examples:
  fcconv convert sample_checkpoints/seed_fc.safetensors --layer fc --patch 20x20x10
  fcconv convert sample_checkpoints/seed_fc.pt -o seed_conv.pt --layer fc=20x20x10 \\
      --input 100x60
  fcconv convert sample_checkpoints/head_fc6_fc7.safetensors -o head.conv.safetensors \\
      --layer fc6=3x3x32 --layer fc7=1x1
  fcconv convert sample_checkpoints/trained_nhwc.safetensors -o nhwc.conv.safetensors \\
      --layer fc --patch 8x8x6 --order auto --json
  fcconv convert - -o - --layer fc --patch 20x20x10 < model.pt > model.conv.pt
"""

VERIFY_EPILOG = """\b
Examples:
  fcconv verify sample_checkpoints/seed_fc.safetensors \\
      sample_checkpoints/seed_fc.conv.safetensors
  fcconv verify model.pt model.conv.pt --input 100x60 --json
  fcconv verify model.pt model.conv.pt --layer fc=20x20x10 --order hwc
  fcconv verify sample_checkpoints/tiny_cnn.onnx dense.onnx

\b
Exit 0 when equivalent, 1 when a difference is found, 2 when the check could not run.
"""


@cli.command(epilog=INSPECT_EPILOG)
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


@cli.command(epilog=CONVERT_EPILOG)
@click.argument("checkpoint", metavar="CKPT")
@click.option(
    "-o",
    "--output",
    metavar="OUT",
    help="Output path (default: <stem>.conv<suffix> beside the input; - = stdout).",
)
@layer_options("convert")
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
def convert(
    checkpoint: str,
    output: str | None,
    as_json: bool,
    no_verify: bool,
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
    writing = phases().bytes("writing")
    result = api.convert_checkpoint(
        checkpoint, output, verify=not no_verify, progress=writing, **options
    )
    say(result.notes)
    warn(result.warnings)
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


@cli.command(epilog=VERIFY_EPILOG)
@click.argument("original", metavar="ORIGINAL")
@click.argument("converted", metavar="CONVERTED")
@layer_options("verify")
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
