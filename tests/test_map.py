"""``fcconv map``: pictures whose pixels land where the coordinate map says, and its refusals.

The drawing is checked pixel by pixel on synthetic maps (one hot cell on a
grey image): the picture's pixel for image pixel ``(x, y)`` is found from the
documented placement (``left + scale·x``, ``top + scale·y``), the expected
colour is the colour map's value blended over the image by hand. End to end,
the ``--json`` grid is checked against the program run directly and against
the original model on each cell's crop.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fcconv.errors import ImageError, MissingExtraError
from fcconv.geometry import CellGeometry
from fcconv.maps.draw import ALPHA, COLORMAP, draw_map
from fcconv.maps.grid import MapGrid, tile
from fcconv.maps.image import read_image

GREY = 128
NATIVE = (16, 16)


def _colour(value: float) -> np.ndarray:
    from matplotlib import colormaps

    return np.asarray(colormaps[COLORMAP](value)[:3]) * 255


def blended(value: float) -> np.ndarray:
    """A tile of ``value`` (0 = the map's minimum, 1 = its maximum) over the grey image."""
    return ALPHA * _colour(value) + (1 - ALPHA) * GREY


def draw(grid: MapGrid, size: tuple[int, int]) -> tuple[np.ndarray, object]:
    image = np.full((*size, 3), GREY, dtype=np.uint8)
    buffer = io.BytesIO()
    placement = draw_map(grid, image, buffer, title="test", label="score")
    with Image.open(io.BytesIO(buffer.getvalue())) as png:
        picture = np.asarray(png.convert("RGB"), dtype=float)
    return picture, placement


def pixel(picture: np.ndarray, placement, y: int, x: int) -> np.ndarray:
    """The picture's colour at the centre of image pixel ``(y, x)``."""
    half = placement.scale // 2
    return picture[
        placement.top + placement.scale * y + half, placement.left + placement.scale * x + half
    ]


def one_hot(rows: int, columns: int, hot: tuple[int, int]) -> list[list[float]]:
    values = [[0.0] * columns for _ in range(rows)]
    values[hot[0]][hot[1]] = 1.0
    return values


def test_a_hot_cell_paints_exactly_its_box_when_window_equals_stride() -> None:
    cells = CellGeometry(offset=(2, 3), stride=(6, 6), window=(6, 6))
    grid = MapGrid(one_hot(4, 5, (1, 2)), cells, [[True] * 5 for _ in range(4)])
    picture, placement = draw(grid, (30, 36))
    (top, bottom), (left, right) = cells.box(1, 2)
    assert (top, bottom, left, right) == (8, 14, 15, 21)
    for y in range(30):
        for x in range(36):
            inside_map = 2 <= y < 2 + 4 * 6 and 3 <= x < 3 + 5 * 6
            if top <= y < bottom and left <= x < right:
                expected = blended(1.0)
            elif inside_map:
                expected = blended(0.0)
            else:
                expected = np.full(3, GREY)
            assert np.abs(pixel(picture, placement, y, x) - expected).max() <= 3, (y, x)


def test_overlapping_boxes_paint_the_stride_sized_tile_at_their_centre() -> None:
    cells = CellGeometry(offset=(-4, -4), stride=(6, 6), window=(14, 14))
    grid = MapGrid(one_hot(5, 5, (2, 3)), cells, [[True] * 5 for _ in range(5)])
    picture, placement = draw(grid, (30, 30))
    (top, bottom), (left, right) = tile(cells, 2, 3)
    assert (top, bottom, left, right) == (12, 18, 18, 24)  # box 8…22 × 14…28, its centre 6×6
    for y in range(30):
        for x in range(30):
            hot = top <= y < bottom and left <= x < right
            expected = blended(1.0 if hot else 0.0)
            assert np.abs(pixel(picture, placement, y, x) - expected).max() <= 3, (y, x)


def test_cells_that_differ_from_their_crop_are_hatched_and_the_others_are_not() -> None:
    cells = CellGeometry(offset=(0, 0), stride=(10, 10), window=(10, 10))
    exact = [[False, True, True], [True, True, True]]
    grid = MapGrid(one_hot(2, 3, (1, 2)), cells, exact)
    picture, placement = draw(grid, (20, 30))
    k = placement.scale

    def block(row: int, column: int) -> np.ndarray:  # the tile's picture pixels, 2 px inside
        top, left = placement.top + k * 10 * row + 2, placement.left + k * 10 * column + 2
        return picture[top : top + 10 * k - 4, left : left + 10 * k - 4]

    hatched, plain = block(0, 0), block(0, 1)
    flat = blended(0.0)
    assert np.abs(plain - flat).max() <= 3  # an exact cell: one flat colour
    lines = np.abs(hatched - flat).max(axis=-1) > 20
    assert 0.02 < lines.mean() < 0.6  # stripes over a visible part of the tile, not all of it


def test_read_image_converts_scales_and_normalises(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((5, 7), 51, dtype=np.uint8)).save(path)
    rgb = read_image(path, 3, mean=0.1, std=[0.5, 0.25, 0.1])
    assert tuple(rgb.tensor.shape) == (1, 3, 5, 7) and rgb.size == (5, 7)
    expected = (0.2 - 0.1) / torch.tensor([0.5, 0.25, 0.1])
    torch.testing.assert_close(rgb.tensor[0, :, 0, 0], expected)
    with pytest.raises(ImageError, match="takes 2 input channels"):
        read_image(path, 2)


# ------------------------------------------------------------------ end to end


class Valid(nn.Module):
    """Valid convs and floor pools (stride 4): every cell equals the model on its crop."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3), nn.MaxPool2d(2)
        )
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.trunk(x), 1))


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The dense model at its trunk's stride 4 and at stride 2, as .pt2, and an image."""
    from fcconv.fcn import convolutionalize_detailed, save_exported, with_output_stride

    folder = tmp_path_factory.mktemp("maps")
    conversion = convolutionalize_detailed(Valid().eval(), NATIVE)
    save_exported(conversion.model, folder / "coarse.pt2", (24, 24))
    finer = with_output_stride(convolutionalize_detailed(Valid().eval(), NATIVE), 2)
    save_exported(finer.model, folder / "fine.pt2", (24, 24), native_size=NATIVE)
    pixels = np.random.default_rng(0).integers(0, 256, size=(29, 35, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "image.png")
    return {
        "coarse": folder / "coarse.pt2",
        "fine": folder / "fine.pt2",
        "image": folder / "image.png",
    }


def _image_tensor(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        pixels = np.asarray(image, dtype=np.float32) / 255
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]


@pytest.mark.parametrize("which", ["coarse", "fine"])
def test_json_grid_holds_every_cell_with_its_box_and_value(
    invoke, programs, tmp_path, which
) -> None:
    picture = tmp_path / "map.png"
    result = invoke(
        "map", programs[which], programs["image"], "-o", picture, "--channel", "1", "--json"
    )
    document = json.loads(result.stdout)
    rows, columns = document["map_size"]
    step = 4 if which == "coarse" else 2
    assert document["cells"]["stride"] == [step, step] and document["channel"] == 1
    assert len(document["grid"]) == rows * columns
    x = _image_tensor(programs["image"])
    program = torch.export.load(programs[which]).module()
    with torch.no_grad():
        direct = program(x)[0, 1]
    model = Valid().eval()
    offset, window = document["cells"]["offset"], document["cells"]["window"]
    for entry in document["grid"]:
        p, q = entry["cell"]
        assert entry["box"] == [
            [offset[0] + p * step, offset[0] + p * step + window[0]],
            [offset[1] + q * step, offset[1] + q * step + window[1]],
        ]
        assert entry["value"] == pytest.approx(float(direct[p, q]), abs=1e-6)
        # no padding: a cell is the model on its crop wherever that crop fits in the image
        fits = p * step + 16 <= 29 and q * step + 16 <= 35
        assert entry["crop_exact"] is fits
        if not fits:
            continue  # the window (14 pixels) fits where the native 16x16 crop does not
        with torch.no_grad():
            crop = model(x[..., p * step : p * step + 16, q * step : q * step + 16])[0, 1]
        assert entry["value"] == pytest.approx(float(crop), abs=1e-5)
    with Image.open(picture) as shown:
        width, height = shown.size
    k = document["placement"]["scale"]
    assert width >= document["placement"]["left"] + k * 35
    assert height >= document["placement"]["top"] + k * 29


def test_people_get_a_table_and_the_picture(invoke, programs, tmp_path) -> None:
    result = invoke("map", programs["fine"], programs["image"], "-o", tmp_path / "m.png")
    text = " ".join(result.stderr.split())
    assert "stride 2x2" in text and "wrote" in text and (tmp_path / "m.png").is_file()
    assert result.stdout == ""


def _rewritten(source: Path, target: Path, change) -> Path:
    """A copy of a .pt2 archive with its entries passed through ``change(name, data)``."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = change(info.filename, old.read(info.filename))
            if data is not None:
                new.writestr(info, data)
    return target


def _facts_with(**changes):
    def change(name: str, data: bytes) -> bytes:
        if name.endswith("extra/fcconv.json"):
            return json.dumps(json.loads(data) | changes).encode()
        return data

    return change


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcconv: error: "), result.stderr
    return lines[0]


def test_bad_inputs_are_one_line_and_write_nothing(invoke, programs, tmp_path) -> None:
    model, image = programs["fine"], programs["image"]
    out = tmp_path / "out.png"
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((15, 40, 3), dtype=np.uint8)).save(small)
    two = _rewritten(model, tmp_path / "two.pt2", _facts_with(in_channels=2))
    none = _rewritten(model, tmp_path / "none.pt2", lambda n, d: None if "fcconv.json" in n else d)
    cases = [
        ((model, text_file, "-o", out), "is not an image Pillow can read"),
        ((two, image, "-o", out), "takes 2 input channels"),
        ((model, small, "-o", out), "smaller than the smallest input the model takes (16x16)"),
        ((model, image, "-o", out, "--channel", "3"), "choose one with --channel"),
        ((model, image, "-o", out, "--output", "boxes"), "choose one of 'output' with --output"),
        ((model, image, "-o", tmp_path / "map.txt"), "name the map -o .png"),
        ((model, image, "-o", out, "--mean", "0.5,0.5"), "give one or 3 with --mean"),
        ((model, image, "-o", out, "--std", "0"), "every std must be positive"),
        ((none, image, "-o", out), "carries no coordinate map"),
        ((tmp_path / "missing.pt2", image, "-o", out), "no such file"),
    ]
    for args, message in cases:
        line = one_line_error(invoke("map", *args, exit=2))
        assert message in line, (args, line)
    assert not out.exists() and not (tmp_path / "map.txt").exists()
    assert not [p for p in tmp_path.iterdir() if "fcconv-tmp" in p.name]


def test_an_existing_picture_is_kept_unless_forced(invoke, programs, tmp_path) -> None:
    out = tmp_path / "map.png"
    out.write_bytes(b"mine")
    line = one_line_error(invoke("map", programs["coarse"], programs["image"], "-o", out, exit=2))
    assert "--force" in line and out.read_bytes() == b"mine"
    invoke("map", programs["coarse"], programs["image"], "-o", out, "--force")
    assert out.read_bytes().startswith(b"\x89PNG")


def test_a_program_that_would_unpickle_is_refused(invoke, programs, tmp_path) -> None:
    def pickled(name: str, data: bytes) -> bytes:
        if name.endswith("weights_config.json"):
            config = json.loads(data)
            next(iter(config["config"].values()))["use_pickle"] = True
            return json.dumps(config, separators=(",", ":")).encode()
        return data

    risky = _rewritten(programs["coarse"], tmp_path / "risky.pt2", pickled)
    line = one_line_error(invoke("map", risky, programs["image"], "-o", tmp_path / "m.png", exit=2))
    assert "would need arbitrary unpickling" in line and "--trust-pickle" in line


def test_a_missing_extra_is_one_line_naming_the_install(
    invoke, programs, tmp_path, monkeypatch
) -> None:
    import importlib

    real = importlib.import_module

    def without_pillow(name: str, *args):
        if name.split(".")[0] in ("PIL", "matplotlib"):
            raise ImportError(f"No module named {name!r}", name=name.split(".")[0])
        return real(name, *args)

    monkeypatch.setattr("fcconv.extras.importlib.import_module", without_pillow)
    with pytest.raises(MissingExtraError):
        read_image(programs["image"], 3)
    line = one_line_error(
        invoke("map", programs["coarse"], programs["image"], "-o", tmp_path / "m.png", exit=2)
    )
    assert "pip install 'fcconv[map]'" in line


@pytest.mark.slow
def test_an_onnx_export_carries_the_map_and_draws_the_same_grid(invoke, programs, tmp_path) -> None:
    from fcconv.fcn import convolutionalize_detailed, with_output_stride
    from fcconv.onnx.export import save_onnx

    finer = with_output_stride(convolutionalize_detailed(Valid().eval(), NATIVE), 2)
    onnx_path = tmp_path / "fine.onnx"
    save_onnx(finer.model, onnx_path, (24, 24), in_channels=3, native_size=(18, 18))
    from_onnx = json.loads(
        invoke("map", onnx_path, programs["image"], "-o", tmp_path / "a.png", "--json").stdout
    )
    from_pt2 = json.loads(
        invoke(
            "map", programs["fine"], programs["image"], "-o", tmp_path / "b.png", "--json"
        ).stdout
    )
    assert from_onnx["cells"] == from_pt2["cells"] and from_onnx["map_size"] == from_pt2["map_size"]
    for a, b in zip(from_onnx["grid"], from_pt2["grid"], strict=True):
        assert a["box"] == b["box"] and a["value"] == pytest.approx(b["value"], abs=1e-5)
