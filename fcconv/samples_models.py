"""Small classifiers for the shipped samples, the benchmark and ``--arch``.

Each factory takes no required arguments and builds the same weights every
time (its own seeded generator, the global RNG untouched), so
``--arch fcconv.samples_models:tiny_vgg`` rebuilds exactly the architecture a
sample checkpoint was saved from.

>>> import torch
>>> tuple(tiny_vgg()(torch.zeros(1, 3, 32, 32)).shape)
(1, 10)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "BLOBS",
    "BlobNet",
    "DetectorStage",
    "KerasStyle",
    "VGGStyle",
    "blob_image",
    "blob_net",
    "detector_stage",
    "keras_style",
    "tiny_vgg",
    "vgg_style",
]


def _seeded_init(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialise every conv and Linear from one seeded generator: same weights each run."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                bound = (6.0 / fan_in) ** 0.5  # He-uniform keeps ReLU activations O(1)
                module.weight.uniform_(-bound, bound, generator=generator)
                if module.bias is not None:
                    module.bias.uniform_(-0.1, 0.1, generator=generator)
    return model


class VGGStyle(nn.Module):
    """Conv stages (3×3 convs, ReLU, 2×2 max pool), an adaptive pool, a Linear head.

    At the native size ``native`` the adaptive pool is the identity, as in
    torchvision's VGG at 224×224; the head is ``flatten → Linear → ReLU →
    Dropout → … → Linear``.

    Args:
        stages: each stage's channel widths; one 3×3 conv per entry.
        hidden: widths of the hidden Linear layers.
        num_classes: the last Linear's outputs.
        native: the input side the network is built for.
        in_channels: the input's channels.
        dropout: the Dropout after each hidden ReLU; ``None`` for none.
    """

    def __init__(
        self,
        stages: Sequence[Sequence[int]] = ((8,), (16,), (16,)),
        hidden: Sequence[int] = (64, 32),
        num_classes: int = 10,
        native: int = 32,
        in_channels: int = 3,
        dropout: float | None = 0.5,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for stage in stages:
            for width in stage:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
                channels = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        side = native // 2 ** len(stages)
        self.avgpool = nn.AdaptiveAvgPool2d((side, side))
        head: list[nn.Module] = []
        width = channels * side * side
        for size in hidden:
            head += [nn.Linear(width, size), nn.ReLU(inplace=True)]
            if dropout is not None:
                head.append(nn.Dropout(dropout))
            width = size
        head.append(nn.Linear(width, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class KerasStyle(nn.Module):
    """A net whose head was trained on NHWC-flattened features (order ``hwc``)."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(12 * 6 * 6, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = x.permute(0, 2, 3, 1).reshape(x.size(0), -1)  # NHWC, as Keras flattens
        return torch.log_softmax(self.fc2(torch.relu(self.fc1(x))), dim=1)


class DetectorStage(nn.Module):
    """A face-detector stage shaped like MTCNN's R-Net: 3×24×24 crops, two heads.

    A shared trunk (3×3 convs with PReLU, 3×3 max pools at stride 2 in
    ``ceil_mode``, a 2×2 conv), the map flattened W×H×C (``permute(0, 3, 2,
    1)``, as MTCNN's weights expect), a shared ``Linear → PReLU``, then a face
    head (``Linear → Softmax``) and a box-regression head (``Linear``). It
    returns ``{"face": [B, 2], "box": [B, 4]}``.

    Args:
        width: the first conv's channels (the others have twice as many).
        hidden: the shared Linear's outputs.
    """

    def __init__(self, width: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=3)
        self.prelu1 = nn.PReLU(width)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(width, 2 * width, kernel_size=3)
        self.prelu2 = nn.PReLU(2 * width)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, kernel_size=2)
        self.prelu3 = nn.PReLU(2 * width)
        self.dense4 = nn.Linear(2 * width * 3 * 3, hidden)
        self.prelu4 = nn.PReLU(hidden)
        self.dense5_1 = nn.Linear(hidden, 2)
        self.softmax5_1 = nn.Softmax(dim=1)
        self.dense5_2 = nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu4(self.dense4(x.view(x.shape[0], -1)))
        return {"face": self.softmax5_1(self.dense5_1(x)), "box": self.dense5_2(x)}


def detector_stage(width: int = 16, hidden: int = 64) -> DetectorStage:
    """The two-headed sample detector stage (3×24×24 in; face scores and boxes out).

    >>> import torch
    >>> {k: tuple(v.shape) for k, v in detector_stage()(torch.zeros(1, 3, 24, 24)).items()}
    {'face': (1, 2), 'box': (1, 4)}
    """
    return _seeded_init(DetectorStage(width, hidden), seed=3).eval()


def tiny_vgg() -> VGGStyle:
    """The sample classifier: 3×32×32 in, 10 classes, a 16×4×4 feature map.

    Its head is ``Linear(256→64) → ReLU → Dropout → Linear(64→32) → ReLU →
    Dropout → Linear(32→10)``; ~27k parameters.
    """
    return _seeded_init(VGGStyle(), seed=0).eval()


def keras_style() -> KerasStyle:
    """A 3×24×24 classifier that flattens NHWC: its order is ``hwc``."""
    return _seeded_init(KerasStyle(), seed=1).eval()


def vgg_style(
    stages: Sequence[Sequence[int]] = ((32,), (64,), (128, 128), (256, 256), (256, 256)),
    hidden: Sequence[int] = (1024,),
    num_classes: int = 10,
    native: int = 224,
) -> VGGStyle:
    """The benchmark's VGG-style classifier: five stages, native 224×224.

    The head is ``Linear(256·7·7 → 1024) → ReLU → Linear(1024 → 10)``.
    """
    model = VGGStyle(
        stages=stages, hidden=hidden, num_classes=num_classes, native=native, dropout=None
    )
    return _seeded_init(model, seed=2).eval()


class BlobNet(nn.Module):
    """A colour-blob classifier: 3×96×96 in, scores for red, green and blue blobs.

    Valid 3×3 convs and 2×2 max pools (stride 32 in all), no padding: at
    96×96 the feature map is 3×2×2, flattened into ``Linear(12 → 3) → ReLU →
    Linear(3 → 3)``. Every cell of its dense map equals the model run on its
    crop, since no layer reads past a crop's border.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3)
        self.conv2 = nn.Conv2d(3, 3, 3)
        self.conv3 = nn.Conv2d(3, 3, 3)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(3 * 2 * 2, 3)
        self.fc2 = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))  # 94 → 47
        x = self.pool(torch.relu(self.conv2(x)))  # 45 → 22
        x = self.pool(torch.relu(self.conv3(x)))  # 20 → 10
        x = self.pool(self.pool(x))  # 10 → 5 → 2
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def _blur_kernel() -> torch.Tensor:
    """A 3×3 binomial blur (1 2 1 ⊗ 1 2 1) / 16: exact in binary floating point."""
    row = torch.tensor([1.0, 2.0, 1.0])
    return torch.outer(row, row) / 16


def blob_net() -> BlobNet:
    """The map sample's classifier, with weights set by hand so that its map means something.

    ``conv1`` turns each colour into its opponency (the colour minus half of
    each other one, blurred), ``conv2`` and ``conv3`` blur each channel, the
    head averages each channel over the 2×2 map and scores class ``c`` as 4×
    its own colour minus the others. Weights are small dyadic fractions, so
    they are the same bits on every machine.

    >>> import torch
    >>> red = torch.zeros(1, 3, 96, 96)
    >>> red[:, 0, 24:72, 24:72] = 1.0
    >>> int(blob_net()(red).argmax())
    0
    """
    model = BlobNet()
    blur = _blur_kernel()
    with torch.no_grad():
        opponency = torch.full((3, 3), -0.5) + 1.5 * torch.eye(3)
        model.conv1.weight.copy_(opponency[:, :, None, None] * blur)
        model.conv1.bias.fill_(-0.0625)
        for conv in (model.conv2, model.conv3):
            conv.weight.copy_(torch.eye(3)[:, :, None, None] * blur)
            conv.bias.zero_()
        model.fc1.weight.copy_(torch.eye(3).repeat_interleave(4, dim=1) / 4)
        model.fc1.bias.zero_()
        model.fc2.weight.copy_(5 * torch.eye(3) - 1)
        model.fc2.bias.zero_()
    return model.eval()


BLOBS = (
    # (row, column, radius, (red, green, blue)) of the sample image's blobs
    (60, 70, 22, (1.0, 0.15, 0.1)),
    (150, 240, 30, (0.1, 0.9, 0.2)),
    (180, 90, 18, (0.15, 0.3, 1.0)),
    (70, 250, 14, (1.0, 0.2, 0.15)),
)


def blob_image(height: int = 240, width: int = 320, blobs: Sequence = BLOBS) -> torch.Tensor:
    """The map sample's picture: soft coloured discs on a dark background, ``[H, W, 3]`` uint8.

    >>> tuple(blob_image(24, 32, [(12, 16, 6, (1.0, 0.0, 0.0))]).shape)
    (24, 32, 3)
    """
    rows = torch.arange(height, dtype=torch.float64)[:, None]
    columns = torch.arange(width, dtype=torch.float64)[None, :]
    image = torch.full((height, width, 3), 0.08, dtype=torch.float64)
    for row, column, radius, colour in blobs:
        inside = ((rows - row) ** 2 + (columns - column) ** 2).sqrt() <= radius
        image[inside] = torch.tensor(colour, dtype=torch.float64)
    return (image * 255).round().to(torch.uint8)
