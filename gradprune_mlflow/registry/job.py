"""The steps of sanitizing one registered version, as plain functions. gradprune_flows composes them into Prefect tasks.

    claim -> start run -> fetch clean set -> validate (GX) -> load model -> load inputs -> sanitize -> log -> register
    -> finish

Every version ends with a final status, also when a step fails (`fail`): the error's own status (rejected, unsafe,
unsupported) or `failed`, and its one-line message as `gradprune.reason`.

Finishing is idempotent: a source whose sanitized version already exists (its worker died, or its last status write
failed, after registering) is finished from that version (`adopt`) instead of being sanitized a second time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.data.cleanset import CleanSet
from gradprune_mlflow.data.expectations import Checks, validate_clean_set
from gradprune_mlflow.data.s3 import fetch_clean_set
from gradprune_mlflow.defense.triggers import Trigger
from gradprune_mlflow.errors import GradpruneError
from gradprune_mlflow.registry import log as runlog
from gradprune_mlflow.registry import tags as T
from gradprune_mlflow.registry.claim import Claim, LeaseKeeper, claim_version, finish, one_line
from gradprune_mlflow.registry.inputs import check_inputs, load_data_uri, load_trigger_uri
from gradprune_mlflow.registry.pending import PendingVersion, all_versions, pending_version, registered_models
from gradprune_mlflow.registry.register import (
    ClaimLost,
    find_sanitized,
    log_sanitized_model,
    move_alias,
    register_sanitized,
)
from gradprune_mlflow.registry.source import SourceModel, check_input_shape, load_source
from gradprune_mlflow.report import review
from gradprune_mlflow.report.summary import suspect, suspect_reason, unverified_reason, verification_failed


@dataclass
class Outcome:
    """What happened to one version: the row of `gradprune scan`'s table, as plain data."""

    model: str
    version: str
    status: str
    reason: str | None = None
    run_id: str | None = None
    run_url: str | None = None
    sanitized_version: str | None = None
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Inputs:
    """What the defense needs besides the model."""

    clean_set: CleanSet
    trigger: Trigger | None = None
    eval_trigger: Trigger | None = None
    test_set: CleanSet | None = None


def status_for(exc: BaseException) -> str:
    """The final status an error maps to: its own for gradprune errors (rejected, unsafe...), else failed."""
    return exc.status if isinstance(exc, GradpruneError) else T.FAILED


def reason_for(exc: BaseException) -> str:
    """One line saying what went wrong."""
    if isinstance(exc, GradpruneError):
        return one_line(exc.message)
    return one_line(f"{type(exc).__name__}: {exc}")


def claim(name: str, version: str, *, lease_seconds: float | None = None,
          client: MlflowClient | None = None) -> tuple[PendingVersion, Claim] | None:
    """Claim a pending version: returns (job, claim), or None when it is not pending or another worker has it."""
    client = client or MlflowClient()
    job = pending_version(client, name, version)
    if job is None:
        return None
    held = claim_version(client, job.name, job.version, lease_seconds=lease_seconds)
    return (job, held) if held else None


def keep_lease(held: Claim, client: MlflowClient | None = None) -> LeaseKeeper:
    """A context manager that renews `held`'s lease while the block runs (see claim.LeaseKeeper)."""
    return LeaseKeeper(client or MlflowClient(), held)


def adopt(job: PendingVersion, held: Claim, client: MlflowClient | None = None) -> Outcome | None:
    """Finish a claimed source whose sanitized version already exists: point the alias at the newest sanitized
    version, write `sanitized` with that version and its run. Returns the Outcome, or None when there is none.

    This closes the gap between registering and the final status write: a worker killed there, or a status write
    that failed, leaves a registered result that the next scan finishes instead of sanitizing again.
    """
    client = client or MlflowClient()
    made = find_sanitized(client, held.name, held.version)
    if made is None:
        return None
    run_id = (made.tags or {}).get(T.RUN_ID) or ""
    unverified = (made.tags or {}).get(T.VERIFICATION) == T.VERIFICATION_FAILED
    status, reason = T.SANITIZED, None
    if unverified:  # registered for review only: the alias stays away from it
        status = T.UNVERIFIED
        reason = f"verification failed (see the run); review version {made.version} before promoting it"
    else:
        move_alias(client, held.name)
    extra = {"sanitized_version": str(made.version)} | ({"run_id": run_id} if run_id else {})
    finish(client, held, status, reason, **extra)
    sides: dict[str, dict[str, Any]] = {"before": {}, "after": {}}
    url = None
    if run_id:
        metrics = client.get_run(run_id).data.metrics
        for key, value in metrics.items():
            metric, _, side = key.partition("/")
            if side in sides and metric in runlog.REPORT_METRICS:
                sides[side][metric] = value
        url = runlog.run_url(client, run_id)
    note = f"finished from sanitized version {made.version}, registered by an earlier run"
    return Outcome(job.name, job.version, status, f"{reason}; {note}" if reason else note, run_id or None, url,
                   str(made.version), sides["before"], sides["after"])


def start(job: PendingVersion, held: Claim, config: SanitizeConfig, client: MlflowClient | None = None) -> str:
    """Create the version's run in the experiment `gradprune`; returns its id."""
    return runlog.start_run(client or MlflowClient(), job, config, held.claim_id)


def fetch(uri: str, cache_dir: str | None = None) -> str:
    """Fetch the clean set (s3:// into the content-keyed cache) and return its local folder."""
    return str(fetch_clean_set(uri, cache_dir))


def validate(folder: str, uri: str, run_id: str | None, checks: Checks | None = None,
             client: MlflowClient | None = None) -> dict[str, Any]:
    """Run the GX suite, log its result to the run, and return the summary. Raises CleanSetRejected on failure."""
    outcome = validate_clean_set(folder, checks or Checks(), source=uri)
    if run_id:
        runlog.log_validation(client or MlflowClient(), run_id, outcome.summary)
    outcome.raise_for_failure()
    return outcome.summary


def load_model(name: str, version: str) -> SourceModel:
    """Download, scan and load the source version."""
    return load_source(name, version)


def load_inputs(job: PendingVersion, folder: str, run_id: str | None = None, cache_dir: str | None = None,
                client: MlflowClient | None = None) -> Inputs:
    """Load the verified clean set, the model's triggers and test set; record the data sets as run inputs."""
    from gradprune_mlflow.data.cleanset import load_clean_set

    clean_set = load_clean_set(Path(folder), source=job.clean_data)
    inputs = Inputs(
        clean_set,
        trigger=load_trigger_uri(job.trigger, cache_dir) if job.trigger else None,
        eval_trigger=load_trigger_uri(job.eval_trigger, cache_dir) if job.eval_trigger else None,
        test_set=load_data_uri(job.test_data, cache_dir) if job.test_data else None,
    )
    check_inputs(clean_set, inputs.trigger, inputs.eval_trigger, test_set=inputs.test_set)
    if run_id:
        client = client or MlflowClient()
        runlog.log_data_params(client, run_id, clean_set, inputs.test_set)
        runlog.log_clean_set_input(client, run_id, clean_set, job.clean_data, context="training")
        if inputs.test_set is not None:
            runlog.log_clean_set_input(client, run_id, inputs.test_set, job.test_data, context="evaluation")
    return inputs


def run_defense(source: SourceModel, inputs: Inputs, config: SanitizeConfig, progress=None):
    """Sanitize the source model; returns the SanitizeResult. Raises DataError when the clean set's input_shape
    disagrees with the model's signature, and the sanitizer's errors."""
    import gradprune_mlflow

    check_input_shape(source, inputs.clean_set.meta.input_shape)
    result = gradprune_mlflow.sanitize(source.model, inputs.clean_set, inputs.trigger, config,
                                       eval_trigger=inputs.eval_trigger, test_set=inputs.test_set, progress=progress)
    result.report["model_format"] = source.model_format
    return result


def log(run_id: str, result, inputs: Inputs, client: MlflowClient | None = None, *, job: PendingVersion | None = None,
        validation: dict[str, Any] | None = None) -> dict[str, float]:
    """Log metrics, curve and artifacts of a result to the run, then what reviewers read: report.html, the figures
    and the run description (with `job`, the version it is for, and `validation`, the GX summary). Returns the
    metrics."""
    client = client or MlflowClient()
    metrics = runlog.log_result(client, run_id, result, inputs.clean_set)
    fmt = result.report.get("model_format")
    if fmt:
        client.log_param(run_id, "model_format", fmt)
        if job is not None:
            client.set_model_version_tag(job.name, job.version, T.MODEL_FORMAT, fmt)
    if job is not None:
        source_page = runlog.version_url(client, job.name, job.version)
        review.log_review(client, run_id, result, model=job.name, version=job.version, clean_set=inputs.clean_set,
                          real_trigger=inputs.eval_trigger or inputs.trigger, validation=validation,
                          links={f"source version {job.version}": source_page} if source_page else None)
    return metrics


def register(held: Claim, run_id: str, result, source: SourceModel, inputs: Inputs,
             client: MlflowClient | None = None) -> str:
    """Log the sanitized model into the run and register it (version, tags, description, alias); returns the version.

    A registration that fails part-way leaves nothing behind: see register.register_sanitized.
    """
    client = client or MlflowClient()
    info = log_sanitized_model(run_id, result.model, source, inputs.clean_set.meta.input_shape)
    return register_sanitized(client, held, model_info=info, run_id=run_id, report=result.report,
                              run_link=runlog.run_url(client, run_id))


def succeed(job: PendingVersion, held: Claim, run_id: str, result, sanitized_version: str | None,
            client: MlflowClient | None = None) -> Outcome:
    """Write the final status and end the run: sanitized; unverified when the independent search still found a trigger
    in the registered version (it has no alias); suspect when nothing was flagged and no model came out but the flag
    score is in the suspect band; clean otherwise."""
    client = client or MlflowClient()
    extra = {"run_id": run_id}
    if sanitized_version:
        extra["sanitized_version"] = sanitized_version
        review.set_run_note(client, run_id, result.report, model=job.name, version=job.version,
                            sanitized_version=sanitized_version)
    if sanitized_version and verification_failed(result.report):
        status, reason = T.UNVERIFIED, unverified_reason(result.report, sanitized_version)
    elif sanitized_version:
        status, reason = T.SANITIZED, None
    elif suspect(result.report):
        status = T.SUSPECT
        reason = (f"{suspect_reason(result.report)}; nothing registered (on_suspect=report): review the model, or "
                  "sanitize it by deleting its gradprune.status tag and scanning with --set on_suspect=sanitize")
    else:
        status, reason = T.CLEAN, "no backdoor flagged; nothing registered (on_clean=skip)"
    finish(client, held, status, reason, **extra)
    runlog.end_run(client, run_id, ok=True)
    return Outcome(job.name, job.version, status, reason, run_id, runlog.run_url(client, run_id), sanitized_version,
                   dict(result.report.get("before") or {}), dict(result.report.get("after") or {}))


def fail(job: PendingVersion, held: Claim, run_id: str | None, exc: BaseException,
         client: MlflowClient | None = None) -> Outcome:
    """Record a failed step: the error's status and reason on the version (unless the claim was lost to another
    worker, whose tags we must not touch), and the run marked FAILED."""
    client = client or MlflowClient()
    status, reason = status_for(exc), reason_for(exc)
    # Only an unexpected error can come after registering (bad inputs and unsafe models stop the flow long before),
    # so only then can a registered result stand; checking costs a registry search.
    adopted = adopt(job, held, client) if status == T.FAILED and not isinstance(exc, ClaimLost) else None
    if adopted is not None:  # the failure came after our result was registered: it stands
        if run_id:
            runlog.end_run(client, run_id, ok=adopted.run_id == run_id)
        return adopted
    if isinstance(exc, ClaimLost):
        status = "lost"
    elif status == T.FAILED:
        reason += "; retry by deleting the gradprune.status tag or with `gradprune scan --retry-failed`"
    if not isinstance(exc, ClaimLost):
        extra = {"run_id": run_id} if run_id else {}
        finish(client, held, status, reason, **extra)
    url = None
    if run_id:
        client.set_tag(run_id, T.REASON, reason[: T.MAX_REASON])
        runlog.end_run(client, run_id, ok=False)
        url = runlog.run_url(client, run_id)
    return Outcome(job.name, job.version, status, reason, run_id, url)


def retry_failed(client: MlflowClient | None = None, model: str | None = None) -> list[str]:
    """Make `failed` versions pending again (delete their status, reason and lease tags); returns 'name/version's."""
    client = client or MlflowClient()
    reset = []
    for rm in registered_models(client, model):
        for v in all_versions(client, rm.name):
            if (v.tags or {}).get(T.STATUS) == T.FAILED:
                # Status last: pending only when clean. The claim id stays: the next claim sees that an earlier run
                # may have left a registered result, and adopts it rather than sanitizing twice.
                for key in (T.REASON, T.LEASE_UNTIL, T.STATUS):
                    if key in v.tags:
                        client.delete_model_version_tag(rm.name, v.version, key)
                reset.append(f"{rm.name}/{v.version}")
    return reset

