"""The `sanitize-model-version` flow: one registered version in, a sanitized version (or a final status) out.

Tasks are thin wrappers over gradprune_mlflow.registry.job; this module is the only place that knows about Prefect.
The sanitize task carries the tag `gradprune-gpu`: `prefect concurrency-limit create gradprune-gpu 1` keeps one
sanitization per GPU across all workers.
"""

from __future__ import annotations

import os
import re
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.data.expectations import Checks
from gradprune_mlflow.data.s3 import S3Unavailable
from gradprune_mlflow.errors import BadInput
from gradprune_mlflow.registry import job as steps
from gradprune_mlflow.report.summary import outcome_markdown

GPU_TAG = "gradprune-gpu"
# Models, data sets and results stay in memory between tasks: never hash or persist them.
_IN_MEMORY = {"cache_policy": NO_CACHE, "persist_result": False}


class _LogProgress:
    """The defense's progress sink: one log line per phase, in the flow run's log."""

    def __init__(self, logger):
        self.logger = logger

    def phase(self, name: str, total: int | None = None) -> None:
        self.logger.info("sanitize: %s%s", name, f" ({total} steps)" if total else "")

    def advance(self, steps: int = 1, **info: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _retry_transient(task, task_run, state) -> bool:
    """Retry S3 and network trouble; a clean set that is missing or wrong will not get better by retrying."""
    try:
        state.result()
    except (S3Unavailable, ConnectionError, TimeoutError):
        return True
    except Exception:
        return False
    return False


def fetch_retry_delays() -> list[float]:
    """Seconds between the clean-set fetch's retries: `GRADPRUNE_FETCH_RETRY_DELAYS` (comma-separated), else 2,10,30.
    One retry per number."""
    raw = os.environ.get("GRADPRUNE_FETCH_RETRY_DELAYS") or "2,10,30"
    try:
        return [float(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise BadInput(f"GRADPRUNE_FETCH_RETRY_DELAYS must be comma-separated seconds, got {raw!r}") from None


@task(**_IN_MEMORY)
def claim_model_version(name: str, version: str, lease_seconds: float | None = None):
    """Claim the version; returns (job, claim) or None when it is not pending or another worker won it."""
    claimed = steps.claim(name, version, lease_seconds=lease_seconds)
    get_run_logger().info("%s v%s: %s", name, version, "claimed" if claimed else "not pending or taken; skipping")
    return claimed


@task(**_IN_MEMORY)
def adopt_sanitized_version(job, held) -> dict[str, Any] | None:
    """Finish the version from a sanitized version an earlier run registered; returns the outcome, or None."""
    outcome = steps.adopt(job, held)
    if outcome is not None:
        get_run_logger().info("%s v%s: %s", job.name, job.version, outcome.reason)
    return outcome.to_dict() if outcome else None


@task(**_IN_MEMORY)
def start_sanitize_run(job, held, config: SanitizeConfig) -> str:
    """Create the MLflow run for the version; returns its id."""
    run_id = steps.start(job, held, config)
    get_run_logger().info("%s v%s: MLflow run %s", job.name, job.version, run_id)
    return run_id


@task(retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_retry_transient, **_IN_MEMORY)
def fetch_clean_data(uri: str) -> str:
    """Fetch the clean set into the content-keyed cache (reused while it is unchanged); returns the local folder."""
    folder = steps.fetch(uri)
    get_run_logger().info("clean set %s -> %s", uri, folder)
    return folder


@task(**_IN_MEMORY)
def validate_clean_data(folder: str, uri: str, run_id: str, min_per_class: int) -> dict[str, Any]:
    """Run the Great Expectations suite and log its result; raises CleanSetRejected naming what failed."""
    summary = steps.validate(folder, uri, run_id, Checks(min_per_class=min_per_class))
    stats = summary["statistics"]
    get_run_logger().info("clean set valid: %s of %s expectations met", stats["successful_expectations"],
                          stats["evaluated_expectations"])
    return summary


@task(**_IN_MEMORY)
def load_model_version(name: str, version: str):
    """Download the version, scan every pickle in it, load it; raises UnsafeModel / UnsupportedModel."""
    return steps.load_model(name, version)


@task(**_IN_MEMORY)
def load_inputs(job, folder: str, run_id: str):
    """Load the clean set, triggers and test set the model's tags name; records the data as run inputs."""
    return steps.load_inputs(job, folder, run_id)


@task(tags=[GPU_TAG], **_IN_MEMORY)
def sanitize_model(source, inputs, config: SanitizeConfig):
    """Run Grad-Prune on the source model; returns the SanitizeResult."""
    logger = get_run_logger()
    result = steps.run_defense(source, inputs, config, progress=_LogProgress(logger))
    before, after = result.report.get("before") or {}, result.report.get("after") or {}
    key = "attack_success_rate" if "attack_success_rate" in before else "synthesized_trigger_success_rate"
    logger.info("%s %s -> %s, clean accuracy %s -> %s", key, before.get(key), after.get(key),
                before.get("clean_accuracy"), after.get("clean_accuracy"))
    return result


@task(**_IN_MEMORY)
def log_sanitize_result(run_id: str, result, inputs, job, validation: dict[str, Any]) -> dict[str, float]:
    """Log metrics, the pruning curve, artifacts, report.html and the run description; returns the metrics."""
    return steps.log(run_id, result, inputs, job=job, validation=validation)


@task(**_IN_MEMORY)
def register_sanitized_model(held, run_id: str, result, source, inputs) -> str:
    """Register the sanitized model as a new version with tags, description and the alias (not when its verification
    failed); returns the version."""
    version = steps.register(held, run_id, result, source, inputs)
    verdict = (result.report.get("verification") or {}).get("verdict")
    alias = "verification failed: no alias" if verdict == "failed" else "alias sanitized"
    get_run_logger().info("%s: registered sanitized version %s (%s)", held.name, version, alias)
    return version


@task(**_IN_MEMORY)
def finish_version(job, held, run_id: str, result, sanitized_version: str | None) -> dict[str, Any]:
    """Write the final status on the source version and end the run; returns the outcome."""
    return steps.succeed(job, held, run_id, result, sanitized_version).to_dict()


@task(**_IN_MEMORY)
def record_failure(job, held, run_id: str | None, exc: BaseException) -> dict[str, Any]:
    """Write the failure's status and reason on the version and fail the run; returns the outcome."""
    outcome = steps.fail(job, held, run_id, exc)
    get_run_logger().error("%s v%s: %s: %s", job.name, job.version, outcome.status, outcome.reason)
    return outcome.to_dict()


def artifact_key(model: str, version: str) -> str:
    """The flow run artifact's key: Prefect keys hold only lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-") or "model"
    return f"gradprune-{slug}-v{version}"


@task(**_IN_MEMORY)
def publish_outcome(outcome: dict[str, Any]) -> str | None:
    """Attach the outcome to the flow run as a markdown artifact (status, before/after table, MLflow run link).

    Returns the artifact id. The registry already holds the final status, so a Prefect API that refuses the
    artifact is logged as a warning rather than failing a version that was sanitized.
    """
    key = artifact_key(outcome["model"], str(outcome["version"]))
    try:
        artifact_id = create_markdown_artifact(outcome_markdown(outcome), key=key,
                                               description=f"gradprune: {outcome['status']}")
    except Exception as exc:
        get_run_logger().warning("could not create the flow run artifact %s: %s", key, exc)
        return None
    return str(artifact_id)


@flow(name="sanitize-model-version")
def sanitize_model_version(
    name: str, version: str, config: dict[str, Any] | None = None, min_per_class: int = 10
) -> dict[str, Any]:
    """Sanitize one registered version: claim, fetch and validate the clean set, load, sanitize, log, register.

    Takes the registered model name and version, SanitizeConfig overrides, and the clean set's minimum images per
    class. Returns the outcome (the scan table's row) as a dict; every claimed version ends with a final status.
    """
    cfg = SanitizeConfig().with_overrides(**(config or {}))
    try:
        claimed = claim_model_version(name, str(version))
    except BadInput as exc:  # no such model or version: nothing to tag, so the outcome carries the reason
        return steps.Outcome(name, str(version), "rejected", exc.message).to_dict()
    if claimed is None:
        return steps.Outcome(name, str(version), "skipped", "not pending, or claimed by another worker").to_dict()
    job, held = claimed
    delays = fetch_retry_delays()
    fetch = fetch_clean_data.with_options(retries=len(delays), retry_delay_seconds=delays or 0)
    run_id = None
    try:
        adopted = adopt_sanitized_version(job, held) if held.previous_claim else None
        if adopted is not None:
            publish_outcome(adopted)
            return adopted
        # The lease is renewed while the work runs, and no longer once the final status is being written (a renewal
        # landing after it would put a lease back on a finished version).
        with steps.keep_lease(held):
            run_id = start_sanitize_run(job, held, cfg)
            folder = fetch(job.clean_data)
            validation = validate_clean_data(folder, job.clean_data, run_id, min_per_class)
            source = load_model_version(job.name, job.version)
            inputs = load_inputs(job, folder, run_id)
            result = sanitize_model(source, inputs, cfg)
            log_sanitize_result(run_id, result, inputs, job, validation)
            new = register_sanitized_model(held, run_id, result, source, inputs) if result.model is not None else None
        outcome = finish_version(job, held, run_id, result, new)
    except Exception as exc:
        outcome = record_failure(job, held, run_id, exc)
    publish_outcome(outcome)
    return outcome
