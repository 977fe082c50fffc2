"""Loading a registered version: download it once, scan every pickle in it, then unpickle (models/io.py)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from gradprune_mlflow.errors import BadInput, DataError, UnsafeModel, UnsupportedModel


@dataclass
class SourceModel:
    """A loaded source version: the module, its MLflow signature (or None), its pip requirements and the format it
    was saved in (models.loading.model_format)."""

    model: nn.Module
    signature: object | None = None
    requirements: list[str] = field(default_factory=list)
    model_format: str = "pickle"


def load_source(name: str, version: str) -> SourceModel:
    """Download `models:/name/version`, refuse it unless it is a safe pytorch-flavor model, and load it.

    Returns a SourceModel. Raises UnsafeModel (refused before unpickling), UnsupportedModel (not a pytorch model,
    or not a loadable nn.Module), and GradpruneError when the registry cannot be reached.
    """
    from mlflow.models import Model

    from gradprune_mlflow.models.download import download_model
    from gradprune_mlflow.models.io import load_mlflow_dir, model_format

    uri = f"models:/{name}/{version}"
    with tempfile.TemporaryDirectory(prefix="gradprune-source-") as tmp:
        # The version was listed a moment ago: MLflow refusing it is the server failing, not a wrong name.
        local = download_model(uri, tmp, listed=True)
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
        return SourceModel(model, meta.signature, _requirements(local), model_format(model, from_file=False))


def check_input_shape(source: SourceModel, input_shape) -> None:
    """Raise DataError when the model's MLflow signature names an input shape other than dataset.json's `input_shape`.

    A model with adaptive pooling accepts any image size, so the forward-pass check in the sanitizer cannot see that
    the clean set was packed for another model; the signature the model was logged with can. No signature (or one
    that is not a single image tensor) means nothing to compare.
    """
    inputs = getattr(getattr(source, "signature", None), "inputs", None)
    specs = inputs.inputs if inputs is not None and getattr(inputs, "is_tensor_spec", lambda: False)() else []
    if len(specs) != 1 or len(specs[0].shape) != 4:
        return
    expected = [int(d) for d in specs[0].shape[1:]]
    given = [int(d) for d in input_shape]
    if any(e not in (-1, g) for e, g in zip(expected, given, strict=True)):
        raise DataError(f"dataset.json input_shape {given} disagrees with the model's signature input "
                        f"{[-1, *expected]}; pack the clean set for this model's input (channels, height, width)")


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
    info = log_source_model(model, input_shape=input_shape, experiment=experiment, run_name=f"register-{name}")
    return register_logged_model(info, name, description=description)[0]


def log_source_model(model: nn.Module, *, input_shape: tuple[int, int, int] | list[int],
                     experiment: str | None = None, run_name: str = "source-model") -> Any:
    """Log `model` in a new run (pytorch flavor, pickle format, signature from a forward pass); returns ModelInfo."""
    import pickle

    import mlflow
    import mlflow.pytorch
    import torch
    from mlflow.models import infer_signature

    from gradprune_mlflow.models.io import quiet

    model = model.cpu().eval()
    example = torch.zeros(1, *map(int, input_shape))
    with torch.no_grad():
        signature = infer_signature(example.numpy(), model(example).numpy())
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment) if experiment else None
    exp_id = exp.experiment_id if exp else (client.create_experiment(experiment) if experiment else None)
    requirements = mlflow.pytorch.get_default_pip_requirements()
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name), quiet("mlflow.pytorch"):
        return mlflow.pytorch.log_model(model, name="model", serialization_format="pickle", pickle_module=pickle,
                                        signature=signature, pip_requirements=requirements)


def register_logged_model(info: Any, name: str, *, count: int = 1, description: str | None = None) -> list[str]:
    """Register `count` new versions of `name` (created when missing) pointing at the logged model `info`.

    One registry call per version and no upload, so tests and benchmarks can have hundreds of real versions.
    Returns the new version numbers.
    """
    import mlflow

    client = mlflow.MlflowClient()
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException:
        pass  # it exists
    return [str(client.create_model_version(name, source=info.model_uri, run_id=info.run_id,
                                            description=description, model_id=info.model_id).version)
            for _ in range(count)]


def _requirements(folder: Path) -> list[str]:
    path = folder / "requirements.txt"
    if not path.is_file():
        return []
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith(("#", "-"))]
