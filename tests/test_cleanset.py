"""The clean-set folder layout: write, load, and every way a set can be broken."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from gradprune_mlflow.data.cleanset import MANIFEST_COLUMNS, load_clean_set, sha256_bytes, write_clean_set
from gradprune_mlflow.data.reference import FASHION_MEAN, FASHION_STD, fashion_mnist, stratified_take
from gradprune_mlflow.errors import DataError

PER_CLASS = 5


@pytest.fixture(scope="module")
def fashion_sample():
    """PER_CLASS real Fashion-MNIST test images of every class (uint8 (50, 28, 28)) and their labels."""
    x, y = fashion_mnist("test")
    idx = stratified_take(y, PER_CLASS, seed=1)
    return x[idx], y[idx]


@pytest.fixture
def set_dir(tmp_path, fashion_sample):
    x, y = fashion_sample
    return write_clean_set(tmp_path / "set", x, y, name="fashion-sample", mean=FASHION_MEAN, std=FASHION_STD,
                           num_classes=10)


def rows(folder):
    with (folder / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def write_rows(folder, new_rows):
    with (folder / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(new_rows)


def png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_round_trip_keeps_every_pixel_and_label(set_dir, fashion_sample):
    x, y = fashion_sample
    data = load_clean_set(set_dir)
    assert len(data) == len(y) == 10 * PER_CLASS
    assert data.images.shape == (len(y), 1, 28, 28) and data.images.dtype == torch.float32
    assert torch.equal(data.images, torch.from_numpy(x).float().div(255).unsqueeze(1))
    assert torch.equal(data.labels, torch.from_numpy(y))
    assert data.per_class() == [PER_CLASS] * 10
    assert data.meta.input_shape == (1, 28, 28) and data.meta.mean == FASHION_MEAN
    assert data.manifest_sha256 == sha256_bytes((set_dir / "manifest.csv").read_bytes())


def test_rgb_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    y = np.array([0, 1, 2, 0, 1, 2])
    folder = write_clean_set(tmp_path / "rgb", x, y, name="rgb", mean=[0.5] * 3, std=[0.25] * 3)
    data = load_clean_set(folder)
    assert data.meta.input_shape == (3, 8, 8) and data.meta.num_classes == 3
    assert torch.equal(data.images, torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255))


def test_changed_image_fails_its_sha256(set_dir):
    first = set_dir / rows(set_dir)[0]["path"]
    first.write_bytes(png_bytes(np.zeros((28, 28), np.uint8)))
    with pytest.raises(DataError, match="row 1: .* does not match its sha256"):
        load_clean_set(set_dir)


def test_missing_image(set_dir):
    (set_dir / rows(set_dir)[3]["path"]).unlink()
    with pytest.raises(DataError, match="row 4: file .* is missing"):
        load_clean_set(set_dir)


@pytest.mark.parametrize(("label", "message"), [("10", "outside 0..9"), ("-1", "outside"), ("shoe", "not an integer")])
def test_bad_label(set_dir, label, message):
    new = rows(set_dir)
    new[2]["label"] = label
    write_rows(set_dir, new)
    with pytest.raises(DataError, match=message):
        load_clean_set(set_dir)


def test_wrong_image_size(set_dir):
    data = png_bytes(np.zeros((20, 20), np.uint8))
    (set_dir / "small.png").write_bytes(data)
    new = rows(set_dir)
    new[0] = {"path": "small.png", "label": "0", "sha256": sha256_bytes(data)}
    write_rows(set_dir, new)
    with pytest.raises(DataError, match=r"small.png has shape \[1, 20, 20\]"):
        load_clean_set(set_dir)


def test_empty_manifest(set_dir):
    write_rows(set_dir, [])
    with pytest.raises(DataError, match="lists no images"):
        load_clean_set(set_dir)


def test_wrong_manifest_columns(set_dir):
    (set_dir / "manifest.csv").write_text("file,class\na.png,0\n")
    with pytest.raises(DataError, match="columns"):
        load_clean_set(set_dir)


def test_corrupt_png_with_matching_sha(set_dir):
    junk = b"\x89PNG\r\n\x1a\n" + b"truncated garbage"
    (set_dir / "broken.png").write_bytes(junk)
    new = rows(set_dir)
    new[1] = {"path": "broken.png", "label": "1", "sha256": sha256_bytes(junk)}
    write_rows(set_dir, new)
    with pytest.raises(DataError, match="broken.png is not a readable PNG"):
        load_clean_set(set_dir)


@pytest.mark.parametrize("escape", ["../outside.png", "images/../../outside.png", "/etc/passwd", ""])
def test_paths_must_stay_inside_the_folder(set_dir, escape):
    # A real file outside the set with a matching hash: only the path check stands in the way.
    outside = set_dir.parent / "outside.png"
    outside.write_bytes(png_bytes(np.zeros((28, 28), np.uint8)))
    new = rows(set_dir)
    new[0] = {"path": escape, "label": "0", "sha256": sha256_bytes(outside.read_bytes())}
    write_rows(set_dir, new)
    with pytest.raises(DataError, match="must be relative and inside"):
        load_clean_set(set_dir)


def test_bad_dataset_json(set_dir):
    meta = json.loads((set_dir / "dataset.json").read_text())
    (set_dir / "dataset.json").write_text(json.dumps({**meta, "std": [0.0]}))
    with pytest.raises(DataError, match="std"):
        load_clean_set(set_dir)
    (set_dir / "dataset.json").unlink()
    with pytest.raises(DataError, match="no dataset.json"):
        load_clean_set(set_dir)


def test_not_a_folder(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        load_clean_set(tmp_path / "nowhere")


def test_stratified_split_keeps_every_class_in_both_parts(set_dir):
    data = load_clean_set(set_dir)
    train, val = data.split(0.1, seed=0)
    assert len(train) + len(val) == len(data)
    assert torch.bincount(val.labels, minlength=10).min() >= 1
    assert torch.bincount(train.labels, minlength=10).min() >= 1
    # Disjoint and complete: the images of both parts together are the whole set.
    together = torch.cat([train.images, val.images]).flatten(1)
    assert torch.unique(together, dim=0).shape[0] == torch.unique(data.images.flatten(1), dim=0).shape[0]
    again_train, again_val = data.split(0.1, seed=0)
    assert torch.equal(val.images, again_val.images) and torch.equal(train.labels, again_train.labels)
    _, other_val = data.split(0.1, seed=1)
    assert not torch.equal(val.images, other_val.images)


def test_split_leaves_a_single_image_class_in_train(tmp_path, fashion_sample):
    x, y = fashion_sample
    keep = np.concatenate([np.flatnonzero(y == 0)[:1], np.flatnonzero(y == 1)])
    data = load_clean_set(write_clean_set(tmp_path / "s", x[keep], y[keep], name="s", mean=[0.5], std=[0.5],
                                          num_classes=2))
    train, val = data.split(0.5, seed=0)
    assert (train.labels == 0).sum() == 1 and (val.labels == 0).sum() == 0
    assert (val.labels == 1).sum() >= 1
