"""The whole-model command: ``convolutionalize``."""

from __future__ import annotations

from typing import Any

import click

from fcconv.cli import DEBUG, JSON, TRUST, cli, finish, with_options

CONVOLUTIONALIZE_EPILOG = """\b
Examples:
  fcconv convolutionalize weights.pt --arch fcconv.samples_models:tiny_vgg \\
      --input 32x32 -o tiny_vgg.pt2
  fcconv convolutionalize model.pt --trust-pickle --input 224x224 -o dense.pt2 \\
      --stride 2x2 --state-dict-out dense.safetensors --json

\b
The .pt2 program loads without your code:
  torch.export.load("dense.pt2").module()(images)  # [B, classes, H', W']
"""


@cli.command("convolutionalize", epilog=CONVOLUTIONALIZE_EPILOG)
@click.argument("model", metavar="MODEL")
@click.option("-o", "--output", required=True, help="The .pt2 torch.export program to write.")
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
    help="A callable that builds the model; MODEL then holds its weights.",
)
@click.option(
    "--layer",
    "layers",
    multiple=True,
    metavar="NAME",
    help="A Linear layer of the head (repeatable); default: found from the trace.",
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
    help="The larger input the dense map is verified on (default: one window step larger).",
)
@click.option("--state-dict-out", help="Also write the converted weights (.safetensors or .pt).")
@click.option("--force", is_flag=True, help="Replace existing output files.")
@with_options(TRUST, DEBUG, JSON)
def convolutionalize(model: str, as_json: bool, layers: tuple[str, ...], **options: Any) -> None:
    """Make a classifier fully convolutional and save it as a .pt2 program.

    MODEL is a pickled nn.Module (only with --trust-pickle) or, with --arch,
    the weights for the model the factory builds. The flatten before the first
    Linear (and any permute before it) gives the patch and the order; the
    Linear layers become convolutions and the result is verified on the native
    size and on a larger input before anything is written.
    """
    from fcconv import api, report

    result = api.convolutionalize_file(model, layers=layers or None, **options)
    finish(result, as_json, report.render_convolutionalize)
