"""The `scan-registry` flow: one pass over the registry, one `sanitize-model-version` sub-flow per pending version.

One version failing does not stop the others; each ends with a final status (see flows/sanitize.py).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows.sanitize import sanitize_model_version
from gradprune_mlflow.registry import job as steps
from gradprune_mlflow.registry.pending import find_pending


@task
def find_pending_versions(model: str | None = None) -> list[tuple[str, str]]:
    """The (name, version) pairs waiting for a sanitize run, oldest first; only model `model`'s when given."""
    pending = [(p.name, p.version) for p in find_pending(model=model)]
    get_run_logger().info("%d pending version(s)%s", len(pending), f" of {model}" if model else "")
    return pending


@task
def reset_failed_versions(model: str | None = None) -> list[str]:
    """Make `failed` versions pending again; returns them as 'name/version'."""
    reset = steps.retry_failed(model=model)
    get_run_logger().info("retrying %d failed version(s)", len(reset))
    return reset


@flow(name="scan-registry")
def scan_registry(
    model: str | None = None,
    config: dict[str, Any] | None = None,
    min_per_class: int = 10,
    retry_failed: bool = False,
) -> list[dict[str, Any]]:
    """Sanitize (or mark) every pending version exactly once; returns one outcome dict per version found.

    Takes an optional registered model name to limit the pass, SanitizeConfig overrides, the clean set's minimum
    images per class, and whether to retry versions that failed before.
    """
    if retry_failed:
        reset_failed_versions(model)
    outcomes = []
    for name, version in find_pending_versions(model):
        state = sanitize_model_version(name, version, config, min_per_class, return_state=True)
        if state.is_completed():
            outcomes.append(state.result())
        else:  # the sub-flow could not even record its failure (registry down?): the lease will expire
            reason = f"sanitize flow ended {state.type.value}: {state.message or 'no message'}"
            outcomes.append(steps.Outcome(name, version, "failed", reason).to_dict())
    return outcomes
