"""The Prefect side of the webhook receiver: each verified `model_version.created` delivery becomes a Prefect event.

The event is `mlflow.model_version.created` on the resource `mlflow.model-version.NAME.VERSION`; the name and
version travel in its payload (names may contain dots, so the resource id is not parsed). Its id derives from the
MLflow delivery id, so a delivery that MLflow retries after a 503 is the same event to Prefect.
"""

from __future__ import annotations

import uuid

from prefect.events import Event
from prefect.events.clients import get_events_client

from gradprune_mlflow.webhooks.receiver import EVENT, ModelVersionCreated

_DELIVERY_NAMESPACE = uuid.UUID("6f0c4e0e-6d1f-4a5e-9d36-6a1f3b7c2e10")


def model_version_event(created: ModelVersionCreated) -> Event:
    """The Prefect event for a created version (resource labels and payload carry the name and version)."""
    data = created.data
    return Event(
        event=EVENT,
        resource={"prefect.resource.id": created.resource_id,
                  "prefect.resource.name": f"{created.name} v{created.version}",
                  "mlflow.model.name": created.name, "mlflow.model.version": created.version},
        payload={"name": created.name, "version": created.version, "delivery_id": created.delivery_id,
                 "source": data.get("source"), "run_id": data.get("run_id")},
        id=uuid.uuid5(_DELIVERY_NAMESPACE, created.delivery_id),
    )


async def emit_model_version_created(created: ModelVersionCreated) -> None:
    """Send the event to the Prefect API at PREFECT_API_URL and wait until it is sent; raises when it cannot be."""
    async with get_events_client(reconnection_attempts=2) as client:
        await client.emit(model_version_event(created))
