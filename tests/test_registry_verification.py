"""A failed verification against a real `mlflow server`: the sanitized version is registered for review, the alias
`sanitized` stays where it was and the source ends `unverified`; a passed one moves the alias as before.
Results are built by hand (no sanitizing here)."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from services import registry_stack

from gradprune_mlflow.api import SanitizeResult
from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.models.zoo import create_model
from gradprune_mlflow.registry import job
from gradprune_mlflow.registry import log as runlog
from gradprune_mlflow.registry import tags as T
from gradprune_mlflow.registry.pending import set_model_inputs
from gradprune_mlflow.registry.register import log_sanitized_model, move_alias, register_sanitized
from gradprune_mlflow.registry.source import load_source, register_source_model
from gradprune_mlflow.report import review

SHAPE = (1, 28, 28)
NAME = "verify-model"
pytestmark = pytest.mark.slow  # a real `mlflow server` and moto S3 for the module

PASSED = {"verdict": "passed", "searched_on": "validation", "images": 50, "flagged": False, "class": 2,
          "anomaly_index": 1.2, "flagged_by": None, "family": "blend", "synthesized_trigger_success_rate": 0.93,
          "same_target": False}
FAILED = {**PASSED, "verdict": "failed", "flagged": True, "class": 3, "anomaly_index": 5.1,
          "flagged_by": "patch_probe", "family": "patch", "synthesized_trigger_success_rate": 0.408,
          "same_target": True}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with registry_stack(tmp_path_factory.mktemp("mlflow")):
        yield MlflowClient()


def _result(verification: dict) -> SanitizeResult:
    scores = {"clean_accuracy": 0.9, "synthesized_trigger_success_rate": 0.96, "clean_target_rate": 0.02}
    report = {"schema": 1, "mode": "fast", "trigger_source": "synthesized", "asr_measured_with": "synthesized",
              "detection": {"target": 3, "anomaly_index": 4.0, "flagged": True, "flagged_by": "patch_probe"},
              "before": scores, "after": {**scores, "synthesized_trigger_success_rate": 0.003},
              "verification": verification, "sanitized": True, "pruned_filters": 2, "total_filters": 48}
    return SanitizeResult(create_model("small_cnn"), report)


def _sanitize(client, version: str, verification: dict) -> tuple[str, str, job.Outcome]:
    """Claim, log, register and finish `version` with a hand-made result; returns (new version, run id, outcome)."""
    pending, held = job.claim(NAME, version)
    run_id = job.start(pending, held, SanitizeConfig())
    result = _result(verification)
    runlog.log_result(client, run_id, result)
    review.set_run_note(client, run_id, result.report, model=NAME, version=version)
    info = log_sanitized_model(run_id, result.model, load_source(NAME, version), SHAPE)
    new = register_sanitized(client, held, model_info=info, run_id=run_id, report=result.report,
                             run_link="http://ui/run")
    return new, run_id, job.succeed(pending, held, run_id, result, new)


def test_a_failed_verification_registers_for_review_without_the_alias(client):
    first, second = (register_source_model(create_model("small_cnn"), NAME, input_shape=SHAPE) for _ in range(2))
    set_model_inputs(client, NAME, clean_data="s3://x/y")

    bad, bad_run, outcome = _sanitize(client, first, FAILED)
    mv = client.get_model_version(NAME, bad)
    assert mv.tags[T.VERIFICATION] == "failed" and mv.tags[T.ROLE] == T.ROLE_SANITIZED
    assert mv.description.startswith("**Verification FAILED** — an independent search on 50 held-out images found")
    assert client.get_registered_model(NAME).aliases == {}  # no alias, not even the first
    source = client.get_model_version(NAME, first).tags
    assert outcome.status == source[T.STATUS] == T.UNVERIFIED and source[T.SANITIZED_VERSION] == bad
    assert source[T.REASON] == outcome.reason
    for part in ("class 3", "anomaly index 5.10", "success rate 40.8%", f"review version {bad} before promoting"):
        assert part in outcome.reason
    run = client.get_run(bad_run).data
    assert run.tags[T.VERIFICATION] == "failed"
    assert run.metrics["verification_anomaly_index"] == pytest.approx(5.1)
    assert run.metrics["verification_synthesized_trigger_success_rate"] == pytest.approx(0.408)
    note = run.tags[review.NOTE_TAG]
    assert note.startswith("**Verification FAILED**") and f"version {bad} without the alias `sanitized`" in note

    good, good_run, outcome = _sanitize(client, second, PASSED)
    assert outcome.status == T.SANITIZED and outcome.reason is None
    assert client.get_registered_model(NAME).aliases == {T.ALIAS: good}
    assert client.get_model_version(NAME, good).tags[T.VERIFICATION] == "passed"
    assert client.get_model_version(NAME, good).description.startswith("**Verification: passed** — an independent")
    assert client.get_run(good_run).data.tags[T.VERIFICATION] == "passed"


def test_a_source_left_with_a_failed_version_is_finished_unverified_not_sanitized(client):
    source, made = (register_source_model(create_model("small_cnn"), NAME, input_shape=SHAPE) for _ in range(2))
    alias = client.get_registered_model(NAME).aliases
    pending, held = job.claim(NAME, source)
    # What a worker leaves when it dies between registering a failed version and writing the final status.
    for key, value in {T.ROLE: T.ROLE_SANITIZED, T.SOURCE_VERSION: source, T.VERIFICATION: "failed"}.items():
        client.set_model_version_tag(NAME, made, key, value)
    outcome = job.adopt(pending, held)
    assert outcome.status == client.get_model_version(NAME, source).tags[T.STATUS] == T.UNVERIFIED
    assert f"review version {made}" in outcome.reason
    assert client.get_registered_model(NAME).aliases == alias
    # Recomputing the newest version for the alias passes over the newer, failed one.
    assert move_alias(client, NAME) == alias[T.ALIAS]


def test_a_suspect_model_ends_suspect_with_its_evidence_and_nothing_registered(client):
    source = register_source_model(create_model("small_cnn"), NAME, input_shape=SHAPE)
    before = client.get_registered_model(NAME).aliases
    count = len(client.search_model_versions(f"name='{NAME}'"))
    pending, held = job.claim(NAME, source)
    run_id = job.start(pending, held, SanitizeConfig())
    score = {"verdict": "suspect", "value": 0.42, "class": 6, "lead": "blend_anomaly", "threshold": 0.5,
             "suspect_threshold": 0.35, "contributions": {
                 "patch_probe": {"strength": 0.3, "vote": 0.06}, "noise_probe": {"strength": 0.5, "vote": 0.12},
                 "blend_anomaly": {"strength": 0.85, "vote": 0.35}}}
    report = {**_result(PASSED).report, "detection": {"target": 6, "anomaly_index": 1.8, "flagged": False,
                                                      "flagged_by": None, "score": score},
              "verification": {"verdict": "not run", "reason": "no model was written"}, "after": None,
              "sanitized": False}
    outcome = job.succeed(pending, held, run_id, SanitizeResult(None, report), None)
    tags = client.get_model_version(NAME, source).tags
    assert outcome.status == tags[T.STATUS] == T.SUSPECT and tags[T.REASON] == outcome.reason
    assert outcome.reason.startswith("suspect, not flagged: flag score 0.42 for class 6 (flagged at 0.50, suspect "
                                     "from 0.35): blend anomaly 0.85 of its threshold")
    assert "--set on_suspect=sanitize" in outcome.reason
    assert len(client.search_model_versions(f"name='{NAME}'")) == count and outcome.sanitized_version is None
    assert client.get_registered_model(NAME).aliases == before
