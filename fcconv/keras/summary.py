"""What a Keras file says of its head and orders, for ``inspect`` and ``verify``.

Kept apart from :mod:`fcconv.api.keras` (the convert job) so that the
inspect and verify jobs read a Keras config without importing the convert job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fcconv.errors import FcconvError
from fcconv.io.keras import config_classes, read_keras
from fcconv.keras.config import KERAS_ORDER, find_head, read_order


def keras_head(path: str | Path) -> dict[str, Any]:
    """What ``inspect`` says of a Keras file's head: the layers read off its config, the
    feature map and the order (or why it has none to rewrite)."""
    file = read_keras(path)
    if file.config is None:
        return {
            "found": False,
            "order": KERAS_ORDER,
            "order_from": "default",
            "reason": "no model config (a weights file): the order is Keras's channels-last "
            "hwc unless a Permute or a channels_first trunk says otherwise",
        }
    try:
        return {"found": True, **find_head(file.config).to_dict()}
    except FcconvError as error:
        found: dict[str, Any] = {"found": False, "reason": str(error), "layer": error.layer}
    for name, cls in config_classes(file.config).items():
        try:
            read = read_order(file.config, name) if cls == "Dense" else None
        except FcconvError:
            continue
        if read is not None:  # the order can still be read, for the weights-only routes
            found.update(order=read.order, order_from="model", order_detail=read.detail)
            break
    return found


def model_orders(path: str | Path) -> dict[str, tuple[str, str]]:
    """Dense layer name → (order, how it was read) for every Dense layer of a Keras model
    that reads a flattened map, read off its config (empty for a file without one).

    For checks that judge a conversion against the order the model uses
    (``order_from: model``).
    """
    file = read_keras(path)
    found: dict[str, tuple[str, str]] = {}
    if file.config is None:
        return found
    for name, cls in config_classes(file.config).items():
        if cls != "Dense":
            continue
        try:
            read = read_order(file.config, name)
        except FcconvError:
            continue
        if read is not None and read.pool is None:
            found[name] = (read.order, read.detail)
    return found
