"""Which layers of two checkpoints are a conversion, and how each claims it was converted.

``verify`` needs no layer arguments: a layer is converted when its weight is
2-D in the original and 3-D, 4-D or 5-D (a Conv1d, Conv2d or Conv3d kernel)
with as many elements in the converted file.
Its patch comes from the kernel's shape; its order is the one the model
uses: explicit arguments, else fcconv's provenance record, else the weights'
evidence when it is clear, else the framework's convention. Never merely an
order that fits: a kernel that matches only another order is a difference.
Every claim is then checked by :mod:`fcconv.verify.layers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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
from fcconv.progress import phased
from fcconv.verify.bits import bitwise_equal, first_mismatch

KERNEL_DIMS = (3, 4, 5)
"""The ranks of conv kernels: Conv1d ``[O, C, L]``, Conv2d and Conv3d."""

if TYPE_CHECKING:
    import torch

    from fcconv.evidence import OrderEvidence


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


@dataclass(frozen=True)
class OrderClaim:
    """The order one layer is judged in, where it came from, and what to say about it."""

    order: str
    order_from: str
    note: str
    margin: float | None = None
    problem: str | None = None
    """A difference found while choosing: the kernel matches only another order."""


Weigh = Callable[[str, str, AnyPatch, int], "OrderEvidence"]
"""``weigh(name, weight_key, patch, out_features)``: the weights' evidence for a layer."""


@dataclass
class VerificationPlan:
    """What :func:`plan_verification` found: the plans, the notes, and the differences."""

    plans: list[LayerPlan]
    notes: list[str]
    problems: dict[str, str] = field(default_factory=dict)
    """Layer name → a difference found while choosing its order."""
    evidence: dict[str, OrderEvidence] = field(default_factory=dict)
    """The evidence weighed per layer (when it was needed to choose the order)."""


@phased("finding the converted layers")
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
    weigh: Weigh | None = None,
    default_order: str | None = None,
    model_orders: Mapping[str, tuple[str, str]] | None = None,
) -> VerificationPlan:
    """Find the converted layers and the order each must be judged in (SPEC §2).

    The order is the one the model uses, never merely one that fits: an
    explicit flag, else the file's provenance record, else the weights'
    evidence when it is clear (``weigh``; the rule ``--order auto`` uses),
    else the framework's convention (``default_order``, else ``chw`` and
    its 1-D/3-D twins). ``model_orders`` (layer → order and how it was read,
    from a Keras config) is the model's own word: it comes after a flag and
    a record, before the weights. A kernel that matches only another order is a
    difference that names that order and how to assert it. A kernel is
    flipped (for a framework that convolves) when ``flip`` says so, else
    when the provenance says so; a kernel that only a flip maps onto the
    weight is named in a note, and checked unflipped (so it fails). ``info``
    (shapes and dtypes of both sides) spares reading tensors still on disk.
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
    found = VerificationPlan([], [])
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
            claim = _claimed_order(
                name,
                lambda key=entry.weight_key: (original[key], converted[key]),
                patch,
                order,
                record,
                flipped,
                _weighing(weigh, found.evidence, name, entry.weight_key, patch, entry.out_features),
                default_order,
                (model_orders or {}).get(name),
            )
        else:  # a claim the kernel cannot hold: checked as claimed, the shapes differ
            layer_order = order_for(None if order == AUTO else order, claimed_patch, name)
            claim = OrderClaim(
                layer_order,
                "flag" if order not in (None, AUTO) else "default",
                f"{name}: the converted kernel is {as_nd(patch).ndim}-D ({patch}), not "
                f"{as_nd(claimed_patch).ndim}-D as the patch {claimed_patch} given says; "
                f"checked as {layer_order}",
            )
        found.notes.append(claim.note)
        if claim.problem:
            found.problems[name] = claim.problem
        found.plans.append(
            LayerPlan(
                name,
                entry.weight_key,
                entry.bias_key,
                entry.out_features,
                claimed_patch,
                claim.order,
                _claimed_stride(claimed_patch, stride, record, name),
                entry.dtype,
                flipped,
                claim.order_from,
                claim.margin,
            )  # fmt: skip
        )
    return found


def _weighing(
    weigh: Weigh | None,
    into: dict[str, OrderEvidence],
    name: str,
    key: str,
    patch: AnyPatch,
    out_features: int,
) -> Callable[[], OrderEvidence | None]:
    """The evidence of one layer, weighed only when asked for (and kept in ``into``)."""

    def weighed() -> OrderEvidence | None:
        if weigh is None:
            return None
        into[name] = weigh(name, key, patch, out_features)
        return into[name]

    return weighed


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
    weigh: Callable[[], OrderEvidence | None],
    default_order: str | None,
    model_order: tuple[str, str] | None = None,
) -> OrderClaim:
    as_flipped = " (kernel flipped)" if flip else ""
    ndim = as_nd(patch).ndim
    if order is not None and order != AUTO:
        order = order_for(order, patch, name)  # an order of another rank is refused
        return OrderClaim(order, "flag", f"{name}: order {order} as given{as_flipped}")
    if record.get("order") in orders_for(ndim):
        return OrderClaim(
            record["order"], "record",
            f"{name}: order {record['order']}{as_flipped} from the file's metadata",
        )  # fmt: skip
    default = default_order if default_order in orders_for(ndim) else kernel_axes(ndim)
    weight, kernel = weights()
    if weight.numel() == 0:
        return OrderClaim(
            default, "default",
            f"{name}: the weight is empty, so every order maps it; checked as {default}",
        )  # fmt: skip
    evidence = weigh() if model_order is None or model_order[0] not in orders_for(ndim) else None
    if model_order is not None and model_order[0] in orders_for(ndim):
        model, came, margin = model_order[0], "model", None
        why = f"order {model} from the model ({model_order[1]})"
    elif evidence is not None and evidence.winner is not None:
        model, came, margin = evidence.winner, "weights", evidence.margin
        why = f"order {model} from the weights ({evidence.ranking_text()})"
    else:
        model, came, margin = default, "default", None
        unclear = f": {evidence.reason}" if evidence is not None else ""
        why = f"order {model}, the framework's default (the weights do not decide{unclear})"
    matches = matching_orders(weight, kernel, flip=flip)
    same = coinciding_orders(patch, model)
    if any(m in same for m in matches):
        also = (
            f"; orders {', '.join(same)} are the same permutation for a {patch} patch"
            if len(same) > 1
            else ""
        )
        return OrderClaim(model, came, f"{name}: {why}{as_flipped}{also}", margin)
    if matches:
        other = matches[0]
        return OrderClaim(
            model, came, f"{name}: {why}{as_flipped}", margin,
            problem=(
                f"the kernel of {name} is the weight flattened in order {other}, not in "
                f"{model} ({_came_words(came)}); if the model really flattens {other}, "
                f"assert it with --order {other} (order=\"{other}\")"
            ),
        )  # fmt: skip
    note = _unmatched(name, weight, kernel, flip)[1]
    return OrderClaim(model, came, f"{name}: {why}{as_flipped}; {note}", margin)


def _came_words(came: str) -> str:
    return {
        "weights": "the order the weights' evidence shows",
        "model": "the order the model's config flattens in",
        "default": "the framework's default, which the model is assumed to use",
    }.get(came, came)


def _unmatched(
    name: str, weight: torch.Tensor, kernel: torch.Tensor, flip: bool
) -> tuple[str, str]:
    """The order closest to a kernel that no order maps onto the weight, and why.

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
        return other[0], f"the kernel {what}"
    closest = closest_order(weight, kernel, flip=flip)
    return closest, f"no order maps the kernel onto the weight exactly; the closest is {closest}"
