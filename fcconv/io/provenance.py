"""fcconv's record of what it converted, kept in safetensors ``__metadata__``.

The record is a claim, never trusted: ``verify`` checks every fact in it
against the weights. Reading it is defensive (a hand-edited or hostile file
may hold anything under the key): a record that is not well formed is
ignored field by field, never an error and never a crash.

A 1-D or 3-D conversion is recorded the same way: its patch in the spelling
that names its rank (``l=16,c=32``, ``d=2,h=3,w=3,c=8``), an order of that
rank, one stride per spatial axis. Facts of different ranks do not go
together: such a stride or order is dropped.

>>> metadata = with_provenance({"source": "x"}, {"fc": {"patch": "2x2x3", "order": "hwc"}})
>>> layer_records(metadata)["fc"]["order"]
'hwc'
>>> layer_records({"fcconv": "[1, 2"})
{}
>>> record = {"patch": "l=16,c=32", "order": "hwc", "stride": [8]}
>>> layer_records(with_provenance({}, {"fc": record}))["fc"]
{'patch': 'l=16,c=32', 'stride': [8]}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fcconv.errors import SpecError
from fcconv.patches import SPATIAL_AXES, orders_for, parse_patch_spec, rank_of

PROVENANCE_KEY = "fcconv"
"""The ``__metadata__`` key fcconv writes its record under."""

_MAX_RECORD_CHARS = 1 << 20


def _document(metadata: Mapping[str, str] | None) -> dict[str, Any]:
    text = (metadata or {}).get(PROVENANCE_KEY)
    if not isinstance(text, str) or not text or len(text) > _MAX_RECORD_CHARS:
        return {}
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    return document if isinstance(document, dict) else {}


def _clean(record: Any) -> dict[str, Any]:
    """The well-formed facts of one layer's record; anything else is dropped."""
    if not isinstance(record, dict):
        return {}
    clean: dict[str, Any] = {}
    patch, rank = record.get("patch"), None
    if isinstance(patch, str) and len(patch) < 64:
        try:
            rank = rank_of(parse_patch_spec(patch))
            clean["patch"] = patch
        except SpecError:
            pass
    ranks = [rank] if rank is not None else list(SPATIAL_AXES)
    if any(record.get("order") in orders_for(n) for n in ranks):
        clean["order"] = record["order"]
    stride = record.get("stride")
    if (
        isinstance(stride, list)
        and len(stride) in ranks
        and all(type(s) is int and 0 < s < 1 << 31 for s in stride)
    ):
        clean["stride"] = list(stride)
    shape = record.get("linear_shape")
    if isinstance(shape, list) and len(shape) == 2 and all(type(s) is int for s in shape):
        clean["linear_shape"] = list(shape)
    if record.get("flip") is True:
        clean["flip"] = True
    return clean


def layer_records(metadata: Mapping[str, str] | None) -> dict[str, dict[str, Any]]:
    """Layer name → its well-formed record (``patch``, ``order``, ``stride``, ``linear_shape``,
    and ``flip`` for a kernel flipped for a convolving framework)."""
    layers = _document(metadata).get("layers")
    if not isinstance(layers, dict):
        return {}
    return {name: _clean(record) for name, record in layers.items() if isinstance(name, str)}


def with_provenance(
    metadata: Mapping[str, str] | None, layers: Mapping[str, Mapping[str, Any]]
) -> dict[str, str]:
    """``metadata`` with fcconv's record of ``layers`` merged into any earlier record."""
    from fcconv import __version__

    merged = dict(metadata or {})
    record = {"version": __version__, "layers": {**layer_records(metadata), **layers}}
    merged[PROVENANCE_KEY] = json.dumps(record, sort_keys=True)
    return merged
