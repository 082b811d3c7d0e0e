"""Write the sample checkpoints shipped in sample_checkpoints/ (fixed seed, small).

    python scripts/make_samples.py [OUT_DIR]

- seed_fc.pt / seed_fc.safetensors: the seed case, Linear(4000 → 64) that was
  fed flattened 20×20×10 patches (NCHW order).
- training_checkpoint.pt: a nested training checkpoint ({"state_dict", "optimizer",
  "epoch", "hparams"}) whose keys carry a "model." prefix.
- head_fc6_fc7.safetensors: a two-layer head, fc6 on 6×6×8 patches, fc7 pointwise.
- trained_nchw.* / trained_nhwc.*: heads of a small trained CNN (see
  make_trained_samples.py) for --order auto.
- tiny_vgg.safetensors: weights of fcconv.samples_models.tiny_vgg, a small
  VGG-style classifier, for `fcconv convolutionalize --arch`.
- keras_cnn.keras / keras_cnn.weights.h5 / tiny_cnn.onnx: Keras and ONNX
  classifiers (see make_format_samples.py).
- detector_stage.safetensors: weights of fcconv.samples_models.detector_stage,
  a two-headed face-detector stage (random init), for the walk-through in docs/guide/models.md.
- blob_net.safetensors / blobs.png: weights of fcconv.samples_models.blob_net (set
  by hand: red, green and blue blob scores) and a synthetic 320x240 picture of
  coloured blobs, for `fcconv map` (Pillow writes the PNG).
- seq_head.safetensors: a 1-D head (random init), fc1 on windows of 16 steps
  of 32 channels and its pointwise fc2.
- clip_head.safetensors: a 3-D head (random init), fc on 2×3×3 clips of 8
  channels.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

SEED = 20260127


def seed_layer() -> dict[str, torch.Tensor]:
    fc = nn.Linear(4000, 64)
    return {"fc.weight": fc.weight.detach().clone(), "fc.bias": fc.bias.detach().clone()}


def training_checkpoint() -> dict:
    model = nn.Sequential()
    model.add_module("backbone", nn.Conv2d(3, 10, 3, padding=1))
    model.add_module("fc", nn.Linear(10 * 8 * 8, 16))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(4, 3, 8, 8)
    loss = model.fc(model.backbone(x).flatten(1)).square().mean()
    loss.backward()
    optimizer.step()
    state = {f"model.{key}": value.detach().clone() for key, value in model.state_dict().items()}
    return {
        "state_dict": state,
        "optimizer": optimizer.state_dict(),
        "epoch": 7,
        "hparams": {"lr": 0.1, "patch": "8x8x10", "note": "flattened NCHW"},
    }


def two_layer_head() -> dict[str, torch.Tensor]:
    fc6, fc7 = nn.Linear(6 * 6 * 8, 32), nn.Linear(32, 10)
    return {
        "fc6.weight": fc6.weight.detach().clone(),
        "fc6.bias": fc6.bias.detach().clone(),
        "fc7.weight": fc7.weight.detach().clone(),
        "fc7.bias": fc7.bias.detach().clone(),
    }


def write_map_samples(out_dir: Path) -> None:
    """The blob classifier's weights and the picture `make demo` maps."""
    from PIL import Image

    from fcconv.samples_models import blob_image, blob_net

    save_file(blob_net().state_dict(), str(out_dir / "blob_net.safetensors"))
    Image.fromarray(blob_image().numpy()).save(out_dir / "blobs.png", optimize=True)


def _linear(generator: torch.Generator, name: str, out: int, features: int) -> dict:
    """``nn.Linear``'s default initialisation, from ``generator`` (no global RNG)."""
    bound = 1 / math.sqrt(features)
    return {
        f"{name}.weight": (torch.rand(out, features, generator=generator) * 2 - 1) * bound,
        f"{name}.bias": (torch.rand(out, generator=generator) * 2 - 1) * bound,
    }


def sequence_head() -> dict[str, torch.Tensor]:
    """A Conv1d trunk's head: fc1 on 16 steps × 32 channels, then a pointwise fc2."""
    generator = torch.Generator().manual_seed(SEED + 1)
    return {**_linear(generator, "fc1", 24, 16 * 32), **_linear(generator, "fc2", 5, 24)}


def clip_head() -> dict[str, torch.Tensor]:
    """A Conv3d trunk's head: fc on 2 frames × 3 × 3 pixels × 8 channels."""
    return _linear(torch.Generator().manual_seed(SEED + 2), "fc", 10, 2 * 3 * 3 * 8)


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    seed = seed_layer()
    torch.save(seed, out_dir / "seed_fc.pt")
    save_file(seed, str(out_dir / "seed_fc.safetensors"), metadata={"source": "fcconv samples"})
    torch.save(training_checkpoint(), out_dir / "training_checkpoint.pt")
    save_file(two_layer_head(), str(out_dir / "head_fc6_fc7.safetensors"))
    sys.path.insert(0, str(Path(__file__).parent))
    from make_trained_samples import write_trained_samples

    write_trained_samples(out_dir)
    from fcconv.samples_models import detector_stage, tiny_vgg

    # Weights for `fcconv convolutionalize --arch fcconv.samples_models:tiny_vgg` (seeded there).
    save_file(tiny_vgg().state_dict(), str(out_dir / "tiny_vgg.safetensors"))
    from make_format_samples import write_keras_samples, write_onnx_samples

    write_keras_samples(out_dir)
    write_onnx_samples(out_dir)
    save_file(detector_stage().state_dict(), str(out_dir / "detector_stage.safetensors"))
    write_map_samples(out_dir)
    save_file(sequence_head(), str(out_dir / "seq_head.safetensors"))
    save_file(clip_head(), str(out_dir / "clip_head.safetensors"))
    for path in sorted(out_dir.iterdir()):
        print(f"{path}  {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    default = Path(__file__).parent.parent / "sample_checkpoints"
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
