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
  fcconv convolutionalize model.onnx -o dense.onnx

\b
The .pt2 program loads without your code:
  torch.export.load("dense.pt2").module()(images)  # [B, classes, H', W']
"""


@cli.command("convolutionalize", epilog=CONVOLUTIONALIZE_EPILOG)
@click.argument("model", metavar="MODEL")
@click.option(
    "-o",
    "--output",
    required=True,
    help="The .pt2 torch.export program, or the .onnx graph, to write.",
)
@click.option(
    "--input",
    "input_size",
    metavar="HxW",
    help="The native input size the classifier was trained at (e.g. 224x224); an ONNX "
    "graph with a fixed input size needs none.",
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
    """Make a classifier fully convolutional and save it as a .pt2 program or .onnx graph.

    MODEL is a pickled nn.Module (only with --trust-pickle), with --arch the
    weights for the model the factory builds, or an .onnx graph (its
    Flatten/Reshape → Gemm head becomes Conv layers, checked in onnxruntime).
    The flatten before the first Linear (and any permute before it) gives the
    patch and the order; the Linear layers become convolutions and the result
    is verified on the native size and on a larger input before anything is
    written.
    """
    from fcconv import api, report

    if options["input_size"] is None and not model.lower().endswith(".onnx"):
        raise click.UsageError("Missing option '--input'.")
    result = api.convolutionalize_file(model, layers=layers or None, **options)
    if result.to_dict().get("format") == "onnx":
        finish(result, as_json, report.render_onnx_convolutionalize)
    finish(result, as_json, report.render_convolutionalize)
