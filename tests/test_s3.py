"""data/s3.py against a real S3 API (moto server on loopback): push, fetch, the content-keyed cache, errors."""

from __future__ import annotations

import json
import shutil

import boto3
import pytest
from services import moto_s3, s3_env

from gradprune_mlflow import lab
from gradprune_mlflow.data.cleanset import load_clean_set, read_manifest
from gradprune_mlflow.data.s3 import (
    S3Unavailable,
    fetch_clean_set,
    fetch_object,
    parse_s3_uri,
    push_clean_set,
    push_object,
    s3_client,
)
from gradprune_mlflow.errors import DataError

BUCKET = "trusted"


@pytest.fixture(scope="module")
def endpoint():
    with moto_s3(buckets=(BUCKET,)) as url:
        yield url


@pytest.fixture(autouse=True)
def s3(endpoint, monkeypatch):
    for key, value in s3_env(endpoint).items():
        monkeypatch.setenv(key, value)
    return boto3.client("s3", endpoint_url=endpoint)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return lab.trusted_clean_set(tmp_path_factory.mktemp("small"), per_class=5)


def test_parse_s3_uri():
    loc = parse_s3_uri("s3://bucket/a/b/")
    assert (loc.bucket, loc.prefix, loc.key("x.png")) == ("bucket", "a/b", "a/b/x.png")
    assert parse_s3_uri("s3://bucket").key("x") == "x"
    with pytest.raises(DataError, match="not an s3:// URI"):
        parse_s3_uri("/local/path")


def test_push_then_fetch_round_trip(small_set, s3, tmp_path):
    count = push_clean_set(small_set, f"s3://{BUCKET}/sets/a")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="sets/a/")["Contents"]}
    assert count == len(keys) == 52  # 50 images, dataset.json, manifest.csv
    local = fetch_clean_set(f"s3://{BUCKET}/sets/a", tmp_path / "cache")
    assert local.parent == tmp_path / "cache"
    original, fetched = load_clean_set(small_set), load_clean_set(local)
    assert fetched.manifest_sha256 == original.manifest_sha256
    assert (fetched.images == original.images).all() and (fetched.labels == original.labels).all()


def test_fetch_reuses_the_cache_without_downloading_images_again(small_set, s3, tmp_path):
    uri = f"s3://{BUCKET}/sets/reuse"
    push_clean_set(small_set, uri)
    first = fetch_clean_set(uri, tmp_path)
    # With one image gone from S3, only a cache hit can still produce a complete set.
    s3.delete_object(Bucket=BUCKET, Key=f"sets/reuse/{read_manifest(small_set)[0]['path']}")
    assert fetch_clean_set(uri, tmp_path) == first
    with pytest.raises(DataError, match="has no images/"):
        fetch_clean_set(uri, tmp_path / "empty-cache")


def test_a_damaged_cache_is_downloaded_again(small_set, tmp_path):
    uri = f"s3://{BUCKET}/sets/repair"
    push_clean_set(small_set, uri)
    local = fetch_clean_set(uri, tmp_path)
    victim = local / read_manifest(local)[3]["path"]
    victim.write_bytes(b"tampered")
    assert fetch_clean_set(uri, tmp_path) == local
    load_clean_set(local)  # verifies every sha256 again


def test_a_changed_set_under_the_same_uri_gets_a_new_cache_key(tmp_path):
    uri = f"s3://{BUCKET}/sets/changing"
    push_clean_set(lab.trusted_clean_set(tmp_path / "v1", per_class=3), uri)
    first = fetch_clean_set(uri, tmp_path / "cache")
    push_clean_set(lab.trusted_clean_set(tmp_path / "v2", per_class=4), uri)
    second = fetch_clean_set(uri, tmp_path / "cache")
    assert first != second and len(load_clean_set(second)) == 40


def test_an_object_that_does_not_match_its_sha256_is_refused(small_set, s3, tmp_path):
    uri = f"s3://{BUCKET}/sets/corrupt"
    push_clean_set(small_set, uri)
    rel = read_manifest(small_set)[7]["path"]
    s3.put_object(Bucket=BUCKET, Key=f"sets/corrupt/{rel}", Body=b"not the image")
    with pytest.raises(DataError, match=f"{rel} does not match its sha256"):
        fetch_clean_set(uri, tmp_path)
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]  # nothing half-written is kept


def test_a_manifest_path_outside_the_set_is_refused(small_set, s3, tmp_path):
    uri = f"s3://{BUCKET}/sets/escape"
    push_clean_set(small_set, uri)
    first = read_manifest(small_set)[0]["path"]
    manifest = (small_set / "manifest.csv").read_text().replace(first, "../../etc/passwd", 1)
    s3.put_object(Bucket=BUCKET, Key="sets/escape/manifest.csv", Body=manifest.encode())
    with pytest.raises(DataError, match="must be relative and inside the set"):
        fetch_clean_set(uri, tmp_path)


def test_missing_sets_and_buckets_are_data_errors(small_set, tmp_path):
    with pytest.raises(DataError, match="has no dataset.json"):
        fetch_clean_set(f"s3://{BUCKET}/nothing/here", tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        fetch_clean_set("s3://no-such-bucket/x", tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        push_clean_set(small_set, "s3://no-such-bucket/x")


def test_push_refuses_an_incomplete_local_set(small_set, tmp_path):
    broken = shutil.copytree(small_set, tmp_path / "broken")
    (broken / read_manifest(broken)[0]["path"]).unlink()
    with pytest.raises(DataError, match="missing or not matching"):
        push_clean_set(broken, f"s3://{BUCKET}/sets/broken")


def test_local_folders_pass_through_unchanged(small_set):
    assert fetch_clean_set(str(small_set)) == small_set
    with pytest.raises(DataError, match="is not a folder"):
        fetch_clean_set("/no/such/folder")


def test_the_service_specific_endpoint_wins(small_set, endpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    push_clean_set(small_set, f"s3://{BUCKET}/sets/endpoint")
    assert fetch_clean_set(f"s3://{BUCKET}/sets/endpoint", tmp_path).is_dir()


def test_a_client_is_reused_until_an_aws_setting_changes(monkeypatch):
    first = s3_client()
    assert s3_client() is first
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    moved = s3_client()
    assert moved is not first and moved.meta.endpoint_url == "http://127.0.0.1:9"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another-secret")
    assert s3_client() is not moved  # new credentials: a new client, never the old one's


def test_an_unreachable_endpoint_is_reported_as_s3_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(S3Unavailable, match="check the S3 endpoint"):
        fetch_clean_set(f"s3://{BUCKET}/sets/a", tmp_path)


def test_single_objects_round_trip(tmp_path):
    src = tmp_path / "trigger.json"
    src.write_text(json.dumps({"kind": "patch", "target": 0}))
    push_object(src, f"s3://{BUCKET}/triggers/t.json")
    assert json.loads(fetch_object(f"s3://{BUCKET}/triggers/t.json", tmp_path / "out/t.json").read_text()) == {
        "kind": "patch", "target": 0}
