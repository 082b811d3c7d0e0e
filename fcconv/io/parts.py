"""The other files an input is made of, so that the output guard protects them too.

An input is more than the path the user names: an ONNX model may keep its
weights in external-data files beside it (``weights.onnx``, ``model.data``),
and a sharded checkpoint's ``*.index.json`` names shard files. Writing any of
them would destroy the input as surely as writing the named file, with or
without ``--force``. :func:`parts_of` lists them; it reads only small,
structural parts of the input (the ONNX protobuf without its external data,
the index's JSON) and never fails: an input it cannot read has no extra parts
here, and is refused when it is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_MAX_INDEX_BYTES = 64 << 20
"""A shard index larger than this is not read here (the loader refuses it)."""


def parts_of(path: str | Path) -> list[Path]:
    """The files besides ``path`` that the input ``path`` is made of (maybe none).

    >>> parts_of("no-such-file.onnx")
    []
    """
    file = Path(path)
    name = file.name.lower()
    try:
        if name.endswith(".onnx") and file.is_file():
            return _onnx_parts(file)
        if name.endswith(".index.json") and file.is_file():
            return _index_parts(file)
    except (OSError, ValueError, RecursionError):
        return []
    except Exception:  # protobuf's own DecodeError and the like: not ours to judge here
        return []
    return []


def _inside(folder: Path, location: str) -> Path | None:
    if not location or "\x00" in location:
        return None
    return folder / location


def _index_parts(file: Path) -> list[Path]:
    if file.stat().st_size > _MAX_INDEX_BYTES:
        return []
    index = json.loads(file.read_bytes())
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        return []
    names = {v for v in weight_map.values() if isinstance(v, str)}
    found = (_inside(file.parent, name) for name in sorted(names))
    return [p for p in found if p is not None]


def _onnx_parts(file: Path) -> list[Path]:
    try:
        import onnx
    except ImportError:
        return []
    model = onnx.load(str(file), load_external_data=False)
    locations = set()
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    found = (_inside(file.parent, os.fspath(name)) for name in sorted(locations))
    return [p for p in found if p is not None]


def _tensors(graph: Any) -> Iterator[Any]:
    """Every tensor of an ONNX graph: initializers, constants, and those of subgraphs."""
    stack = [graph]
    while stack:
        current = stack.pop()
        yield from current.initializer
        for sparse in current.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in current.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                if attribute.HasField("g"):
                    stack.append(attribute.g)
                stack.extend(attribute.graphs)
