"""Every bad input the registry can hand us, through the real path: a real `mlflow server`, moto S3 and Prefect's test
harness, one `scan-registry` pass over one registered model per case.

Each case must end with its documented status and a reason that says what is wrong, and leave the registry as it was
otherwise: no new version, no alias, no code from a model or a clean set run (canary files prove it).
"""

from __future__ import annotations

import csv
import io
import pickle
import shutil
import warnings
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from registry_helpers import Evil, register_pyfunc_version, register_unsafe_version
from services import patched_env, registry_stack

from gradprune_flows.sanitize import sanitize_model_version
from gradprune_flows.scan import scan_registry
from gradprune_mlflow import lab
from gradprune_mlflow.data.cleanset import sha256_bytes, write_clean_set
from gradprune_mlflow.data.s3 import push_clean_set, push_object
from gradprune_mlflow.models.zoo import create_model
from gradprune_mlflow.registry import tags as T
from gradprune_mlflow.registry.pending import set_model_inputs
from gradprune_mlflow.registry.source import log_source_model, register_logged_model

SHAPE = (1, 28, 28)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CONFIG = {"finetune_epochs": 1, "synth_steps": 5}
PER_CLASS = 10


def _rows(folder: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((folder / "manifest.csv").open()))


def _write_rows(folder: Path, rows: list[dict[str, str]]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["path", "label", "sha256"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    (folder / "manifest.csv").write_text(out.getvalue())


def _replace_file(folder: Path, data: bytes, row: int = 0) -> None:
    """Overwrite one image with `data` and record its sha256, so that only the content is wrong."""
    rows = _rows(folder)
    (folder / rows[row]["path"]).write_bytes(data)
    rows[row]["sha256"] = sha256_bytes(data)
    _write_rows(folder, rows)


def _png(size: tuple[int, int], mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


def _label(folder: Path) -> None:
    rows = _rows(folder)
    rows[0]["label"] = "10"
    _write_rows(folder, rows)


def _class_missing(folder: Path) -> None:
    _write_rows(folder, [r for r in _rows(folder) if r["label"] != "9"])


def _empty(folder: Path) -> None:
    _write_rows(folder, [])


def _escape(folder: Path) -> None:
    rows = _rows(folder)
    rows[0]["path"] = "../../outside.png"
    _write_rows(folder, rows)


def _set_of_shape(work: Path, name: str, channels: int, side: int) -> Path:
    """A consistent, valid clean set whose images are `channels` x `side` x `side`: only the model disagrees."""
    rng = np.random.default_rng(0)
    shape = (10 * PER_CLASS, side, side) + ((3,) if channels == 3 else ())
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    return write_clean_set(work / name, images, np.repeat(np.arange(10), PER_CLASS), name=name,
                           mean=[0.5] * channels, std=[0.25] * channels, num_classes=10)


# case -> (how the clean set is damaged locally, expected status, a piece of the reason)
LOCAL_DAMAGE = {
    "label-out-of-range": (_label, "rejected", "label"),
    "wrong-image-size": (lambda f: _replace_file(f, _png((32, 32))), "rejected", "image shape 1x28x28"),
    "class-missing": (_class_missing, "rejected", "class"),
    "empty-manifest": (_empty, "rejected", "row"),
    "corrupt-png": (lambda f: _replace_file(f, b"\x89PNG\r\n\x1a\n but not really"), "rejected", "decode"),
    "path-escapes-the-set": (_escape, "rejected", "inside the set"),
}
# Damage done on S3 after a clean push (push itself refuses a set that does not match its manifest).
S3_DAMAGE = {"missing-file": ("rejected", "has no images/"), "checksum-mismatch": ("rejected", "sha256")}


@pytest.fixture(scope="module")
def scanned(tmp_path_factory, prefect_harness):
    """Registers one model per case, runs one scan over them all, and yields what the tests check."""
    work = tmp_path_factory.mktemp("bad-inputs")
    canaries = work / "canaries"
    canaries.mkdir()
    with registry_stack(work / "mlflow") as stack, patched_env({"GRADPRUNE_CLAIM_SETTLE_SECONDS": "0.2"}):
        client = MlflowClient()
        bucket = f"s3://{stack.data_bucket}"
        good = lab.trusted_clean_set(work / "good", per_class=PER_CLASS)
        push_clean_set(good, f"{bucket}/good")
        cnn = log_source_model(create_model("small_cnn", width=8), input_shape=SHAPE)
        expected: dict[str, tuple[str, str]] = {}

        def case(name: str, info, clean: str, status: str, reason: str, **inputs) -> None:
            register_logged_model(info, name)
            set_model_inputs(client, name, clean_data=clean, **inputs)
            expected[name] = (status, reason)

        for name, (damage, status, reason) in LOCAL_DAMAGE.items():
            folder = shutil.copytree(good, work / name)
            damage(folder)
            _push_unchecked(folder, f"{bucket}/{name}", stack.s3_endpoint)
            case(name, cnn, f"{bucket}/{name}", status, reason)
        s3 = boto3.client("s3", endpoint_url=stack.s3_endpoint)
        for seed, (name, (status, reason)) in enumerate(S3_DAMAGE.items(), start=1):
            # Sets of their own content: the download cache is keyed by content, and a set it holds already
            # (verified) is not fetched again.
            push_clean_set(lab.trusted_clean_set(work / name, per_class=PER_CLASS, seed=seed), f"{bucket}/{name}")
            first = _rows(work / name)[0]["path"]
            if name == "missing-file":
                s3.delete_object(Bucket=stack.data_bucket, Key=f"{name}/{first}")
            else:
                s3.put_object(Bucket=stack.data_bucket, Key=f"{name}/{first}", Body=_png((28, 28)))
            case(name, cnn, f"{bucket}/{name}", status, reason)
        # A clean set is data only: a pickle posing as a PNG is never unpickled, it just fails to decode.
        folder = shutil.copytree(good, work / "pickle-as-png")
        _replace_file(folder, pickle.dumps(Evil(canaries / "clean-set")))
        _push_unchecked(folder, f"{bucket}/pickle-as-png", stack.s3_endpoint)
        case("pickle-as-png", cnn, f"{bucket}/pickle-as-png", "rejected", "decode")
        for name, channels, side in (("rgb-set-for-grey-model", 3, 28), ("32px-set-for-28px-model", 1, 32)):
            push_clean_set(_set_of_shape(work, name, channels, side), f"{bucket}/{name}")
            case(name, cnn, f"{bucket}/{name}", "rejected", "disagrees with the model's signature")
        # Models the method cannot take.
        good_uri = f"{bucket}/good"
        case("no-conv", log_source_model(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10)),
                                              input_shape=SHAPE),
             good_uri, "unsupported", "no Conv2d")
        five = log_source_model(create_model("small_cnn", width=8, num_classes=5), input_shape=SHAPE)
        case("five-outputs", five, good_uri, "rejected", "outputs shape [5]")
        nan = create_model("small_cnn", width=8)
        with torch.no_grad():
            nan.features[0].weight[0, 0, 0, 0] = float("nan")
        case("nan-weights", log_source_model(nan, input_shape=SHAPE), good_uri, "unsupported", "NaN")
        register_pyfunc_version("pyfunc-flavor")
        set_model_inputs(client, "pyfunc-flavor", clean_data=good_uri)
        expected["pyfunc-flavor"] = ("unsupported", "flavors")
        _register_sklearn("sklearn-flavor")
        set_model_inputs(client, "sklearn-flavor", clean_data=good_uri)
        expected["sklearn-flavor"] = ("unsupported", "flavors")
        for via in ("os.system", "subprocess", "eval"):
            name = f"unsafe-{via.replace('.', '-')}"
            register_unsafe_version(name, work, canaries / name, via=via)
            set_model_inputs(client, name, clean_data=good_uri)
            expected[name] = ("unsafe", "imports")
        # Trigger files that are not triggers.
        for name, body in (("trigger-not-json", b"{kind: patch"), ("trigger-unknown-kind", b'{"kind": "laser"}'),
                           ("trigger-target-out-of-range", b'{"kind": "patch", "target": 12, "size": 3}')):
            (work / f"{name}.json").write_bytes(body)
            push_object(work / f"{name}.json", f"{bucket}/triggers/{name}.json")
            case(name, cnn, good_uri, "rejected", "trigger" if name != "trigger-target-out-of-range" else "12",
                 trigger=f"{bucket}/triggers/{name}.json")
        outcomes = {o["model"]: o for o in scan_registry(config=CONFIG)}
        yield {"client": client, "expected": expected, "outcomes": outcomes, "canaries": canaries}


def _push_unchecked(folder: Path, uri: str, endpoint: str) -> None:
    """Upload a damaged set as is (push_clean_set refuses what does not match its manifest)."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    s3 = boto3.client("s3", endpoint_url=endpoint)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())


def _register_sklearn(name: str) -> None:
    sklearn = pytest.importorskip("sklearn.linear_model")
    import mlflow.sklearn

    model = sklearn.LogisticRegression().fit(np.eye(4), [0, 1, 0, 1])
    with mlflow.start_run(run_name=name), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = mlflow.sklearn.log_model(model, name="model", pip_requirements=["scikit-learn"])
    mlflow.register_model(info.model_uri, name)


CASES = [*LOCAL_DAMAGE, *S3_DAMAGE, "pickle-as-png", "rgb-set-for-grey-model", "32px-set-for-28px-model", "no-conv",
         "five-outputs", "nan-weights", "pyfunc-flavor", "sklearn-flavor", "unsafe-os-system", "unsafe-subprocess",
         "unsafe-eval", "trigger-not-json", "trigger-unknown-kind", "trigger-target-out-of-range"]


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_ends_with_its_status_and_registers_nothing(scanned, case):
    client, (status, reason) = scanned["client"], scanned["expected"][case]
    outcome = scanned["outcomes"][case]
    tags = client.get_model_version(case, "1").tags
    assert (outcome["status"], tags[T.STATUS]) == (status, status), outcome["reason"]
    assert reason in outcome["reason"] and tags[T.REASON] == outcome["reason"][: T.MAX_REASON]
    assert "\n" not in tags[T.REASON] and "Traceback" not in tags[T.REASON]
    assert T.LEASE_UNTIL not in tags and T.SANITIZED_VERSION not in tags
    assert [str(v.version) for v in client.search_model_versions(f"name='{case}'")] == ["1"]
    assert client.get_registered_model(case).aliases == {}
    assert client.get_run(outcome["run_id"]).info.status == "FAILED"


def test_no_payload_ever_ran(scanned):
    assert len(scanned["outcomes"]) == len(CASES)
    assert list(scanned["canaries"].iterdir()) == []


@pytest.mark.parametrize(("name", "version", "reason"), [
    ("no-conv", "99", "has no version 99"),
    ("no-such-model", "1", "no registered model named 'no-such-model'"),
])
def test_a_version_that_does_not_exist_is_rejected_without_a_trace(scanned, name, version, reason):
    before = {rm.name: rm.aliases for rm in scanned["client"].search_registered_models()}
    outcome = sanitize_model_version(name, version, CONFIG)
    assert outcome["status"] == "rejected" and reason in outcome["reason"] and outcome["run_id"] is None
    assert {rm.name: rm.aliases for rm in scanned["client"].search_registered_models()} == before
