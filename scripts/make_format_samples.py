"""Keras and ONNX samples for sample_checkpoints/ (fixed seed, small, random init).

Keras and onnx are needed only to *write* these files; fcconv reads Keras
files with h5py and ONNX graphs with onnx.

- keras_cnn.keras / keras_cnn.weights.h5: a Keras 3 ``Conv2D → MaxPooling2D →
  Flatten → Dense → Dense`` classifier on 18×14×3 images (its head reads an
  8×6×6 map, flattened NHWC), saved as a model and as weights.
- tiny_cnn.onnx: a PyTorch ``Conv2d → ReLU → MaxPool → Flatten → Linear →
  ReLU → Linear`` classifier on 3×16×16 images, exported to ONNX with a
  dynamic batch (the reshape's shape is computed from the input's).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

SEED = 20260127
KERAS_INPUT = (18, 14, 3)
ONNX_INPUT = (3, 16, 16)


def write_keras_samples(out_dir: Path) -> None:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    os.environ.setdefault("KERAS_HOME", tempfile.mkdtemp(prefix="keras-home-"))
    import keras
    from keras import layers

    keras.utils.set_random_seed(SEED)
    model = keras.Sequential(
        [
            keras.Input(KERAS_INPUT, name="image"),
            layers.Conv2D(6, 3, activation="relu", name="conv"),
            layers.MaxPooling2D(2, name="pool"),
            layers.Flatten(name="flatten"),
            layers.Dense(32, activation="relu", name="fc6"),
            layers.Dense(10, name="fc7"),
        ],
        name="keras_cnn",
    )
    model.save(out_dir / "keras_cnn.keras")
    model.save_weights(out_dir / "keras_cnn.weights.h5")


class TinyCNN:
    """Built lazily so that importing this script needs no torch."""

    @staticmethod
    def build():
        from torch import nn

        return nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 7 * 7, 24),
            nn.ReLU(),
            nn.Linear(24, 5),
        )


def write_onnx_samples(out_dir: Path) -> None:
    import torch

    torch.manual_seed(SEED)
    model = TinyCNN.build().eval()
    example = torch.randn(1, *ONNX_INPUT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter
        torch.onnx.export(
            model,
            (example,),
            str(out_dir / "tiny_cnn.onnx"),
            dynamo=False,
            input_names=["image"],
            output_names=["scores"],
            dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}},
        )
