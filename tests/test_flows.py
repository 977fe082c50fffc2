"""gradprune_flows end to end: a real `mlflow server`, a real S3 API (moto) and Prefect's test harness.

One registry is set up per module and the tests run in order over it: the first scan does the work, the later tests
check what it left and that nothing happens twice. Sanitizing uses the known BadNets trigger and short fine-tuning
to stay fast on two cores; trigger-free mode is exercised by tests/test_demo.py.
"""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow import MlflowClient
from registry_helpers import register_pyfunc_version, register_unsafe_version, snapshot
from services import patched_env, registry_stack
from typer.testing import CliRunner

from gradprune_flows.sanitize import sanitize_model_version
from gradprune_flows.scan import scan_registry
from gradprune_mlflow import lab
from gradprune_mlflow.cli import app
from gradprune_mlflow.data.cleanset import write_clean_set
from gradprune_mlflow.data.reference import FASHION_MEAN, FASHION_STD
from gradprune_mlflow.data.s3 import push_clean_set, push_object
from gradprune_mlflow.defense.metrics import evaluate
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.models.zoo import create_model
from gradprune_mlflow.registry import job as steps
from gradprune_mlflow.registry import tags as T
from gradprune_mlflow.registry.inputs import load_data_uri, load_trigger_uri
from gradprune_mlflow.registry.pending import find_pending, set_model_inputs
from gradprune_mlflow.registry.source import register_source_model
from gradprune_mlflow.report.summary import before_after_table, pct

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CONFIG = {"finetune_epochs": 3, "synth_steps": 50}
SHAPE = (1, 28, 28)
GOOD = "fashion-cnn"


@pytest.fixture(scope="module")
def registry(tmp_path_factory, prefect_harness, clean_set_dir, badnets_cnn):
    """Registered models: GOOD (two BadNets versions, known trigger, test set), a model with a clean set too small
    to pass validation, one whose pickle runs code, and one of another flavor."""
    work = tmp_path_factory.mktemp("flows")
    # One process claims here, so a short settle delay is enough (test_concurrency.py races with the default 1 s).
    with registry_stack(work / "mlflow") as stack, patched_env({"GRADPRUNE_CLAIM_SETTLE_SECONDS": "0.2"}):
        bucket = f"s3://{stack.data_bucket}"
        push_clean_set(clean_set_dir, f"{bucket}/fashion")
        push_clean_set(lab.trusted_clean_set(work / "tiny", per_class=3), f"{bucket}/tiny")
        test = lab.test_data(500)
        write_clean_set(work / "test", (test.images.squeeze(1).numpy() * 255).round().astype("uint8"),
                        test.labels.numpy(), name="fashion-test-500", mean=FASHION_MEAN, std=FASHION_STD,
                        num_classes=10)
        push_clean_set(work / "test", f"{bucket}/test")
        (work / "badnets.json").write_text(json.dumps(lab.attack_trigger("badnets").spec()))
        push_object(work / "badnets.json", f"{bucket}/triggers/badnets.json")
        client = MlflowClient()
        for _ in range(2):
            register_source_model(badnets_cnn, GOOD, input_shape=SHAPE)
        set_model_inputs(client, GOOD, clean_data=f"{bucket}/fashion", trigger=f"{bucket}/triggers/badnets.json",
                         test_data=f"{bucket}/test")
        register_source_model(badnets_cnn, "tiny-data-cnn", input_shape=SHAPE)
        set_model_inputs(client, "tiny-data-cnn", clean_data=f"{bucket}/tiny")
        register_unsafe_version("unsafe-cnn", work, work / "pwned")
        set_model_inputs(client, "unsafe-cnn", clean_data=f"{bucket}/fashion")
        register_pyfunc_version("pyfunc-model")
        set_model_inputs(client, "pyfunc-model", clean_data=f"{bucket}/fashion")
        yield {"client": client, "bucket": bucket, "work": work}


@pytest.fixture(scope="module")
def first_scan(registry):
    return {(o["model"], o["version"]): o for o in scan_registry(config=CONFIG)}


def test_one_scan_handles_every_pending_version(first_scan, registry):
    client = registry["client"]
    statuses = {key: o["status"] for key, o in first_scan.items()}
    assert statuses == {(GOOD, "1"): "sanitized", (GOOD, "2"): "sanitized", ("tiny-data-cnn", "1"): "rejected",
                        ("unsafe-cnn", "1"): "unsafe", ("pyfunc-model", "1"): "unsupported"}
    new = {first_scan[(GOOD, v)]["sanitized_version"] for v in ("1", "2")}
    assert new == {"3", "4"}
    assert client.get_registered_model(GOOD).aliases == {T.ALIAS: "4"}
    for source in ("1", "2"):
        outcome = first_scan[(GOOD, source)]
        tags = client.get_model_version(GOOD, source).tags
        assert tags[T.STATUS] == T.SANITIZED and tags[T.RUN_ID] == outcome["run_id"]
        assert tags[T.SANITIZED_VERSION] == outcome["sanitized_version"]
        made = client.get_model_version(GOOD, outcome["sanitized_version"])
        # a known trigger: its measured ASR is the verification
        assert made.tags == {T.ROLE: T.ROLE_SANITIZED, T.SOURCE_VERSION: source, T.RUN_ID: outcome["run_id"],
                             T.MODEL_FORMAT: "pickle", T.VERIFICATION: "measured"}
        assert "| attack success rate |" in made.description and outcome["run_url"] in made.description
        assert outcome["after"]["attack_success_rate"] < 0.2 < outcome["before"]["attack_success_rate"]
        run = client.get_run(outcome["run_id"])
        assert run.info.status == "FINISHED" and run.data.params["model_version"] == source
        assert run.data.params["clean_data_manifest_sha256"] == ge_manifest_hash(registry)
        assert client.get_experiment(run.info.experiment_id).name == T.EXPERIMENT
        assert {"clean_accuracy/before", "clean_accuracy/after", "attack_success_rate/after",
                "sanitize_seconds", "pruned_fraction"} <= set(run.data.metrics)
        assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"fashion-mnist-trusted-100",
                                                                         "fashion-test-500"}
    assert not (registry["work"] / "pwned").exists()
    assert "posix.system" in client.get_model_version("unsafe-cnn", "1").tags[T.REASON] or \
        "os.system" in client.get_model_version("unsafe-cnn", "1").tags[T.REASON]


def ge_manifest_hash(registry) -> str:
    return load_data_uri(f"{registry['bucket']}/fashion").manifest_sha256


def test_bad_clean_data_is_rejected_with_nothing_registered(first_scan, registry):
    client = registry["client"]
    outcome = first_scan[("tiny-data-cnn", "1")]
    tags = client.get_model_version("tiny-data-cnn", "1").tags
    assert tags[T.STATUS] == T.REJECTED and "at least 10 images per class" in tags[T.REASON]
    assert [str(v.version) for v in client.search_model_versions("name='tiny-data-cnn'")] == ["1"]
    assert client.get_registered_model("tiny-data-cnn").aliases == {}
    run = client.get_run(outcome["run_id"])
    assert run.info.status == "FAILED"
    ge = json.loads(mlflow.artifacts.load_text(f"runs:/{outcome['run_id']}/validation/ge_result.json"))
    assert ge["success"] is False and any("at least 10 images per class" in f for f in ge["failed"])


def test_a_second_scan_changes_nothing(first_scan, registry):
    before = snapshot(registry["client"])
    assert scan_registry(config=CONFIG) == []
    assert snapshot(registry["client"]) == before


def test_a_sanitized_version_is_never_scanned_again(first_scan, registry):
    client = registry["client"]
    assert find_pending(client, GOOD) == []
    before = dict(client.get_model_version(GOOD, "4").tags)
    outcome = sanitize_model_version(GOOD, "4", CONFIG)
    assert outcome["status"] == "skipped"
    assert dict(client.get_model_version(GOOD, "4").tags) == before


def test_the_sanitized_model_reloads_and_scores_what_the_run_logged(first_scan, registry):
    client = registry["client"]
    version = client.get_model_version_by_alias(GOOD, T.ALIAS)
    run = client.get_run(version.tags[T.RUN_ID])
    model = mlflow.pytorch.load_model(f"models:/{GOOD}@{T.ALIAS}", map_location="cpu")
    test = load_data_uri(f"{registry['bucket']}/test")
    trigger = load_trigger_uri(f"{registry['bucket']}/triggers/badnets.json")
    scores = evaluate(Normalized(model.eval(), FASHION_MEAN, FASHION_STD), test.as_split(), trigger)
    one_image = 1.0 / len(test)
    for key in ("clean_accuracy", "attack_success_rate", "robust_accuracy"):
        assert scores[key] == pytest.approx(run.data.metrics[f"{key}/after"], abs=one_image)


def test_scan_of_one_model_leaves_the_others_alone(first_scan, registry, tmp_path):
    client = registry["client"]
    new_unsafe = register_unsafe_version("unsafe-cnn", tmp_path, tmp_path / "pwned")
    waiting = register_source_model(create_model("small_cnn"), "tiny-data-cnn", input_shape=SHAPE)
    outcomes = scan_registry(model="unsafe-cnn", config=CONFIG)
    assert [(o["model"], o["version"], o["status"]) for o in outcomes] == [("unsafe-cnn", new_unsafe, "unsafe")]
    assert [p.version for p in find_pending(client, "tiny-data-cnn")] == [waiting]


def test_cli_scan_prints_the_table(first_scan, registry, tmp_path):
    version = register_unsafe_version("unsafe-cnn", tmp_path, tmp_path / "pwned")
    result = CliRunner().invoke(app, ["scan", "--model", "unsafe-cnn", "--set", "finetune_epochs=3"])
    assert result.exit_code == 0, result.output
    assert "gradprune scan" in result.output and "unsafe" in result.output
    assert f"unsafe-cnn v{version} unsafe: model file data/model.pth imports" in " ".join(result.output.split())
    result = CliRunner().invoke(app, ["scan", "--model", "unsafe-cnn"])
    assert result.exit_code == 0 and "nothing pending" in result.output
    result = CliRunner().invoke(app, ["scan", "--set", "bogus=1"])
    assert result.exit_code == 2 and "unknown setting(s) ['bogus']" in result.output


def test_a_crash_marks_the_version_failed_and_the_scan_goes_on(first_scan, registry, tmp_path, monkeypatch):
    client = registry["client"]
    crashing = register_source_model(create_model("small_cnn"), "crashy", input_shape=SHAPE)
    unsafe = register_unsafe_version("crashy", tmp_path, tmp_path / "pwned")
    set_model_inputs(client, "crashy", clean_data=f"{registry['bucket']}/fashion")
    real = steps.load_source

    def crash_on_first(name, version):
        if version == crashing:
            raise RuntimeError("disk on fire")
        return real(name, version)

    monkeypatch.setattr(steps, "load_source", crash_on_first)
    result = CliRunner().invoke(app, ["scan", "--model", "crashy"])
    assert result.exit_code == 1
    assert "1 version(s) failed (crashy v1: RuntimeError: disk on fire" in " ".join(result.output.split())
    tags = client.get_model_version("crashy", crashing).tags
    assert tags[T.STATUS] == T.FAILED and tags[T.REASON].startswith("RuntimeError: disk on fire")
    assert T.LEASE_UNTIL not in tags
    assert client.get_model_version("crashy", unsafe).tags[T.STATUS] == T.UNSAFE
    assert client.get_run(tags[T.RUN_ID]).info.status == "FAILED"


def test_the_run_and_the_flow_run_carry_what_reviewers_read(first_scan, registry):
    from prefect.artifacts import Artifact

    from gradprune_flows.sanitize import artifact_key

    client = registry["client"]
    outcome = first_scan[(GOOD, "1")]
    table = before_after_table(outcome)
    note = client.get_run(outcome["run_id"]).data.tags["mlflow.note.content"]
    assert table in note and f"Registered as version {outcome['sanitized_version']}" in note
    assert "Great Expectations): passed" in note
    html = mlflow.artifacts.load_text(f"runs:/{outcome['run_id']}/report.html")
    assert "id='before-after'" in html and pct(outcome["after"]["attack_success_rate"]) in html
    # pruning curve, trigger, and filters per layer when a filter was pruned (model-dependent at the default budget)
    assert html.count("src='data:image/png;base64,") in (2, 3) and "src='http" not in html  # self-contained
    assert "Clean set validation (Great Expectations)" in html and "passed" in html
    plots = {a.path for a in client.list_artifacts(outcome["run_id"], "plots")}
    assert {"plots/pruning_curve.png", "plots/trigger_comparison.png"} <= plots
    # the filters-per-layer figure exists exactly when the report shows it (a filter was pruned)
    assert ("plots/pruned_by_layer.png" in plots) == (html.count("src='data:image/png;base64,") == 3)
    artifact = Artifact.get(artifact_key(GOOD, "1"))
    assert artifact.type == "markdown" and artifact.flow_run_id is not None
    assert table in artifact.data and outcome["run_url"] in artifact.data and ": sanitized" in artifact.data
    rejected = Artifact.get(artifact_key("tiny-data-cnn", "1"))
    assert ": rejected" in rejected.data and "at least 10 images per class" in rejected.data


def test_the_reconciler_dispatches_once_per_version_and_sanitizes_itself_when_the_key_is_spent(registry):
    """scan_registry(dispatch=...) as `gradprune serve` runs it: a flow run per version under the key NAME:VERSION,
    the same run on the next pass, and an in-process sanitization once that key's run has finished."""
    from prefect import get_client
    from prefect.states import Completed

    client = registry["client"]
    version = register_source_model(create_model("small_cnn"), "dispatched-cnn", input_shape=SHAPE)
    set_model_inputs(client, "dispatched-cnn", clean_data=f"{registry['bucket']}/tiny")
    sanitize_model_version.to_deployment("dispatch-target").apply()
    target = "sanitize-model-version/dispatch-target"
    first = scan_registry(model="dispatched-cnn", dispatch=target)
    again = scan_registry(model="dispatched-cnn", dispatch=target)
    assert [o["status"] for o in first + again] == ["dispatched", "dispatched"]
    assert first[0]["reason"] == again[0]["reason"]  # the same flow run: the key NAME:VERSION held
    run_id = first[0]["reason"].split("(")[1].rstrip(")")
    with get_client(sync_client=True) as prefect:
        run = prefect.read_flow_run(run_id)
        assert run.idempotency_key == f"dispatched-cnn:{version}" and run.parameters["version"] == version
        prefect.set_flow_run_state(run_id, Completed(), force=True)  # as if it had run and lost its claim
    [outcome] = scan_registry(model="dispatched-cnn", dispatch=target, config=CONFIG)
    assert (outcome["version"], outcome["status"]) == (version, "rejected")  # sanitized here: tiny clean set
    assert client.get_model_version("dispatched-cnn", version).tags[T.STATUS] == T.REJECTED
