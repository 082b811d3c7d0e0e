"""An image file as a model's input: read by Pillow, fed at its own size.

The image keeps its size (a dense model takes any size from its smallest
input up); it is converted to the model's channels (1: grey, 3: RGB, 4:
RGBA), scaled to [0, 1] from its own bit depth (8-bit images by 255, 16-bit
ones by 65535), and, when asked, normalised per channel: ``(x − mean) / std``.

An image is data until decoded, and decoding is where a small file becomes
large: :func:`open_image` opens only the raster formats of
:data:`RASTER_FORMATS` (never EPS or PDF, which Pillow would hand to
Ghostscript), refuses what is not a regular file (a folder, a FIFO,
``/dev/zero``) by name, and checks the pixel count the header declares
against :data:`PIXEL_BUDGET` before any pixel is decoded.
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcconv.errors import ImageError, SpecError
from fcconv.extras import require
from fcconv.progress import phased

MODES = {1: "L", 3: "RGB", 4: "RGBA"}
"""Pillow's mode for each channel count a model may take."""

RASTER_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM", "TGA")
"""The formats Pillow may open: raster decoders only, no EPS/PDF/PostScript."""

PIXEL_BUDGET = 1 << 25
"""Pixels an image read whole may declare (33.6 M, 5792×5792 fits): about 1.3 GB as float32 RGB
with its 8-bit copies; a 9,400×9,400 image would need 3.5 GB before the model runs."""

STD_FLOOR = 1e-6
"""The smallest ``std`` accepted: below it the normalised image is noise times a huge factor."""

SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
"""Pillow's modes for 16-bit grey images (``I`` holds them as 32-bit integers)."""


@dataclass
class Picture:
    """The image as drawn (``[H, W, 3]`` uint8 RGB) and as fed (``[1, C, H, W]`` float32)."""

    rgb: Any
    tensor: Any

    @property
    def size(self) -> tuple[int, int]:
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])


def _pil() -> Any:
    return require("PIL.Image", "map", purpose="to read images")


def per_channel(values: Sequence[float] | float | None, channels: int, what: str) -> list[float]:
    """One value per channel from one value or ``channels`` of them, finite (std above a floor).

    >>> per_channel([0.5], 3, "mean")
    [0.5, 0.5, 0.5]
    """
    if values is None:
        return [0.0 if what == "mean" else 1.0] * channels
    numbers = [float(values)] if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(numbers) == 1:
        numbers *= channels
    if len(numbers) != channels:
        raise SpecError(
            f"{what} has {len(numbers)} values for a model with {channels} input channels; "
            f"give one or {channels} with {{{what}}}"
        )
    if not all(math.isfinite(n) for n in numbers):
        raise SpecError(f"every {what} must be a finite number; fix {{{what}}}")
    if what == "std" and min(numbers) <= 0:
        raise SpecError("every std must be positive; fix {std}")
    if what == "std" and min(numbers) < STD_FLOOR:
        raise SpecError(
            f"every std must be at least {STD_FLOOR:g} (dividing by less makes the image "
            "noise); fix {std}"
        )
    return numbers


def check_image_file(path: str | Path) -> Path:
    """``path`` as a regular file to read, or an ImageError saying what it is instead."""
    file = Path(path)
    try:
        status = os.stat(file)
    except FileNotFoundError:
        raise ImageError(f"no such image file: {file}; check the path", path=str(file)) from None
    except OSError as error:
        raise ImageError(
            f"cannot read the image {file}: {error.strerror or error}", path=str(file)
        ) from None
    if not stat.S_ISREG(status.st_mode):
        from fcconv.io.files import kind_of

        raise ImageError(
            f"{file} is {kind_of(status.st_mode)}, not an image file; give a picture file",
            path=str(file),
        )
    return file


def open_image(path: str | Path, *, budget: int = PIXEL_BUDGET) -> Any:
    """Open ``path`` with Pillow (raster formats only) and check its size before decoding.

    The returned image is not decoded yet (call ``load()``) and must be
    closed by the caller. Tiled readers of large TIFF images need not use it.

    Raises:
        ImageError: not a regular file, not a raster image Pillow reads, or
            more pixels than ``budget``.
    """
    image_module = _pil()
    file = check_image_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", image_module.DecompressionBombWarning)
            opened = image_module.open(file, formats=list(RASTER_FORMATS))
    except (image_module.DecompressionBombError, image_module.DecompressionBombWarning):
        raise _over_budget(file, None, budget) from None
    except Exception as error:  # Pillow's own errors for unknown, truncated or broken files
        raise _unreadable(file, error) from None
    width, height = opened.size
    if width * height > budget:
        opened.close()
        raise _over_budget(file, (width, height), budget)
    return opened


def _over_budget(file: Path, size: tuple[int, int] | None, budget: int) -> ImageError:
    declared = f"declares {size[0]}×{size[1]} pixels" if size else "declares too many pixels"
    return ImageError(
        f"{file} {declared}, more than the budget of {budget / 1e6:.1f} M pixels for an image "
        "read whole; resize it, or save it as TIFF, which fcconv reads in tiles",
        path=str(file),
    )


def _unreadable(file: Path, error: Exception) -> ImageError:
    detail = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
    return ImageError(
        f"{file} is not an image Pillow can read ({type(error).__name__}: {detail}); fcconv "
        f"reads {', '.join(RASTER_FORMATS)}",
        path=str(file),
    )


def image_pixels(opened: Any, channels: int) -> tuple[Any, Any]:
    """A decoded image as ``[H, W, channels]`` float32 in [0, 1] and ``[H, W, 3]`` uint8 RGB.

    8-bit images go through Pillow's conversion to the model's mode; 16-bit
    grey (``I;16``, ``I``) is scaled by 65535 itself, since Pillow's
    conversion to 8 bits clips it; float images (``F``) are taken as they are.
    """
    import numpy as np

    if opened.mode in SIXTEEN_BIT or opened.mode == "F":
        grey = np.asarray(opened, dtype=np.float32)
        if opened.mode != "F":
            grey = grey / 65535.0
        grey = grey.reshape(opened.height, opened.width, 1)
        shown = np.repeat(np.clip(np.rint(grey * 255), 0, 255).astype(np.uint8), 3, axis=2)
        if channels == 4:
            fed = np.concatenate([np.repeat(grey, 3, axis=2), np.ones_like(grey)], axis=2)
        else:
            fed = np.repeat(grey, channels, axis=2)
        return fed, shown
    converted = opened.convert(MODES[channels])
    fed = np.asarray(converted, dtype=np.float32).reshape(opened.height, opened.width, channels)
    shown = np.asarray(opened.convert("RGB"), dtype=np.uint8)
    return fed / 255.0, shown


@phased("reading the image")
def read_image(
    path: str | Path,
    channels: int,
    *,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
    budget: int = PIXEL_BUDGET,
) -> Picture:
    """Read ``path`` with Pillow for a model that takes ``channels`` input channels.

    Raises:
        ImageError: not a readable image, too large to decode within
            ``budget`` pixels, or a model whose channels no image has.
        SpecError: ``mean``/``std`` of the wrong length, not finite, or a std
            below :data:`STD_FLOOR`.
    """
    import numpy as np
    import torch

    if channels not in MODES:
        raise ImageError(
            f"the model takes {channels} input channels; an image gives 1 (grey), 3 (RGB) "
            "or 4 (RGBA)"
        )
    shift, scale = per_channel(mean, channels, "mean"), per_channel(std, channels, "std")
    opened = open_image(path, budget=budget)
    file = Path(path)
    try:
        with opened:
            opened.load()
            data, shown = image_pixels(opened, channels)
    except ImageError:
        raise
    except Exception as error:  # truncated or broken pixel data
        raise _unreadable(file, error) from None
    data = (data - np.asarray(shift, np.float32)) / np.asarray(scale, np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(data.transpose(2, 0, 1)))[None]
    return Picture(shown, tensor)
