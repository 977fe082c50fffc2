"""Downloading an MLflow model (`models:/...`, `runs:/...`) into a local folder, MLflow's failures as one-line
gradprune errors. `gradprune sanitize` and the registry scan both come through here.
"""

from __future__ import annotations

from pathlib import Path

from gradprune_mlflow.errors import BadInput, GradpruneError


def download_model(uri: str, dst: str, *, listed: bool = False) -> Path:
    """Download `uri` into the folder `dst`; returns the local path.

    MLflow refusing the URI means a wrong name, version or alias (BadInput), except for a version the registry has
    just listed (`listed=True`): then the registry or its artifact store is failing (GradpruneError). An unreachable
    server is a GradpruneError either way.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst))
    except MlflowException as exc:
        if listed:
            raise GradpruneError(f"cannot download {uri}: {_first_line(exc)}; check the MLflow server and its "
                                 "artifact store") from None
        raise BadInput(f"cannot fetch model {uri}: {_first_line(exc)}; check the name, version or alias "
                       "and MLFLOW_TRACKING_URI") from None
    except (OSError, ConnectionError) as exc:
        raise GradpruneError(f"cannot fetch model {uri} ({type(exc).__name__}: {_first_line(exc)}); "
                             "check MLFLOW_TRACKING_URI and that the server is up") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
