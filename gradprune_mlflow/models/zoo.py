"""The models of the tests, the demo and the benchmark, registered by name: small CNNs defined here, and the
torchvision and timm architectures of `gradprune_mlflow.models.vision`.

The classes live in an importable module on purpose: a whole-module `torch.save` refers to them by import path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from gradprune_mlflow.models.vision import TIMM, TORCHVISION, vision_model


class SmallCNN(nn.Module):
    """Two conv blocks (conv, optional BatchNorm, ReLU, max-pool) and a linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32, batch_norm: bool = True):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)]
            return layers + ([nn.BatchNorm2d(cout)] if batch_norm else []) + [nn.ReLU(), nn.MaxPool2d(2)]

        self.features = nn.Sequential(*block(in_channels, width), *block(width, 2 * width))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * width * 16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """A residual block; a 1x1 conv shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """A three-stage residual net with 1x1 shortcuts, small enough for 2 CPU cores."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(
            BasicBlock(width, width), BasicBlock(width, 2 * width, 2), BasicBlock(2 * width, 4 * width, 2)
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + short


class PreActResNet18(nn.Module):
    """PreAct-ResNet18 for 32x32 inputs, the usual backdoor-benchmark model (GPU preset)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        stages, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages += [PreActBlock(cin, cout, stride), PreActBlock(cout, cout)]
            cin = cout
        self.layers = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "small_cnn_nobn": lambda **kw: SmallCNN(batch_norm=False, **kw),
    "tiny_resnet": TinyResNet,
    "preact_resnet18": PreActResNet18,
}


VISION = TORCHVISION + TIMM


def create_model(name: str, num_classes: int | None = None, in_channels: int | None = None,
                 image_size: int | None = None, **kwargs) -> nn.Module:
    """Build a model by name for `in_channels` x `image_size`^2 inputs and `num_classes` outputs.

    Unset arguments take the model's defaults (10 classes; 1 channel for the small CNNs, 3 for the others). The small
    CNNs take any input size; `image_size` matters to the torchvision/timm ones (see models.vision). Unknown names
    list the valid ones.
    """
    given = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels)) if v is not None}
    if name in VISION:
        return vision_model(name, image_size=image_size, **given, **kwargs)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS) + list(VISION))}")
    return MODELS[name](**given, **kwargs)
