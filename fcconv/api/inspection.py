"""The inspect job: what a checkpoint holds, which patches fit, what is already converted.

>>> import fcconv
>>> info = fcconv.inspect_checkpoint("model.pt", channels=32, rank=1)  # doctest: +SKIP
>>> info.to_dict()["layers"][0]["patches"]  # doctest: +SKIP
['l=16,c=32']
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcconv.errors import SpecError
from fcconv.io.keras import KERAS_FORMATS
from fcconv.io.sources import Source, source_of
from fcconv.patches import (
    AnySpec,
    PatchNd,
    PatchSpecNd,
    as_nd,
    candidate_patches_nd,
    kernel_axes,
    rank_of,
    resolve_patch,
    spec_from,
)
from fcconv.plan import (
    FeedingConv,
    LayerPlan,
    LinearEntry,
    feeding_conv,
    layer_stride,
    linear_entries,
    param_key,
)

if TYPE_CHECKING:
    from fcconv.evidence import OrderEvidence

CONV_DIMS = (3, 4, 5)
"""Ranks of the converted weights ``inspect`` lists: Conv1d, Conv2d and Conv3d kernels."""


@dataclass
class InspectResult:
    """The Linear-shaped entries of a checkpoint, the patches that fit, what is converted.

    ``rank`` is the number of spatial axes the listed patches have (2 unless
    asked otherwise).
    """

    source: str
    format: str
    entries: list[LinearEntry]
    fits: dict[str, list[str]]
    converted: list[dict[str, Any]]
    evidence: dict[str, OrderEvidence] = field(default_factory=dict)
    exit_code: int = 0
    rank: int = 2
    feeders: dict[str, FeedingConv] = field(default_factory=dict)
    """Layer → the conv before it in the checkpoint whose ``out_channels`` is its C."""
    proposed: dict[str, str] = field(default_factory=dict)
    """Layer → the patch proposed from that conv (a square or cube of its C, or 1-D)."""
    head: dict[str, Any] | None = None
    """A Keras or ONNX model's head, as read off its config or graph."""

    def __bool__(self) -> bool:
        return True

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "layers": [
                {
                    "name": e.name,
                    "weight": e.weight_key,
                    "bias": e.bias_key,
                    "out_features": e.out_features,
                    "in_features": e.in_features,
                    "dtype": e.dtype,
                    "patches": self.fits[e.name],
                    "proposed_patch": self.proposed.get(e.name),
                    "channels_from": (
                        self.feeders[e.name].to_dict() if e.name in self.feeders else None
                    ),
                }
                for e in self.entries
            ],
            "converted": self.converted,
            "order_evidence": {name: ev.to_dict() for name, ev in self.evidence.items()},
            "head": self.head,
        }


def spec_of(value: str | AnySpec | Any | None) -> AnySpec | None:
    """A patch given as text (any rank), a spec, a resolved patch or a tuple, as a spec
    (see :func:`fcconv.patches.spec_from`); None stays None."""
    return None if value is None else spec_from(value)


def inspect_checkpoint(
    path: str | Path | Mapping[str, Any],
    *,
    channels: int | None = None,
    feature_map: str | AnySpec | None = None,
    patch: str | AnySpec | None = None,
    rank: int | None = None,
    trust_pickle: bool = False,
) -> InspectResult:
    """List the Linear-shaped entries of a checkpoint and the patches that fit each.

    Args:
        path: a checkpoint file, ``-`` for stdin, a sharded checkpoint's folder, or a
            state dict in memory.
        channels: the patch's channels C, if known: every patch of that many
            channels that fits is listed.
        feature_map: the feature map the layer reads, if known, as a patch
            (``HxWxC``, ``l=100,c=64``, ``d=4,h=7,w=7,c=512``): limits the
            patches listed, and its rank is the rank listed.
        patch: rank the flatten orders by the weights' evidence for this patch
            (of any rank).
        rank: the spatial axes of the patches listed: 1 (lengths; all of
            them, longest first), 2 (square patches, or every ``kh × kw``
            with ``channels``; the default) or 3 (cubes, or every ``D × H × W``
            with ``channels``).
        trust_pickle: allow arbitrary unpickling (only for files you trust).

    A safetensors file or shard folder is described from its headers alone.
    """
    if str(path).lower().endswith(".onnx"):
        return _inspect_onnx(path, channels, _rank(rank, spec_of(feature_map)))
    limit = spec_of(feature_map)
    rank = _rank(rank, limit)
    if limit is not None:
        channels = limit.channels or channels
    describe_only = patch is None  # no tensor bytes are read: a .pt may be memory-mapped
    source = source_of(path, trust_pickle=trust_pickle, describe_only=describe_only)
    entries = linear_entries(source.info)
    feeders = {
        entry.name: feeder
        for entry in entries
        if (feeder := feeding_conv(source.info, entry)) is not None
    }
    fits, proposed = {}, {}
    for entry in entries:
        feeder = feeders.get(entry.name)
        known = channels  # the user's C wins; else the conv's, when it has the rank listed
        if known is None and feeder is not None and feeder.rank == rank:
            known = feeder.channels
        fits[entry.name] = _fits(entry.in_features, rank, known, limit)
        if feeder is not None and known == feeder.channels:
            proposal = _proposal(entry.in_features, rank, feeder.channels)
            if proposal is not None:
                proposed[entry.name] = proposal
    converted = [
        {"layer": name, "conv_shape": list(weight.shape), **record, **_order_from(record)}
        for name, record in source.records.items()
        if (weight := source.info.get(param_key(name, "weight"))) is not None
        and len(weight.shape) in CONV_DIMS
    ]
    spec = spec_of(patch)
    evidence = _evidence_for_patch(source, entries, spec) if spec is not None else {}
    head = None
    if source.format in KERAS_FORMATS:
        from fcconv.keras.summary import keras_head

        head = keras_head(source.path)
    return InspectResult(
        source.path, source.format, entries, fits, converted, evidence, rank=rank,
        feeders=feeders, proposed=proposed, head=head,
    )  # fmt: skip


def _proposal(features: int, rank: int, channels: int) -> str | None:
    """The patch of ``channels`` with equal sides (any length in 1-D), if one fits.

    A conv's output says C, not the sides: only a square (a cube) is proposed.

    >>> _proposal(1024, 2, 16), _proposal(512, 2, 16), _proposal(128, 1, 16)
    ('8x8x16', None, 'l=8,c=16')
    """
    area = features // channels
    side = round(area ** (1 / rank))
    for guess in (side - 1, side, side + 1):
        if guess >= 1 and guess**rank == area:
            patch = PatchNd((guess,) * rank, channels)
            return str(patch) if rank == 1 else "x".join(map(str, (*patch.sizes, channels)))
    return None


def _rank(rank: int | None, limit: AnySpec | None) -> int:
    """The rank asked for, or the feature map's, which must agree."""
    if rank is not None and rank not in (1, 2, 3):
        raise SpecError(f"{{rank}} {rank} is not a number of spatial axes; give 1, 2 or 3")
    if limit is None:
        return rank or 2
    if rank is not None and rank != rank_of(limit):
        raise SpecError(
            f"the feature map {limit} given as {{input_size}} is {rank_of(limit)}-D, but "
            f"{{rank}} asks for {rank}-D patches; leave one out"
        )
    return rank_of(limit)


def _fits(features: int, rank: int, channels: int | None, limit: AnySpec | None) -> list[str]:
    """The patches of ``rank`` that fit, the most plausible first, within ``limit``."""
    found = candidate_patches_nd(features, rank, channels, limit=32 if limit else 6)
    if limit is not None:
        room = _room(limit)
        found = [p for p in found if all(map(int.__le__, as_nd(p).sizes, room.sizes))]
    return [str(p) for p in found][:6]


def _room(limit: AnySpec) -> PatchNd:
    """The feature map's spatial sizes (its channels, when not given, do not matter here)."""
    if isinstance(limit, PatchSpecNd):
        return PatchNd(limit.sizes, limit.channels or 1)
    return PatchNd((limit.height, limit.width), limit.channels or 1)


def _evidence_for_patch(
    source: Source, entries: list[LinearEntry], spec: AnySpec
) -> dict[str, OrderEvidence]:
    found = {}
    for entry in entries:
        try:
            fitted = resolve_patch(spec, entry.in_features, entry.name)
        except SpecError:
            continue
        plan = LayerPlan(
            entry.name, entry.weight_key, entry.bias_key, entry.out_features, fitted,
            kernel_axes(as_nd(fitted).ndim), layer_stride(fitted, None), entry.dtype,
        )  # fmt: skip
        found[entry.name] = order_evidence(source, plan)
    if not found:
        raise SpecError(f"patch {spec} fits no Linear-shaped entry; see the patches that fit")
    return found


def _order_from(record: dict[str, Any]) -> dict[str, str]:
    """A recorded conversion's order comes from fcconv's record."""
    return {"order_from": "record"} if "order" in record else {}


def order_evidence(source: Source, plan: LayerPlan) -> OrderEvidence:
    """How the weights rank the flatten orders for ``plan``'s patch (rows read only)."""
    from fcconv.evidence import MAX_FEATURES, rank_orders, sample_rows

    too_wide = plan.patch.features > MAX_FEATURES  # judged without reading a row
    rows = [] if too_wide else sample_rows(plan.out_features, plan.patch.features).tolist()
    return rank_orders(source.read_rows(plan.weight_key, rows), plan.patch)


def _inspect_onnx(path: str | Path, channels: int | None, rank: int) -> InspectResult:
    """``inspect`` on an ONNX graph: its linear layers (Gemm, MatMul with a constant 2-D
    weight) as Linear-shaped entries, the patches that fit, and the head fcconv would
    rewrite (or why there is none)."""
    from fcconv.api.onnx import load_onnx
    from fcconv.errors import FcconvError
    from fcconv.onnx.graph import LINEARS, _Graph, find_head

    model = load_onnx(path)
    graph = _Graph(model)
    entries, fits = [], {}
    for node in model.graph.node:
        if node.op_type not in LINEARS or len(node.input) < 2:
            continue
        weight = graph.constant(node.input[1])
        if weight is None or weight.ndim != 2:
            continue
        transposed = node.op_type == "Gemm" and graph.attribute(node, "transB", 0)
        out_features, in_features = weight.shape if transposed else weight.shape[::-1]
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else None
        name = node.name or node.output[0]
        entries.append(
            LinearEntry(
                name, node.input[1], bias or None, out_features, in_features, str(weight.dtype)
            )
        )
        found = candidate_patches_nd(in_features, rank, channels, limit=6)
        fits[name] = [str(patch) for patch in found][:6]
    try:
        head: dict[str, Any] = find_head(model).to_dict()
    except FcconvError as error:
        head = {"found": False, "reason": str(error)}
    return InspectResult(str(path), "onnx", entries, fits, [], rank=rank, head=head)
