"""Running a model in float64 without a float64 copy of it: weights cast block by block.

The float64 checks (:mod:`fcconv.fcn.check`, :mod:`fcconv.fcn.stride`) used
to deep-copy the original and the converted model and cast both to float64:
for a VGG-16 (553 MB of float32 weights) that is 2.2 GB of copies before any
input is run. :class:`Float64Weights` instead leaves the models as they are
and, while it is active, computes every layer that takes a float64 input in
float64: the weight of a linear layer or convolution is cast one block of
output channels at a time (at most ``block_bytes`` of float64 weights alive
at once) and the blocks' outputs are concatenated; the few other layers
with parameters (normalizations, PReLU, matrix products, embeddings) get
their tensor arguments cast whole. Casting float32 to float64 is exact, and
each output channel is computed by the same float64 arithmetic as with the
whole weight, so the result is the float64 model's.

>>> import torch
>>> layer = torch.nn.Linear(3, 5)
>>> x = torch.randn(2, 3, dtype=torch.float64)
>>> with Float64Weights(block_bytes=16):  # one row of 3·8 bytes at a time
...     blocked = layer(x)
>>> whole = torch.nn.functional.linear(x, layer.weight.double(), layer.bias.double())
>>> blocked.dtype, bool(torch.allclose(blocked, whole, rtol=1e-15, atol=0))
(torch.float64, True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

BLOCK_BYTES = 64 * 2**20
"""Float64 weights alive at once per blocked layer (64 MiB: 12 blocks for VGG-16's fc6)."""

_LINEAR = {"linear"}
_CONV = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution"}
_WHOLE = {
    "addmm",
    "baddbmm",
    "batch_norm",
    "bmm",
    "einsum",
    "embedding",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "matmul",
    "mm",
    "native_batch_norm",
    "_native_batch_norm_legit_no_training",
    "native_group_norm",
    "native_layer_norm",
    "prelu",
    "_prelu_kernel",
    "rms_norm",
    "_fused_rms_norm",
}


def _stem(func: Callable[..., Any]) -> str:
    """``linear`` for ``F.linear`` and ``torch.ops.aten.linear.default`` alike."""
    name = getattr(func, "__name__", "")
    return name.split(".")[0]


def _low(value: Any) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.dtype != torch.float64
    )


def _wide(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.float64


def _cast(value: Any) -> Any:
    if _low(value):
        return value.double()
    if isinstance(value, (list, tuple)) and any(_low(v) for v in value):
        return type(value)(_cast(v) for v in value)
    return value


class Float64Weights(TorchFunctionMode):
    """While active, layers fed float64 inputs compute in float64 from their own weights.

    Args:
        block_bytes: the float64 weight of a linear layer or convolution is
            cast at most this many bytes at a time (whole output channels).
    """

    def __init__(self, block_bytes: int = BLOCK_BYTES) -> None:
        super().__init__()
        self.block_bytes = block_bytes

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        stem = _stem(func)
        if args and _wide(args[0]) and len(args) > 1 and isinstance(args[1], torch.Tensor):
            plain = _plain_conv2d(stem, args, kwargs)
            if plain is not None:
                return conv2d_in_strips(*plain, work_bytes=self.block_bytes)
        if args and _wide(args[0]) and len(args) > 1 and _low(args[1]):
            if stem in _LINEAR:
                return self._blocked(func, args, kwargs, channel_axis=-1)
            if stem in _CONV and not _transposed(stem, args, kwargs):
                return self._blocked(func, args, kwargs, channel_axis=1)
        if stem in _LINEAR | _CONV | _WHOLE:
            every = list(args) + list(kwargs.values())
            if any(
                _wide(v) or (isinstance(v, (list, tuple)) and any(map(_wide, v))) for v in every
            ):
                args = tuple(_cast(a) for a in args)
                kwargs = {k: _cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def _blocked(self, func, args, kwargs, channel_axis: int) -> torch.Tensor:  # noqa: ANN001
        """``func`` on blocks of the weight's output channels (its first axis), concatenated."""
        weight = args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        groups = _groups(func, args, kwargs)
        per_channel = max(1, weight[0].numel() * 8)
        rows = max(1, self.block_bytes // per_channel)
        total = weight.shape[0]
        if groups != 1 or rows >= total:
            return func(*(_cast(a) for a in args), **{k: _cast(v) for k, v in kwargs.items()})
        parts = []
        for start in range(0, total, rows):
            stop = min(total, start + rows)
            block = list(args)
            block[1] = weight[start:stop].double()
            extra = dict(kwargs)
            if bias is not None:
                if len(args) > 2:
                    block[2] = _cast(bias[start:stop])
                else:
                    extra["bias"] = _cast(bias[start:stop])
            parts.append(func(*block, **extra))
            del block
        return torch.cat(parts, dim=channel_axis)


def _transposed(stem: str, args: tuple, kwargs: dict) -> bool:
    """Whether a ``convolution`` call is transposed (its weight is ``[in, out, …]``)."""
    if stem not in ("convolution", "_convolution"):
        return False
    value = args[6] if len(args) > 6 else kwargs.get("transposed", False)
    return bool(value)


def _groups(func: Callable[..., Any], args: tuple, kwargs: dict) -> int:
    stem = _stem(func)
    if stem in ("conv1d", "conv2d", "conv3d"):
        value = args[6] if len(args) > 6 else kwargs.get("groups", 1)
    elif stem in ("convolution", "_convolution"):
        value = args[8] if len(args) > 8 else kwargs.get("groups", 1)
    else:
        value = 1
    return int(value)


def _pairs(value: Any) -> tuple[int, int] | None:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(type(v) is int for v in value):
        return (int(value[0]), int(value[1]))
    return None


def _plain_conv2d(stem: str, args: tuple, kwargs: dict) -> tuple | None:
    """``(x, weight, bias, stride, padding, dilation, groups)`` of a 2-D convolution in
    float64 with numeric zero padding, or None for anything else (left to the general path)."""
    x, weight = args[0], args[1]
    if x.dim() != 4 or weight.dim() != 4 or not weight.is_floating_point():
        return None
    names = ("bias", "stride", "padding", "dilation")
    if stem == "conv2d":
        given = dict(zip(names + ("groups",), args[2:7], strict=False))
    elif stem == "convolution" and not _transposed(stem, args, kwargs):
        given = dict(zip(names, args[2:6], strict=False))
        given["groups"] = args[8] if len(args) > 8 else kwargs.get("groups", 1)
    else:
        return None
    given = {**{k: v for k, v in kwargs.items() if k in (*names, "groups")}, **given}
    bias = given.get("bias")
    stride = _pairs(given.get("stride", 1))
    padding = _pairs(given.get("padding", 0))
    dilation = _pairs(given.get("dilation", 1))
    groups = given.get("groups", 1)
    if None in (stride, padding, dilation) or type(groups) is not int:
        return None  # "same"/"valid" padding or symbolic values: the general path
    return x, weight, bias, stride, padding, dilation, groups


def conv2d_in_strips(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    *,
    work_bytes: int = BLOCK_BYTES,
) -> torch.Tensor:
    """A float64 ``conv2d`` in strips of output rows and blocks of output channels.

    PyTorch computes a float64 convolution on the CPU through an unfolded
    copy of its input (``C·kh·kw`` values per output pixel: 760 MB for one
    64-channel 3×3 layer of a VGG on a 288×288 image): each strip of output
    rows reads its own rows of the zero-padded input, so that copy, and the
    float64 weights of a block of output channels, stay under ``work_bytes``.

    >>> x = torch.randn(1, 2, 9, 7, dtype=torch.float64)
    >>> w, b = torch.randn(4, 2, 3, 3), torch.randn(4)
    >>> strips = conv2d_in_strips(x, w, b, (2, 1), (1, 1), (1, 1), 1, work_bytes=64)
    >>> whole = torch.nn.functional.conv2d(x, w.double(), b.double(), (2, 1), (1, 1))
    >>> bool(torch.allclose(strips, whole, rtol=1e-14, atol=0))
    True
    """
    import torch.nn.functional as F

    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    kh, kw = weight.shape[-2:]
    padded = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    rows = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    columns = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    if rows < 1 or columns < 1:  # let torch say what is wrong
        return F.conv2d(x, weight.double(), _cast(bias), stride, padding, dilation, groups)
    per_row = max(1, x.shape[0] * weight.shape[1] * groups * kh * kw * columns * 8)
    strip = max(1, work_bytes // per_row)
    per_channel = max(1, weight[0].numel() * 8)
    block = weight.shape[0] if groups != 1 else max(1, work_bytes // per_channel)
    channels = []
    for first in range(0, weight.shape[0], block):
        w = weight[first : first + block].double()
        b = None if bias is None else bias[first : first + block].double()
        strips = []
        for top in range(0, rows, strip):
            bottom = min(rows, top + strip)
            reads = padded[:, :, top * sh : (bottom - 1) * sh + dh * (kh - 1) + 1]
            strips.append(F.conv2d(reads, w, b, stride, 0, dilation, groups))
        channels.append(torch.cat(strips, dim=2) if len(strips) > 1 else strips[0])
        del w
    return torch.cat(channels, dim=1) if len(channels) > 1 else channels[0]
