"""Train two tiny CNN heads on synthetic images and save them as sample checkpoints.

Random weights carry no evidence of their flatten order, so ``--order auto``
needs heads that were really trained. This script trains, in a few seconds on
a CPU and with a fixed seed, a small CNN whose features end in a 6×4 map of
16 channels, flattened into ``Linear(384, 12)``. The images are synthetic:
one blob or bar on a noisy background, and the class says where it is
(a 3×2 grid of regions) and what it is (blob or bar), so the head must weigh
each position of the map, and weight decay makes those weights vary smoothly
from one position to the next.

It trains the network twice: once flattening the features NCHW
(``x.flatten(1)``, order ``chw``) and once NHWC
(``x.permute(0, 2, 3, 1).flatten(1)``, order ``hwc``), and saves each head as
a plain state dict ``{"fc.weight", "fc.bias"}``:

    sample_checkpoints/trained_nchw.pt   (+ .safetensors)
    sample_checkpoints/trained_nhwc.pt   (+ .safetensors)

Run: ``python scripts/make_trained_samples.py [OUT_DIR]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fcconv.evidence import rank_orders  # noqa: E402
from fcconv.geometry import Patch  # noqa: E402

SEED = 0
IMAGE = (24, 16)
"""Input height × width; two 2× poolings leave a 6×4 feature map."""
CHANNELS = 16
PATCH = Patch(IMAGE[0] // 4, IMAGE[1] // 4, CHANNELS)
REGIONS = (3, 2)
CLASSES = REGIONS[0] * REGIONS[1] * 2
SAMPLES = 1536
STEPS = 200
FLATTENS = {"nchw": "chw", "nhwc": "hwc"}


def synthetic_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``[n, 1, H, W]`` of one blob or bar, and their class labels."""
    height, width = IMAGE
    ys = torch.arange(height, dtype=torch.float32).view(1, height, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, width)
    cy = torch.rand(n, 1, 1, generator=generator) * (height - 4) + 2
    cx = torch.rand(n, 1, 1, generator=generator) * (width - 4) + 2
    is_bar = torch.rand(n, generator=generator) < 0.5
    blob = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * 2.0**2))
    bar = torch.exp(-((ys - cy) ** 2) / (2 * 0.8**2)) * (abs(xs - cx) < 4)
    shape = torch.where(is_bar.view(n, 1, 1), bar, blob)
    noise = 0.15 * torch.randn(n, height, width, generator=generator)
    images = (shape + noise).unsqueeze(1)
    row = (cy.view(n) * REGIONS[0] / height).long().clamp(max=REGIONS[0] - 1)
    col = (cx.view(n) * REGIONS[1] / width).long().clamp(max=REGIONS[1] - 1)
    labels = (row * REGIONS[1] + col) * 2 + is_bar.long()
    return images, labels


class SmallNet(nn.Module):
    """Two conv blocks to a 6×4×16 map, flattened in ``layout``, then ``fc``."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.layout = layout
        self.features = nn.Sequential(
            nn.Conv2d(1, CHANNELS, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(PATCH.features, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if self.layout == "nhwc":
            x = x.permute(0, 2, 3, 1)
        return self.fc(x.flatten(1))


def train_head(layout: str) -> tuple[dict[str, torch.Tensor], float]:
    """Train one network from a fixed seed; return its head and its training accuracy."""
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    images, labels = synthetic_images(SAMPLES, generator)
    model = SmallNet(layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    loss_fn = nn.CrossEntropyLoss()
    for _step in range(STEPS):
        batch = torch.randint(0, SAMPLES, (128,), generator=generator)
        optimizer.zero_grad()
        loss = loss_fn(model(images[batch]), labels[batch])
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = float((model(images).argmax(1) == labels).float().mean())
    head = {
        "fc.weight": model.fc.weight.detach().clone().contiguous(),
        "fc.bias": model.fc.bias.detach().clone().contiguous(),
    }
    return head, accuracy


def write_trained_samples(out_dir: Path) -> dict[str, dict]:
    """Train both heads and write them to ``out_dir``; return what was written.

    Returns:
        Per layout (``nchw``, ``nhwc``): the paths written, the patch, the
        true order, the training accuracy and the evidence as a dict.
    """
    # one thread: the same float sums on every machine, and no oversubscription
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _write(Path(out_dir))
    finally:
        torch.set_num_threads(threads)


def _write(out_dir: Path) -> dict[str, dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, dict] = {}
    for layout, order in FLATTENS.items():
        head, accuracy = train_head(layout)
        path = out_dir / f"trained_{layout}.pt"
        torch.save(head, path)
        paths = [path]
        st_path = path.with_suffix(".safetensors")
        # one key: safetensors keeps metadata in a hash map, so several would
        # come out in a different order, and different bytes, on every run
        note = f"trained head; features {PATCH} (HxWxC) flattened {order}"
        save_file(head, st_path, metadata={"sample": note})
        paths.append(st_path)
        evidence = rank_orders(head["fc.weight"], PATCH)
        written[layout] = {
            "paths": paths,
            "patch": str(PATCH),
            "order": order,
            "accuracy": accuracy,
            "evidence": evidence.to_dict(),
        }
    return written


def main(argv: list[str]) -> int:
    out_dir = Path(argv[1]) if len(argv) > 1 else REPO / "sample_checkpoints"
    started = time.perf_counter()
    written = write_trained_samples(out_dir)
    elapsed = time.perf_counter() - started
    for layout, info in written.items():
        evidence = info["evidence"]
        print(
            f"{layout}: patch {info['patch']} (HxWxC), flattened {info['order']}, "
            f"train accuracy {info['accuracy']:.2f} -> "
            + ", ".join(
                str(p.relative_to(REPO) if p.is_relative_to(REPO) else p) for p in info["paths"]
            )
        )
        ranking = ", ".join(f"{r['order']} {r['score']:.3f}" for r in evidence["ranking"])
        print(f"  ranking: {ranking}")
        print(f"  winner {evidence['winner']}: {evidence['reason']}")
    print(f"trained and written in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
