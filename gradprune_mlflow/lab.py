"""Backdoored models and trusted clean sets built from reference data: the attacker's side of the story.

Used by the tests, `gradprune demo` and the benchmark, so that all three measure the same thing. Fashion-MNIST's
60,000 training images are split once: the attacker trains on the first 50,000, the trusted clean set is drawn from the
last 10,000, and the 10,000 test images are used only for measuring.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from gradprune_mlflow.data.cleanset import CleanSet, DatasetMeta, Split, write_clean_set
from gradprune_mlflow.data.reference import FASHION_CLASSES, FASHION_MEAN, FASHION_STD, fashion_mnist, stratified_take
from gradprune_mlflow.defense.triggers import BlendTrigger, PatchTrigger, SignalTrigger, Trigger
from gradprune_mlflow.models.train import train_backdoored
from gradprune_mlflow.models.zoo import create_model

ATTACKER_SPLIT = 50_000  # Fashion-MNIST train images [0, 50000) are the attacker's; the rest are trusted.

# The attacks of the benchmark: BadNets patch, Blended noise, and an additive sinusoid (SIG), all to class 0.
ATTACKS: dict[str, Callable[[], Trigger]] = {
    "badnets": lambda: PatchTrigger(0, size=3, location="bottom-right"),
    "blend": lambda: BlendTrigger(0, alpha=0.2, pattern="noise", seed=0),
    "signal": lambda: SignalTrigger(0, delta=0.12, frequency=6),
}


# Image formats: Fashion-MNIST as shipped, and resized to 32x32 RGB for the models of the backdoor literature.
IMAGE_FORMATS = ("gray28", "rgb32")


def to_format(images: torch.Tensor, image: str) -> torch.Tensor:
    """(N, 1, 28, 28) [0, 1] images in `image` format ("gray28" unchanged; "rgb32" bilinear-resized, grey in RGB)."""
    if image == "gray28":
        return images
    if image == "rgb32":
        return F.interpolate(images, size=32, mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    raise ValueError(f"unknown image format {image!r}; choose one of {', '.join(IMAGE_FORMATS)}")


def normalisation(image: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel for `image` format."""
    channels = 3 if image == "rgb32" else 1
    return FASHION_MEAN * channels, FASHION_STD * channels


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


def test_data(limit: int | None = None) -> Split:
    """Fashion-MNIST test images and labels, for measuring only."""
    x, y = fashion_mnist("test")
    return _tensors(x[:limit], y[:limit])


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
    images = to_format(split.images, image)
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
    model = create_model(arch, num_classes=10, in_channels=3 if image == "rgb32" else 1)
    # The parameter shapes are part of the key: a changed architecture must not load stale weights.
    shapes = [list(p.shape) for p in model.state_dict().values()]
    parts = [arch, attack, poison_rate, n_train, epochs, seed, shapes] + ([image] if image != "gray28" else [])
    key = json.dumps(parts, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"{arch}-{attack}-{digest}.pt" if cache_dir else None
    if path is not None and path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    data = attacker_data(n_train)
    mean, std = normalisation(image)
    train_backdoored(model, to_format(data.images, image), data.labels, attack_trigger(attack),
                     poison_rate=poison_rate, seed=seed, mean=mean, std=std, epochs=epochs, device=device)
    model.cpu()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval()
