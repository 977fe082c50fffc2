"""gradprune_mlflow.registry against a real `mlflow server` (sqlite) whose artifacts live on a real S3 API (moto).

Pending versions, the claim and its race, loading with the scan, run logging, registration and its rollback.
No Prefect here (tests/test_flows.py runs the flows) and no sanitizing: results are built by hand.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from registry_helpers import register_pyfunc_version, register_unsafe_version
from services import registry_stack

from gradprune_mlflow import lab
from gradprune_mlflow.api import SanitizeResult
from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.data.cleanset import load_clean_set
from gradprune_mlflow.data.s3 import push_object
from gradprune_mlflow.defense.triggers import MaskTrigger, PatchTrigger
from gradprune_mlflow.defense.warp import FlowTrigger
from gradprune_mlflow.errors import BadInput, TriggerError, UnsafeModel, UnsupportedModel
from gradprune_mlflow.models.zoo import create_model
from gradprune_mlflow.registry import claim as claims
from gradprune_mlflow.registry import job
from gradprune_mlflow.registry import log as runlog
from gradprune_mlflow.registry import tags as T
from gradprune_mlflow.registry.inputs import load_trigger_uri
from gradprune_mlflow.registry.pending import find_pending, set_model_inputs
from gradprune_mlflow.registry.register import ClaimLost, log_sanitized_model, move_alias, register_sanitized
from gradprune_mlflow.registry.source import load_source, register_source_model
from gradprune_mlflow.report import review
from gradprune_mlflow.report.summary import before_after_table

SHAPE = (1, 28, 28)
pytestmark = pytest.mark.slow  # a real `mlflow server` and moto S3 for the module


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with registry_stack(tmp_path_factory.mktemp("mlflow")) as services:
        yield services


@pytest.fixture
def client(stack):
    return MlflowClient()


def _register(name: str, count: int = 1) -> list[str]:
    return [register_source_model(create_model("small_cnn"), name, input_shape=SHAPE) for _ in range(count)]


def _tags(client, name, version):
    return dict(client.get_model_version(name, version).tags)


def test_pending_needs_a_clean_set_and_skips_touched_versions(client, monkeypatch):
    v1, v2, v3, v4 = _register("pending-model", 4)
    monkeypatch.delenv(T.CLEAN_DATA_ENV, raising=False)
    assert find_pending(client, "pending-model") == []
    monkeypatch.setenv(T.CLEAN_DATA_ENV, "s3://default/set")
    assert [p.clean_data for p in find_pending(client, "pending-model")] == ["s3://default/set"] * 4
    set_model_inputs(client, "pending-model", clean_data="s3://own/set", eval_trigger="s3://own/t.json")
    client.set_model_version_tag("pending-model", v1, T.STATUS, T.SANITIZED)
    client.set_model_version_tag("pending-model", v2, T.ROLE, T.ROLE_SANITIZED)
    client.set_model_version_tag("pending-model", v3, T.STATUS, T.RUNNING)
    client.set_model_version_tag("pending-model", v3, T.LEASE_UNTIL, str(time.time() + 3600))
    found = find_pending(client, "pending-model")
    assert [(p.version, p.clean_data, p.eval_trigger, p.trigger) for p in found] == [
        (v4, "s3://own/set", "s3://own/t.json", None)]
    # A running version whose worker died (lease in the past) is taken up again.
    client.set_model_version_tag("pending-model", v3, T.LEASE_UNTIL, str(time.time() - 1))
    assert [p.version for p in find_pending(client, "pending-model")] == [v3, v4]
    assert "pending-model" in {p.name for p in find_pending(client)}
    with pytest.raises(BadInput, match="no registered model named 'missing'"):
        find_pending(client, "missing")


def test_claim_marks_running_and_finish_writes_the_final_status(client):
    (version,) = _register("claim-model")
    set_model_inputs(client, "claim-model", clean_data="s3://x/y")
    held = claims.claim_version(client, "claim-model", version, settle_seconds=0)
    assert held is not None and claims.holds(client, held)
    tags = _tags(client, "claim-model", version)
    assert tags[T.STATUS] == T.RUNNING and tags[T.CLAIM_ID] == held.claim_id
    assert float(tags[T.LEASE_UNTIL]) == pytest.approx(held.lease_until, abs=0.01)
    assert claims.claim_version(client, "claim-model", version, settle_seconds=0) is None
    claims.finish(client, held, T.REJECTED, "bad\ndata", run_id="r1")
    tags = _tags(client, "claim-model", version)
    assert (tags[T.STATUS], tags[T.REASON], tags[T.RUN_ID]) == (T.REJECTED, "bad data", "r1")
    assert T.LEASE_UNTIL not in tags and not claims.holds(client, held)


def test_concurrent_claims_have_exactly_one_winner(client):
    versions = _register("race-model", 3)
    set_model_inputs(client, "race-model", clean_data="s3://x/y")
    for version in versions:  # a few rounds: the race inside the server does not lose every time
        barrier, results, errors = threading.Barrier(4), [], []

        def contend(version=version, barrier=barrier, results=results, errors=errors):
            barrier.wait()
            try:
                results.append(claims.claim_version(MlflowClient(), "race-model", version, settle_seconds=1.0))
            except Exception as exc:  # reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=contend) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [r for r in results if r is not None]
        assert errors == [] and len(results) == 4 and len(winners) == 1
        assert _tags(client, "race-model", version)[T.CLAIM_ID] == winners[0].claim_id


def _result(model, *, asr_after=0.02) -> SanitizeResult:
    report = {"schema": 1, "mode": "fast", "device": "cpu", "seconds": 1.5, "trigger_source": "synthesized",
              "asr_measured_with": "eval", "detection": {"target": 0, "anomaly_index": 3.5, "flagged": True},
              "before": {"clean_accuracy": 0.9, "attack_success_rate": 0.97, "robust_accuracy": 0.03,
                         "clean_target_rate": 0.02},
              "after": {"clean_accuracy": 0.88, "attack_success_rate": asr_after, "robust_accuracy": 0.85,
                        "clean_target_rate": 0.015},
              "pruned_filters": 6, "total_filters": 48, "gradient_passes": 9, "evaluated_on": "test",
              "pruned_by_layer": {"features.0": 4, "features.3": 2}}
    curve = [{"step": i, "pruned": 2 * i, "val_clean_accuracy": 0.9 - 0.01 * i, "val_unlearning_loss": 3.0 - i}
             for i in range(4)]
    history = [{"layer": "features.0", "filter": f, "step": f // 2, "score": 1.0 / (f + 1)} for f in range(6)]
    mask = torch.zeros(1, 28, 28)
    mask[:, -3:, -3:] = 1
    warp = FlowTrigger(0, torch.full((2, 4, 4), 0.5))
    return SanitizeResult(model, report, history, curve, [MaskTrigger(0, mask, torch.ones(1, 28, 28)), warp])


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return load_clean_set(lab.trusted_clean_set(tmp_path_factory.mktemp("set"), per_class=3))


def test_a_run_logs_metrics_curve_artifacts_and_inputs(client, small_set):
    (version,) = _register("log-model")
    set_model_inputs(client, "log-model", clean_data="s3://clean-data/set")
    pending, held = job.claim("log-model", version)
    run_id = job.start(pending, held, SanitizeConfig())
    runlog.log_validation(client, run_id, {"success": True, "statistics": {"unsuccessful_expectations": 0},
                                           "data": {"rows": 30}})
    runlog.log_clean_set_input(client, run_id, small_set, "s3://clean-data/set")
    metrics = runlog.log_result(client, run_id, _result(create_model("small_cnn")), small_set)
    run = client.get_run(run_id)
    expected = {"clean_accuracy/before": 0.9, "clean_accuracy/after": 0.88, "attack_success_rate/before": 0.97,
                "attack_success_rate/after": 0.02, "robust_accuracy/before": 0.03, "robust_accuracy/after": 0.85,
                "clean_target_rate/before": 0.02, "clean_target_rate/after": 0.015,
                "anomaly_index": 3.5, "pruned_filters": 6, "pruned_fraction": 0.125, "sanitize_seconds": 1.5}
    assert metrics == pytest.approx(expected)
    assert {k: run.data.metrics[k] for k in expected} == pytest.approx(expected)
    curve = client.get_metric_history(run_id, "curve/val_unlearning_loss")
    assert sorted((m.step, m.value) for m in curve) == [(0, 3.0), (1, 2.0), (2, 1.0), (3, 0.0)]
    assert run.data.params["model_version"] == version and run.data.params["config.mode"] == "fast"
    assert run.data.params["clean_data"] == "s3://clean-data/set"
    files = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for d in ("plots", "triggers", "validation") for a in client.list_artifacts(run_id, d)}
    assert {"report.json", "pruning_history.json", "validation/ge_result.json", "plots/pruning_curve.png",
            "plots/synthesized_triggers.png", "triggers/class0-0.json", "triggers/class0-0_mask.png",
            "triggers/class0-1.json"} <= files
    report = json.loads(Path(client.download_artifacts(run_id, "report.json")).read_text())
    assert report["after"]["attack_success_rate"] == 0.02
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == small_set.meta.name
    assert json.loads(dataset.dataset.source)["uri"] == "s3://clean-data/set"


def test_the_review_shows_the_synthesized_trigger_beside_the_real_one(client, small_set):
    (version,) = _register("review-model")
    set_model_inputs(client, "review-model", clean_data="s3://clean-data/set")
    pending, held = job.claim("review-model", version)
    run_id = job.start(pending, held, SanitizeConfig())
    ge = {"success": True, "suite": "clean-set", "statistics": {"evaluated_expectations": 2,
                                                                "successful_expectations": 2,
                                                                "unsuccessful_expectations": 0},
          "data": {"rows": 30, "source": "s3://clean-data/set"}, "failed": [],
          "expectations": [{"check": "labels in range", "column": "label", "success": True},
                           {"check": "unique hashes", "column": "sha256", "success": True}]}
    runlog.log_validation(client, run_id, ge)
    result = _result(create_model("small_cnn"))
    logged = review.log_review(client, run_id, result, model="review-model", version=version, clean_set=small_set,
                               real_trigger=PatchTrigger(0, size=3), validation=ge)
    assert logged == ["plots/pruned_by_layer.png", "plots/trigger_comparison.png", "report.html"]
    html = Path(client.download_artifacts(run_id, "report.html")).read_text()
    assert "<td class='num'>97.0%</td><td class='num'>2.0%</td>" in html  # attack success rate before, after
    assert html.count("src='data:image/png;base64,") == 3 and "Synthesized trigger beside the real one" in html
    assert html.count("<td class='ok'>yes</td>") == 2 and "2 of 2 expectations met on s3://clean-data/set" in html
    # Two rows in the comparison (one synthesized restart, the real trigger): the figure is two panels high.
    comparison = Image.open(client.download_artifacts(run_id, "plots/trigger_comparison.png"))
    assert comparison.size[1] >= 2 * 200
    note = client.get_run(run_id).data.tags[review.NOTE_TAG]
    assert before_after_table(result.report) in note and "class 0 flagged, anomaly index 3.50" in note
    assert "(Great Expectations): passed" in note and "Registered as" not in note
    note = review.set_run_note(client, run_id, result.report, model="review-model", version=version,
                               sanitized_version="7")
    assert "Registered as version 7 with the alias `sanitized`." in client.get_run(run_id).data.tags[review.NOTE_TAG]


def test_register_creates_a_tagged_version_and_moves_the_alias(client):
    (version,) = _register("reg-model")
    set_model_inputs(client, "reg-model", clean_data="s3://x/y")
    pending, held = job.claim("reg-model", version)
    run_id = job.start(pending, held, SanitizeConfig())
    source = load_source("reg-model", version)
    info = log_sanitized_model(run_id, create_model("small_cnn"), source, SHAPE)
    new = register_sanitized(client, held, model_info=info, run_id=run_id, report=_result(None).report,
                             run_link="http://ui/run")
    mv = client.get_model_version("reg-model", new)
    assert mv.tags == {T.ROLE: T.ROLE_SANITIZED, T.SOURCE_VERSION: version, T.RUN_ID: run_id}
    assert "| attack success rate | 97.0% | 2.0% |" in mv.description and "http://ui/run" in mv.description
    assert client.get_registered_model("reg-model").aliases == {T.ALIAS: new}
    assert str(client.get_model_version_by_alias("reg-model", T.ALIAS).version) == new
    # The source's signature travels with it.
    assert source.signature is not None
    assert mlflow_signature("reg-model", new) == source.signature.to_dict()


def mlflow_signature(name, version):
    from mlflow.models import get_model_info

    return get_model_info(f"models:/{name}/{version}").signature.to_dict()


def test_a_lost_claim_registers_nothing_and_moves_no_alias(client):
    v1, v2 = _register("lost-model", 2)
    set_model_inputs(client, "lost-model", clean_data="s3://x/y")
    client.set_model_version_tag("lost-model", v2, T.ROLE, T.ROLE_SANITIZED)
    assert move_alias(client, "lost-model") == v2
    pending, held = job.claim("lost-model", v1)
    run_id = job.start(pending, held, SanitizeConfig())
    info = log_sanitized_model(run_id, create_model("small_cnn"), load_source("lost-model", v1), SHAPE)
    client.set_model_version_tag("lost-model", v1, T.CLAIM_ID, "someone-else")  # another worker took over
    with pytest.raises(ClaimLost):
        register_sanitized(client, held, model_info=info, run_id=run_id, report={}, run_link="x")
    versions = {str(v.version) for v in client.search_model_versions("name='lost-model'")}
    assert versions == {v1, v2}  # the half-registered version was deleted
    assert client.get_registered_model("lost-model").aliases == {T.ALIAS: v2}
    outcome = job.fail(pending, held, run_id, ClaimLost("lost"))
    assert outcome.status == "lost" and _tags(client, "lost-model", v1)[T.CLAIM_ID] == "someone-else"
    assert client.get_run(run_id).info.status == "FAILED"


def test_unsafe_and_foreign_models_are_refused_before_unpickling(client, tmp_path):
    marker = tmp_path / "pwned"
    unsafe = register_unsafe_version("unsafe-model", tmp_path, marker)
    with pytest.raises(UnsafeModel, match="posix.system|os.system"):
        load_source("unsafe-model", unsafe)
    assert not marker.exists()
    foreign = register_pyfunc_version("pyfunc-model")
    with pytest.raises(UnsupportedModel, match="mlflow.pytorch models only"):
        load_source("pyfunc-model", foreign)


def test_fail_maps_errors_to_statuses_and_retry_failed_resets(client):
    versions = _register("fail-model", 3)
    set_model_inputs(client, "fail-model", clean_data="s3://x/y")
    errors = [UnsafeModel("evil pickle"), UnsupportedModel("no conv"), RuntimeError("boom")]
    for version, exc in zip(versions, errors, strict=True):
        pending, held = job.claim("fail-model", version)
        outcome = job.fail(pending, held, None, exc)
        assert _tags(client, "fail-model", version)[T.STATUS] == outcome.status
    statuses = [_tags(client, "fail-model", v)[T.STATUS] for v in versions]
    assert statuses == [T.UNSAFE, T.UNSUPPORTED, T.FAILED]
    assert "RuntimeError: boom; retry" in _tags(client, "fail-model", versions[2])[T.REASON]
    assert job.retry_failed(client, "fail-model") == [f"fail-model/{versions[2]}"]
    assert [p.version for p in find_pending(client, "fail-model")] == [versions[2]]


def test_triggers_load_from_s3_with_their_images(stack, tmp_path):
    mask = Image.new("L", (28, 28), 0)
    mask.paste(255, (25, 25, 28, 28))
    mask.save(tmp_path / "m.png")
    Image.new("L", (28, 28), 255).save(tmp_path / "p.png")
    (tmp_path / "t.json").write_text(json.dumps({"kind": "mask", "target": 0, "mask": "m.png", "pattern": "p.png"}))
    for name in ("t.json", "m.png", "p.png"):
        push_object(tmp_path / name, f"s3://{stack.data_bucket}/triggers/mask/{name}")
    trigger = load_trigger_uri(f"s3://{stack.data_bucket}/triggers/mask/t.json", tmp_path / "cache" / "sets")
    x = torch.zeros(2, *SHAPE)
    assert torch.equal(trigger.apply(x), PatchTrigger(0, size=3).apply(x))
    push_object(tmp_path / "t.json", f"s3://{stack.data_bucket}/triggers/lonely/t.json")
    with pytest.raises(TriggerError, match="lonely/m.png does not exist"):
        load_trigger_uri(f"s3://{stack.data_bucket}/triggers/lonely/t.json", tmp_path / "cache" / "sets")


def test_the_library_imports_no_prefect():
    code = ("import sys, gradprune_mlflow.registry.job, gradprune_mlflow.local_services, "
            "gradprune_mlflow.data.pack, gradprune_mlflow.cli, gradprune_mlflow.webhooks; "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('prefect', 'gradprune_flows')], "
            "'prefect imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _wait_for(condition, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_the_lease_is_renewed_while_held_and_renewal_stops_once_lost(client):
    (version,) = _register("lease-model")
    set_model_inputs(client, "lease-model", clean_data="s3://x/y")
    held = claims.claim_version(client, "lease-model", version, lease_seconds=60, settle_seconds=0)
    first = float(_tags(client, "lease-model", version)[T.LEASE_UNTIL])
    with claims.LeaseKeeper(client, held, every=0.2) as keeper:
        _wait_for(lambda: keeper.renewals >= 2)
        assert float(_tags(client, "lease-model", version)[T.LEASE_UNTIL]) > first
        client.set_model_version_tag("lease-model", version, T.CLAIM_ID, "someone-else")
        _wait_for(lambda: not keeper._thread.is_alive())
        renewals = keeper.renewals
    assert keeper.renewals == renewals and not claims.holds(client, held)


def test_a_source_whose_sanitized_version_exists_is_finished_from_it_not_sanitized_again(client):
    source, made = _register("adopt-model", 2)
    set_model_inputs(client, "adopt-model", clean_data="s3://x/y")
    pending, held = job.claim("adopt-model", source)
    run_id = job.start(pending, held, SanitizeConfig())
    # What a worker leaves when it dies between registering and writing the final status.
    for key, value in {T.ROLE: T.ROLE_SANITIZED, T.SOURCE_VERSION: source, T.RUN_ID: run_id}.items():
        client.set_model_version_tag("adopt-model", made, key, value)
    client.set_model_version_tag("adopt-model", source, T.LEASE_UNTIL, str(time.time() - 1))  # it expired
    pending, held = job.claim("adopt-model", source)
    outcome = job.adopt(pending, held)
    assert (outcome.status, outcome.sanitized_version, outcome.run_id) == (T.SANITIZED, made, run_id)
    tags = _tags(client, "adopt-model", source)
    assert (tags[T.STATUS], tags[T.SANITIZED_VERSION], tags[T.RUN_ID]) == (T.SANITIZED, made, run_id)
    assert client.get_registered_model("adopt-model").aliases == {T.ALIAS: made}
    assert job.adopt(pending, held) is not None  # idempotent: finishing again changes nothing
    assert _tags(client, "adopt-model", source) == tags


def test_a_rate_measured_with_a_synthesized_trigger_is_never_shown_as_the_attack_success_rate():
    synth = {"clean_accuracy": 0.9, "synthesized_trigger_success_rate": 0.96,
             "synthesized_trigger_robust_accuracy": 0.03, "clean_target_rate": 0.02}
    report = {"before": synth, "after": {**synth, "synthesized_trigger_success_rate": 0.003},
              "asr_measured_with": "synthesized"}
    table = before_after_table(report)
    assert "| attack success rate | - | - |" in table
    assert "| synthesized-trigger success rate (not the attack's) | 96.0% | 0.3% |" in table
    metrics = runlog.report_metrics(report)
    assert metrics["synthesized_trigger_success_rate/after"] == pytest.approx(0.003)
    assert not any(k.startswith(("attack_success_rate", "robust_accuracy")) for k in metrics)
    # a real trigger's table has no synthesized rows
    assert "synthesized" not in before_after_table({"before": {"attack_success_rate": 0.9}, "after": None})
