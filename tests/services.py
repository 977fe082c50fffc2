"""Real services for tests: an `mlflow server` process (sqlite) and a moto S3 API, both on 127.0.0.1.

The context managers themselves live in gradprune_mlflow.local_services (the demo uses them too); this module
wires them together the way the registry tests need them and points this process at them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gradprune_mlflow.local_services import free_port, mlflow_server, moto_s3, s3_env, stop_process_group

__all__ = ["Stack", "free_port", "mlflow_server", "moto_s3", "patched_env", "registry_stack", "s3_env",
           "stop_process_group"]

ARTIFACT_BUCKET = "mlflow-artifacts"
DATA_BUCKET = "clean-data"


@dataclass(frozen=True)
class Stack:
    """Where the running services are."""

    tracking_uri: str
    s3_endpoint: str
    data_bucket: str = DATA_BUCKET


@contextmanager
def patched_env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables inside a block and restore the previous values after it."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextmanager
def registry_stack(workdir: Path) -> Iterator[Stack]:
    """moto S3 (buckets for data and MLflow artifacts) and an MLflow server storing artifacts in it.

    Inside the block this process talks to both: MLFLOW_TRACKING_URI, the AWS endpoint and fake credentials are set.
    """
    import mlflow

    with moto_s3(buckets=(ARTIFACT_BUCKET, DATA_BUCKET)) as endpoint:
        env = s3_env(endpoint)
        with mlflow_server(workdir, artifacts_destination=f"s3://{ARTIFACT_BUCKET}/mlflow", env=env) as url:
            with patched_env({**env, "MLFLOW_TRACKING_URI": url}):
                mlflow.set_tracking_uri(url)
                try:
                    yield Stack(url, endpoint)
                finally:
                    mlflow.set_tracking_uri(None)
