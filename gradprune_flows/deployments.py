"""The two deployments that make scans automatic, and `serve`, which runs both from one process.

- `sanitize-model-version/gradprune-sanitize`: started by a DeploymentEventTrigger on each
  `mlflow.model_version.created` event (from `gradprune webhook serve`), with name and version from the event.
- `scan-registry/gradprune-reconcile`: every `scan_interval` seconds (10 minutes by default), it hands each pending
  version to the sanitize deployment under the flow-run idempotency key `NAME:VERSION`, so webhook deliveries that
  were lost still get scanned. The registry claim settles a version that both paths start at once.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect import serve
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.events import DeploymentEventTrigger

from gradprune_flows.sanitize import sanitize_model_version
from gradprune_flows.scan import scan_registry
from gradprune_mlflow.webhooks.receiver import EVENT

SANITIZE_DEPLOYMENT = "gradprune-sanitize"
RECONCILE_DEPLOYMENT = "gradprune-reconcile"
SANITIZE_TARGET = f"sanitize-model-version/{SANITIZE_DEPLOYMENT}"
DEFAULT_SCAN_INTERVAL = 600.0


def model_version_trigger() -> DeploymentEventTrigger:
    """Run the sanitize deployment once per `mlflow.model_version.created` event, for the event's version."""
    return DeploymentEventTrigger(
        name="mlflow-model-version-created",
        expect={EVENT},
        match={"prefect.resource.id": "mlflow.model-version.*"},
        parameters={"name": "{{ event.payload.name }}", "version": "{{ event.payload.version }}"},
    )


def build_deployments(
    *,
    scan_interval: float = DEFAULT_SCAN_INTERVAL,
    config: dict[str, Any] | None = None,
    min_per_class: int = 10,
) -> list[RunnerDeployment]:
    """The event-triggered sanitize deployment and the scheduled reconciler.

    Takes the reconciler's interval in seconds, SanitizeConfig overrides and the clean set's minimum images per
    class (both become the deployments' default parameters). Returns the two RunnerDeployments.
    """
    shared = {"config": config or None, "min_per_class": min_per_class}
    # Module entry points: the runner finds the flows wherever the package is installed, whatever the cwd.
    sanitize = sanitize_model_version.to_deployment(
        SANITIZE_DEPLOYMENT, triggers=[model_version_trigger()], parameters=shared,
        entrypoint_type=EntrypointType.MODULE_PATH,
        description="Sanitize one registered version; started by mlflow.model_version.created events.")
    reconcile = scan_registry.to_deployment(
        RECONCILE_DEPLOYMENT, interval=timedelta(seconds=scan_interval),
        parameters={**shared, "dispatch": SANITIZE_TARGET}, entrypoint_type=EntrypointType.MODULE_PATH,
        description="Hand every pending version to the sanitize deployment (idempotency key NAME:VERSION).")
    return [sanitize, reconcile]


def serve_deployments(*, limit: int | None = None, **options: Any) -> None:
    """Register both deployments on the Prefect API (PREFECT_API_URL) and run their flow runs here until stopped.

    Takes the most flow runs at once (`limit`, None for no limit) and build_deployments' options.
    """
    serve(*build_deployments(**options), limit=limit, print_starting_message=True)
