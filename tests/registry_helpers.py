"""Registered versions that must never be sanitized: a pickle that runs code, and a model of another flavor."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import mlflow
import mlflow.pytorch
import torch

from gradprune_mlflow.models.zoo import create_model


class Evil:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Identity(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return model_input


def register_unsafe_version(name: str, folder: Path, marker: Path) -> str:
    """Register a pytorch-flavor model whose weights file is a pickle that would run `touch marker`."""
    local = folder / "unsafe-model"
    mlflow.pytorch.save_model(create_model("small_cnn"), str(local), serialization_format="pickle",
                              pickle_module=pickle, pip_requirements=["torch"])
    torch.save(Evil(marker), local / "data" / "model.pth")
    with mlflow.start_run(run_name=f"unsafe-{name}") as run:
        mlflow.log_artifacts(str(local), "model")
    return str(mlflow.register_model(f"runs:/{run.info.run_id}/model", name).version)


def register_pyfunc_version(name: str) -> str:
    """Register a python_function model (no pytorch flavor): unsupported."""
    with mlflow.start_run(run_name=f"pyfunc-{name}"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        info = mlflow.pyfunc.log_model(name="model", python_model=Identity(), pip_requirements=["mlflow"])
    return str(mlflow.register_model(info.model_uri, name).version)
