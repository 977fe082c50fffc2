"""The inputs a registered model's tags point at, fetched and loaded: triggers and test data (local or s3://)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from gradprune_mlflow.data.cleanset import CleanSet, load_clean_set, sha256_bytes
from gradprune_mlflow.data.s3 import default_cache_dir, fetch_clean_set, fetch_object, is_s3_uri, parse_s3_uri
from gradprune_mlflow.defense.triggers import Trigger, check_trigger_fits, load_trigger
from gradprune_mlflow.errors import DataError, TriggerError

# Keys of a trigger JSON that name image files relative to it.
_FILE_KEYS = ("mask", "pattern")


def load_trigger_uri(uri: str, cache_dir: str | os.PathLike | None = None) -> Trigger:
    """Load a trigger JSON from a local path or s3://bucket/key.json, with the PNGs it names (relative to it).

    S3 triggers are kept under `cache_dir` (default: beside the clean-set cache) in a folder named by the sha256 of
    their bytes: trigger images are read lazily, so the files must outlive this call.
    Raises TriggerError when the file or an image it names cannot be read.
    """
    if not is_s3_uri(uri):
        return load_trigger(uri.removeprefix("file://"))
    with tempfile.TemporaryDirectory(prefix="gradprune-trigger-") as tmp:
        name = PurePosixPath(parse_s3_uri(uri).prefix).name or "trigger.json"
        files = {name: _fetch(uri, Path(tmp) / name)}
        try:
            spec = json.loads(files[name])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TriggerError(f"trigger {uri} is not valid JSON ({exc})") from None
        base = uri.rsplit("/", 1)[0]
        for key in _FILE_KEYS:
            rel = spec.get(key) if isinstance(spec, dict) else None
            if isinstance(rel, str) and rel.lower().endswith(".png"):
                if rel.startswith("/") or ".." in PurePosixPath(rel).parts:
                    raise TriggerError(f"trigger {uri}: {key} path {rel!r} must be relative and beside the JSON")
                files[rel] = _fetch(f"{base}/{rel}", Path(tmp) / rel)
        digest = sha256_bytes(b"".join(k.encode() + b"\0" + v for k, v in sorted(files.items())))[:32]
        target = Path(cache_dir or default_cache_dir()).parent / "triggers" / digest
        if not (target / name).is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(tmp, target, dirs_exist_ok=True)
    return load_trigger(target / name)


def _fetch(uri: str, dest: Path) -> bytes:
    try:
        return fetch_object(uri, dest).read_bytes()
    except DataError as exc:
        raise TriggerError(f"trigger file {exc.message}; upload it beside the trigger JSON") from None


def load_data_uri(uri: str, cache_dir: str | os.PathLike | None = None) -> CleanSet:
    """Fetch (s3://, cached by content) and load a set in the clean-set layout, every file verified."""
    return load_clean_set(fetch_clean_set(uri, cache_dir), source=uri)


def check_inputs(clean_set: CleanSet, *triggers: Trigger | None, test_set: CleanSet | None = None) -> None:
    """Raise TriggerError / DataError unless the triggers and the test set fit the clean set's classes and shape."""
    for trig in triggers:
        if trig is not None:
            check_trigger_fits(trig, clean_set.meta.num_classes, clean_set.meta.input_shape)
    if test_set is not None:
        a, b = clean_set.meta, test_set.meta
        if (a.num_classes, a.input_shape) != (b.num_classes, b.input_shape):
            raise DataError(f"test data {test_set.source} has {b.num_classes} classes of shape {list(b.input_shape)} "
                            f"but the clean set has {a.num_classes} of shape {list(a.input_shape)}")
