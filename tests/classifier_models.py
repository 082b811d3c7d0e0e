"""Classifiers written the way torchvision, timm and facenet-pytorch write them.

Not imports of those packages: their class shapes (module names, forward
code, where the global pool and the head sit), rewritten here so the tests
need nothing beyond torch. ``width`` scales the channels down for speed;
``width=1`` is the published size.

- :func:`resnet18`: torchvision's ``ResNet`` (``BasicBlock``,
  ``self.avgpool = nn.AdaptiveAvgPool2d((1, 1))``, ``torch.flatten(x, 1)``, ``self.fc``).
- :func:`mobilenet_v3_small`: torchvision's ``MobileNetV3`` (inverted residuals,
  squeeze-and-excitation in the trunk, ``avgpool`` → ``flatten`` → ``classifier``
  of Linear, Hardswish, Dropout, Linear).
- :func:`timm_resnet18`: timm's ``ResNet`` with ``forward_features``/``forward_head``,
  ``SelectAdaptivePool2d`` (a pool and a flatten in one module) and ``F.dropout``.
- :class:`FaceNetTail`: facenet-pytorch's ``InceptionResnetV1`` ending:
  ``avgpool_1a`` → Dropout → ``last_linear`` (no bias) on ``x.view(x.shape[0], -1)`` →
  ``last_bn`` (BatchNorm1d) → ``F.normalize(x, p=2, dim=1)``.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------- torchvision ResNet


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision.models.ResNet's layout: stem, four stages, avgpool, flatten, fc."""

    def __init__(self, layers: list[int], num_classes: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * BasicBlock.expansion, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_impl(x)


def resnet18(num_classes: int = 1000, width: int = 64) -> ResNet:
    return ResNet([2, 2, 2, 2], num_classes, width)


# ---------------------------------------------------------------- torchvision MobileNetV3


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class Conv2dNormActivation(nn.Sequential):
    def __init__(self, cin, cout, kernel_size=3, stride=1, groups=1, activation_layer=nn.ReLU):
        layers = [
            nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                      bias=False),
            nn.BatchNorm2d(cout, eps=0.001, momentum=0.01),
        ]  # fmt: skip
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: a whole-map pool in the trunk."""

    def __init__(self, input_channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def _scale(self, input: torch.Tensor) -> torch.Tensor:
        scale = self.avgpool(input)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        scale = self._scale(input)
        return scale * input


class InvertedResidual(nn.Module):
    def __init__(self, cin, kernel, expanded, cout, use_se, use_hs, stride) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        activation = nn.Hardswish if use_hs else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(Conv2dNormActivation(cin, expanded, 1, activation_layer=activation))
        layers.append(
            Conv2dNormActivation(expanded, expanded, kernel, stride, expanded, activation)
        )
        if use_se:
            layers.append(SqueezeExcitation(expanded, _make_divisible(expanded // 4, 8)))
        layers.append(Conv2dNormActivation(expanded, cout, 1, activation_layer=None))
        self.block = nn.Sequential(*layers)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


# (input, kernel, expanded, out, SE, hardswish, stride) of mobilenet_v3_small
_SMALL = [
    (16, 3, 16, 16, True, False, 2),
    (16, 3, 72, 24, False, False, 2),
    (24, 3, 88, 24, False, False, 1),
    (24, 5, 96, 40, True, True, 2),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 120, 48, True, True, 1),
    (48, 5, 144, 48, True, True, 1),
    (48, 5, 288, 96, True, True, 2),
    (96, 5, 576, 96, True, True, 1),
    (96, 5, 576, 96, True, True, 1),
]


class MobileNetV3(nn.Module):
    def __init__(self, width: float = 1.0, num_classes: int = 1000, last: int = 1024) -> None:
        super().__init__()
        scale = partial(lambda c, w: _make_divisible(c * w, 8), w=width)
        setting = [(scale(a), k, scale(e), scale(o), se, hs, s) for a, k, e, o, se, hs, s in _SMALL]
        layers: list[nn.Module] = [
            Conv2dNormActivation(3, setting[0][0], 3, 2, activation_layer=nn.Hardswish)
        ]
        layers += [InvertedResidual(*cnf) for cnf in setting]
        lastconv = 6 * setting[-1][3]
        layers.append(
            Conv2dNormActivation(setting[-1][3], lastconv, 1, activation_layer=nn.Hardswish)
        )
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(lastconv, scale(last)),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=0.2, inplace=True),
            nn.Linear(scale(last), num_classes),
        )

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_impl(x)


def mobilenet_v3_small(num_classes: int = 1000, width: float = 1.0) -> MobileNetV3:
    return MobileNetV3(width, num_classes)


# ---------------------------------------------------------------- timm ResNet


class FastAdaptiveAvgPool(nn.Module):
    def __init__(self, flatten: bool = False) -> None:
        super().__init__()
        self.flatten = flatten
        self.dim = (2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(self.dim, keepdim=not self.flatten)


class AdaptiveAvgMaxPool2d(nn.Module):
    def __init__(self, output_size: int = 1) -> None:
        super().__init__()
        self.output_size = output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_avg = F.adaptive_avg_pool2d(x, self.output_size)
        x_max = F.adaptive_max_pool2d(x, self.output_size)
        return 0.5 * (x_avg + x_max)


class AdaptiveCatAvgMaxPool2d(AdaptiveAvgMaxPool2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_avg = F.adaptive_avg_pool2d(x, self.output_size)
        x_max = F.adaptive_max_pool2d(x, self.output_size)
        return torch.cat((x_avg, x_max), 1)


class SelectAdaptivePool2d(nn.Module):
    """timm.layers.SelectAdaptivePool2d: a pool and (if asked) a flatten in one module."""

    def __init__(self, pool_type: str = "fast", flatten: bool = False) -> None:
        super().__init__()
        self.pool_type = pool_type
        if pool_type.startswith("fast"):
            self.pool = FastAdaptiveAvgPool(flatten)
            self.flatten = nn.Identity()
        else:
            self.pool = {
                "avg": lambda: nn.AdaptiveAvgPool2d(1),
                "max": lambda: nn.AdaptiveMaxPool2d(1),
                "avgmax": AdaptiveAvgMaxPool2d,
                "catavgmax": AdaptiveCatAvgMaxPool2d,
            }[pool_type]()
            self.flatten = nn.Flatten(1) if flatten else nn.Identity()

    def feat_mult(self) -> int:
        return 2 if self.pool_type == "catavgmax" else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)
        x = self.flatten(x)
        return x


def create_classifier(num_features: int, num_classes: int, pool_type: str = "avg"):
    global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=True)
    fc = nn.Linear(num_features * global_pool.feat_mult(), num_classes, bias=True)
    return global_pool, fc


class TimmResNet(nn.Module):
    """timm.models.ResNet's layout: forward_features, forward_head with pre_logits."""

    def __init__(self, num_classes=1000, width=64, global_pool="avg", drop_rate=0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        trunk = ResNet([2, 2, 2, 2], num_classes, width)
        self.layer1, self.layer2 = trunk.layer1, trunk.layer2
        self.layer3, self.layer4 = trunk.layer3, trunk.layer4
        self.num_features = width * 8
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.act1(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        x = self.forward_head(x)
        return x


def timm_resnet18(num_classes=1000, width=64, global_pool="avg", drop_rate=0.0) -> TimmResNet:
    return TimmResNet(num_classes, width, global_pool, drop_rate)


# ---------------------------------------------------------------- facenet-pytorch


class FaceNetTail(nn.Module):
    """A small trunk, then InceptionResnetV1's tail as facenet-pytorch writes it."""

    def __init__(self, classify: bool = False, channels: int = 16, embedding: int = 8) -> None:
        super().__init__()
        self.classify = classify
        self.conv2d_1a = nn.Conv2d(3, channels, 3, stride=2)
        self.block8 = nn.Conv2d(channels, channels, 3, padding=1)
        self.avgpool_1a = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.6)
        self.last_linear = nn.Linear(channels, embedding, bias=False)
        self.last_bn = nn.BatchNorm1d(embedding, eps=0.001, momentum=0.1, affine=True)
        self.logits = nn.Linear(embedding, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2d_1a(x)
        x = F.relu(self.block8(x))
        x = self.avgpool_1a(x)
        x = self.dropout(x)
        x = self.last_linear(x.view(x.shape[0], -1))
        x = self.last_bn(x)
        if self.classify:
            x = self.logits(x)
        else:
            x = F.normalize(x, p=2, dim=1)
        return x
