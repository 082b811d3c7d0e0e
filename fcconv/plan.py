"""Which tensors of a checkpoint are which layer, and the plan to convert them.

Works on tensor *descriptions* (shape and dtype), so the same planning serves
tensors in memory and tensors still on disk.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fcconv import dtypes
from fcconv.errors import LayerError, SpecError
from fcconv.geometry import (
    Patch,
    PatchSpec,
    conv2d_line,
    default_input,
    flip_kernel,
    linear_weight_to_conv,
    make_grid,
    parse_order,
    parse_patch,
    resolve_patch,
)

if TYPE_CHECKING:
    import torch

AUTO = "auto"


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
    patch: PatchSpec | None = None

    @classmethod
    def parse(cls, text: str) -> LayerRequest:
        """Parse ``fc`` or ``fc6=7x7x512``."""
        name, _, patch = text.partition("=")
        if not name.strip():
            raise SpecError(f"malformed {{layers}} {text!r}: expected NAME or NAME=HxWxC")
        return cls(name.strip(), parse_patch(patch) if patch else None)


def parse_order_option(text: str) -> str:
    """A flatten order, or ``auto`` (decided from the weights later)."""
    return AUTO if text.strip().lower() == AUTO else parse_order(text)


@dataclass(frozen=True)
class LayerPlan:
    """Everything needed to convert one layer and to describe the result."""

    name: str
    weight_key: str
    bias_key: str | None
    out_features: int
    patch: Patch
    order: str
    stride: tuple[int, int]
    dtype: str
    flip: bool = False
    """The kernel is flipped for a framework that convolves (see ``geometry.flip_kernel``)."""

    @property
    def linear_shape(self) -> tuple[int, int]:
        return (self.out_features, self.patch.features)

    @property
    def conv_shape(self) -> tuple[int, int, int, int]:
        p = self.patch
        return (self.out_features, p.channels, p.height, p.width)

    def conv2d_line(self) -> str:
        """The ``nn.Conv2d(...)`` that the converted weights load into."""
        return conv2d_line(self.patch, self.out_features, self.stride, self.bias_key is not None)

    def to_dict(self) -> dict[str, Any]:
        """The layer's conversion facts, for JSON reports."""
        return {
            "layer": self.name,
            "weight": self.weight_key,
            "bias": self.bias_key,
            "linear_shape": list(self.linear_shape),
            "conv_shape": list(self.conv_shape),
            "patch": str(self.patch),
            "order": self.order,
            "stride": list(self.stride),
            "dtype": self.dtype,
            "flip": self.flip,
            "conv2d": self.conv2d_line(),
        }

    def geometry(self, input_size: tuple[int, int] | None) -> dict[str, Any]:
        """Input → output map, the receptive field, and what the windows leave out."""
        size = input_size or default_input(self.patch, self.stride)
        grid = make_grid(size, self.patch, self.stride)
        return {
            "input": [grid.height, grid.width, self.patch.channels],
            "output_map": [grid.rows, grid.cols, self.out_features],
            "receptive_field": [self.patch.height, self.patch.width],
            "uncovered_rows": grid.uncovered_rows,
            "uncovered_cols": grid.uncovered_cols,
            "warnings": grid.warnings(),
        }

    def provenance(self) -> dict[str, Any]:
        """The record kept in safetensors metadata (``flip`` only when the kernel is flipped)."""
        record = {
            "patch": str(self.patch),
            "order": self.order,
            "stride": list(self.stride),
            "linear_shape": list(self.linear_shape),
        }
        return {**record, "flip": True} if self.flip else record

    def with_order(self, order: str) -> LayerPlan:
        return dataclasses.replace(self, order=order)


def plan_layers(
    info: Mapping[str, TensorInfo],
    requests: Iterable[LayerRequest],
    *,
    default_patch: PatchSpec | None,
    order: str,
    stride: tuple[int, int] | None,
    source: str,
    flip: bool = False,
) -> list[LayerPlan]:
    """Check each request against the checkpoint and fix its patch, order and stride.

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
        plans.append(
            LayerPlan(
                name=name,
                weight_key=entry.weight_key,
                bias_key=entry.bias_key,
                out_features=entry.out_features,
                patch=patch,
                order=order,
                stride=layer_stride(patch, stride),
                dtype=entry.dtype,
                flip=flip,
            )
        )
    if not plans:
        raise SpecError("no layer to convert; name one with {layers} NAME[=HxWxC]")
    return plans


def layer_stride(patch: Patch, stride: tuple[int, int] | None) -> tuple[int, int]:
    # A 1×1 layer is the pointwise follower of a head (fc7 after fc6): it reads
    # every cell of the map before it, whatever stride the patch layer uses.
    if (patch.height, patch.width) == (1, 1):
        return (1, 1)
    return stride or (patch.height, patch.width)


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
    plans: list[LayerPlan], size: tuple[int, int] | None
) -> list[tuple[int, int] | None]:
    """The input grid each layer sees when ``size`` feeds the first.

    A 1×1 layer that reads the previous layer's outputs (``fc7`` after ``fc6``)
    sees that layer's output map, not the original input; every other layer
    gets ``size`` itself (``None``: each layer's default 2×2 grid of windows).
    """
    inputs: list[tuple[int, int] | None] = []
    for index, plan in enumerate(plans):
        previous = plans[index - 1] if index else None
        follows = (
            previous is not None
            and (plan.patch.height, plan.patch.width) == (1, 1)
            and plan.patch.channels == previous.out_features
        )
        if not follows:
            inputs.append(size)
            continue
        seen = inputs[-1] or default_input(previous.patch, previous.stride)
        grid = make_grid(seen, previous.patch, previous.stride)
        inputs.append((grid.rows, grid.cols))
    return inputs


def apply_plans(
    tensors: Mapping[str, torch.Tensor], plans: Iterable[LayerPlan]
) -> dict[str, torch.Tensor]:
    """A new state dict with each planned weight rearranged into its conv kernel.

    Keys keep their order; every other tensor is the very same object.
    """
    converted = dict(tensors)
    for plan in plans:
        kernel = linear_weight_to_conv(tensors[plan.weight_key], plan.patch, plan.order)
        converted[plan.weight_key] = flip_kernel(kernel) if plan.flip else kernel
    return converted
