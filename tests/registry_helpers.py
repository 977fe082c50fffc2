"""Registered versions for the registry tests: pickles that run code, models of another flavor, and many cheap
versions of one logged model."""

from __future__ import annotations

import builtins
import os
import pickle
import subprocess
import warnings
from pathlib import Path

import mlflow
import mlflow.pytorch
import torch

from gradprune_mlflow.models.zoo import create_model


class Evil:
    """Unpickling this leaves a marker file, through os.system (default), subprocess or eval."""

    def __init__(self, marker: Path, via: str = "os.system"):
        self.marker, self.via = str(marker), via

    def __reduce__(self):
        if self.via == "subprocess":
            return subprocess.check_call, (["touch", self.marker],)
        if self.via == "eval":
            return builtins.eval, (f"open({self.marker!r}, 'w').close()",)
        return os.system, (f"touch {self.marker}",)


class Identity(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return model_input


def register_unsafe_version(name: str, folder: Path, marker: Path, via: str = "os.system") -> str:
    """Register a pytorch-flavor model whose weights file is a pickle that would create `marker` (see Evil)."""
    local = folder / f"unsafe-model-{via}"
    mlflow.pytorch.save_model(create_model("small_cnn"), str(local), serialization_format="pickle",
                              pickle_module=pickle, pip_requirements=["torch"])
    torch.save(Evil(marker, via), local / "data" / "model.pth")
    with mlflow.start_run(run_name=f"unsafe-{name}") as run:
        mlflow.log_artifacts(str(local), "model")
    return str(mlflow.register_model(f"runs:/{run.info.run_id}/model", name).version)


def register_pyfunc_version(name: str) -> str:
    """Register a python_function model (no pytorch flavor): unsupported."""
    with mlflow.start_run(run_name=f"pyfunc-{name}"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        info = mlflow.pyfunc.log_model(name="model", python_model=Identity(), pip_requirements=["mlflow"])
    return str(mlflow.register_model(info.model_uri, name).version)


def snapshot(client) -> dict:
    """Every registered model's aliases and its versions' tags: compare two to prove nothing moved."""
    out = {}
    for rm in client.search_registered_models():
        out[rm.name] = (dict(rm.aliases), {str(v.version): dict(v.tags)
                                           for v in client.search_model_versions(f"name='{rm.name}'")})
    return out
