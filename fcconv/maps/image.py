"""An image file as a model's input: read by Pillow, fed at its own size.

The image keeps its size (a dense model takes any size from its smallest
input up); it is converted to the model's channels (1: grey, 3: RGB, 4:
RGBA, by Pillow's conversion), scaled from 8 bits to [0, 1], and, when asked,
normalised per channel: ``(x − mean) / std``.
"""

from __future__ import annotations

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
    """One value per channel from one value or ``channels`` of them.

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
    if what == "std" and min(numbers) <= 0:
        raise SpecError("every std must be positive; fix {std}")
    return numbers


@phased("reading the image")
def read_image(
    path: str | Path,
    channels: int,
    *,
    mean: Sequence[float] | float | None = None,
    std: Sequence[float] | float | None = None,
) -> Picture:
    """Read ``path`` with Pillow for a model that takes ``channels`` input channels.

    Raises:
        ImageError: not a readable image, too large to decode safely, or a
            model whose channels no image has.
        SpecError: ``mean``/``std`` of the wrong length, or a std ≤ 0.
    """
    import numpy as np
    import torch

    image_module = _pil()
    if channels not in MODES:
        raise ImageError(
            f"the model takes {channels} input channels; an image gives 1 (grey), 3 (RGB) "
            "or 4 (RGBA)"
        )
    shift, scale = per_channel(mean, channels, "mean"), per_channel(std, channels, "std")
    file = Path(path)
    if not file.is_file():
        raise ImageError(f"no such image file: {file}; check the path", path=str(file))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", image_module.DecompressionBombWarning)
            with image_module.open(file) as opened:
                opened.load()
                fed = opened.convert(MODES[channels])
                shown = opened.convert("RGB")
    except (image_module.DecompressionBombError, image_module.DecompressionBombWarning):
        raise ImageError(
            f"{file} declares more pixels than Pillow decodes safely; resize it first",
            path=str(file),
        ) from None
    except Exception as error:  # Pillow's own errors for unknown, truncated or broken files
        detail = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        raise ImageError(
            f"{file} is not an image Pillow can read ({type(error).__name__}: {detail})",
            path=str(file),
        ) from None
    data = np.asarray(fed, dtype=np.float32).reshape(fed.height, fed.width, channels) / 255.0
    data = (data - np.asarray(shift, np.float32)) / np.asarray(scale, np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(data.transpose(2, 0, 1)))[None]
    return Picture(np.asarray(shown, dtype=np.uint8), tensor)
