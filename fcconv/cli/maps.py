"""The picture command: ``map``."""

from __future__ import annotations

from typing import Any

import click

from fcconv.cli.group import DEBUG, JSON, TRUST, cli, finish, with_options

MAP_EPILOG = """\b
Examples:
  fcconv convolutionalize sample_checkpoints/blob_net.safetensors \\
      --arch fcconv.samples_models:blob_net --input 96x96 -o blobs.pt2
  fcconv map blobs.pt2 sample_checkpoints/blobs.png -o map.png --channel 1
  fcconv map dense.pt2 photo.jpg -o map.png --output face --channel 1 \\
      --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --json

\b
Each cell is painted on the stride-sized tile at the centre of its input box;
cells that are not the model run on their crop are hatched; the best cell's
whole box is outlined. --json gives every cell with its box and value.
"""


def _numbers(context: Any, parameter: Any, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(part) for part in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None


@cli.command("map", epilog=MAP_EPILOG)
@click.argument("model", metavar="MODEL")
@click.argument("image", metavar="IMAGE")
@click.option(
    "-o", "picture", required=True, metavar="PICTURE", help="The picture to write (.png)."
)
@click.option(
    "--output",
    "output",
    metavar="NAME",
    help="The model output to draw (0, face, boxes, …); default: the first.",
)
@click.option(
    "--channel",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="The channel of that output to draw (a class's score).",
)
@click.option(
    "--mean",
    callback=_numbers,
    metavar="M[,M…]",
    help="Per-channel mean subtracted after scaling to [0, 1].",
)
@click.option(
    "--std",
    callback=_numbers,
    metavar="S[,S…]",
    help="Per-channel standard deviation divided by after the mean.",
)
@click.option("--force", is_flag=True, help="Replace an existing picture.")
@with_options(TRUST, DEBUG, JSON)
def map_command(model: str, image: str, picture: str, as_json: bool, **options: Any) -> None:
    """Draw a dense model's map over an image, each cell on its input box.

    MODEL is a .pt2 program from fcconv convolutionalize (or its .onnx export,
    with onnxruntime); its coordinate map comes with it. IMAGE is any file
    Pillow reads, fed at its own size, converted to the model's channels and
    scaled to [0, 1]. Needs the map extra: pip install 'fcconv[map]'.
    """
    from fcconv import api, report

    result = api.map_image(model, image, picture, **options)
    finish(result, as_json, report.render_map)
