"""Keras models written the way published ones are, built in tests (random weights).

- :func:`mtcnn_rnet` and :func:`mtcnn_onet` follow MTCNN's Keras R-Net and
  O-Net (ipazc/mtcnn): convs with PReLU shared over the map, ``Permute((3, 2,
  1))`` before ``Flatten`` (so the head reads the map as ``w, h, c``), a Dense
  layer, a PReLU, then two or three Dense heads.
- :func:`channels_first_net`: a ``channels_first`` trunk flattened as is
  (order ``chw``).
- :func:`global_pool_net`: a trunk ending in global pooling, then Dense layers
  with per-cell layers between them.

Importing this module does not import Keras; each builder does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _keras() -> Any:
    import keras

    keras.utils.set_random_seed(7)
    return keras


def mtcnn_rnet() -> Any:
    """R-Net: 24x24x3 → 3x3x64 map → Permute((3, 2, 1)) → Flatten → fc4 (128) → PReLU →
    (fc5-1 softmax over 2, fc5-2 four box offsets)."""
    keras = _keras()
    from keras import layers

    image = keras.Input((24, 24, 3), name="input")
    x = layers.Conv2D(28, 3, name="conv1")(image)
    x = layers.PReLU(shared_axes=[1, 2], name="prelu1")(x)
    x = layers.MaxPooling2D(3, 2, padding="same", name="pool1")(x)
    x = layers.Conv2D(48, 3, name="conv2")(x)
    x = layers.PReLU(shared_axes=[1, 2], name="prelu2")(x)
    x = layers.MaxPooling2D(3, 2, name="pool2")(x)
    x = layers.Conv2D(64, 2, name="conv3")(x)
    x = layers.PReLU(shared_axes=[1, 2], name="prelu3")(x)
    x = layers.Permute((3, 2, 1), name="permute")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(128, name="fc4")(x)
    x = layers.PReLU(name="prelu4")(x)
    scores = layers.Dense(2, activation="softmax", name="fc5-1")(x)
    boxes = layers.Dense(4, name="fc5-2")(x)
    return keras.Model(image, [scores, boxes], name="rnet")


def mtcnn_onet() -> Any:
    """O-Net: 48x48x3 → 3x3x128 map → Permute((3, 2, 1)) → Flatten → fc5 (256) → PReLU →
    (fc6-1 softmax, fc6-2 boxes, fc6-3 ten landmark coordinates)."""
    keras = _keras()
    from keras import layers

    image = keras.Input((48, 48, 3), name="input")
    x = layers.Conv2D(32, 3, name="conv1")(image)
    x = layers.PReLU(shared_axes=[1, 2], name="prelu1")(x)
    x = layers.MaxPooling2D(3, 2, padding="same", name="pool1")(x)
    x = layers.Conv2D(64, 3, name="conv2")(x)
    x = layers.PReLU(shared_axes=[1, 2], name="prelu2")(x)
    x = layers.MaxPooling2D(3, 2, name="pool2")(x)
    x = layers.Conv2D(64, 3, name="conv3")(x)
    x = layers.PReLU(shared_axes=[1, 2], name="prelu3")(x)
    x = layers.MaxPooling2D(2, name="pool3")(x)
    x = layers.Conv2D(128, 2, name="conv4")(x)
    x = layers.PReLU(shared_axes=[1, 2], name="prelu4")(x)
    x = layers.Permute((3, 2, 1), name="permute")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(256, name="fc5")(x)
    x = layers.PReLU(name="prelu5")(x)
    scores = layers.Dense(2, activation="softmax", name="fc6-1")(x)
    boxes = layers.Dense(4, name="fc6-2")(x)
    marks = layers.Dense(10, name="fc6-3")(x)
    return keras.Model(image, [scores, boxes, marks], name="onet")


def channels_first_net() -> Any:
    """A channels_first trunk ([B, 6, 5, 4] after its conv) flattened as is: order ``chw``."""
    keras = _keras()
    from keras import layers

    image = keras.Input((3, 7, 6), name="img")
    x = layers.Conv2D(6, 3, data_format="channels_first", activation="relu", name="c1")(image)
    x = layers.Flatten(name="flat")(x)
    x = layers.Dense(9, activation="relu", name="fc1")(x)
    scores = layers.Dense(3, name="fc2")(x)
    return keras.Model(image, scores, name="cf")


def save(model: Any, path: Path) -> Path:
    """``model.save`` for ``.keras``/``.h5``, ``save_weights`` for ``.weights.h5``."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy .h5 format warns that it is legacy
        if path.name.endswith(".weights.h5"):
            model.save_weights(path)
        else:
            model.save(path)
    return path


def global_pool_net(pool: str = "avg") -> Any:
    """A trunk ending in global pooling (as Keras applications end), then a head with
    per-cell layers between its Dense layers: 20x18x3 → 7x6x8 map → pool → fc1 (12) →
    BatchNormalization → PReLU → LayerNormalization → fc2 (softmax over 5)."""
    keras = _keras()
    from keras import layers

    image = keras.Input((20, 18, 3), name="img")
    x = layers.Conv2D(8, 3, activation="relu", name="c1")(image)
    x = layers.MaxPooling2D(2, name="p1")(x)
    x = layers.Conv2D(8, 2, name="c2")(x)
    pooled = (
        layers.GlobalAveragePooling2D(name="gap")
        if pool == "avg"
        else layers.GlobalMaxPooling2D(name="gmp")
    )(x)
    x = layers.Dense(12, name="fc1")(pooled)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.PReLU(name="act")(x)
    x = layers.LayerNormalization(name="ln")(x)
    scores = layers.Dense(5, activation="softmax", name="fc2")(x)
    model = keras.Model(image, scores, name=f"g{pool}")
    _randomize_normalization(model)
    return model


def nested_net() -> Any:
    """A Functional model whose Dense layers sit inside a nested Sequential sub-model."""
    keras = _keras()
    from keras import layers

    head = keras.Sequential(
        [keras.Input((4, 4, 6)), layers.Flatten(name="flat"), layers.Dense(7, name="fc1")],
        name="head",
    )
    image = keras.Input((6, 6, 3), name="img")
    x = layers.Conv2D(6, 3, name="c1")(image)
    scores = layers.Dense(3, name="fc2")(head(x))
    return keras.Model(image, scores, name="nested")


def _randomize_normalization(model: Any) -> None:
    """Moving statistics and scales that are not the identity, so that a lost layer shows."""
    import numpy as np

    rng = np.random.default_rng(3)
    for layer in model.layers:
        if type(layer).__name__ in ("BatchNormalization", "LayerNormalization", "PReLU"):
            layer.set_weights(
                [
                    (
                        rng.uniform(0.5, 1.5, w.shape) if i % 2 else rng.normal(0, 0.3, w.shape)
                    ).astype(np.float32)
                    for i, w in enumerate(layer.get_weights())
                ]
            )


# ------------------------------------------------------------ Keras 2-era files


def _keras2_layer(cls: str, name: str, config: dict, inbound: list[str] | None) -> dict:
    layer = {"class_name": cls, "config": {"name": name, "trainable": True, **config}}
    if inbound is not None:
        layer["name"] = name
        layer["inbound_nodes"] = [[[source, 0, 0, {}] for source in inbound]] if inbound else []
    return layer


def keras2_h5(path: Path, style: str, rng: Any) -> dict[str, Any]:
    """A Keras 2-era ``.h5`` written with h5py, as Keras 2.0 (``style="2.0"``: a Sequential
    whose config is the list of layers) or 2.2 (``"2.2"``: a ``Model`` whose layers name
    their inputs in list-form ``inbound_nodes``) saved it.

    The model: 8x8x3 → Conv2D c1 (4, 3x3, relu) → Permute((3, 1, 2)) → Flatten → fc1 (6)
    → fc2 (3): the head reads the 6x6x4 map as ``chw``. Returns the weights by layer.
    """
    import json

    import h5py
    import numpy as np

    functional = style == "2.2"
    inbound = (lambda *names: list(names)) if functional else (lambda *names: None)
    conv = {"filters": 4, "kernel_size": [3, 3], "strides": [1, 1], "padding": "valid",
            "data_format": "channels_last", "dilation_rate": [1, 1], "activation": "relu",
            "use_bias": True}  # fmt: skip
    dense = {"activation": "linear", "use_bias": True}
    layers = [
        _keras2_layer("Conv2D", "c1", conv, inbound("input_1")),
        _keras2_layer("Permute", "nchw", {"dims": [3, 1, 2]}, inbound("c1")),
        _keras2_layer("Flatten", "flat", {"data_format": "channels_last"}, inbound("nchw")),
        _keras2_layer("Dense", "fc1", {"units": 6, **dense}, inbound("flat")),
        _keras2_layer("Dense", "fc2", {"units": 3, **dense}, inbound("fc1")),
    ]
    if functional:
        first = {"batch_input_shape": [None, 8, 8, 3], "dtype": "float32", "sparse": False}
        layers.insert(0, _keras2_layer("InputLayer", "input_1", first, []))
        config = {
            "class_name": "Model",
            "config": {"name": "model_1", "layers": layers,
                       "input_layers": [["input_1", 0, 0]], "output_layers": [["fc2", 0, 0]]},
        }  # fmt: skip
    else:
        layers[0]["config"]["batch_input_shape"] = [None, 8, 8, 3]
        config = {"class_name": "Sequential", "config": layers}
    weights = {
        "c1": {"kernel": rng.standard_normal((3, 3, 3, 4)), "bias": rng.standard_normal(4)},
        "fc1": {"kernel": rng.standard_normal((144, 6)), "bias": rng.standard_normal(6)},
        "fc2": {"kernel": rng.standard_normal((6, 3)), "bias": rng.standard_normal(3)},
    }
    weights = {k: {n: a.astype(np.float32) for n, a in v.items()} for k, v in weights.items()}
    names = [layer["config"]["name"] for layer in layers]
    with h5py.File(path, "w") as handle:
        handle.attrs["keras_version"] = b"2.2.4" if functional else b"2.0.8"
        handle.attrs["backend"] = b"tensorflow"
        handle.attrs["model_config"] = json.dumps(config).encode()
        group = handle.create_group("model_weights")
        group.attrs["layer_names"] = np.array([n.encode() for n in names])
        for name in names:
            layer = group.create_group(name)
            arrays = weights.get(name, {})
            layer.attrs["weight_names"] = np.array(
                [f"{name}/{variable}:0".encode() for variable in arrays], dtype="S"
            )
            for variable, array in arrays.items():
                layer.create_dataset(f"{name}/{variable}:0", data=array)
    return weights
