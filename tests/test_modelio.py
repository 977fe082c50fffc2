"""Model files: scanned before anything is unpickled, loaded, and saved as MLflow model folders.

The malicious files here are built with torch.save and are never loaded by the tests themselves: a canary file
that the payload would create shows whether anything ran.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import shutil
import tarfile

import mlflow
import mlflow.pytorch
import pytest
import torch
import yaml

from gradprune_mlflow.errors import BadInput, UnsafeModel, UnsupportedModel
from gradprune_mlflow.models.io import load_model, load_model_file, save_model, scan_model_file
from gradprune_mlflow.models.zoo import create_model


class RunsShell:
    """Unpickling this runs a shell command: the classic malicious model file."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class ImportsModule:
    """Unpickling this imports a module by name: picklescan calls it suspicious, we refuse it."""

    def __reduce__(self):
        return (importlib.import_module, ("os",))


def booby_trapped(canary) -> torch.nn.Module:
    """A real SmallCNN that carries a payload touching `canary` when unpickled."""
    model = create_model("small_cnn")
    model.payload = RunsShell(f"touch {canary}")
    return model


def probe():
    return torch.rand((8, 1, 28, 28), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["small_cnn", "small_cnn_nobn", "tiny_resnet"])
def test_zoo_models_pass_the_scan_and_load(tmp_path, arch):
    model = create_model(arch).eval()
    torch.save(model, tmp_path / "model.pt")
    scan_model_file(tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt")
    assert type(loaded) is type(model) and not loaded.training
    torch.testing.assert_close(loaded(probe()), model(probe()), rtol=0, atol=0)


def test_legacy_pickle_format_loads(tmp_path):
    model = create_model("small_cnn").eval()
    torch.save(model, tmp_path / "model.bin", _use_new_zipfile_serialization=False)
    torch.testing.assert_close(load_model_file(tmp_path / "model.bin")(probe()), model(probe()), rtol=0, atol=0)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_os_system_payload_is_refused_without_running(tmp_path, legacy):
    canary = tmp_path / "CANARY"
    path = tmp_path / "model.pt"
    torch.save(booby_trapped(canary), path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeModel, match=r"model file model.pt imports os\.system: refused without loading") as err:
        load_model(path)
    assert "\n" not in str(err.value)
    assert err.value.exit_code == 3
    assert not canary.exists()


@pytest.mark.parametrize("fmt", ["torch-zip", "pickle-0", "pickle-5", "pickle-then-zip"])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pickletools, reading the zip bytes as pickle opcodes
def test_payload_in_any_format_or_name_is_refused(tmp_path, fmt):
    canary = tmp_path / "CANARY"
    payload = {"model": RunsShell(f"touch {canary}")}
    path = tmp_path / "weights.txt"  # scanned as what torch.load will read, whatever the name says
    if fmt == "torch-zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=0 if fmt == "pickle-0" else 5))
    if fmt == "pickle-then-zip":  # a zip at the end fools zip detectors; torch.load still unpickles the front
        buf = io.BytesIO()
        torch.save(create_model("small_cnn"), buf)
        path.write_bytes(path.read_bytes() + buf.getvalue())
    with pytest.raises(UnsafeModel, match="os.system"):
        load_model_file(path)
    assert not canary.exists()


def test_import_gadget_is_refused(tmp_path):
    torch.save({"x": ImportsModule()}, tmp_path / "gadget.pt")
    with pytest.raises(UnsafeModel, match="importlib.import_module"):
        scan_model_file(tmp_path / "gadget.pt")


def test_tar_format_is_refused_unscanned(tmp_path):
    path = tmp_path / "old.pt"
    with tarfile.open(path, "w") as tar:
        data = b"anything"
        info = tarfile.TarInfo("pickle")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(UnsafeModel, match="legacy tar format"):
        load_model_file(path)


def test_state_dict_is_not_a_model(tmp_path):
    torch.save(create_model("small_cnn").state_dict(), tmp_path / "sd.pt")
    with pytest.raises(UnsupportedModel, match="holds a state_dict, not an nn.Module"):
        load_model_file(tmp_path / "sd.pt")


def test_junk_and_missing_files_are_bad_input(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"this is not a model")
    with pytest.raises(BadInput, match="not a readable torch.save file"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(BadInput, match="does not exist"):
        load_model(tmp_path / "missing.pt")


def test_save_model_round_trip_gives_identical_outputs(tmp_path, badnets_cnn):
    history = [{"layer": "features.0", "filter": 3, "step": 1, "score": 0.5}]
    out = save_model(badnets_cnn, tmp_path / "model", input_shape=(1, 28, 28), history=history)
    reloaded = mlflow.pytorch.load_model(str(out))
    assert isinstance(reloaded, torch.nn.Module)
    x = probe()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), badnets_cnn(x), rtol=0, atol=0)
    mlmodel = yaml.safe_load((out / "MLmodel").read_text())
    inputs = yaml.safe_load(mlmodel["signature"]["inputs"])
    assert inputs[0]["tensor-spec"] == {"dtype": "float32", "shape": [-1, 1, 28, 28]}
    assert yaml.safe_load(mlmodel["signature"]["outputs"])[0]["tensor-spec"]["shape"] == [-1, 10]
    assert (out / "pruning_history.json").read_text().count('"features.0"') == 1
    # Our own loader takes the folder too, and a second save replaces the first.
    save_model(create_model("small_cnn"), out, input_shape=(1, 28, 28))
    assert not (out / "pruning_history.json").exists()
    with torch.no_grad():
        assert not torch.equal(load_model(out)(x), badnets_cnn(x))


def test_save_model_refuses_to_overwrite_other_folders(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    with pytest.raises(BadInput, match="not an MLflow model folder"):
        save_model(create_model("small_cnn"), tmp_path / "stuff", input_shape=(1, 28, 28))
    assert (tmp_path / "stuff" / "notes.txt").read_text() == "mine"


@pytest.fixture
def mlflow_dir(tmp_path):
    return save_model(create_model("small_cnn"), tmp_path / "mlflow-model", input_shape=(1, 28, 28))


def test_mlflow_folder_with_a_poisoned_pickle_is_refused(tmp_path, mlflow_dir):
    canary = tmp_path / "CANARY"
    torch.save(booby_trapped(canary), mlflow_dir / "data" / "model.pth")
    with pytest.raises(UnsafeModel, match="os.system"):
        load_model(mlflow_dir)
    assert not canary.exists()


def test_mlflow_folder_with_code_is_refused(mlflow_dir):
    mlmodel = yaml.safe_load((mlflow_dir / "MLmodel").read_text())
    mlmodel["flavors"]["pytorch"]["code"] = "code"
    (mlflow_dir / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with pytest.raises(UnsafeModel, match="carries Python code"):
        load_model(mlflow_dir)


def test_mlflow_folder_naming_another_pickle_module_is_refused(mlflow_dir):
    (mlflow_dir / "data" / "pickle_module_info.txt").write_text("dill")
    with pytest.raises(UnsafeModel, match="'dill'"):
        load_model(mlflow_dir)


def test_mlflow_folder_of_another_flavor_is_bad_input(mlflow_dir):
    mlmodel = yaml.safe_load((mlflow_dir / "MLmodel").read_text())
    del mlmodel["flavors"]["pytorch"]
    (mlflow_dir / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    with pytest.raises(BadInput, match="not a pytorch model"):
        load_model(mlflow_dir)


@pytest.mark.slow
def test_registry_uris_are_downloaded_scanned_and_loaded(tmp_path):
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        exp = mlflow.create_experiment("modelio", artifact_location=(tmp_path / "artifacts").as_uri())
        model = create_model("small_cnn").eval()
        with mlflow.start_run(experiment_id=exp):
            mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                     registered_model_name="cnn")
        client = mlflow.MlflowClient()
        client.set_registered_model_alias("cnn", "candidate", "1")
        x = probe()
        for uri in ("models:/cnn/1", "models:/cnn@candidate"):
            with torch.no_grad():
                torch.testing.assert_close(load_model(uri)(x), model(x), rtol=0, atol=0)
        with pytest.raises(BadInput, match="cannot fetch model models:/cnn/7"):
            load_model("models:/cnn/7")
        with pytest.raises(BadInput, match="cannot fetch model models:/nosuch/1"):
            load_model("models:/nosuch/1")
        # A poisoned artifact in the registry is refused after download, before unpickling.
        canary = tmp_path / "CANARY"
        version_dir = mlflow.artifacts.download_artifacts("models:/cnn/1", dst_path=str(tmp_path / "dl"))
        torch.save(booby_trapped(canary), os.path.join(version_dir, "data", "model.pth"))
        with mlflow.start_run(experiment_id=exp) as run:
            mlflow.log_artifacts(version_dir, "model")
        with pytest.raises(UnsafeModel, match="os.system"):
            load_model(f"runs:/{run.info.run_id}/model")
        assert not canary.exists()
    finally:
        mlflow.set_tracking_uri(previous)
        shutil.rmtree(tmp_path / "dl", ignore_errors=True)
