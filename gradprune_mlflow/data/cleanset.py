"""The trusted clean image set: a folder with `dataset.json`, `manifest.csv` and one PNG per image.

    dataset.json   {"name", "num_classes", "input_shape": [C, H, W], "mean": [C], "std": [C], "class_names"?}
    manifest.csv   path,label,sha256   (paths relative to the folder)

Pixels are read as floats in [0, 1]; mean/std are the model's input normalisation, applied after any trigger.
Every file is checked against its sha256 before it is used.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from gradprune_mlflow.errors import DataError

MANIFEST_COLUMNS = ["path", "label", "sha256"]


@dataclass(frozen=True)
class DatasetMeta:
    """The contents of dataset.json."""

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None = None

    @classmethod
    def from_dict(cls, raw: Any) -> DatasetMeta:
        """Parse and check dataset.json; raises DataError naming the bad field."""
        if not isinstance(raw, dict):
            raise DataError("dataset.json must be a JSON object; see README 'Clean image set'")
        missing = {"name", "num_classes", "input_shape", "mean", "std"} - set(raw)
        if missing:
            raise DataError(f"dataset.json lacks {sorted(missing)}; see README 'Clean image set'")
        k, shape = raw["num_classes"], raw["input_shape"]
        if not isinstance(k, int) or k < 2:
            raise DataError(f"dataset.json num_classes must be an integer >= 2, got {k!r}")
        if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
            raise DataError(f"dataset.json input_shape must be [C, H, W] positive integers, got {shape!r}")
        if shape[0] not in (1, 3):
            raise DataError(f"dataset.json input_shape has {shape[0]} channels; PNG sets hold 1 (grey) or 3 (RGB)")
        for key in ("mean", "std"):
            vals = raw[key]
            if not (isinstance(vals, list) and len(vals) == shape[0] and all(isinstance(v, int | float) for v in vals)):
                raise DataError(f"dataset.json {key} must list {shape[0]} numbers (one per channel)")
        if any(v <= 0 for v in raw["std"]):
            raise DataError("dataset.json std values must be positive")
        names = raw.get("class_names")
        if names is not None and (not isinstance(names, list) or len(names) != k):
            raise DataError(f"dataset.json class_names must list {k} names")
        return cls(
            str(raw["name"]), k, tuple(shape), tuple(map(float, raw["mean"])), tuple(map(float, raw["std"])),
            tuple(map(str, names)) if names else None,
        )

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "num_classes": self.num_classes, "input_shape": list(self.input_shape),
               "mean": list(self.mean), "std": list(self.std)}
        if self.class_names:
            out["class_names"] = list(self.class_names)
        return out


@dataclass
class CleanSet:
    """A loaded, verified clean set: images (N, C, H, W) float32 in [0, 1] and labels (N,) int64."""

    meta: DatasetMeta
    images: torch.Tensor
    labels: torch.Tensor
    source: str = ""
    manifest_sha256: str = ""
    paths: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def per_class(self) -> list[int]:
        """Number of images of each class."""
        return torch.bincount(self.labels, minlength=self.meta.num_classes).tolist()

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> tuple[Split, Split]:
        """Stratified train/validation split: `val_fraction` of each class (at least one image) goes to validation.

        Classes with a single image stay in train. Deterministic for a given seed.
        """
        gen = torch.Generator().manual_seed(seed)
        train_idx, val_idx = [], []
        for c in range(self.meta.num_classes):
            idx = torch.nonzero(self.labels == c).flatten()
            idx = idx[torch.randperm(len(idx), generator=gen)]
            n_val = max(1, int(round(val_fraction * len(idx)))) if len(idx) > 1 else 0
            val_idx.append(idx[:n_val])
            train_idx.append(idx[n_val:])
        tr, va = torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values
        return Split(self.images[tr], self.labels[tr]), Split(self.images[va], self.labels[va])

    def as_split(self) -> Split:
        return Split(self.images, self.labels)


@dataclass
class Split:
    """A pair of image and label tensors."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_meta(folder: Path) -> DatasetMeta:
    """Read and check `folder/dataset.json`."""
    path = folder / "dataset.json"
    if not path.is_file():
        raise DataError(f"{folder} has no dataset.json; build the set with `gradprune dataset pack`")
    try:
        return DatasetMeta.from_dict(json.loads(path.read_text()))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc})") from None


def read_manifest(folder: Path) -> list[dict[str, str]]:
    """Read `folder/manifest.csv` as rows of strings; checks the header only."""
    path = folder / "manifest.csv"
    if not path.is_file():
        raise DataError(f"{folder} has no manifest.csv; build the set with `gradprune dataset pack`")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames != MANIFEST_COLUMNS:
            raise DataError(f"manifest.csv columns are {reader.fieldnames}; expected exactly {MANIFEST_COLUMNS}")
        return list(reader)


def decode_png(data: bytes) -> np.ndarray:
    """Decode PNG bytes to a uint8 array (H, W) or (H, W, 3); raises ValueError for anything else."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format != "PNG":
            raise ValueError(f"not a PNG ({img.format})")
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB" if "A" in img.mode or img.mode == "P" else "L")
        return np.asarray(img, dtype=np.uint8).copy()


def to_chw(arr: np.ndarray) -> np.ndarray:
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_clean_set(folder: str | Path, *, source: str | None = None) -> CleanSet:
    """Load a clean set from a local folder, verifying every file. Raises DataError with one clear line.

    Checks: dataset.json fields, manifest header, labels in range, each file present with a matching sha256,
    each PNG decodable with shape input_shape, and no empty manifest.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"clean data {folder} is not a folder; give a folder or s3://bucket/prefix")
    meta = read_meta(folder)
    rows = read_manifest(folder)
    if not rows:
        raise DataError(f"{folder}/manifest.csv lists no images")
    images = np.empty((len(rows), *meta.input_shape), dtype=np.uint8)
    labels = np.empty(len(rows), dtype=np.int64)
    for i, row in enumerate(rows):
        labels[i] = _parse_label(row, meta.num_classes, i)
        images[i] = _read_verified_image(folder, row, meta.input_shape, i)
    manifest_hash = sha256_bytes((folder / "manifest.csv").read_bytes())
    return CleanSet(
        meta, torch.from_numpy(images).float().div_(255.0), torch.from_numpy(labels),
        source=source or str(folder), manifest_sha256=manifest_hash, paths=[r["path"] for r in rows],
    )


def _parse_label(row: dict[str, str], num_classes: int, i: int) -> int:
    try:
        label = int(row["label"])
    except (TypeError, ValueError):
        raise DataError(f"manifest.csv row {i + 1}: label {row['label']!r} is not an integer") from None
    if not 0 <= label < num_classes:
        raise DataError(f"manifest.csv row {i + 1}: label {label} is outside 0..{num_classes - 1}")
    return label


def _read_verified_image(folder: Path, row: dict[str, str], shape: tuple[int, int, int], i: int) -> np.ndarray:
    rel = row["path"] or ""
    path = (folder / rel).resolve()
    if not rel or Path(rel).is_absolute() or folder.resolve() not in path.parents:
        raise DataError(f"manifest.csv row {i + 1}: path {rel!r} must be relative and inside the set's folder")
    if not path.is_file():
        raise DataError(f"manifest.csv row {i + 1}: file {rel} is missing; re-push the clean set")
    data = path.read_bytes()
    if sha256_bytes(data) != (row["sha256"] or "").lower():
        raise DataError(f"manifest.csv row {i + 1}: {rel} does not match its sha256; the file changed or is corrupt")
    try:
        arr = to_chw(decode_png(data))
    except (OSError, ValueError) as exc:
        raise DataError(f"manifest.csv row {i + 1}: {rel} is not a readable PNG ({exc})") from None
    if arr.shape != tuple(shape):
        raise DataError(f"{rel} has shape {list(arr.shape)} but dataset.json input_shape is {list(shape)}")
    return arr


def write_clean_set(
    out: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    name: str,
    mean: list[float] | tuple[float, ...],
    std: list[float] | tuple[float, ...],
    class_names: list[str] | None = None,
    num_classes: int | None = None,
) -> Path:
    """Write images (N, H, W), (N, H, W, 3) or (N, C, H, W) uint8, and labels, in the clean-set layout.

    Returns the folder. PNGs go to `images/<class>/<index>.png`.
    """
    out = Path(out)
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise DataError("write_clean_set takes uint8 images (0..255)")
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
        images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC for PIL
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    labels = np.asarray(labels).astype(np.int64)
    k = int(num_classes if num_classes is not None else labels.max() + 1)
    channels = 1 if images.ndim == 3 else 3
    meta = DatasetMeta(name, k, (channels, *images.shape[1:3]), tuple(mean), tuple(std),
                       tuple(class_names) if class_names else None)
    rows = []
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        rel = f"images/{int(label)}/{i:06d}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        (out / rel).write_bytes(buf.getvalue())
        rows.append({"path": rel, "label": int(label), "sha256": sha256_bytes(buf.getvalue())})
    (out / "dataset.json").write_text(json.dumps(meta.to_dict(), indent=2))
    with (out / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return out
