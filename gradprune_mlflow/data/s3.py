"""Clean sets on S3 (or any S3 API: MinIO, SeaweedFS, moto): upload, and download into a content-keyed local cache.

Credentials come from boto3's standard chain (environment, shared files, instance roles). The endpoint comes from
`AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`, else AWS itself.

The cache is keyed by content: the key is the sha256 of `dataset.json` and `manifest.csv`, and the manifest holds the
sha256 of every image, so one key names exactly one set of bytes. A changed set under the same URI gets a new key; an
unchanged set is never downloaded twice. Every file is checked against its sha256, also when the cache is reused.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from gradprune_mlflow.data.cleanset import read_manifest, sha256_bytes
from gradprune_mlflow.errors import DataError, GradpruneError

_COMPLETE = ".complete.json"
_WORKERS = 8
_CLIENTS: dict[tuple, object] = {}
_CLIENTS_LOCK = threading.Lock()


class S3Unavailable(GradpruneError):
    """S3 could not be reached or refused access (credentials, permissions, network): retry; the data is fine."""


@dataclass(frozen=True)
class S3Location:
    """A parsed `s3://bucket/prefix` URI; `prefix` has no leading or trailing slash."""

    bucket: str
    prefix: str

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def is_s3_uri(uri: str | os.PathLike) -> bool:
    """True for `s3://...`."""
    return str(uri).startswith("s3://")


def parse_s3_uri(uri: str) -> S3Location:
    """Split `s3://bucket/prefix` into bucket and prefix; raises BadInput-class DataError for anything else."""
    if not is_s3_uri(uri):
        raise DataError(f"{uri!r} is not an s3:// URI; give s3://bucket/prefix")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise DataError(f"{uri!r} names no bucket; give s3://bucket/prefix")
    return S3Location(bucket, prefix.strip("/"))


def s3_client():
    """A boto3 S3 client: standard credential chain, endpoint from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL.

    Clients are reused while every AWS_* variable (endpoint, credentials, profile, region, attempts) is unchanged:
    building one costs about 0.25 s (botocore loads its service model), more than a whole version that ends early.
    boto3 clients are thread-safe; sessions are not, so building happens under a lock.
    """
    key = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
            attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or 5)  # the standard variable, honoured; 5 when unset
            config = Config(retries={"max_attempts": attempts, "mode": "standard"},
                            max_pool_connections=_WORKERS * 2)
            _CLIENTS[key] = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
        return _CLIENTS[key]


def default_cache_dir() -> Path:
    """`GRADPRUNE_CACHE_DIR`, else `$XDG_CACHE_HOME/gradprune/clean-sets` (~/.cache by default)."""
    if os.environ.get("GRADPRUNE_CACHE_DIR"):
        return Path(os.environ["GRADPRUNE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gradprune" / "clean-sets"


def fetch_clean_set(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a local folder holding the clean set at `uri`, every file verified against the manifest.

    Takes `s3://bucket/prefix` (downloaded into `cache_dir`, default `default_cache_dir()`, and reused while the
    content is unchanged) or a local folder (returned as is; `load_clean_set` verifies it when it loads).
    Raises DataError when the set is missing, lists unsafe paths or a file does not match its sha256, and S3Unavailable
    when S3 cannot be reached or refuses access.
    """
    if not is_s3_uri(uri):
        path = Path(str(uri).removeprefix("file://"))
        if not path.is_dir():
            raise DataError(f"clean data {uri} is not a folder; give a folder or s3://bucket/prefix")
        return path
    loc = parse_s3_uri(str(uri))
    client = s3_client()
    meta_bytes = _get(client, loc, "dataset.json")
    manifest_bytes = _get(client, loc, "manifest.csv")
    rows = _manifest_rows(manifest_bytes, loc)
    target = Path(cache_dir or default_cache_dir()) / sha256_bytes(meta_bytes + b"\0" + manifest_bytes)[:32]
    if (target / _COMPLETE).is_file() and not _bad_files(target, rows):
        return target
    return _download(client, loc, target, rows, meta_bytes, manifest_bytes)


def fetch_object(uri: str, dest: str | os.PathLike) -> Path:
    """Download one object `s3://bucket/key` to the file `dest` and return it. Raises DataError when it is missing."""
    loc = parse_s3_uri(uri)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(_get(s3_client(), S3Location(loc.bucket, ""), loc.prefix, missing=f"{uri} does not exist"))
    return dest


def push_object(local: str | os.PathLike, uri: str) -> str:
    """Upload one local file to `s3://bucket/key` and return the URI. Raises DataError / S3Unavailable."""
    local = Path(local)
    if not local.is_file():
        raise DataError(f"{local} is not a file")
    loc = parse_s3_uri(uri)
    client = s3_client()
    _ensure_bucket(client, loc.bucket)
    try:
        client.put_object(Bucket=loc.bucket, Key=loc.prefix, Body=local.read_bytes())
    except (ClientError, BotoCoreError) as exc:
        raise _unavailable(exc, loc) from None
    return uri


def push_clean_set(local: str | os.PathLike, uri: str) -> int:
    """Upload the clean set in folder `local` to `s3://bucket/prefix`; returns the number of objects written.

    Every file is checked against the manifest first. Images go up before `dataset.json` and `manifest.csv`, so a
    reader never sees a manifest that names files not yet uploaded. Objects already under the prefix that the
    manifest does not name are left alone. Raises DataError for an incomplete local set, S3Unavailable for S3 errors.
    """
    local = Path(local)
    loc = parse_s3_uri(uri)
    if not (local / "dataset.json").is_file():
        raise DataError(f"{local} has no dataset.json; build the set with `gradprune dataset pack`")
    rows = read_manifest(local)
    bad = _bad_files(local, rows)
    if bad:
        raise DataError(f"{local}: {len(bad)} file(s) missing or not matching manifest.csv (first: {bad[0]})")
    client = s3_client()
    _ensure_bucket(client, loc.bucket)

    def put(rel: str) -> None:
        kind = "image/png" if rel.endswith(".png") else "application/octet-stream"
        try:
            client.put_object(Bucket=loc.bucket, Key=loc.key(rel), Body=(local / rel).read_bytes(), ContentType=kind)
        except (ClientError, BotoCoreError) as exc:
            raise _unavailable(exc, loc) from None

    with ThreadPoolExecutor(_WORKERS) as pool:
        list(pool.map(put, sorted({r["path"] for r in rows})))
    for rel in ("dataset.json", "manifest.csv"):
        put(rel)
    return len({r["path"] for r in rows}) + 2


def _ensure_bucket(client, bucket: str) -> None:
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if _code(exc) not in ("404", "NoSuchBucket", "NotFound"):
            raise _unavailable(exc, S3Location(bucket, "")) from None
        raise DataError(f"bucket s3://{bucket} does not exist; create it first (aws s3 mb s3://{bucket})") from None
    except BotoCoreError as exc:
        raise _unavailable(exc, S3Location(bucket, "")) from None


def _get(client, loc: S3Location, rel: str, missing: str | None = None) -> bytes:
    try:
        return client.get_object(Bucket=loc.bucket, Key=loc.key(rel))["Body"].read()
    except ClientError as exc:
        if _code(exc) in ("NoSuchKey", "404", "NotFound"):
            hint = f"{loc} has no {rel}; push the clean set with `gradprune dataset push`"
            raise DataError(missing or hint) from None
        if _code(exc) == "NoSuchBucket":
            raise DataError(f"bucket s3://{loc.bucket} does not exist; check the clean-data URI") from None
        raise _unavailable(exc, loc) from None
    except (BotoCoreError, NoCredentialsError) as exc:
        raise _unavailable(exc, loc) from None


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _unavailable(exc: Exception, loc: S3Location) -> S3Unavailable:
    return S3Unavailable(f"cannot read or write {loc} ({type(exc).__name__}: {exc}); check the S3 endpoint "
                         "(AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) and credentials")


def _manifest_rows(data: bytes, loc: S3Location) -> list[dict[str, str]]:
    try:
        reader = csv.DictReader(io.StringIO(data.decode("utf-8")))
        rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{loc}/manifest.csv is not a readable CSV ({exc})") from None
    if not {"path", "sha256"} <= set(reader.fieldnames or ()):
        raise DataError(f"{loc}/manifest.csv columns are {reader.fieldnames}; expected path,label,sha256")
    for i, row in enumerate(rows):
        rel = row.get("path") or ""
        parts = PurePosixPath(rel).parts
        if not rel or rel.startswith("/") or ".." in parts or "\\" in rel:
            raise DataError(f"{loc}/manifest.csv row {i + 1}: path {rel!r} must be relative and inside the set")
    return rows


def _bad_files(folder: Path, rows: list[dict[str, str]]) -> list[str]:
    """Paths from the manifest that are missing in `folder` or do not match their sha256."""
    bad = []
    for row in rows:
        path = folder / row["path"]
        if not path.is_file() or sha256_bytes(path.read_bytes()) != (row.get("sha256") or "").lower():
            bad.append(row["path"])
    return bad


def _download(client, loc: S3Location, target: Path, rows, meta_bytes: bytes, manifest_bytes: bytes) -> Path:
    # Download into a private folder and rename it into place: a crash or a concurrent fetch never leaves a
    # half-written folder under the content key.
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.parent / f".partial-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        work.mkdir()  # also for a manifest without rows: validation, not a missing folder, must say what is wrong
        def fetch(row: dict[str, str]) -> None:
            data = _get(client, loc, row["path"])
            if sha256_bytes(data) != (row.get("sha256") or "").lower():
                raise DataError(f"{loc}/{row['path']} does not match its sha256 in manifest.csv; re-push the set")
            out = work / row["path"]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)

        with ThreadPoolExecutor(_WORKERS) as pool:
            list(pool.map(fetch, rows))
        (work / "dataset.json").write_bytes(meta_bytes)
        (work / "manifest.csv").write_bytes(manifest_bytes)
        (work / _COMPLETE).write_text(json.dumps({"source": str(loc), "files": len(rows)}))
        if (target / _COMPLETE).is_file() and not _bad_files(target, rows):
            return target  # a concurrent fetch finished first
        if target.exists():  # a damaged copy: move it aside in one step, then drop it
            trash = target.parent / f".trash-{target.name}-{uuid.uuid4().hex[:8]}"
            target.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
