"""The map command: ``map`` (a picture, or the values as .npy / .zarr, tile by tile)."""

from __future__ import annotations

from typing import Any

import click

from fcconv.cli.group import DEBUG, JSON, TRUST, cli, finish, verbosity, with_options

MAP_EPILOG = """\b
Examples:
  fcconv convolutionalize sample_checkpoints/blob_net.safetensors \\
      --arch fcconv.samples_models:blob_net --input 96x96 -o blobs.pt2
  fcconv map blobs.pt2 sample_checkpoints/blobs.png -o map.png --channel 1
  fcconv map dense.pt2 photo.jpg -o map.png --output face --channel 1 \\
      --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --json
  fcconv map dense.pt2 slide.ome.tif -o slide.zarr --memory 2GB --picture slide.png
  fcconv map dense.pt2 slide.ome.tif -o slide.zarr --resume

\b
The suffix of -o decides: .png draws one channel over the image (each cell on
the stride-sized tile at the centre of its input box, cells that are not the
model run on their crop hatched, the best cell's box outlined; --json gives
every cell); .npy writes the values [outputs, H', W'] float32 with the
coordinate map in OUT.npy.json; .zarr writes them chunked, one chunk per tile,
the coordinate map in its attributes. The model runs tile by tile: the tile
size follows --memory (or --tile), and every cell equals the one-pass map's.
"""


UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "T": 1e12, "TB": 1e12, "TIB": 2**40}  # fmt: skip


def _bytes(context: Any, parameter: Any, value: str | None) -> int | None:
    """``2GB``, ``1.5G``, ``512MiB`` or a number of bytes."""
    if value is None:
        return None
    text = value.strip().upper().replace(" ", "")
    number = text.rstrip("KMGTIB")
    unit = text[len(number) :]
    try:
        amount = float(number) * UNITS[unit]
    except (ValueError, KeyError):
        raise click.BadParameter(f"{value!r} is not a size such as 2GB, 512MB or 1.5GiB") from None
    if amount < 1:
        raise click.BadParameter(f"{value!r} is not a positive size")
    return int(amount)


def _tile(context: Any, parameter: Any, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        parts = [int(part) for part in value.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise click.BadParameter(f"{value!r} is not N or HxW cells (positive whole numbers)")
    return (parts[0], parts[-1])


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
    "-o",
    "target",
    required=True,
    metavar="OUT",
    help="The map to write: .png (a picture), .npy or .zarr (the values).",
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
@click.option(
    "--picture",
    metavar="PNG",
    help="With a .npy or .zarr map: also a downsampled picture of --channel.",
)
@click.option(
    "--memory",
    callback=_bytes,
    metavar="SIZE",
    help="Memory budget that picks the tile size (2GB, 512MB); default: half of what is free.",
)
@click.option(
    "--tile",
    callback=_tile,
    metavar="N|HxW",
    help="Cells per tile side, instead of --memory.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    help="Torch threads per tile (float32 results depend on it); default: the CPUs available.",
)
@click.option(
    "--resume", is_flag=True, help="Keep the tiles an interrupted .zarr run of this job wrote."
)
@click.option("--force", is_flag=True, help="Replace an existing map.")
@with_options(TRUST, DEBUG, JSON)
def map_command(model: str, image: str, target: str, as_json: bool, **options: Any) -> None:
    """Map a dense model over an image, tile by tile: a picture, or the values.

    MODEL is a .pt2 program from fcconv convolutionalize (or its .onnx export,
    with onnxruntime); its coordinate map comes with it. IMAGE is a TIFF,
    BigTIFF or OME-TIFF (read tile by tile: pip install 'fcconv[tiff]') or any
    file Pillow reads, fed at its own size, converted to the model's channels
    and scaled to [0, 1]. Pictures need the map extra: pip install 'fcconv[map]'.
    """
    from fcconv import api, report

    quiet = verbosity() < 0
    with report.tile_progress(enabled=False if quiet else None) as progress:
        result = api.map_image(model, image, target, progress=progress, **options)
    finish(result, as_json, report.render_map)
