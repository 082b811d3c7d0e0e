"""TIFF, BigTIFF and OME-TIFF images read region by region (tifffile and its zarr store).

Only the tiles (or strips) of the file that a region touches are decoded, so
an image of any size is read in the memory of one region. The first series'
full-resolution level is read: ``YX`` (grey), ``YXS`` (samples last: RGB,
RGBA) or ``SYX`` (planar). Needs ``pip install 'fcconv[tiff]'``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcconv.errors import ImageError
from fcconv.extras import require

SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
"""Suffixes read as TIFF (OME-TIFF ends in ``.ome.tif``)."""

LUMA = (0.299, 0.587, 0.114)
"""Grey from RGB as Pillow's ``L`` conversion does (ITU-R 601-2)."""


def is_tiff(path: str | Path) -> bool:
    return Path(path).suffix.lower() in SUFFIXES


@dataclass
class TiffSource:
    """A TIFF image as a model's input, read a region at a time.

    Attributes:
        path: the file.
        size: ``(H, W)`` of the full-resolution level.
        samples: channels in the file (1, 3 or 4).
        channels: channels the model takes.
    """

    path: str
    size: tuple[int, int]
    samples: int
    channels: int
    _array: Any = field(repr=False)
    _axes: str = field(repr=False)
    _scale: float = field(repr=False)
    _handle: Any = field(repr=False)

    def read(self, rows: slice, columns: slice) -> Any:
        """The region as ``[C, h, w]`` float32 in [0, 1] (integers scaled by their range)."""
        import numpy as np

        index: list[Any] = []
        kept = []
        for axis, length in zip(self._axes, self._array.shape, strict=True):
            if axis in "YX":
                index.append(rows if axis == "Y" else columns)
                kept.append(axis)
            elif length == 1:
                index.append(0)
            else:
                index.append(slice(None))
                kept.append("S")
        pixels = np.asarray(self._array[tuple(index)])
        if "S" not in kept:
            pixels, kept = pixels[None], ["S", *kept]
        pixels = pixels.transpose([kept.index(a) for a in "SYX"])
        values = pixels.astype(np.float32)
        if self._scale != 1.0:
            values /= np.float32(self._scale)
        return convert_channels(values, self.channels, str(self.path))

    def close(self) -> None:
        self._handle.close()


def convert_channels(values: Any, channels: int, name: str) -> Any:
    """``[S, h, w]`` samples as ``channels``: equal, grey repeated, alpha dropped, or luma."""
    import numpy as np

    samples = values.shape[0]
    if samples == channels:
        return values
    if samples == 1 and channels in (3, 4):
        grey = np.repeat(values, 3, axis=0)
        return grey if channels == 3 else np.concatenate([grey, np.ones_like(values)])
    if samples == 4 and channels == 3:
        return values[:3]
    if samples in (3, 4) and channels == 1:
        weights = np.asarray(LUMA, dtype=np.float32)[:, None, None]
        return (values[:3] * weights).sum(axis=0, keepdims=True)
    raise ImageError(
        f"{name} has {samples} samples per pixel; the model takes {channels} channels",
        path=name,
    )


def open_tiff(path: str | Path, channels: int) -> TiffSource:
    """Open ``path`` for reading regions, checking its layout before any pixel is read.

    Raises:
        ImageError: not a TIFF tifffile reads, or a layout that is not one
            image of 1, 3 or 4 samples.
    """
    tifffile = require("tifffile", "tiff", purpose="to read TIFF images in tiles")
    zarr = require("zarr", "tiff", purpose="to read TIFF images in tiles")
    import numpy as np

    file = Path(path)
    if not file.is_file():
        raise ImageError(f"no such image file: {file}; check the path", path=str(file))
    try:
        handle = tifffile.TiffFile(file)
    except Exception as error:  # tifffile's own errors for broken or foreign files
        detail = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        raise ImageError(
            f"{file} is not a TIFF tifffile can read ({type(error).__name__}: {detail})",
            path=str(file),
        ) from None
    try:
        series = handle.series[0]
        axes = series.axes.upper()
        shape = tuple(int(n) for n in series.shape)
        layout = _layout(axes, shape)
        if layout is None:
            raise ImageError(
                f"{file} holds a {axes} image of shape {shape}; fcconv maps one 2-D image of "
                "1, 3 or 4 samples (YX, YXS or SYX)",
                path=str(file),
            )
        samples, size = layout
        dtype = np.dtype(series.dtype)
        if dtype.kind == "u":
            scale = float(np.iinfo(dtype).max)
        elif dtype.kind == "f":
            scale = 1.0
        else:
            raise ImageError(f"{file} holds {dtype} pixels; fcconv reads unsigned or float")
        array = zarr.open(series.aszarr(level=0), mode="r")
    except ImageError:
        handle.close()
        raise
    except Exception as error:  # a layout tifffile's zarr store cannot serve
        handle.close()
        detail = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
        raise ImageError(
            f"{file} cannot be read in tiles ({type(error).__name__}: {detail})", path=str(file)
        ) from None
    if len(array.shape) != len(axes):
        handle.close()
        raise ImageError(f"{file}: its zarr store does not have the series' axes {axes}")
    axes = axes.replace("C", "S")
    return TiffSource(str(file), size, samples, channels, array, axes, scale, handle)


def _layout(axes: str, shape: tuple[int, ...]) -> tuple[int, tuple[int, int]] | None:
    """``(samples, (H, W))`` of a one-image series (other axes of length 1), else None."""
    squeezed = [(a, n) for a, n in zip(axes, shape, strict=True) if n != 1 or a in "YX"]
    names = "".join(a for a, _ in squeezed)
    sizes = [n for _, n in squeezed]
    if names == "YX":
        return 1, (sizes[0], sizes[1])
    if names in ("YXS", "YXC") and sizes[2] in (3, 4):
        return sizes[2], (sizes[0], sizes[1])
    if names in ("SYX", "CYX") and sizes[0] in (3, 4):
        return sizes[0], (sizes[1], sizes[2])
    return None
