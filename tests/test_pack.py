"""data/pack.py and `gradprune dataset pack|validate|push`: real Fashion-MNIST images in, a valid clean set out."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from services import moto_s3, s3_env
from typer.testing import CliRunner

from gradprune_mlflow.cli import app
from gradprune_mlflow.data.cleanset import load_clean_set
from gradprune_mlflow.data.expectations import Checks, validate_clean_set
from gradprune_mlflow.data.pack import pack_clean_set
from gradprune_mlflow.data.reference import fashion_mnist, stratified_take
from gradprune_mlflow.errors import DataError

runner = CliRunner()


@pytest.fixture(scope="module")
def fashion():
    x, y = fashion_mnist("test")
    idx = stratified_take(y, 10, seed=1)
    return x[idx], y[idx]


@pytest.fixture(scope="module")
def image_folder(fashion, tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    x, y = fashion
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        cls = root / f"class-{label:02d}"
        cls.mkdir(exist_ok=True)
        # PNG and lossless formats only: the images must come back bit for bit.
        Image.fromarray(img).save(cls / f"{i}.{'png' if i % 2 else 'bmp'}")
    (root / "class-00" / "notes.txt").write_text("ignored")
    return root


def test_pack_from_an_image_folder(image_folder, fashion, tmp_path):
    out = pack_clean_set(image_folder, tmp_path / "set", mean=[0.286], std=[0.353])
    data = load_clean_set(out)
    x, y = fashion
    assert data.meta.num_classes == 10 and data.meta.input_shape == (1, 28, 28)
    assert data.meta.class_names == tuple(f"class-{c:02d}" for c in range(10))
    assert data.meta.mean == (0.286,) and data.per_class() == [10] * 10
    # Same images per class (folder order is by file name, so compare sorted pixel sums).
    for c in range(10):
        got = sorted((data.images[data.labels == c] * 255).round().sum(dim=(1, 2, 3)).tolist())
        assert got == sorted(x[y == c].reshape(10, -1).sum(1).astype(float).tolist())
    assert validate_clean_set(out, Checks(min_per_class=10)).success


def test_numeric_class_folders_sort_as_numbers(tmp_path):
    for label in (2, 10, 1):
        (tmp_path / "src" / str(label)).mkdir(parents=True)
        Image.new("L", (8, 8), label).save(tmp_path / "src" / str(label) / "a.png")
    data = load_clean_set(pack_clean_set(tmp_path / "src", tmp_path / "out"))
    assert data.meta.class_names == ("1", "2", "10")
    assert [round(float(v) * 255) for v in data.images[:, 0, 0, 0]] == [1, 2, 10]


def test_pack_from_npz_uint8_and_float_nchw(fashion, tmp_path):
    x, y = fashion
    np.savez(tmp_path / "u8.npz", images=x, labels=y)
    np.savez(tmp_path / "f32.npz", x=(x[:, None] / 255.0).astype(np.float32), y=y,
             class_names=np.array([f"c{i}" for i in range(10)]))
    a = load_clean_set(pack_clean_set(tmp_path / "u8.npz", tmp_path / "a"))
    b = load_clean_set(pack_clean_set(tmp_path / "f32.npz", tmp_path / "b"))
    assert (a.images == b.images).all() and (a.labels == b.labels).all()
    assert b.meta.class_names[3] == "c3"
    # Computed normalisation: the images' own statistics.
    assert a.meta.mean[0] == pytest.approx(float(x.mean() / 255), abs=1e-3)


@pytest.mark.parametrize(("setup", "message"), [
    ("missing", "neither a folder"),
    ("empty", "no class sub-folders"),
    ("sizes", "differ in size"),
    ("range", "float images must be in"),
])
def test_pack_refuses_unusable_sources(setup, message, tmp_path):
    src = tmp_path / "src"
    if setup == "empty":
        src.mkdir()
    elif setup == "sizes":
        for label, size in (("a", 8), ("b", 9)):
            (src / label).mkdir(parents=True)
            Image.new("L", (size, size)).save(src / label / "x.png")
    elif setup == "range":
        src = tmp_path / "bad.npz"
        np.savez(src, images=np.full((4, 8, 8), 2.0), labels=np.arange(4))
    with pytest.raises(DataError, match=message):
        pack_clean_set(src, tmp_path / "out")


def test_pack_refuses_a_non_empty_destination(image_folder, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        pack_clean_set(image_folder, tmp_path / "out")


def test_cli_pack_validate_push(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "set"
    result = runner.invoke(app, ["dataset", "pack", str(image_folder), "--out", str(out), "--mean", "0.286",
                                 "--std", "0.353"])
    assert result.exit_code == 0, result.output
    assert "packed 100 images of 10 classes" in result.output
    result = runner.invoke(app, ["dataset", "validate", str(out), "--json", str(tmp_path / "ge.json")])
    assert result.exit_code == 0, result.output
    assert "15 of 15 expectations met" in result.output and (tmp_path / "ge.json").is_file()
    result = runner.invoke(app, ["dataset", "validate", str(out), "--min-per-class", "11"])
    assert result.exit_code == 2
    assert "FAILED" in result.output and "failed validation" in result.output
    assert "at least 11 images per class" in result.output.splitlines()[-1]
    with moto_s3(buckets=("cli",)) as endpoint:
        for key, value in s3_env(endpoint).items():
            monkeypatch.setenv(key, value)
        result = runner.invoke(app, ["dataset", "push", str(out), "s3://cli/sets/a/"])
        assert result.exit_code == 0, result.output
        assert "uploaded 102 objects to s3://cli/sets/a" in result.output
        result = runner.invoke(app, ["dataset", "validate", "s3://cli/sets/a"])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["dataset", "pack", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "neither a folder" in result.output
