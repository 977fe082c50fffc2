"""The lab's data: Fashion-MNIST split once between the attacker, the trusted clean set and measuring.

The attacker trains on the first 50,000 training images, the trusted clean set is drawn from the last 10,000, and the
10,000 test images are used only for measuring.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gradprune_mlflow.data.cleanset import CleanSet, DatasetMeta, Split, write_clean_set
from gradprune_mlflow.data.reference import FASHION_CLASSES, FASHION_MEAN, FASHION_STD, fashion_mnist, stratified_take
from gradprune_mlflow.lab.formats import COLOUR_SEEDS, normalisation, to_format

ATTACKER_SPLIT = 50_000  # Fashion-MNIST train images [0, 50000) are the attacker's; the rest are trusted.


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
