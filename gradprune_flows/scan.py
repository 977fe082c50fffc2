"""The `scan-registry` flow: one pass over the registry, one `sanitize-model-version` sub-flow per pending version.

One version failing does not stop the others; each ends with a final status (see sanitize.py). With `dispatch` (the
served reconciler, deployments.py) each version becomes a flow run of that deployment instead, under the idempotency
key `NAME:VERSION`, so passes that find the same version again start nothing new.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.deployments import run_deployment

from gradprune_flows.sanitize import sanitize_model_version
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


@task
def dispatch_version(deployment: str, name: str, version: str) -> dict[str, Any] | None:
    """Start a flow run of `deployment` for the version under the idempotency key NAME:VERSION.

    Returns the 'dispatched' outcome, or None when the key's run has already finished (an earlier attempt: the
    version was made pending again, by --retry-failed or an expired lease) and the caller must sanitize it itself.
    """
    run = run_deployment(deployment, parameters={"name": name, "version": version},
                         idempotency_key=f"{name}:{version}", timeout=0, as_subflow=False)
    if run.state is not None and run.state.is_final():
        get_run_logger().info("%s v%s: run %s for this key has finished; sanitizing here", name, version, run.name)
        return None
    get_run_logger().info("%s v%s: flow run %s (%s)", name, version, run.name, run.state.name if run.state else "-")
    return steps.Outcome(name, version, "dispatched", f"flow run {run.name} ({run.id})").to_dict()


@flow(name="scan-registry")
def scan_registry(
    model: str | None = None,
    config: dict[str, Any] | None = None,
    min_per_class: int = 10,
    retry_failed: bool = False,
    dispatch: str | None = None,
) -> list[dict[str, Any]]:
    """Sanitize (or mark) every pending version exactly once; returns one outcome dict per version found.

    Takes an optional registered model name to limit the pass, SanitizeConfig overrides, the clean set's minimum
    images per class, whether to retry versions that failed before, and a deployment ('flow/deployment') to hand
    each version to instead of sanitizing it here (outcome status `dispatched`).
    """
    if retry_failed:
        reset_failed_versions(model)
    outcomes = []
    for name, version in find_pending_versions(model):
        handed = dispatch_version(dispatch, name, version) if dispatch else None
        if handed is not None:
            outcomes.append(handed)
            continue
        state = sanitize_model_version(name, version, config, min_per_class, return_state=True)
        if state.is_completed():
            outcomes.append(state.result())
        else:  # the sub-flow could not even record its failure (registry down?): the lease will expire
            reason = f"sanitize flow ended {state.type.value}: {state.message or 'no message'}"
            outcomes.append(steps.Outcome(name, version, "failed", reason).to_dict())
    return outcomes
