"""MLflow webhooks: signature checks, the replay cache and the ASGI receiver (no Prefect here).

The receiver turns a verified `model_version.created` delivery into a call of an `emit` function it is given; the
CLI passes one that sends a Prefect event (gradprune_flows/events.py), so this package stays free of Prefect.
"""

from gradprune_mlflow.webhooks.receiver import ModelVersionCreated, create_app
from gradprune_mlflow.webhooks.replay import ReplayCache
from gradprune_mlflow.webhooks.signature import SECRET_ENV, sign, verify

__all__ = ["SECRET_ENV", "ModelVersionCreated", "ReplayCache", "create_app", "sign", "verify"]
