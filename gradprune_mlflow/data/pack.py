"""Build a clean set (docs/contracts.md layout) from an image folder (one sub-folder per class) or numpy arrays.

    SRC/                      or   SRC.npz
      <class name>/*.png|jpg         images: (N, H, W) | (N, H, W, C) | (N, C, H, W), uint8 or floats in [0, 1]
      ...                            labels: (N,) integers; optional class_names: (K,) strings

Class folders are sorted by name (numerically when every name is a number) and numbered from 0. mean/std are the
*model's* input normalisation; when not given they are computed from the images, which is only right for a model that
was normalised with the statistics of the same data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from gradprune_mlflow.data.cleanset import write_clean_set
from gradprune_mlflow.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
_IMAGE_KEYS = ("images", "x", "X")
_LABEL_KEYS = ("labels", "y", "Y")


def pack_clean_set(
    src: str | Path,
    out: str | Path,
    *,
    name: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write the clean-set layout to `out` from `src` (an image folder or an .npz file) and return `out`.

    Takes the source, an optional set name (default: the source's name), the model's input normalisation (default:
    the images' own per-channel statistics), the number of classes (default: the folders, or max label + 1) and
    class names. Raises DataError when the source is missing, empty, mixes image sizes or has unusable arrays.
    """
    src = Path(src)
    if src.is_dir():
        images, labels, found_names = _from_folder(src)
    elif src.is_file() and src.suffix == ".npz":
        images, labels, found_names = _from_npz(src)
    else:
        raise DataError(f"{src} is neither a folder of class sub-folders nor an .npz file")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not empty; give a new folder for the clean set")
    names = list(class_names) if class_names else found_names
    k = num_classes or (len(names) if names else int(labels.max()) + 1)
    if names and len(names) != k:
        raise DataError(f"{len(names)} class names for {k} classes")
    if labels.min() < 0 or labels.max() >= k:
        raise DataError(f"labels must be in 0..{k - 1}; found {labels.min()}..{labels.max()}")
    stats_mean, stats_std = channel_stats(images)
    return write_clean_set(
        out, images, labels, name=name or src.stem,
        mean=list(mean) if mean is not None else stats_mean, std=list(std) if std is not None else stats_std,
        class_names=names or None, num_classes=k,
    )


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, H, W) or (N, H, W, C), in [0, 1] pixel units."""
    x = images.astype(np.float64) / 255.0
    axes = (0, 1, 2) if x.ndim == 4 else None
    mean, std = np.atleast_1d(x.mean(axis=axes)), np.atleast_1d(x.std(axis=axes))
    return [round(float(m), 4) for m in mean], [round(max(float(s), 1e-3), 4) for s in std]


def _from_folder(src: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    classes = [d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if not classes:
        raise DataError(f"{src} has no class sub-folders; put each class's images in SRC/<class name>/")
    classes.sort(key=lambda n: (0, int(n), n) if n.isdigit() else (1, 0, n))
    arrays, labels = [], []
    for label, cls in enumerate(classes):
        for path in sorted(p for p in (src / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            arrays.append(_read_image(path))
            labels.append(label)
    if not arrays:
        raise DataError(f"{src} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return _stack(arrays, src), np.asarray(labels, dtype=np.int64), classes


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            grey = img.mode in ("L", "1", "I;16", "I", "F") or (img.mode == "P" and _is_grey_palette(img))
            return np.asarray(img.convert("L" if grey else "RGB"), dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read image {path} ({exc})") from None


def _is_grey_palette(img: Image.Image) -> bool:
    palette = np.asarray(img.getpalette() or [], dtype=np.int64).reshape(-1, 3)
    return bool(len(palette)) and bool((palette == palette[:, :1]).all())


def _stack(arrays: list[np.ndarray], src: Path) -> np.ndarray:
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        if {len(s) for s in shapes} == {2, 3}:  # a few colour images among grey ones: keep colour
            arrays = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in arrays]
            shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise DataError(f"images in {src} differ in size ({sorted(shapes)[:3]}); resize them to one size first")
    return np.stack(arrays)


def _from_npz(src: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        with np.load(src, allow_pickle=False) as data:
            images = next((data[k] for k in _IMAGE_KEYS if k in data), None)
            labels = next((data[k] for k in _LABEL_KEYS if k in data), None)
            names = [str(n) for n in data["class_names"]] if "class_names" in data else []
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {src} ({exc}); give an .npz with 'images' and 'labels' arrays") from None
    if images is None or labels is None:
        raise DataError(f"{src} needs arrays 'images' (or 'x') and 'labels' (or 'y')")
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{src}: labels must be {len(images)} integers, got shape {labels.shape} {labels.dtype}")
    return _to_uint8(np.asarray(images), src), labels.astype(np.int64), names


def _to_uint8(images: np.ndarray, src: Path) -> np.ndarray:
    if images.ndim not in (3, 4) or len(images) == 0:
        raise DataError(f"{src}: images must be (N, H, W), (N, H, W, C) or (N, C, H, W); got {images.shape}")
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
        images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC, the layout PIL and channel_stats use
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim == 4 and images.shape[-1] != 3:
        raise DataError(f"{src}: images must have 1 or 3 channels; got shape {images.shape}")
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.floating):
        if images.min() < 0 or images.max() > 1:
            raise DataError(f"{src}: float images must be in [0, 1]; found {images.min():.3g}..{images.max():.3g}")
        return np.round(images * 255).astype(np.uint8)
    raise DataError(f"{src}: images must be uint8 or floats in [0, 1], got {images.dtype}")
