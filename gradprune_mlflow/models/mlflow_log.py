"""Log a sanitized adapter model (pt2, TorchScript) into an MLflow run as the folder it came in.

MLflow's own `mlflow.pytorch.log_model` would export a pt2 model again (a new graph, traced from the GraphModule) and
cannot write a ScriptModule as pt2 at all. `Model.log` with a flavor whose save_model writes our folder keeps
everything MLflow's logging does (a LoggedModel, the run's outputs, the model's URI), while the files are the
source's: MLmodel's flavors, signature and input example, the requirements and the model file's graph unchanged;
only the weights and the MLmodel's identity (run, model id, time) are new.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from gradprune_mlflow.models.adapter import FormatAdapter

# What an MLmodel says about the model itself; the rest (run, ids, time) belongs to the new logged model.
_KEPT = ("flavors", "signature", "saved_input_example_info", "metadata", "model_size_bytes")


class _SourceFolder:
    """A flavor module stand-in: save_model copies a written model folder and keeps its MLmodel's description."""

    __name__ = "mlflow.pytorch"

    def __init__(self, folder: Path):
        self.folder = folder

    def save_model(self, path: str, mlflow_model: Any, **_: Any) -> None:
        from mlflow.models import Model

        shutil.copytree(self.folder, path, dirs_exist_ok=True)
        source = Model.load(str(Path(path) / "MLmodel"))
        for key in _KEPT:
            setattr(mlflow_model, key, getattr(source, key, None))
        mlflow_model.save(str(Path(path) / "MLmodel"))


def log_in_format(model: FormatAdapter, run_id: str, name: str,
                  history: list[dict[str, Any]] | None = None) -> Any:
    """Log `model` (from an MLflow source) into run `run_id` as `name`, in its own format. Returns ModelInfo."""
    import mlflow
    from mlflow.models import Model

    with tempfile.TemporaryDirectory(prefix="gradprune-log-") as tmp:
        folder = model.cpu().eval().write(Path(tmp) / "model", history)
        # The fluent API puts the logged model in the run's experiment only while the run is active; the active
        # run is thread-local, so this is safe inside a flow's worker thread.
        with mlflow.start_run(run_id=run_id):
            # validate_serving_input off: it would load the model again in this process for nothing we check
            return Model.log(artifact_path=None, name=name, flavor=_SourceFolder(folder), validate_serving_input=False)
