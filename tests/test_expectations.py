"""data/expectations.py: the GX suite passes a good set and names exactly what is wrong with a bad one."""

from __future__ import annotations

import csv
import io
import json
import shutil

import pytest
from PIL import Image

from gradprune_mlflow import lab
from gradprune_mlflow.data.cleanset import sha256_bytes
from gradprune_mlflow.data.expectations import Checks, CleanSetRejected, validate_clean_set
from gradprune_mlflow.errors import DataError

CHECKS = Checks(min_per_class=10)


@pytest.fixture(scope="module")
def good_set(tmp_path_factory):
    return lab.trusted_clean_set(tmp_path_factory.mktemp("good"), per_class=12)


@pytest.fixture
def bad_set(good_set, tmp_path):
    return shutil.copytree(good_set, tmp_path / "set")


def _rows(folder):
    with (folder / "manifest.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def _write(folder, fields, rows):
    with (folder / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, format="PNG")
    return buf.getvalue()


def _replace_image(folder, row, data: bytes) -> None:
    (folder / row["path"]).write_bytes(data)
    row["sha256"] = sha256_bytes(data)


def wrong_label(folder, fields, rows):
    rows[0]["label"] = "10"


def null_label(folder, fields, rows):
    rows[1]["label"] = ""


def missing_class(folder, fields, rows):
    rows[:] = [r for r in rows if r["label"] != "3"]


def few_per_class(folder, fields, rows):
    drop = [i for i, r in enumerate(rows) if r["label"] == "5"][:4]
    rows[:] = [r for i, r in enumerate(rows) if i not in drop]


def duplicate_row(folder, fields, rows):
    rows.append(dict(rows[0]))


def duplicate_image(folder, fields, rows):
    _replace_image(folder, rows[1], (folder / rows[0]["path"]).read_bytes())


def sha_mismatch(folder, fields, rows):
    rows[2]["sha256"] = "0" * 64


def missing_file(folder, fields, rows):
    (folder / rows[3]["path"]).unlink()


def escaping_path(folder, fields, rows):
    rows[4]["path"] = "../outside.png"


def wrong_shape(folder, fields, rows):
    _replace_image(folder, rows[5], _png((32, 32)))


def not_an_image(folder, fields, rows):
    _replace_image(folder, rows[6], b"GIF89a not really")


def extra_column(folder, fields, rows):
    fields.append("note")
    for r in rows:
        r["note"] = "x"


@pytest.mark.parametrize(("mutate", "check"), [
    (wrong_label, "labels in 0..9"),
    (null_label, "no nulls"),
    (missing_class, "every class present"),
    (few_per_class, "at least 10 images per class"),
    (duplicate_row, "unique paths"),
    (duplicate_image, "unique hashes"),
    (sha_mismatch, "sha256 matches the file"),
    (missing_file, "files exist"),
    (escaping_path, "paths inside the set"),
    (wrong_shape, "image shape 1x28x28"),
    (not_an_image, "images decode"),
    (extra_column, "exact columns"),
])
def test_each_defect_fails_the_check_that_describes_it(bad_set, mutate, check):
    fields, rows = _rows(bad_set)
    mutate(bad_set, fields, rows)
    _write(bad_set, fields, rows)
    outcome = validate_clean_set(bad_set, CHECKS, source="s3://b/set")
    assert not outcome.success
    assert any(line.startswith(check) for line in outcome.failed), outcome.failed
    with pytest.raises(CleanSetRejected, match=f"s3://b/set failed validation: .*{check}") as info:
        outcome.raise_for_failure()
    assert isinstance(info.value, DataError) and info.value.exit_code == 2 and info.value.status == "rejected"


def test_a_good_set_passes_every_expectation(good_set):
    outcome = validate_clean_set(good_set, CHECKS)
    stats = outcome.summary["statistics"]
    assert outcome.success and outcome.failed == []
    assert stats["evaluated_expectations"] == stats["successful_expectations"] >= 15
    assert json.loads(outcome.to_json())["data"]["rows"] == 120
    assert outcome.raise_for_failure() is outcome


def test_row_count_bounds_are_enforced(good_set):
    outcome = validate_clean_set(good_set, Checks(min_per_class=10, max_rows=100))
    assert outcome.failed == [next(f for f in outcome.failed if f.startswith("row count in 100..100"))]


def test_raise_on_failure_raises_with_the_summary_attached(good_set):
    with pytest.raises(CleanSetRejected) as info:
        validate_clean_set(good_set, Checks(min_per_class=13), raise_on_failure=True)
    assert info.value.outcome.summary["statistics"]["unsuccessful_expectations"] >= 1


def test_an_unreadable_dataset_json_is_a_data_error(bad_set):
    (bad_set / "dataset.json").write_text("{nope")
    with pytest.raises(DataError, match="not valid JSON"):
        validate_clean_set(bad_set)
