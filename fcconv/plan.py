"""Which tensors of a checkpoint are which layer, and the plan to convert them.

Works on tensor *descriptions* (shape and dtype), so the same planning serves
tensors in memory and tensors still on disk.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fcconv import dtypes
from fcconv.errors import LayerError, PatchSpellingError, SpecError
from fcconv.geometry import linear_weight_to_conv_nd
from fcconv.patches import (
    AnyPatch,
    AnySpec,
    PatchNd,
    as_nd,
    fit_extent,
    kernel_axes,
    order_rank,
    order_text,
    parse_order_nd,
    parse_patch_spec,
    rank_of,
    resolve_patch,
    spec_from,
)
from fcconv.progress import phased
from fcconv.windows import conv_line, default_input, make_grid

if TYPE_CHECKING:
    import torch

AUTO = "auto"

ORDER_FROM = ("record", "flag", "model", "weights", "default")
"""Where a layer's flatten order came from (``order_from`` in every result):
fcconv's provenance record, an explicit flag or argument, the model itself
(a traced flatten, a Keras config, an ONNX Transpose), the weights' evidence
(with its margin), or the framework's convention (``chw`` for PyTorch)."""


@dataclass(frozen=True)
class TensorInfo:
    """What planning needs to know of a tensor: its shape, dtype name and layout."""

    shape: tuple[int, ...]
    dtype: str  # torch's name without the prefix: "float32", "int8", ...
    layout: str = "strided"  # or "sparse_coo", "sparse_csr", ...

    @property
    def floating(self) -> bool:
        """Whether it can be a Linear weight fcconv converts (a dense real float type)."""
        return self.layout == "strided" and dtypes.is_convertible(self.dtype)

    @property
    def kind(self) -> str:
        """The dtype, with the layout when it is not dense: ``sparse_coo float32``."""
        return self.dtype if self.layout == "strided" else f"{self.layout} {self.dtype}"


def describe(tensors: Mapping[str, torch.Tensor]) -> dict[str, TensorInfo]:
    """Shapes, dtypes and layouts of in-memory tensors, in their order."""
    return {
        name: TensorInfo(
            tuple(t.shape), dtypes.name_of(t.dtype), str(t.layout).removeprefix("torch.")
        )
        for name, t in tensors.items()
    }


@dataclass(frozen=True)
class LinearEntry:
    """A Linear-shaped pair of entries: a 2-D ``weight`` and an optional 1-D ``bias``."""

    name: str
    weight_key: str
    bias_key: str | None
    out_features: int
    in_features: int
    dtype: str


ROOT = "."
"""The name of a layer saved on its own: ``nn.Linear(...).state_dict()`` has bare keys."""


def param_key(name: str, param: str) -> str:
    """The state-dict key of ``param`` (``weight``/``bias``) of the module ``name``."""
    return param if name == ROOT else f"{name}.{param}"


def module_name(key: str) -> str | None:
    """The module that owns a ``…weight`` key, or None for other keys."""
    if key == "weight":
        return ROOT
    return key.removesuffix(".weight") if key.endswith(".weight") else None


def module_names(info: Mapping[str, TensorInfo]) -> list[str]:
    """Every name that owns a ``weight`` entry, in file order."""
    return [name for name in map(module_name, info) if name is not None]


def linear_entries(info: Mapping[str, TensorInfo]) -> list[LinearEntry]:
    """Every Linear-shaped entry: a 2-D ``NAME.weight`` with an optional matching bias."""
    entries = []
    for name in module_names(info):
        weight = info[param_key(name, "weight")]
        if len(weight.shape) != 2:
            continue
        out_features, in_features = weight.shape
        bias_key = param_key(name, "bias")
        bias = info.get(bias_key)
        bias_key = bias_key if bias is not None and bias.shape == (out_features,) else None
        entries.append(
            LinearEntry(
                name,
                param_key(name, "weight"),
                bias_key,
                out_features,
                in_features,
                weight.dtype,
            )
        )
    return entries


def suffix_matches(requested: str, names: Iterable[str]) -> list[str]:
    """The names that are ``requested`` or end with it on a dot boundary (``model.fc`` for ``fc``).

    >>> suffix_matches("fc.weight", ["model.fc.weight", "fc.weight", "xfc.weight"])
    ['model.fc.weight', 'fc.weight']
    """
    return [n for n in names if n == requested or n.endswith(f".{requested}")]


def resolve_name(requested: str, info: Mapping[str, TensorInfo], source: str) -> str:
    """The module name in the checkpoint that ``requested`` refers to.

    An exact name wins; otherwise a unique suffix match on a dot boundary is
    accepted, so ``fc`` finds ``model.fc`` or ``module.fc``.
    """
    names = module_names(info)
    if requested in names:
        return requested
    matches = suffix_matches(requested, names)
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise LayerError(
            f"layer name {requested!r} is ambiguous in {source}: it matches "
            f"{', '.join(matches)}; give the full name"
        )
    linear = [entry.name for entry in linear_entries(info)]
    close = difflib.get_close_matches(requested, linear, n=3, cutoff=0.5) or linear[:5]
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise LayerError(
        f"no layer {requested!r} in {source}; {hint}(fcconv inspect {source} lists "
        "the Linear-shaped layers)"
    )


@dataclass(frozen=True)
class LayerRequest:
    """One ``--layer NAME[=PATCH]`` as given, before it is checked against a file."""

    name: str
    patch: AnySpec | None = None

    @classmethod
    def parse(cls, text: str) -> LayerRequest:
        """Parse ``fc``, ``fc6=7x7x512``, ``fc1=16`` (1-D) or ``fc=d=2,h=3,w=3`` (3-D)."""
        name, _, patch = text.partition("=")
        if not name.strip():
            raise SpecError(f"malformed {{layers}} {text!r}: expected NAME or NAME=HxWxC")
        return cls(name.strip(), parse_patch_spec(patch) if patch else None)

    @classmethod
    def of(cls, value: object) -> LayerRequest:
        """A layer as the library takes it: ``"fc"``, ``"fc6=7x7x512"``, a request, or a
        ``(name, patch)`` pair whose patch is any form :func:`~fcconv.patches.spec_from`
        takes (``("fc", (8, 8, 16))``).

        >>> LayerRequest.of(("fc", (8, 8, 16)))
        LayerRequest(name='fc', patch=PatchSpec(height=8, width=8, channels=16))
        """
        if isinstance(value, LayerRequest):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
            name, patch = value
            return cls(name, None if patch is None else spec_from(patch))
        raise SpecError(
            'a layer is a name ("fc"), "NAME=PATCH" or a (name, patch) pair, '
            f"not {type(value).__name__}"
        )


def parse_order_option(text: str) -> str:
    """A flatten order of any rank (``chw``, ``lc``, ``dhwc``), or ``auto`` (decided later).

    Whether it suits a layer is checked once the layer's patch is known
    (:func:`order_for`).
    """
    if order_text(text).strip().lower() == AUTO:
        return AUTO
    order_rank(text)
    return text.strip().lower()


def order_for(order: str | None, patch: AnyPatch, layer: str) -> str:
    """``order`` checked against the rank of ``patch``; None is that rank's default.

    Raises:
        SpecError: an order of another rank (``hwc`` for a 1-D patch).
    """
    ndim = as_nd(patch).ndim
    if order is None:
        return kernel_axes(ndim)
    if order == AUTO:
        return AUTO
    if order_rank(order) != ndim:
        raise SpecError(
            f"order {order} is for {order_rank(order)}-D patches, but the patch of {layer} "
            f"({patch}) is {ndim}-D; give {{order}} {kernel_axes(ndim)}, another permutation "
            f"of {', '.join(kernel_axes(ndim))}, or auto",
            layer=layer,
        )
    return parse_order_nd(order, ndim)


@dataclass(frozen=True)
class LayerPlan:
    """Everything needed to convert one layer and to describe the result.

    ``patch`` is a :class:`~fcconv.patches.Patch` for a 2-D conversion (what
    every 2-D report and JSON document has always shown) and a
    :class:`~fcconv.patches.PatchNd` for a 1-D or 3-D one; ``stride`` has one
    number per spatial axis.
    """

    name: str
    weight_key: str
    bias_key: str | None
    out_features: int
    patch: AnyPatch
    order: str
    stride: tuple[int, ...]
    dtype: str
    flip: bool = False
    """The kernel is flipped for a framework that convolves (see ``geometry.flip_kernel``)."""
    order_from: str = "default"
    """Where ``order`` came from: one of :data:`ORDER_FROM`."""
    order_margin: float | None = None
    """With ``order_from`` ``weights``: the evidence's margin over the next family."""
    channels_from: FeedingConv | None = None
    """The conv of the same checkpoint whose output the layer flattens, when it is clear."""

    @property
    def ndim(self) -> int:
        """The patch's spatial axes: 1 (Conv1d), 2 (Conv2d) or 3 (Conv3d)."""
        return as_nd(self.patch).ndim

    @property
    def linear_shape(self) -> tuple[int, int]:
        return (self.out_features, self.patch.features)

    @property
    def conv_shape(self) -> tuple[int, ...]:
        """``(O, C, *sizes)``: ``[O, C, kh, kw]`` in 2-D, ``[O, C, L]`` in 1-D."""
        return (self.out_features, *as_nd(self.patch).kernel_shape)

    def conv_line(self) -> str:
        """The ``nn.Conv1d/2d/3d(...)`` that the converted weights load into."""
        return conv_line(
            as_nd(self.patch), self.out_features, self.stride, self.bias_key is not None
        )

    def conv2d_line(self) -> str:
        """:meth:`conv_line` (the name from when every conversion was 2-D)."""
        return self.conv_line()

    def to_dict(self) -> dict[str, Any]:
        """The layer's conversion facts, for JSON reports (``conv1d``/``conv3d`` off 2-D)."""
        return {
            "layer": self.name,
            "weight": self.weight_key,
            "bias": self.bias_key,
            "linear_shape": list(self.linear_shape),
            "conv_shape": list(self.conv_shape),
            "patch": str(self.patch),
            "order": self.order,
            "order_from": self.order_from,
            "order_margin": self.order_margin,
            "stride": list(self.stride),
            "dtype": self.dtype,
            "flip": self.flip,
            f"conv{self.ndim}d": self.conv_line(),
            "channels_from": None if self.channels_from is None else self.channels_from.to_dict(),
        }

    def geometry(self, input_size: tuple[int, ...] | None) -> dict[str, Any]:
        """Input → output map, the receptive field, and what the windows leave out.

        ``input_size`` has one number per spatial axis (see :func:`layer_inputs`).
        """
        size = input_size or default_input(self.patch, self.stride)
        grid = make_grid(size, self.patch, self.stride)
        facts: dict[str, Any] = {
            "input": [*grid.size, grid.patch.channels],
            "output_map": [*grid.counts, self.out_features],
            "receptive_field": list(grid.patch.sizes),
        }
        if self.ndim == 2:
            facts |= {"uncovered_rows": grid.uncovered_rows, "uncovered_cols": grid.uncovered_cols}
        else:
            facts["uncovered"] = list(grid.uncovered)
        return {**facts, "warnings": grid.warnings()}

    def provenance(self) -> dict[str, Any]:
        """The record kept in safetensors metadata (``flip`` only when the kernel is flipped).

        The patch's spelling names its rank (``20x20x10``, ``l=16,c=64``,
        ``d=2,h=3,w=3,c=8``), and so does the stride's length.
        """
        record = {
            "patch": str(self.patch),
            "order": self.order,
            "stride": list(self.stride),
            "linear_shape": list(self.linear_shape),
        }
        return {**record, "flip": True} if self.flip else record

    def with_order(
        self, order: str, order_from: str | None = None, margin: float | None = None
    ) -> LayerPlan:
        """The same plan in ``order`` (and, when given, where that order came from)."""
        came = self.order_from if order_from is None else order_from
        return dataclasses.replace(self, order=order, order_from=came, order_margin=margin)


@phased("planning")
def plan_layers(
    info: Mapping[str, TensorInfo],
    requests: Iterable[LayerRequest],
    *,
    default_patch: AnySpec | None,
    order: str | None,
    stride: tuple[int, ...] | None,
    source: str,
    flip: bool = False,
) -> list[LayerPlan]:
    """Check each request against the checkpoint and fix its patch, order and stride.

    ``order`` None is each patch's default (``cl``, ``chw`` or ``cdhw``);
    ``stride`` is one number for every axis, or one per axis of the patch.
    ``flip`` flips every kernel for a framework that convolves (1×1 kernels
    are their own flip).
    """
    plans: list[LayerPlan] = []
    for request in requests:
        name = resolve_name(request.name, info, source)
        if any(plan.name == name for plan in plans):
            raise LayerError(f"layer {name} is named twice; give each {{layers}} once")
        entry = _linear_entry(name, info, source)
        spec = request.patch or default_patch
        if spec is None:
            raise SpecError(
                f"no patch for layer {name} (in_features {entry.in_features}); give "
                f"{{patch}} HxWxC or {{layers}} {request.name}=HxWxC"
            )
        patch = resolve_patch(spec, entry.in_features, name)
        feeder = feeding_conv(info, entry)
        if feeder is not None and feeder.rank == rank_of(patch):
            feeder = check_channels(patch, feeder)
        else:
            feeder = None
        plans.append(
            LayerPlan(
                name=name,
                weight_key=entry.weight_key,
                bias_key=entry.bias_key,
                out_features=entry.out_features,
                patch=patch,
                order=order_for(order, patch, name),
                stride=layer_stride(patch, stride, name),
                dtype=entry.dtype,
                flip=flip,
                order_from="default" if order is None else "flag",
                channels_from=feeder,
            )
        )
    if not plans:
        raise SpecError("no layer to convert; name one with {layers} NAME[=HxWxC]")
    return plans


def layer_stride(
    patch: AnyPatch, stride: tuple[int, ...] | None, layer: str | None = None
) -> tuple[int, ...]:
    """The window stride of a layer: ``stride`` fitted to its rank, else the patch size.

    A pointwise layer (every side 1) is the follower of a head (fc7 after
    fc6): it reads every cell of the map before it, whatever stride the
    patch layer uses.
    """
    nd = as_nd(patch)
    if nd.pointwise:
        return (1,) * nd.ndim
    return fit_extent(stride, nd.ndim, "stride", layer) if stride else nd.sizes


def _linear_entry(name: str, info: Mapping[str, TensorInfo], source: str) -> LinearEntry:
    weight = info[param_key(name, "weight")]
    if len(weight.shape) != 2:
        raise LayerError(
            f"{name} is not Linear-shaped: {name}.weight has shape {tuple(weight.shape)}, "
            "fcconv converts 2-D Linear weights [out, in]; pick a Linear layer "
            f"(fcconv inspect {source} lists them)"
        )
    bias = info.get(param_key(name, "bias"))
    out_features = weight.shape[0]
    if bias is not None and bias.shape != (out_features,):
        raise LayerError(
            f"{name}.bias has shape {tuple(bias.shape)} but {name}.weight has "
            f"{out_features} rows; this is not a Linear layer's bias"
        )
    check_convertible(name, weight, bias)
    entry = next(e for e in linear_entries(info) if e.name == name)
    return entry


def check_convertible(name: str, weight: TensorInfo, bias: TensorInfo | None = None) -> None:
    """Refuse a Linear-shaped weight that has nothing fcconv can convert (or verify).

    Raises:
        LayerError: an integer, boolean, quantized or sparse weight, one with
            no input features (no patch has zero elements), or a bias of
            another dtype or layout than the weight (no Linear computes that).
    """
    if not weight.floating:
        raise LayerError(
            f"{name}.weight is {weight.kind}; fcconv converts dense floating-point weights "
            "only: dequantize (or densify) the checkpoint first",
            layer=name,
        )
    if weight.shape[1] == 0:
        raise LayerError(
            f"{name}.weight has shape {tuple(weight.shape)}: a Linear without inputs has no "
            "patch to convert; pick another layer",
            layer=name,
        )
    if bias is not None and (bias.dtype, bias.layout) != (weight.dtype, weight.layout):
        raise LayerError(
            f"{name}.bias is {bias.kind} but {name}.weight is {weight.kind}; a Linear layer's "
            "bias has its weight's dtype, so this is not one",
            layer=name,
        )


def layer_inputs(
    plans: list[LayerPlan], size: tuple[int, ...] | None
) -> list[tuple[int, ...] | None]:
    """The input each layer sees when ``size`` feeds the first, one number per axis.

    ``size`` is one number for every axis or one per axis of the patches
    (``100x60``, ``1024``). A pointwise layer that reads the previous layer's
    outputs (``fc7`` after ``fc6``) sees that layer's output map, not the
    original input; every other layer gets ``size`` itself (``None``: each
    layer's default grid of two windows per axis).

    Raises:
        SpecError: ``size`` has another number of axes than a layer's patch.
    """
    inputs: list[tuple[int, ...] | None] = []
    for index, plan in enumerate(plans):
        previous = plans[index - 1] if index else None
        follows = (
            previous is not None
            and previous.ndim == plan.ndim
            and as_nd(plan.patch).pointwise
            and plan.patch.channels == previous.out_features
        )
        if not follows:
            inputs.append(fit_extent(size, plan.ndim, layer=plan.name) if size else None)
            continue
        seen = inputs[-1] or default_input(previous.patch, previous.stride)
        inputs.append(make_grid(seen, previous.patch, previous.stride).counts)
    return inputs


def apply_plans(
    tensors: Mapping[str, torch.Tensor], plans: Iterable[LayerPlan]
) -> dict[str, torch.Tensor]:
    """A new state dict with each planned weight rearranged into its conv kernel.

    Keys keep their order; every other tensor is the very same object.
    """
    converted = dict(tensors)
    for plan in plans:
        weight = tensors[plan.weight_key]
        converted[plan.weight_key] = linear_weight_to_conv_nd(
            weight, plan.patch, plan.order, flip=plan.flip
        )
    return converted


# ------------------------------------------------------------------ C from the conv before


@dataclass(frozen=True)
class FeedingConv:
    """The conv whose output a Linear flattens, as the checkpoint shows it: its
    ``out_channels`` is the patch's C.

    Found by :func:`feeding_conv`; ``agrees`` says whether the patch as given has that C.
    """

    layer: str
    conv: str
    weight_key: str
    channels: int
    rank: int
    agrees: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "conv": self.conv,
            "weight": self.weight_key,
            "out_channels": self.channels,
            "rank": self.rank,
            "agrees": self.agrees,
            "rule": f"the last conv before {self.layer} in the checkpoint's key order, with "
            "no Linear between them",
        }


def key_order(info: Mapping[str, TensorInfo]) -> list[str]:
    """The keys in the order the model had them, as far as the file tells.

    A torch pickle keeps the state dict's order (the modules' order); a
    safetensors header sorts names as text, so ``trunk.10`` comes before
    ``trunk.9``: keys that come sorted are put in natural order (numbers as
    numbers) instead.

    >>> key_order({"trunk.10.weight": 0, "trunk.9.weight": 0, "z.fc.weight": 0})
    ['trunk.9.weight', 'trunk.10.weight', 'z.fc.weight']
    """
    keys = list(info)
    if keys != sorted(keys):
        return keys
    return sorted(keys, key=lambda key: [int(p) if p.isdigit() else p for p in _DIGITS.split(key)])


_DIGITS = re.compile(r"(\d+)")


def feeding_conv(info: Mapping[str, TensorInfo], entry: LinearEntry) -> FeedingConv | None:
    """The conv whose output ``entry`` flattens, when the checkpoint makes it clear.

    That is the last conv-shaped weight (3-, 4- or 5-D ``NAME.weight``) before
    the Linear in :func:`key_order`, with no other Linear-shaped weight between
    them (``fc7`` reads ``fc6``, not a conv) and an ``out_channels`` that
    divides ``in_features``. None when there is no such conv.
    """
    keys = key_order(info)
    for key in reversed(keys[: keys.index(entry.weight_key)]):
        name = module_name(key)
        shape = info[key].shape
        if name is None or len(shape) < 2:
            continue
        if len(shape) == 2 or len(shape) > 5:
            return None
        channels = shape[0]
        if channels < 1 or entry.in_features % channels:
            return None
        return FeedingConv(entry.name, name, key, channels, len(shape) - 2)
    return None


def check_channels(patch: AnyPatch, feeder: FeedingConv) -> FeedingConv:
    """Refuse a patch spelt with C first (``16x8x8``, the C×H×W PyTorch prints) where the
    conv before the layer has that first number as its ``out_channels``; return
    ``feeder`` with ``agrees`` set.

    Only that case is refused: another C that does not match is recorded
    (``agrees`` False), since something between the conv and the flatten may
    change the channels, and a side that merely equals C (``3x4x5`` after a
    4-channel conv) says nothing about the spelling.

    Raises:
        PatchSpellingError: the patch's C is not the conv's, and its first side is;
            ``proposed`` is the spelling that fits (the first side moved last).
    """
    nd = as_nd(patch)
    if nd.channels == feeder.channels:
        return feeder
    if nd.sizes[0] != feeder.channels:  # not C first: only recorded
        return dataclasses.replace(feeder, agrees=False)
    proposed = PatchNd((*nd.sizes[1:], nd.channels), feeder.channels)
    spelling = (
        str(proposed)
        if proposed.ndim == 1
        else "x".join(map(str, (*proposed.sizes, proposed.channels)))
    )
    raise PatchSpellingError(
        f"patch {patch} of {feeder.layer} has C={nd.channels}, but {feeder.conv} (the conv "
        f"before it in the checkpoint) has {feeder.channels} output channels: fcconv spells "
        f"a patch with C last (PyTorch prints C first); use {{patch}} {spelling}",
        layer=feeder.layer,
        proposed=spelling,
        channels=feeder.channels,
        conv=feeder.conv,
    )
