"""Which layers of two checkpoints are a conversion, and how each claims it was converted.

``verify`` needs no layer arguments: a layer is converted when its weight is
2-D in the original and 3-D, 4-D or 5-D (a Conv1d, Conv2d or Conv3d kernel)
with as many elements in the converted file.
Its patch comes from the kernel's shape; its order from explicit arguments,
else from fcconv's provenance record, else from the order whose permutation
maps one weight onto the other exactly. Every claim is then checked by
:mod:`fcconv.verify.layers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from fcconv.errors import LayerError
from fcconv.geometry import coinciding_orders, conv_weight_to_linear_nd, patch_of_kernel
from fcconv.patches import AnyPatch, AnySpec, as_nd, kernel_axes, orders_for, resolve_patch
from fcconv.plan import (
    AUTO,
    LayerPlan,
    LayerRequest,
    TensorInfo,
    check_convertible,
    describe,
    layer_stride,
    linear_entries,
    module_name,
    order_for,
    resolve_name,
)
from fcconv.verify.bits import bitwise_equal, first_mismatch

KERNEL_DIMS = (3, 4, 5)
"""The ranks of conv kernels: Conv1d ``[O, C, L]``, Conv2d and Conv3d."""

if TYPE_CHECKING:
    import torch


def matching_orders(weight: torch.Tensor, kernel: torch.Tensor, *, flip: bool = False) -> list[str]:
    """The orders under which ``kernel`` (unflipped first, with ``flip``) flattens back to
    ``weight`` bit for bit; a kernel of any rank."""
    if (
        kernel.dim() not in KERNEL_DIMS
        or kernel.dtype != weight.dtype
        or kernel.numel() != weight.numel()
    ):
        return []
    return [
        order
        for order in orders_for(kernel.dim() - 2)
        if bitwise_equal(conv_weight_to_linear_nd(kernel, order, flip=flip), weight)
    ]


def closest_order(weight: torch.Tensor, kernel: torch.Tensor, *, flip: bool = False) -> str:
    """The order with the fewest mismatching elements (to point at the difference)."""
    orders = orders_for(kernel.dim() - 2)
    counts = {
        order: first_mismatch(weight, conv_weight_to_linear_nd(kernel, order, flip=flip))[0]
        for order in orders
    }
    return min(orders, key=lambda order: counts[order])


def converted_pairs(
    original: Mapping[str, TensorInfo], converted: Mapping[str, TensorInfo]
) -> list[str]:
    """Weight keys that are 2-D in the original and a conv kernel with as many elements after."""
    pairs = []
    for key, info in original.items():
        other = converted.get(key)
        if (
            module_name(key) is not None
            and other is not None
            and len(info.shape) == 2
            and len(other.shape) in KERNEL_DIMS
            and math.prod(info.shape) == math.prod(other.shape)
        ):
            pairs.append(key)
    return pairs


def plan_verification(
    original: Mapping[str, torch.Tensor],
    converted: Mapping[str, torch.Tensor],
    *,
    requests: list[LayerRequest],
    default_patch: AnySpec | None,
    order: str | None,
    stride: tuple[int, ...] | None,
    provenance: Mapping[str, Mapping[str, Any]],
    source: str,
    info: tuple[Mapping[str, TensorInfo], Mapping[str, TensorInfo]] | None = None,
    flip: bool | None = None,
) -> tuple[list[LayerPlan], list[str]]:
    """Find the converted layers and how each claims to have been converted.

    Explicit flags win, then the file's provenance, then discovery: the order
    whose permutation maps one weight onto the other exactly. A kernel is
    flipped (for a framework that convolves) when ``flip`` says so, else when
    the provenance says so; a kernel that only a flip maps onto the weight is
    named in a note, and checked unflipped (so it fails). Returns the plans
    and the notes that say where each fact came from; flags that disagree with
    the files come back as plans that the checks will fail. ``info`` (shapes
    and dtypes of both sides) spares reading tensors that are still on disk.
    """
    info, info_after = info or (describe(original), describe(converted))
    pairs = converted_pairs(info, info_after)
    if requests:
        names = [resolve_name(r.name, info, source) for r in requests]
    else:
        names = [module_name(key) for key in pairs]
    if not names:
        raise LayerError(
            f"no converted layer found: no weight of {source} is 2-D there and a conv kernel "
            "(3-D, 4-D or 5-D) with as many elements in the converted file; check the two paths"
        )
    entries = {entry.name: entry for entry in linear_entries(info)}
    specs = {r.name: r.patch for r in requests}
    plans, notes = [], []
    for requested, name in zip(requests or names, names, strict=True):
        if name not in entries:
            raise LayerError(f"{name} is not Linear-shaped in {source}; nothing to verify")
        entry = entries[name]
        bias = info.get(entry.bias_key) if entry.bias_key else None
        check_convertible(name, info[entry.weight_key], bias)
        if entry.weight_key not in pairs:
            after = info_after.get(entry.weight_key)
            shape = tuple(after.shape) if after is not None else None
            raise LayerError(
                f"{name} is not converted in the second file ({entry.weight_key} has "
                f"shape {shape}); check the layer name and the file order"
            )
        patch = patch_of_kernel(tuple(info_after[entry.weight_key].shape))
        spec = specs.get(getattr(requested, "name", requested)) or default_patch
        claimed_patch = resolve_patch(spec, entry.in_features, name) if spec else patch
        record = provenance.get(name, {})
        flipped = flip if flip is not None else bool(record.get("flip"))
        if as_nd(claimed_patch).ndim == as_nd(patch).ndim:
            # the weights are read only when neither flags nor provenance name the order
            layer_order, note = _claimed_order(
                name,
                lambda key=entry.weight_key: (original[key], converted[key]),
                patch,
                order,
                record,
                flipped,
            )
        else:  # a claim the kernel cannot hold: checked as claimed, the shapes differ
            layer_order = order_for(None if order == AUTO else order, claimed_patch, name)
            note = (
                f"{name}: the converted kernel is {as_nd(patch).ndim}-D ({patch}), not "
                f"{as_nd(claimed_patch).ndim}-D as the patch {claimed_patch} given says; "
                f"checked as {layer_order}"
            )
        notes.append(note)
        plans.append(
            LayerPlan(
                name,
                entry.weight_key,
                entry.bias_key,
                entry.out_features,
                claimed_patch,
                layer_order,
                _claimed_stride(claimed_patch, stride, record, name),
                entry.dtype,
                flipped,
            )  # fmt: skip
        )
    return plans, notes


def _claimed_stride(
    patch: AnyPatch, stride: tuple[int, ...] | None, record: Mapping[str, Any], name: str
) -> tuple[int, ...]:
    """The stride given, else the file's record (when it has the patch's rank), else the patch."""
    recorded = tuple(record.get("stride", ()))
    if not stride and len(recorded) == as_nd(patch).ndim:
        return recorded
    return layer_stride(patch, stride, name)


def _claimed_order(
    name: str,
    weights: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    patch: AnyPatch,
    order: str | None,
    record: Mapping[str, Any],
    flip: bool,
) -> tuple[str, str]:
    as_flipped = " (kernel flipped)" if flip else ""
    if order is not None and order != AUTO:
        order = order_for(order, patch, name)  # an order of another rank is refused
        return order, f"{name}: order {order} as given{as_flipped}"
    if record.get("order") in orders_for(as_nd(patch).ndim):
        return record["order"], (
            f"{name}: order {record['order']}{as_flipped} from the file's metadata"
        )
    weight, kernel = weights()
    if weight.numel() == 0:
        default = kernel_axes(as_nd(patch).ndim)
        return default, (
            f"{name}: the weight is empty, so every order maps it; checked as {default}"
        )
    matches = matching_orders(weight, kernel, flip=flip)
    if not matches:
        return _unmatched(name, weight, kernel, flip)
    same = coinciding_orders(patch, matches[0])
    if len(matches) == 1:
        return matches[0], f"{name}: order {matches[0]} found from the weights"
    if set(matches) <= set(same):
        return matches[0], (
            f"{name}: orders {', '.join(matches)} are the same permutation for a "
            f"{patch} patch; any of them is right"
        )
    return matches[0], (
        f"{name}: orders {', '.join(matches)} all map the kernel onto the weight "
        f"(its values repeat); checked as {matches[0]}"
    )


def _unmatched(
    name: str, weight: torch.Tensor, kernel: torch.Tensor, flip: bool
) -> tuple[str, str]:
    """The order to check a kernel that no order maps onto the weight, and why.

    A flip is a permutation too, so it is decided exactly: when the kernel
    matches only the other way round, the note says so and how to check it.
    """
    other = matching_orders(weight, kernel, flip=not flip)
    if other:
        if flip:
            what = f"matches order {other[0]} unflipped: it was not flipped"
        else:
            what = (
                f"matches order {other[0]} with its spatial axes flipped: a kernel for a "
                "framework that convolves (Theano, textbook convolution); if that is what "
                "was meant, check it with --flip (flip=True)"
            )
        return other[0], f"{name}: the kernel {what}"
    closest = closest_order(weight, kernel, flip=flip)
    return closest, (
        f"{name}: no order maps the kernel onto the weight exactly; the closest is {closest}"
    )
