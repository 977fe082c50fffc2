"""Every saved format through the registry: registered with plain `mlflow` the way its documentation says, scanned
with the real flow (a real `mlflow server`, moto S3, Prefect's test harness), sanitized, and registered again in the
format it came in. Unsafe archives of each new format end `unsafe` with nothing of theirs run.
"""

from __future__ import annotations

import copy
import json
import pickle

import mlflow
import mlflow.pytorch
import pytest
import torch
from mlflow import MlflowClient
from services import patched_env, registry_stack
from test_formats import RunsShell, _evil_pt2, rewrite, script_file, script_folder

from gradprune_flows.scan import scan_registry
from gradprune_mlflow import lab
from gradprune_mlflow.data.reference import FASHION_MEAN, FASHION_STD
from gradprune_mlflow.data.s3 import push_clean_set, push_object
from gradprune_mlflow.evaluator import evaluation_frame
from gradprune_mlflow.registry import tags as T
from gradprune_mlflow.registry.pending import set_model_inputs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
CONFIG = {"finetune_epochs": 3}
SHAPE = (1, 28, 28)
# registered model -> the format it is logged in, and the type plain mlflow.pytorch.load_model gives back
FORMATS = {"fmt-pt2": "pt2", "fmt-pickle": "pickle", "fmt-torchscript": "torchscript"}


def _log(model: torch.nn.Module, name: str, fmt: str) -> None:
    example = torch.rand(1, *SHAPE).numpy()
    with mlflow.start_run(run_name=name):
        if fmt == "pt2":  # MLflow's default outside Databricks
            mlflow.pytorch.log_model(model, name="model", input_example=example, registered_model_name=name)
        elif fmt == "pickle":
            mlflow.pytorch.log_model(model, name="model", input_example=example, serialization_format="pickle",
                                     registered_model_name=name)
        else:
            mlflow.pytorch.log_model(torch.jit.script(model), name="model", input_example=example,
                                     serialization_format="pickle", registered_model_name=name)


def _log_folder(folder, name: str) -> None:
    with mlflow.start_run(run_name=name) as run:
        mlflow.log_artifacts(str(folder), "model")
    mlflow.register_model(f"runs:/{run.info.run_id}/model", name)


@pytest.fixture(scope="module")
def scanned(tmp_path_factory, prefect_harness, clean_set_dir, badnets_cnn):
    work = tmp_path_factory.mktemp("formats-registry")
    with registry_stack(work / "mlflow") as stack, patched_env({"GRADPRUNE_CLAIM_SETTLE_SECONDS": "0.2"}):
        bucket = f"s3://{stack.data_bucket}"
        push_clean_set(clean_set_dir, f"{bucket}/fashion")
        (work / "badnets.json").write_text(json.dumps(lab.attack_trigger("badnets").spec()))
        push_object(work / "badnets.json", f"{bucket}/triggers/badnets.json")
        client = MlflowClient()
        for name, fmt in FORMATS.items():
            _log(badnets_cnn.eval(), name, fmt)
            set_model_inputs(client, name, clean_data=f"{bucket}/fashion", trigger=f"{bucket}/triggers/badnets.json")
        canary = work / "CANARY"
        _log_folder(_evil_pt2(work / "evil-pt2", canary, "custom-object"), "unsafe-pt2")
        folder = script_folder(work / "evil-ts", badnets_cnn)
        evil = rewrite(script_file(work / "ts.pt", badnets_cnn),
                       {"data.pkl": pickle.dumps(RunsShell(f"touch {canary}"), protocol=2)}, work / "evil.pt")
        rewrite(evil, {}, folder / "data" / "model.pth")
        _log_folder(folder, "unsafe-torchscript")
        for name in ("unsafe-pt2", "unsafe-torchscript"):
            set_model_inputs(client, name, clean_data=f"{bucket}/fashion")
        outcomes = {o["model"]: o for o in scan_registry(config=CONFIG)}
        yield {"client": client, "outcomes": outcomes, "canary": canary, "trigger": str(work / "badnets.json")}


def _predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits one image at a time: a pt2 program logged from a one-image example takes batches of one."""
    with torch.no_grad():
        return torch.cat([model(x[i : i + 1]) for i in range(len(x))])


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_comes_back_sanitized_in_its_own_format(scanned, name, badnets_cnn):
    client, fmt = scanned["client"], FORMATS[name]
    outcome = scanned["outcomes"][name]
    assert outcome["status"] == T.SANITIZED, outcome
    source = client.get_model_version(name, "1")
    made = client.get_model_version_by_alias(name, T.ALIAS)
    assert source.tags[T.MODEL_FORMAT] == made.tags[T.MODEL_FORMAT] == fmt
    assert client.get_run(made.tags[T.RUN_ID]).data.params["model_format"] == fmt
    loaded = mlflow.pytorch.load_model(f"models:/{name}@{T.ALIAS}", map_location="cpu")
    if fmt == "pt2":
        assert isinstance(loaded, torch.fx.GraphModule)
    elif fmt == "torchscript":
        assert isinstance(loaded, torch.jit.ScriptModule)
    else:
        assert type(loaded) is type(badnets_cnn)
    # Its predictions are those of the sanitized weights (put into the eager architecture).
    eager = copy.deepcopy(badnets_cnn).eval()
    eager.load_state_dict(loaded.state_dict())
    test = lab.test_data(300)
    mean, std = FASHION_MEAN[0], FASHION_STD[0]
    trigger = lab.attack_trigger("badnets")
    keep = test.labels != trigger.target
    triggered = (trigger.apply(test.images[keep]) - mean) / std
    got = _predict(loaded, triggered)
    torch.testing.assert_close(got, _predict(eager, triggered), rtol=1e-4, atol=1e-4)
    before = _predict(badnets_cnn.eval(), triggered).argmax(1).eq(trigger.target).float().mean()
    after = got.argmax(1).eq(trigger.target).float().mean()
    assert before > 0.8 and after < 0.2, (float(before), float(after))


def test_unsafe_archives_of_each_format_end_unsafe_and_run_nothing(scanned):
    for name in ("unsafe-pt2", "unsafe-torchscript"):
        outcome = scanned["outcomes"][name]
        assert outcome["status"] == T.UNSAFE and "os.system" in outcome["reason"], outcome
        assert scanned["client"].get_model_version(name, "1").tags[T.STATUS] == T.UNSAFE
    assert not scanned["canary"].exists()


@pytest.mark.parametrize("name", ["fmt-pt2", "fmt-torchscript"])
def test_the_evaluator_measures_pt2_and_torchscript_versions(scanned, name, clean_set, badnets_cnn):
    frame = evaluation_frame(clean_set, badnets_cnn).groupby("label", group_keys=False).head(10)
    config = {"mean": list(clean_set.meta.mean), "std": list(clean_set.meta.std), "synthesize": False,
              "eval_trigger": scanned["trigger"]}
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/1")
    with mlflow.start_run(run_name=f"evaluate-{name}") as run:
        # By URI (our loader, an adapter) and as MLflow's own loaded model (a GraphModule or ScriptModule).
        mlflow.models.evaluate(data=frame, targets="label", predictions="prediction", model_type="classifier",
                               evaluators=["gradprune"], evaluator_config={"gradprune": {
                                   **config, "model_uri": f"models:/{name}/1"}})
        by_uri = mlflow.get_run(run.info.run_id).data.metrics
    with mlflow.start_run(run_name=f"evaluate-raw-{name}") as run:
        # with a short trigger search too: synthesis freezes the copy's weights, which must be leaf tensors
        mlflow.models.evaluate(pyfunc, frame.drop(columns="prediction"), targets="label", model_type="classifier",
                               evaluators=["gradprune"], evaluator_config={"gradprune": {
                                   **config, "synthesize": True, "synth_steps": 3, "synth_restarts": 1}})
        raw = mlflow.get_run(run.info.run_id).data.metrics
    assert by_uri["gradprune/attack_success_rate"] > 0.8
    for key in ("gradprune/clean_accuracy", "gradprune/attack_success_rate"):
        assert raw[key] == pytest.approx(by_uri[key], abs=1e-6)
