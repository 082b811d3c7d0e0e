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
