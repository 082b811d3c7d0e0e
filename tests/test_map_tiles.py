"""Maps of any size in tiles: the stitched map is the one-pass map, and the map as data.

- In float64, tiles of every size give the one-pass map to float64 rounding
  (1e-14 relative), for trunks that pad, pool with ``ceil_mode`` and stride,
  at the trunk's stride and stitched at finer strides, on sizes that are
  multiples of nothing (a tile that reads a run's padded border where the
  whole image has pixels was caught here: 0.18 off).
- ``fcconv map`` writes ``.npy`` (a sidecar with the coordinate map) and
  ``.zarr`` (attributes) from TIFF and Pillow images; their values equal the
  program run once on the whole image (float32, judged by the one judge at
  1e-5 relative); a tiny memory budget forces many tiles and the same values.
- An interrupted ``.zarr`` run leaves a consistent partial store that
  ``--resume`` completes; outputs go through the output guard.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fcconv.fcn import convolutionalize_detailed, save_exported, with_output_stride
from fcconv.maps.engine import ArraySource, Geometry, map_size, run_tiles, tile_plan
from fcconv.maps.writers import MemoryWriter, partial_of
from fcconv.verify.judge import FLOAT32_TINY, FLOAT64_TINY, Rule, compare

tifffile = pytest.importorskip("tifffile")
zarr = pytest.importorskip("zarr")

TILES_FLOAT32 = Rule("tiles-float32", 1e-5, FLOAT32_TINY / 1e-5)
"""Tiles against one pass in float32: within 1e-5 of the map's largest value."""
TILES_FLOAT64 = Rule("tiles-float64", 1e-14, FLOAT64_TINY / 1e-14)
"""Tiles against one pass in float64: a few units of float64 rounding (the BLAS sums a
conv's terms in an order that depends on the width of the tile's matrices)."""


class Padded(nn.Module):
    """Padded convs, a ceil_mode pool and a strided conv: trunk stride 4, native 14x14."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.Tanh(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(5 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


class Valid(nn.Module):
    """No padding (BarNet's shape): trunk stride 4, native 22x22."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 5, 3), nn.ReLU(),
            nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(5 * 4 * 4, 6), nn.Tanh(), nn.Linear(6, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))


MODELS = {"padded": (Padded, (14, 14)), "valid": (Valid, (22, 22))}


def dense(which: str, step: int | None, dtype=torch.float64):
    kind, native = MODELS[which]
    torch.manual_seed(5)
    model = kind().eval().to(dtype)
    conversion = convolutionalize_detailed(model, native)
    if step is not None:
        conversion = with_output_stride(conversion, step)
    facts = conversion.outputs[0]
    cells = facts.cells
    phases = conversion.phases or (1, 1)
    geometry = Geometry(
        tuple(cells.offset),
        tuple(cells.stride),
        tuple(cells.window),
        tuple(s * f for s, f in zip(cells.stride, phases, strict=True)),
        tuple(native),
        tuple(phases),
        tuple(facts.cells_map.map_axes),
    )
    return conversion.model, geometry


def tiled(model, geometry, pixels, per_tile, dtype="float64"):
    def run(x):
        return [model(x)]

    outputs, cells = map_size(run, 0, geometry, pixels.shape[1:], pixels.shape[0], dtype)
    writer = MemoryWriter((*outputs, *cells), dtype)
    tiles = tile_plan(geometry, pixels.shape[1:], cells, per_tile)
    run_tiles(run, 0, ArraySource(pixels), tiles, geometry, writer)
    return writer.array, len(tiles)


@pytest.mark.parametrize("which", ["padded", "valid"])
@pytest.mark.parametrize("step", [None, 2, 1])
@pytest.mark.parametrize("size", [(37, 29)])
def test_tiles_of_every_size_give_the_one_pass_map_in_float64(which, step, size) -> None:
    model, geometry = dense(which, step)
    pixels = np.random.default_rng(1).standard_normal((3, *size))
    with torch.no_grad():
        whole = model(torch.from_numpy(pixels)[None])[0].numpy()
    assert not np.isnan(whole).any()
    seen = set()
    for per_tile in ((1, 1), (3, 2), (4, 4), (8, 5), (1000, 1000)):
        with torch.no_grad():
            got, count = tiled(model, geometry, pixels, per_tile)
        seen.add(count)
        assert got.shape == whole.shape, per_tile
        judged = compare(got, whole, TILES_FLOAT64)  # a tile's cell from the wrong place
        assert judged, (per_tile, judged.summary())  # differs by the size of the map
    assert max(seen) > 4 and min(seen) == 1  # many tiles and one


# ------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Padded at stride 2 (stitched), as .pt2; RGB images as tiled TIFF, strip TIFF and PNG."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("tiles")
    torch.manual_seed(5)
    conversion = with_output_stride(convolutionalize_detailed(Padded().eval(), (14, 14)), 2)
    save_exported(conversion.model, folder / "dense.pt2", (30, 26))
    pixels = np.random.default_rng(0).integers(0, 256, size=(75, 61, 3), dtype=np.uint8)
    tifffile.imwrite(folder / "image.tif", pixels, tile=(16, 16), photometric="rgb")
    tifffile.imwrite(folder / "planar.ome.tif", pixels.transpose(2, 0, 1), ome=True)
    Image.fromarray(pixels).save(folder / "image.png")
    return {
        "model": folder / "dense.pt2",
        "tif": folder / "image.tif",
        "ome": folder / "planar.ome.tif",
        "png": folder / "image.png",
        "pixels": pixels,
    }


def one_pass(program) -> np.ndarray:
    exported = torch.export.load(program["model"]).module()
    x = torch.from_numpy(program["pixels"].astype(np.float32).transpose(2, 0, 1) / 255)[None]
    with torch.no_grad():
        return exported(x)[0].numpy()


@pytest.mark.parametrize("image", ["tif", "ome", "png"])
@pytest.mark.parametrize("suffix", [".npy", ".zarr"])
def test_the_map_as_data_is_the_one_pass_map(invoke, program, tmp_path, image, suffix) -> None:
    target = tmp_path / f"map{suffix}"
    result = invoke(
        "map", program["model"], program[image], "-o", target, "--tile", "3x4", "--json"
    )
    document = json.loads(result.stdout)
    assert document["format"] == suffix[1:] and document["tiles"] > 4
    if suffix == ".npy":
        values = np.load(target)
        facts = json.loads((tmp_path / "map.npy.json").read_text())
    else:
        store = zarr.open_array(str(target), mode="r")
        values, facts = store[...], store.attrs["fcconv"]
    whole = one_pass(program)
    assert values.dtype == np.float32 and values.shape == whole.shape
    assert list(values.shape) == document["map_shape"] == facts["shape"]
    assert facts["cells"] == document["cells"] and facts["cells"]["stride"] == [2, 2]
    judged = compare(values, whole, TILES_FLOAT32)
    assert judged, judged.summary()
    assert not list(tmp_path.glob("*fcconv*"))  # no partial or temporary file left


def test_a_tiny_memory_budget_makes_many_tiles_of_the_same_map(program, tmp_path) -> None:
    from fcconv.api import map_image

    small = map_image(program["model"], program["tif"], tmp_path / "a.npy", memory=1, keep=True)
    large = map_image(program["model"], program["tif"], tmp_path / "b.npy", tile=1000, keep=True)
    assert small.tiles > 20 and large.tiles == 1
    judged = compare(small.values, large.values, TILES_FLOAT32)
    assert judged, judged.summary()


def test_a_picture_beside_the_data_and_a_picture_alone(invoke, program, tmp_path) -> None:
    from PIL import Image

    invoke("map", program["model"], program["tif"], "-o", tmp_path / "m.npy",
           "--picture", tmp_path / "m.png", "--tile", "4")  # fmt: skip
    with Image.open(tmp_path / "m.png") as shown:
        assert shown.size == (np.load(tmp_path / "m.npy").shape[-1],) + (shown.size[1],)
    result = invoke(
        "map", program["model"], program["tif"], "-o", tmp_path / "p.png", "--tile", "5", "--json"
    )
    document = json.loads(result.stdout)
    assert document["picture"] == str(tmp_path / "p.png") and len(document["grid"]) == (
        document["map_size"][0] * document["map_size"][1]
    )


def test_an_interrupted_zarr_run_resumes_to_the_same_map(program, tmp_path) -> None:
    from fcconv.api import map_image

    target = tmp_path / "m.zarr"

    def stop_after_three(done: int, total: int, cells: int) -> None:
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        map_image(program["model"], program["tif"], target, tile=3, progress=stop_after_three)
    assert not target.exists() and partial_of(target).is_dir()
    partial = zarr.open_array(str(partial_of(target)), mode="r")
    assert partial.shape  # the store opens: consistent after the interruption
    resumed = map_image(program["model"], program["tif"], target, tile=3, resume=True, keep=True)
    assert resumed.tiles_resumed == 3 and not partial_of(target).exists()
    fresh = map_image(program["model"], program["tif"], tmp_path / "f.zarr", tile=3, keep=True)
    assert np.array_equal(resumed.values, fresh.values)


def test_bad_targets_are_one_line_and_leave_files_alone(invoke, program, tmp_path) -> None:
    existing = tmp_path / "old.npy"
    existing.write_bytes(b"keep")
    cases = [
        (("-o", tmp_path / "map.txt"), "name the map -o .png"),
        (("-o", existing), "exists"),
        (("-o", tmp_path / "m.png", "--picture", tmp_path / "p.png"), "--picture"),
        (("-o", tmp_path / "m.npy", "--tile", "0"), "--tile"),
        (("-o", tmp_path / "m.npy", "--memory", "lots"), "--memory"),
    ]
    for args, words in cases:
        result = invoke("map", program["model"], program["tif"], *args, exit=2)
        line = result.stderr.strip().splitlines()[-1]
        assert words in result.stderr, (args, result.stderr)
        assert line.startswith(("fcconv: error:", "Error:")) or "Usage" in result.stderr
    same = invoke("map", program["model"], program["png"], "-o", program["png"], exit=2)
    assert "input" in same.stderr and len(same.stderr.strip().splitlines()) == 1
    assert existing.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.npy"]
