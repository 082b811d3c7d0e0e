"""The whole-model command: ``convolutionalize``."""

from __future__ import annotations

from typing import Any

import click

from fcconv.cli.group import DEBUG, JSON, TRUST, cli, finish, with_options

CONVOLUTIONALIZE_EPILOG = """\b
Examples:
  fcconv convolutionalize weights.pt --arch fcconv.samples_models:tiny_vgg \\
      --input 32x32 -o tiny_vgg.pt2
  fcconv convolutionalize sample_checkpoints/detector_stage.safetensors \\
      --arch 'fcconv.samples_models:detector_stage' --input 24x24 -o det.pt2
  fcconv convolutionalize model.pt --trust-pickle --input 224x224 -o dense.pt2 \\
      --stride 2x2 --state-dict-out dense.safetensors --json
  fcconv convolutionalize crepe.pt --arch 'mypkg.models:Crepe(capacity="tiny")' \\
      --input 1024 -o crepe.pt2 --keep-output 0
  fcconv convolutionalize model.onnx -o dense.onnx
  fcconv convolutionalize --arch 'timm:create_model("resnet18", pretrained=True)' \\
      --input 224x224 -o r18.pt2 --head cam
  fcconv convolutionalize sample_checkpoints/blob_net.safetensors \\
      --arch fcconv.samples_models:blob_net --input 96x96 -o blobs_s8.pt2 --output-stride 8

\b
--arch takes literal arguments (numbers, strings, tuples, lists, dicts,
True/False/None), read with ast.literal_eval, never evaluated. A module in
the working folder is found, but never shadows an installed one.

\b
The .pt2 program loads without your code; its outputs keep the model's
structure, each a map [B, O, *cells]:
  torch.export.load("dense.pt2").module()(images)
"""


@cli.command("convolutionalize", epilog=CONVOLUTIONALIZE_EPILOG)
@click.argument("model", metavar="[MODEL]", required=False)
@click.option(
    "-o",
    "--output",
    required=True,
    help="The .pt2 torch.export program, or the .onnx graph, to write.",
)
@click.option(
    "--input",
    "input_size",
    metavar="T|HxW|DxHxW",
    help="The native input size the model was trained at (1024, 224x224, 16x112x112); "
    "an ONNX graph with a fixed input size needs none.",
)
@click.option(
    "--arch",
    metavar="PKG.MOD:FN[(ARGS)]",
    help="A callable that builds the model, with literal arguments if any "
    "(pkg.models:Net(depth=3)); MODEL then holds its weights. Without MODEL the "
    "factory's own weights are used (e.g. a pretrained=True factory).",
)
@click.option(
    "--head",
    type=click.Choice(["pool", "cam"]),
    default=None,
    help="What a global pool before the head becomes: pool (default) the same pool over "
    "every native-size window at stride 1, each cell the model's head on that window; "
    "cam no pool, the head at every feature cell (a class activation map).",
)
@click.option(
    "--layer",
    "layers",
    multiple=True,
    metavar="NAME",
    help="A Linear layer of the head (repeatable, checked); default: found from the trace.",
)
@click.option(
    "--keep-output",
    "outputs",
    multiple=True,
    metavar="NAME",
    help="Keep only this output of the model (repeatable): 0, 1, boxes, out.landmarks; "
    "default: every output.",
)
@click.option(
    "--stride",
    metavar="S|SHxSW",
    help="The first convs' stride in feature-map cells (default 1: a window at every offset).",
)
@click.option(
    "--output-stride",
    metavar="S|SHxSW",
    help="The map's stride in input pixels, a divisor of the trunk's (e.g. 8 for a "
    "stride-32 trunk): a denser map by shift-and-stitch, every cell verified, its cost "
    "reported.",
)
@click.option(
    "--channels",
    type=click.IntRange(min=1),
    help="Input channels, when the model does not start with a conv.",
)
@click.option(
    "--check-size",
    metavar="T|HxW|DxHxW",
    help="The larger input the dense map is verified on (default: two window steps larger).",
)
@click.option("--state-dict-out", help="Also write the converted weights (.safetensors or .pt).")
@click.option("--force", is_flag=True, help="Replace existing output files.")
@with_options(TRUST, DEBUG, JSON)
def convolutionalize(
    model: str | None,
    as_json: bool,
    layers: tuple[str, ...],
    outputs: tuple[str, ...],
    **options: Any,
) -> None:
    """Make a model's Linear head(s) fully convolutional: a .pt2 program or an .onnx graph.

    MODEL is a pickled nn.Module (only with --trust-pickle), with --arch the
    weights for the model the factory builds ('-': stdin; left out: the
    factory's own weights, recorded as such), or an .onnx graph
    (its Flatten/Reshape → Gemm head becomes Conv layers, checked in
    onnxruntime). Each output is followed back to the flatten that feeds it,
    which (with any permute before it) gives the patch and the order; every
    Linear of every head becomes a convolution (Conv1d, Conv2d or Conv3d as
    the trunk is). A global pool before the head (AdaptiveAvgPool2d(1),
    x.mean((2, 3)), ...) becomes the same pool over every native-size window
    of the feature map at stride 1 (--head cam: the head at every feature
    cell instead). The result is verified at the native size and on every
    cell of a larger input before anything is written; the report gives each
    output's coordinate map and which cells equal the model run on their crop.
    """
    from fcconv import api, report

    if model is None and options["arch"] is None:
        raise click.UsageError(
            "Missing argument 'MODEL' (a pickled model, or weights with --arch; --arch "
            "alone uses the weights its factory builds)."
        )
    if options["input_size"] is None and not (model or "").lower().endswith(".onnx"):
        raise click.UsageError("Missing option '--input'.")
    result = api.convolutionalize_file(
        model, layers=layers or None, outputs=outputs or None, **options
    )
    if result.to_dict().get("format") == "onnx":
        finish(result, as_json, report.render_onnx_convolutionalize)
    if as_json:
        for warning in result.warnings:
            click.echo(report.printable(warning), err=True)
    finish(result, as_json, report.render_convolutionalize)
