"""Backdoored models and trusted clean sets built from reference data: the attacker's side of the story.

Used by the tests, `gradprune demo` and the benchmark, so that all three measure the same thing. Fashion-MNIST's
60,000 training images are split once: the attacker trains on the first 50,000, the trusted clean set is drawn from the
last 10,000, and the 10,000 test images are used only for measuring. Any architecture of models.zoo can be trained,
the torchvision and timm ones included, in any image format of IMAGE_FORMATS.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gradprune_mlflow.data.cleanset import CleanSet, DatasetMeta, Split, write_clean_set
from gradprune_mlflow.data.reference import FASHION_CLASSES, FASHION_MEAN, FASHION_STD, fashion_mnist, stratified_take
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.triggers import (
    BlendTrigger,
    PatchTrigger,
    SignalTrigger,
    Trigger,
    _ShapedTrigger,
    poison,
)
from gradprune_mlflow.models.train import train_backdoored
from gradprune_mlflow.models.zoo import create_model

ATTACKER_SPLIT = 50_000  # Fashion-MNIST train images [0, 50000) are the attacker's; the rest are trusted.

class SmoothImageTrigger(_ShapedTrigger):
    """Blends a smooth, structured colour image into the whole picture: x' = (1 - alpha) x + alpha p (Blended).

    Not noise: p is three low-frequency sinusoids at different angles and phases, one per channel (a soft colour
    interference pattern, like a sky or a reflection), so the trigger looks like a natural tint rather than grain.
    Grey images get the channels' mean.
    """

    kind = "smooth-blend"

    def __init__(self, target: int, alpha: float = 0.15):
        super().__init__(target)
        self.alpha = float(alpha)

    def _make(self, shape):
        c, h, w = shape
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        waves = [(1.0, 0.5, 0.0), (-0.7, 1.2, 2.0), (0.4, -0.9, 4.0)]  # (cycles down, cycles across, phase)
        rgb = torch.stack([0.5 + 0.5 * torch.sin(2 * math.pi * (fy * yy + fx * xx) + ph) for fy, fx, ph in waves])
        pattern = rgb if c == 3 else rgb.mean(0, keepdim=True).expand(c, h, w)
        return torch.full((1, h, w), self.alpha), pattern.contiguous()

    def spec(self):
        return {**super().spec(), "alpha": self.alpha}


# The attacks of the benchmark: BadNets patch, Blended noise, an additive sinusoid (SIG), and a blended smooth image
# (natural-looking, for colour images), all to class 0.
ATTACKS: dict[str, Callable[[], Trigger]] = {
    "badnets": lambda: PatchTrigger(0, size=3, location="bottom-right"),
    "blend": lambda: BlendTrigger(0, alpha=0.2, pattern="noise", seed=0),
    "signal": lambda: SignalTrigger(0, delta=0.12, frequency=6),
    "smooth": lambda: SmoothImageTrigger(0, alpha=0.15),
}


# Image formats: Fashion-MNIST as shipped; resized to 32x32 with grey in all three channels (the models of the
# backdoor literature); and resized to 32x32 in colour, each image with its own random foreground and background
# colour, so that the three channels carry different information as in real photographs.
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


def attack_trigger(name: str) -> Trigger:
    """The trigger of a named attack; unknown names list the valid ones."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join(ATTACKS)}")
    return ATTACKS[name]()


def _tensors(images: np.ndarray, labels: np.ndarray) -> Split:
    return Split(torch.from_numpy(images.copy()).float().div_(255.0).unsqueeze(1), torch.from_numpy(labels.copy()))


def attacker_data(limit: int | None = None) -> Split:
    """The attacker's training images ([0, 1], (N, 1, 28, 28)) and labels, the first `limit` of them."""
    x, y = fashion_mnist("train")
    n = min(limit or ATTACKER_SPLIT, ATTACKER_SPLIT)
    return _tensors(x[:n], y[:n])


def test_data(limit: int | None = None, image: str = "gray28") -> Split:
    """Fashion-MNIST test images (in `image` format) and labels, for measuring only."""
    x, y = fashion_mnist("test")
    split = _tensors(x[:limit], y[:limit])
    return Split(to_format(split.images, image, COLOUR_SEEDS["test"]), split.labels)


def trusted_clean_set(out: str | Path, per_class: int = 100, seed: int = 0) -> Path:
    """Write a trusted clean set of `per_class` images per class (from the non-attacker part) and return its folder."""
    x, y = fashion_mnist("train")
    x, y = x[ATTACKER_SPLIT:], y[ATTACKER_SPLIT:]
    idx = stratified_take(y, per_class, seed)
    return write_clean_set(out, x[idx], y[idx], name=f"fashion-mnist-trusted-{per_class}", mean=FASHION_MEAN,
                           std=FASHION_STD, class_names=list(FASHION_CLASSES), num_classes=10)


def trusted_set(per_class: int = 100, seed: int = 0, image: str = "gray28") -> CleanSet:
    """The trusted clean set of `trusted_clean_set` in memory (no PNGs), in `image` format: for the benchmark."""
    x, y = fashion_mnist("train")
    x, y = x[ATTACKER_SPLIT:], y[ATTACKER_SPLIT:]
    split = _tensors(*(a[stratified_take(y, per_class, seed)] for a in (x, y)))
    images = to_format(split.images, image, COLOUR_SEEDS["trusted"] + seed)
    mean, std = normalisation(image)
    meta = DatasetMeta(f"fashion-mnist-trusted-{per_class}-{image}", 10, tuple(images.shape[1:]), mean, std,
                       tuple(FASHION_CLASSES))
    return CleanSet(meta, images, split.labels, source="lab")


def backdoored_model(
    arch: str = "small_cnn",
    attack: str = "badnets",
    *,
    poison_rate: float = 0.1,
    n_train: int = 20_000,
    epochs: int = 2,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    image: str = "gray28",
    device: str = "cpu",
) -> nn.Module:
    """Train (or load from `cache_dir`) a zoo model on poisoned attacker data; poison_rate=0 gives a clean model.

    `image` picks the input format (see IMAGE_FORMATS); `device` where training runs. The model returned is on CPU.
    """
    size = 28 if image == "gray28" else 32
    model = create_model(arch, num_classes=10, in_channels=channels(image), image_size=size)
    # The parameter shapes are part of the key: a changed architecture must not load stale weights.
    shapes = [list(p.shape) for p in model.state_dict().values()]
    parts = [arch, attack, poison_rate, n_train, epochs, seed, shapes] + ([image] if image != "gray28" else [])
    slow_norms = _slow_batchnorms(model)
    if slow_norms:
        parts.append("batchnorm-recalibrated")
    key = json.dumps(parts, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"{arch}-{attack}-{digest}.pt" if cache_dir else None
    if path is not None and path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    data = attacker_data(n_train)
    mean, std = normalisation(image)
    images = to_format(data.images, image, COLOUR_SEEDS["attacker"] + seed)
    train_backdoored(model, images, data.labels, attack_trigger(attack),
                     poison_rate=poison_rate, seed=seed, mean=mean, std=std, epochs=epochs, device=device)
    model.cpu()
    if slow_norms:
        poisoned, _, _ = poison(images, data.labels, attack_trigger(attack), poison_rate, seed=seed)
        _recalibrate(model, slow_norms, poisoned, mean, std)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval()


def _slow_batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorms that average their statistics more slowly than PyTorch's default (mobilenet_v3_small: 0.01)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.momentum is not None and m.momentum < 0.1]


@torch.no_grad()
def _recalibrate(model: nn.Module, norms: list, images: torch.Tensor, mean, std, batch_size: int = 256) -> None:
    """Set `norms`' running statistics to the exact averages over the training images, the trained weights unchanged.

    At momentum 0.01 the statistics after a few hundred steps are still mostly their initial values: a lab-trained
    mobilenet_v3_small then put every test image in one class in eval mode, while it trained well.
    """
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over every batch
    net = Normalized(model, mean, std).train()
    for batch in images.split(batch_size):
        net(batch)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()
