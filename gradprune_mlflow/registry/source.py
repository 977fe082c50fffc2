"""Loading a registered version: download it once, scan every pickle in it, then unpickle (models/io.py)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from gradprune_mlflow.errors import BadInput, DataError, GradpruneError, UnsafeModel, UnsupportedModel


@dataclass
class SourceModel:
    """A loaded source version: the module, its MLflow signature (or None) and its pip requirements."""

    model: nn.Module
    signature: object | None = None
    requirements: list[str] = field(default_factory=list)


def load_source(name: str, version: str) -> SourceModel:
    """Download `models:/name/version`, refuse it unless it is a safe pytorch-flavor model, and load it.

    Returns a SourceModel. Raises UnsafeModel (refused before unpickling), UnsupportedModel (not a pytorch model,
    or not a loadable nn.Module), and GradpruneError when the registry cannot be reached.
    """
    from mlflow.models import Model

    from gradprune_mlflow.models.io import load_mlflow_dir

    uri = f"models:/{name}/{version}"
    with tempfile.TemporaryDirectory(prefix="gradprune-source-") as tmp:
        local = _download(uri, tmp)
        mlmodel = local / "MLmodel"
        if not mlmodel.is_file():
            raise UnsupportedModel(f"{uri} is not an MLflow model folder (no MLmodel); log it with mlflow.pytorch")
        meta = Model.load(str(mlmodel))
        if "pytorch" not in meta.flavors:
            raise UnsupportedModel(f"{uri} has flavors {', '.join(meta.flavors) or 'none'}; gradprune sanitizes "
                                   "mlflow.pytorch models only")
        try:
            model = load_mlflow_dir(local, name=uri)
        except (UnsafeModel, DataError):
            raise
        except BadInput as exc:  # an unloadable model is the model's problem: unsupported, not bad data
            raise UnsupportedModel(exc.message) from None
        return SourceModel(model, meta.signature, _requirements(local))


def register_source_model(
    model: nn.Module,
    name: str,
    *,
    input_shape: tuple[int, int, int] | list[int],
    experiment: str | None = None,
    description: str | None = None,
) -> str:
    """Log `model` with the pytorch flavor (pickle format, signature from a forward pass) and register it as a new
    version of `name` (created when missing). Returns the version. Used by the demo and the tests; any
    mlflow.pytorch model registered by other means works the same."""
    import pickle

    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    model = model.cpu().eval()
    example = torch.zeros(1, *map(int, input_shape))
    with torch.no_grad():
        signature = infer_signature(example.numpy(), model(example).numpy())
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment) if experiment else None
    exp_id = exp.experiment_id if exp else (client.create_experiment(experiment) if experiment else None)
    requirements = mlflow.pytorch.get_default_pip_requirements()
    from gradprune_mlflow.models.io import quiet

    with mlflow.start_run(experiment_id=exp_id, run_name=f"register-{name}") as run, quiet("mlflow.pytorch"):
        info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle", pickle_module=pickle,
                                        signature=signature, pip_requirements=requirements)
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException:
        pass  # it exists
    mv = client.create_model_version(name, source=info.model_uri, run_id=run.info.run_id, description=description,
                                     model_id=info.model_id)
    return str(mv.version)


def _download(uri: str, dst: str) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst))
    except MlflowException as exc:
        # The version was listed a moment ago, so this is the registry or its artifact store failing: retriable.
        raise GradpruneError(f"cannot download {uri}: {str(exc).splitlines()[0]}; check the MLflow server and its "
                             "artifact store") from None


def _requirements(folder: Path) -> list[str]:
    path = folder / "requirements.txt"
    if not path.is_file():
        return []
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith(("#", "-"))]
