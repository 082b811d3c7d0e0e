"""Images within a budget: raster formats only, sizes from the header, modes scaled right."""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fcconv.errors import ImageError, SpecError
from fcconv.maps.image import PIXEL_BUDGET, open_image, read_image


def declared_png(path: Path, width: int, height: int) -> Path:
    """A grey PNG of ``width``×``height`` zeros: a small file declaring many pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    packer = zlib.compressobj(9)
    row = bytes(width + 1)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )
    return path


def test_a_small_png_declaring_88_million_pixels_is_refused_from_its_header(tmp_path) -> None:
    big = declared_png(tmp_path / "big.png", 9400, 9400)
    assert big.stat().st_size < 1 << 20 and 9400 * 9400 > PIXEL_BUDGET
    with pytest.raises(ImageError) as raised:
        open_image(big)
    assert "9400×9400" in str(raised.value)


def test_fcconv_map_on_it_stays_within_2_gb(tmp_path) -> None:
    """Under a 2 GB address-space limit the refusal is one line, exit 2, nothing written."""
    from test_hostile_programs import Small

    from fcconv.fcn import convolutionalize_detailed, save_exported

    save_exported(
        convolutionalize_detailed(Small().eval(), (8, 8)).model, tmp_path / "d.pt2", (12, 12)
    )
    big = declared_png(tmp_path / "big.png", 9400, 9400)
    script = textwrap.dedent(
        f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from fcconv.cli import main
        sys.argv = ["fcconv", "map", {str(tmp_path / "d.pt2")!r}, {str(big)!r}, "-o",
                    {str(tmp_path / "m.png")!r}]
        main()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "9400×9400" in lines[0] and "TIFF" in lines[0]
    assert not (tmp_path / "m.png").exists()


def test_only_raster_formats_are_opened(tmp_path, monkeypatch) -> None:
    """An EPS file never reaches Pillow's EPS plugin (which runs Ghostscript)."""
    from PIL import EpsImagePlugin

    marker = tmp_path / "ghostscript-ran"

    def ghostscript(self, *args, **kwargs):
        marker.touch()
        raise OSError("no")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "load", ghostscript)
    eps = tmp_path / "picture.png"
    eps.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ImageError, match="not an image Pillow can read"):
        read_image(eps, 3)
    assert not marker.exists()


@pytest.mark.parametrize("channels", [1, 3])
def test_a_16_bit_grey_png_is_scaled_by_its_own_depth(tmp_path, channels) -> None:
    values = np.array([[0, 1000, 30000, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")  # Pillow keeps the 16 bits
    picture = read_image(path, channels)
    expected = values.astype(np.float64) / 65535
    for channel in range(channels):
        np.testing.assert_allclose(picture.tensor[0, channel].numpy(), expected, rtol=1e-6)
    assert picture.rgb[0, :, 0].tolist() == [0, 4, 117, 255]


def test_8_bit_and_palette_images_are_scaled_by_255(tmp_path) -> None:
    grey = np.array([[0, 51, 255]], dtype=np.uint8)
    Image.fromarray(grey).convert("P").save(tmp_path / "palette.png")
    np.testing.assert_allclose(
        read_image(tmp_path / "palette.png", 1).tensor[0, 0].numpy(), grey / 255
    )


@pytest.mark.parametrize(
    ("what", "value"),
    [("std", math.nan), ("std", math.inf), ("std", 1e-45), ("mean", math.nan), ("mean", -math.inf)],
)
def test_normalisation_values_are_finite_and_std_above_a_floor(tmp_path, what, value) -> None:
    path = tmp_path / "grey.png"
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(path)
    with pytest.raises(SpecError):
        read_image(path, 3, **{what: value})


def test_the_command_line_refuses_nan_std(invoke, tmp_path) -> None:
    from test_hostile_programs import Small

    from fcconv.fcn import convolutionalize_detailed, save_exported

    save_exported(
        convolutionalize_detailed(Small().eval(), (8, 8)).model, tmp_path / "d.pt2", (12, 12)
    )
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    for option in (("--std", "nan"), ("--std", "1e-45"), ("--mean", "inf")):
        result = invoke(
            "map", tmp_path / "d.pt2", tmp_path / "i.png", "-o", tmp_path / "m.png", *option, exit=2
        )
        assert result.stderr.count("\n") == 1 and option[0] in result.stderr
    assert not (tmp_path / "m.png").exists()


def test_what_is_not_a_file_is_named(tmp_path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    (tmp_path / "folder.png").mkdir()
    for path, kind in (
        (fifo, "FIFO"),
        ("/dev/zero", "character device"),
        (tmp_path / "folder.png", "directory"),
    ):
        with pytest.raises(ImageError, match=kind):
            read_image(path, 3)
    with pytest.raises(ImageError, match="no such image file"):
        read_image(tmp_path / "missing.png", 3)


def test_a_16_bit_grey_png_through_map_image_feeds_the_model_its_scaled_values(tmp_path) -> None:
    """The map equals the dense program run on the pixels / 65535 (Pillow's 8-bit copy clips)."""
    import torch
    from test_hostile_programs import Small
    from torch import nn

    from fcconv import map_image
    from fcconv.fcn import convolutionalize_detailed, save_exported

    model = Small()
    model.trunk[0] = nn.Conv2d(1, 4, 3)
    dense = convolutionalize_detailed(model.eval(), (8, 8), in_channels=1).model
    save_exported(dense, tmp_path / "grey.pt2", (12, 12))
    pixels = np.random.default_rng(0).integers(0, 65536, size=(20, 24), dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    result = map_image(tmp_path / "grey.pt2", tmp_path / "deep.png", tmp_path / "m.png")
    fed = torch.from_numpy(pixels.astype(np.float32) / 65535)[None, None]
    expected = torch.export.load(tmp_path / "grey.pt2").module()(fed)[0, 0]
    np.testing.assert_allclose(
        np.array(result.grid.values), expected.detach().numpy(), rtol=1e-5, atol=1e-6
    )
