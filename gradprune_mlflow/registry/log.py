"""One MLflow run per sanitized version, in the experiment `gradprune`: parameters, metrics, curve, artifacts, input.

Everything goes through an explicit run id (MlflowClient), not the fluent active run, so that flows may log from
worker threads. Metric names are a contract: docs/contracts.md, "Run metrics and artifacts".
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from typing import Any
from urllib.parse import quote

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException

from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.data.cleanset import CleanSet
from gradprune_mlflow.registry import tags as T
from gradprune_mlflow.registry.pending import PendingVersion
from gradprune_mlflow.report.figures import curve_png, triggers_png

SIDES = ("before", "after")
REPORT_METRICS = ("clean_accuracy", "attack_success_rate", "robust_accuracy", "clean_target_rate",
                  "synthesized_trigger_success_rate", "synthesized_trigger_robust_accuracy")
# The pruning curve, one point per pruning step (x = step).
CURVE_METRICS = {"pruned": "curve/pruned_filters", "val_clean_accuracy": "curve/val_clean_accuracy",
                 "val_unlearning_loss": "curve/val_unlearning_loss"}


def experiment_id(client: MlflowClient, name: str = T.EXPERIMENT) -> str:
    """The id of experiment `name`, created when missing (two scans creating it at once both get the same one)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start_run(client: MlflowClient, job: PendingVersion, config: SanitizeConfig, claim_id: str = "") -> str:
    """Create the run for one version: tags naming the version, parameters for the config and the inputs.

    Returns the run id. The run stays RUNNING until `end_run`.
    """
    tags = {"gradprune.model": job.name, "gradprune.version": job.version, T.CLAIM_ID: claim_id,
            "mlflow.runName": f"{job.name}-v{job.version}"}
    run = client.create_run(experiment_id(client), tags=tags)
    params = {**{f"config.{k}": v for k, v in config.to_dict().items()}, "model_name": job.name,
              "model_version": job.version, "model_uri": job.uri, "clean_data": job.clean_data,
              "trigger": job.trigger or "none", "eval_trigger": job.eval_trigger or "none",
              "test_data": job.test_data or "none"}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    return run.info.run_id


def end_run(client: MlflowClient, run_id: str, ok: bool) -> None:
    """Mark the run FINISHED or FAILED."""
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))


def run_url(client: MlflowClient, run_id: str) -> str:
    """A link to the run in the MLflow UI when the tracking server speaks HTTP, else `runs:/<id>`."""
    uri = client.tracking_uri
    if not str(uri).startswith(("http://", "https://")):
        return f"runs:/{run_id}"
    exp = client.get_run(run_id).info.experiment_id
    return f"{str(uri).rstrip('/')}/#/experiments/{exp}/runs/{run_id}"


def version_url(client: MlflowClient, name: str, version: str) -> str | None:
    """A link to a model version's page in the MLflow UI, or None when the tracking server does not speak HTTP."""
    uri = str(client.tracking_uri)
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/models/{quote(name, safe='')}/versions/{version}"


def log_json(client: MlflowClient, run_id: str, obj: Any, artifact_file: str) -> None:
    """Write `obj` as indented JSON to the run's artifact path `artifact_file`."""
    client.log_text(run_id, json.dumps(obj, indent=2, default=str) + "\n", artifact_file)


def log_validation(client: MlflowClient, run_id: str, summary: dict[str, Any]) -> None:
    """Log the clean set's Great Expectations result (its JSON summary) and its verdict."""
    log_json(client, run_id, summary, "validation/ge_result.json")
    stats = summary.get("statistics", {})
    client.log_batch(run_id, metrics=_metrics({"clean_set/expectations_failed": stats.get("unsuccessful_expectations"),
                                               "clean_set/rows": summary.get("data", {}).get("rows")}))
    client.set_tag(run_id, "gradprune.clean_set_valid", str(bool(summary.get("success"))).lower())


def log_data_params(client: MlflowClient, run_id: str, clean_set: CleanSet, test_set: CleanSet | None = None) -> None:
    """Parameters naming exactly which data was used: the manifests' sha256 and the set sizes."""
    params = {"clean_data_manifest_sha256": clean_set.manifest_sha256, "clean_data_images": len(clean_set)}
    if test_set is not None:
        params |= {"test_data_manifest_sha256": test_set.manifest_sha256, "test_data_images": len(test_set)}
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])


def log_clean_set_input(client: MlflowClient, run_id: str, clean_set: CleanSet, uri: str,
                        context: str = "training") -> None:
    """Record a clean (or test) set as a run input: its manifest as a table, its URI as the source, hash as digest."""
    import mlflow
    import pandas as pd
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    frame = pd.DataFrame({"path": clean_set.paths or [""] * len(clean_set), "label": clean_set.labels.numpy()})
    # A local path matches two equivalent local sources (either is right), and MLflow hints that integer labels
    # cannot hold missing values (ours never miss): neither warning helps anyone.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(uri)
        dataset = mlflow.data.from_pandas(frame, source=source, targets="label", name=clean_set.meta.name,
                                          digest=(clean_set.manifest_sha256 or "")[:16] or None)
        entry = _dataset_input(dataset, context)  # the schema, and its warning, are computed here
    client.log_inputs(run_id, datasets=[entry])


def _dataset_input(dataset, context: str):
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The run metrics (docs/contracts.md) read off a report.json dict; missing or null values are left out."""
    out: dict[str, Any] = {}
    for side in SIDES:
        for key in REPORT_METRICS:
            out[f"{key}/{side}"] = (report.get(side) or {}).get(key)
    out["anomaly_index"] = (report.get("detection") or {}).get("anomaly_index")
    verification = report.get("verification") or {}
    if verification.get("verdict") in ("passed", "failed"):  # the independent search ran
        out["verification_anomaly_index"] = verification.get("anomaly_index")
        out["verification_synthesized_trigger_success_rate"] = verification.get("synthesized_trigger_success_rate")
    out["pruned_filters"] = report.get("pruned_filters")
    total = report.get("total_filters")
    if isinstance(total, int | float) and total and isinstance(report.get("pruned_filters"), int | float):
        out["pruned_fraction"] = report["pruned_filters"] / total
    out["sanitize_seconds"] = report.get("seconds")
    return {k: float(v) for k, v in out.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def log_result(client: MlflowClient, run_id: str, result, clean_set: CleanSet | None = None) -> dict[str, float]:
    """Log a SanitizeResult: metrics, the pruning curve, report.json, pruning_history.json, the curve plot and the
    synthesized triggers. Returns the metrics logged."""
    metrics = report_metrics(result.report)
    client.log_batch(run_id, metrics=_metrics(metrics))
    curve = [_metrics({name: point.get(key) for key, name in CURVE_METRICS.items()}, step=int(point.get("step", i)))
             for i, point in enumerate(result.curve)]
    for chunk in _chunks([m for ms in curve for m in ms], 900):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=chunk)
    log_json(client, run_id, result.report, "report.json")
    log_json(client, run_id, result.history, "pruning_history.json")
    if result.curve:
        client.log_image(run_id, curve_png(result.curve), artifact_file="plots/pruning_curve.png")
    _log_triggers(client, run_id, result.triggers, clean_set)
    client.set_tag(run_id, "gradprune.trigger_source", str(result.report.get("trigger_source")))
    verdict = (result.report.get("verification") or {}).get("verdict")
    if verdict:
        client.set_tag(run_id, T.VERIFICATION, verdict)
    return metrics


def _log_triggers(client: MlflowClient, run_id: str, triggers, clean_set: CleanSet | None) -> None:
    from gradprune_mlflow.defense.trigger_files import savable, save_triggers

    shown = savable(triggers)
    if not shown:
        return
    with tempfile.TemporaryDirectory(prefix="gradprune-triggers-") as tmp:
        save_triggers(shown, tmp)
        client.log_artifacts(run_id, tmp, "triggers")
    client.log_image(run_id, triggers_png(shown, clean_set), artifact_file="plots/synthesized_triggers.png")


def _metrics(values: dict[str, Any], step: int = 0) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool)]


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]

