"""torchvision's VGG-16 shape (138 M parameters, 553 MB in float32), random init, no torchvision.

For the memory benchmarks (:mod:`benchmarks.bench_check_memory`): the same
layers as ``torchvision.models.vgg16()`` (13 padded 3×3 convs in five stages,
``AdaptiveAvgPool2d(7)``, ``Linear(25088 → 4096 → 4096 → 1000)`` with dropout),
seeded so that two processes build the same weights.
"""

from __future__ import annotations

import torch
from torch import nn

STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG16(nn.Module):
    """``features`` → ``avgpool`` → ``flatten`` → ``classifier``, as torchvision names them."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for stage in STAGES:
            for width in stage:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg16(seed: int = 0) -> VGG16:
    """The VGG-16 shape with small seeded weights (He-like scale), in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    model = VGG16()
    with torch.no_grad():
        for parameter in model.parameters():
            fan_in = parameter[0].numel() if parameter.dim() > 1 else 1
            parameter.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
    return model.eval()
