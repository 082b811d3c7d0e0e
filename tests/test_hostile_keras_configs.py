"""No Keras model config makes an internal error: one field anywhere replaced by any JSON."""

from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fcconv.errors import FcconvError
from fcconv.geometry import Patch
from fcconv.io.keras import config_classes
from fcconv.io.keras_schema import check_keras_config
from fcconv.keras.config import find_head, layer_classes, rewrite

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"


def sample_config() -> dict:
    with zipfile.ZipFile(SAMPLES / "keras_cnn.keras") as archive:
        return json.loads(archive.read("config.json"))


def functional_config() -> dict:
    """The sample as a Functional model: layers linked by their inbound nodes."""
    config = sample_config()
    config["class_name"] = "Functional"
    layers = config["config"]["layers"]
    layers.insert(
        0,
        {"class_name": "InputLayer", "config": {"name": "input", "batch_shape": [None, 16, 16, 3]}},
    )
    for before, layer in zip(layers, layers[1:], strict=False):
        tensor = {"class_name": "__keras_tensor__", "config": {
            "shape": [None, 8, 8, 6], "dtype": "float32",
            "keras_history": [before["config"]["name"], 0, 0]}}  # fmt: skip
        layer["inbound_nodes"] = [{"args": [tensor], "kwargs": {}}]
    return config


def paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths(item, (*prefix, index))


BASES = [sample_config(), functional_config()]
PATHS = [(b, p) for b, base in enumerate(BASES) for p in paths(base) if p]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**66), max_value=2**66)
    | st.floats(allow_nan=False)
    | st.text(max_size=6)
    | st.sampled_from(
        [
            "Dense",
            "Flatten",
            "Permute",
            "Conv2D",
            "InputLayer",
            "same",
            "valid",
            "channels_first",
            "__keras_tensor__",
            "dense",
            "conv2d",
        ]
    ),  # fmt: skip
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


def mutated(choice: tuple[int, tuple], value: object, delete: bool) -> dict:
    base, path = choice
    config = copy.deepcopy(BASES[base])
    holder = config
    for key in path[:-1]:
        holder = holder[key]
    if delete and isinstance(holder, dict):
        del holder[path[-1]]
    else:
        holder[path[-1]] = value
    return config


def read_like_fcconv(config: dict) -> None:
    """What fcconv does with a config: check it, find the head, list and rewrite the layers."""
    check_keras_config(config, "fuzz.keras")
    config_classes(config)
    classes = layer_classes(config)
    assert all(isinstance(name, str) for name, _ in classes)
    head = find_head(config)
    if head.patch is not None and head.dense:
        convert = {head.dense[0]: (head.patch, (1, 1))}
        convert.update({name: (Patch(1, 1, 1), (1, 1)) for name in head.dense[1:]})
        rewrite(config, head, convert)


@pytest.mark.parametrize("base", [0, 1])
def test_the_unchanged_configs_are_read(base: int) -> None:
    read_like_fcconv(copy.deepcopy(BASES[base]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PATHS), json_values, st.booleans())
def test_no_config_makes_an_internal_error(choice, value, delete) -> None:
    config = mutated(choice, value, delete)
    try:
        read_like_fcconv(config)
    except FcconvError:
        pass


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_no_json_value_makes_an_internal_error(value) -> None:
    try:
        read_like_fcconv(value)
    except FcconvError:
        pass


def test_a_deep_config_is_refused() -> None:
    config = {"class_name": "Sequential", "config": {"layers": []}}
    holder = config["config"]
    for _ in range(10_000):
        holder["x"] = {}
        holder = holder["x"]
    with pytest.raises(FcconvError, match="deeper"):
        check_keras_config(config, "deep.keras")
