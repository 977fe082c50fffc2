"""Image formats of the lab: Fashion-MNIST as shipped, or resized to 32x32 in grey RGB or in colour.

"gray28" is Fashion-MNIST as shipped; "rgb32" is resized to 32x32 with grey in all three channels (the models of the
backdoor literature); "color32" is resized to 32x32 in colour, each image with its own random foreground and
background colour, so that the three channels carry different information as in real photographs.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from gradprune_mlflow.data.reference import FASHION_MEAN, FASHION_STD

IMAGE_FORMATS = ("gray28", "rgb32", "color32")
# Colour draws of the three data parts are independent: a test image's colours say nothing of a training image's.
COLOUR_SEEDS = {"attacker": 0, "trusted": 1, "test": 2}
# Per-channel statistics of the color32 training images (the colours' uniform ranges shift every channel alike).
COLOUR_MEAN, COLOUR_STD = (0.4141,) * 3, (0.2071,) * 3


def _colourise(images: torch.Tensor, seed: int) -> torch.Tensor:
    """Grey [0, 1] images as foreground * x + background * (1 - x), with per-image colours drawn with `seed`."""
    gen = torch.Generator().manual_seed(seed)
    n = len(images)
    background = torch.rand(n, 3, 1, 1, generator=gen) * 0.6
    foreground = 0.4 + torch.rand(n, 3, 1, 1, generator=gen) * 0.6
    return (foreground * images + background * (1 - images)).clamp(0, 1)


def to_format(images: torch.Tensor, image: str, colour_seed: int = 0) -> torch.Tensor:
    """(N, 1, 28, 28) [0, 1] images in `image` format ("gray28" unchanged; "rgb32" bilinear-resized, grey in RGB;
    "color32" resized and coloured with per-image colours drawn with `colour_seed`)."""
    if image == "gray28":
        return images
    if image in ("rgb32", "color32"):
        resized = F.interpolate(images, size=32, mode="bilinear", align_corners=False).clamp(0, 1)
        return resized.repeat(1, 3, 1, 1) if image == "rgb32" else _colourise(resized, colour_seed)
    raise ValueError(f"unknown image format {image!r}; choose one of {', '.join(IMAGE_FORMATS)}")


def channels(image: str) -> int:
    return 1 if image == "gray28" else 3


def normalisation(image: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel for `image` format."""
    if image == "color32":
        return COLOUR_MEAN, COLOUR_STD
    return FASHION_MEAN * channels(image), FASHION_STD * channels(image)
