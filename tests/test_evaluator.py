"""The MLflow evaluator plugin `gradprune`, selected by name through the installed entry point.

The package is installed (editable) by scripts/setup.sh, so `evaluators=["gradprune"]` resolves through the
`mlflow.model_evaluator` entry point exactly as it would for a user. Tracking goes to the test run's sqlite store
(tests/conftest.py).
"""

from __future__ import annotations

import json
import pickle

import mlflow
import pytest
import torch
from mlflow.models import infer_signature

from gradprune_mlflow import lab
from gradprune_mlflow.errors import BadInput
from gradprune_mlflow.evaluator import evaluation_frame

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> str:
    """This module's experiment id. Passed to every start_run rather than made the active experiment: a global
    active experiment would follow later test modules onto their own tracking servers, where it does not exist."""
    # The sqlite store's default artifact root is ./mlruns in the working directory: keep artifacts in tmp instead.
    artifacts = tmp_path_factory.mktemp("evaluator-artifacts")
    return mlflow.create_experiment("evaluator-tests", artifacts.as_uri())


@pytest.fixture(scope="module")
def logged_badnets(badnets_cnn, experiment):
    """The BadNets model logged with mlflow.pytorch (tensor signature [-1, 1, 28, 28]); returns its model URI."""
    example = torch.zeros(1, 1, 28, 28)
    with torch.no_grad():
        signature = infer_signature(example.numpy(), badnets_cnn.eval()(example).numpy())
    with mlflow.start_run(experiment_id=experiment, run_name="log-badnets"):
        info = mlflow.pytorch.log_model(badnets_cnn, name="model", signature=signature, pip_requirements=["torch"],
                                        serialization_format="pickle", pickle_module=pickle)
    return info.model_uri


@pytest.fixture(scope="module")
def frame(clean_set, badnets_cnn):
    """200 clean images (20 per class) as the evaluator takes them: one column of normalised pixel arrays, `label`,
    and the model's predicted class in `prediction` (for MLflow's default evaluator)."""
    data = evaluation_frame(clean_set, badnets_cnn)
    return data.groupby("label", group_keys=False).head(20).reset_index(drop=True)


@pytest.fixture(scope="module")
def badnets_trigger(tmp_path_factory):
    path = tmp_path_factory.mktemp("trigger") / "badnets.json"
    path.write_text(json.dumps(lab.attack_trigger("badnets").spec()))
    return str(path)


def _config(clean_set, **extra):
    # Synthesis is kept tiny: these tests check the wiring, tests/test_synthesis.py checks detection quality.
    return {"mean": list(clean_set.meta.mean), "std": list(clean_set.meta.std), "synth_steps": 20,
            "synth_restarts": 1, **extra}


def test_plugin_is_selected_by_name_and_leaves_the_model_unchanged(logged_badnets, frame, clean_set,
                                                                   badnets_trigger, experiment):
    pyfunc = mlflow.pyfunc.load_model(logged_badnets)
    weights = {k: v.clone() for k, v in pyfunc.get_raw_model().state_dict().items()}
    with mlflow.start_run(experiment_id=experiment, run_name="evaluate") as run:
        result = mlflow.models.evaluate(pyfunc, frame.drop(columns="prediction"), targets="label",
                                        model_type="classifier", evaluators=["gradprune"],
                                        evaluator_config={"gradprune": _config(clean_set,
                                                                               eval_trigger=badnets_trigger)})
    metrics = mlflow.get_run(run.info.run_id).data.metrics
    assert metrics["gradprune/clean_accuracy"] > 0.7
    assert metrics["gradprune/attack_success_rate"] > 0.8 > metrics["gradprune/robust_accuracy"]
    assert {"gradprune/anomaly_index", "gradprune/flagged", "gradprune/target_class"} <= set(metrics)
    assert result.metrics["gradprune/clean_accuracy"] == pytest.approx(metrics["gradprune/clean_accuracy"])
    detection = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/gradprune/detection.json")
    assert detection["target"] == int(metrics["gradprune/target_class"])
    assert set(detection["per_family"]) == {"patch", "blend"}
    after = pyfunc.get_raw_model().state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    assert all(p.requires_grad for p in pyfunc.get_raw_model().parameters())


def test_next_to_the_default_evaluator_on_a_predictions_column(logged_badnets, frame, clean_set, experiment):
    config = _config(clean_set, model_uri=logged_badnets, synthesize=False)
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.models.evaluate(data=frame, targets="label", predictions="prediction", model_type="classifier",
                               evaluators=["default", "gradprune"], evaluator_config={"gradprune": config})
    metrics = mlflow.get_run(run.info.run_id).data.metrics
    # The default (classifier) evaluator scored the predictions column; ours loaded the model and agrees with it.
    assert metrics["accuracy_score"] == pytest.approx(metrics["gradprune/clean_accuracy"], abs=1e-6)
    assert "confusion_matrix.png" in {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert not any(k.startswith("gradprune/") and k != "gradprune/clean_accuracy" for k in metrics)


@pytest.mark.parametrize(("config", "message"), [
    ({}, r"span \[-0\.8.*not \[0, 1\]; set evaluator_config mean/std"),
    ({"mean": [0.286], "std": [0.353], "bogus": 1}, r"unknown evaluator_config key\(s\) \['bogus'\]"),
    ({"mean": [0.286], "std": [0]}, "std values must be positive"),
    ({"mean": [0.286], "std": [0.353], "search_precision": "fp16"}, "search_precision must be one of auto, fp32, bf16"),
    ({"mean": [0.286], "std": [0.353], "decisive_score": -1}, "decisive_score must be a number >= 0"),
    ({"mean": [0.286], "std": [0.353], "suspect_threshold": 0.7}, "suspect_threshold and flag_threshold must satisfy"),
    ({"mean": [0.286], "std": [0.353], "synth_steps": 0}, "synth_steps must be a whole number of at least 1"),
    ({"mean": [0.286], "std": [0.353], "input_shape": [3, 28, 28]}, "each row must hold 2352 pixel values"),
])
def test_bad_config_says_what_to_fix(logged_badnets, frame, config, message, experiment):
    with mlflow.start_run(experiment_id=experiment), pytest.raises(BadInput, match=message):
        mlflow.models.evaluate(logged_badnets, frame.drop(columns="prediction"), targets="label",
                               model_type="classifier", evaluators=["gradprune"],
                               evaluator_config={"gradprune": config})
