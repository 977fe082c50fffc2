"""Register a sanitized model as a new version of the SAME registered model, then move the alias `sanitized`.

All or nothing: the new version is created with its tags and description in one call; if anything after that fails
(the claim was lost, the alias cannot be set), the new version is deleted again and the alias stays where it was.
The source version's final status is written by the caller (claim.finish) after this returns.
"""

from __future__ import annotations

import logging
import pickle
from typing import Any

import torch
from mlflow import MlflowClient
from torch import nn

from gradprune_mlflow.errors import GradpruneError
from gradprune_mlflow.models.io import quiet
from gradprune_mlflow.registry import tags as T
from gradprune_mlflow.registry.claim import Claim, holds
from gradprune_mlflow.registry.pending import all_versions
from gradprune_mlflow.registry.source import SourceModel
from gradprune_mlflow.report.summary import version_description

log = logging.getLogger(__name__)
MODEL_NAME = "sanitized_model"  # the model's name inside the run


class ClaimLost(GradpruneError):
    """Another worker holds the version now (our lease ran out): our result is not registered."""


def log_sanitized_model(run_id: str, model: nn.Module, source: SourceModel, input_shape) -> Any:
    """Log `model` into run `run_id` in its source's format: an adapter (pt2, TorchScript) as the source's folder with
    new weights (models/mlflow_log.py); an eager module with the pytorch flavor (pickle format), the source's signature
    (inferred from a forward pass when the source has none) and the source's pip requirements. Returns ModelInfo."""
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    from gradprune_mlflow.models.adapter import FormatAdapter
    from gradprune_mlflow.models.mlflow_log import log_in_format

    if isinstance(model, FormatAdapter):  # pt2 and TorchScript go back in their own format and folder
        return log_in_format(model, run_id, MODEL_NAME)
    model = model.cpu().eval()
    signature = source.signature
    if signature is None:
        example = torch.zeros(1, *map(int, input_shape))
        with torch.no_grad():
            signature = infer_signature(example.numpy(), model(example).numpy())
    requirements = source.requirements or mlflow.pytorch.get_default_pip_requirements()
    # The fluent API puts the logged model in the run's experiment only while the run is active; the active run is
    # thread-local, so this is safe inside a flow's worker thread.
    with mlflow.start_run(run_id=run_id), quiet("mlflow.pytorch"):
        return mlflow.pytorch.log_model(
            model, name=MODEL_NAME, serialization_format="pickle", pickle_module=pickle, signature=signature,
            pip_requirements=requirements,
        )


def register_sanitized(
    client: MlflowClient,
    claim: Claim,
    *,
    model_info: Any,
    run_id: str,
    report: dict[str, Any],
    run_link: str,
) -> str:
    """Create the sanitized version (tags, description, run link), re-check the claim, point `sanitized` at it,
    unless its verification failed: then the version stays, for review, and the alias stays where it was.

    Returns the new version number. Raises ClaimLost when the claim is no longer ours, and re-raises whatever failed
    after the version was created; in both cases the new version is deleted and no alias has moved.
    """
    tags = {T.ROLE: T.ROLE_SANITIZED, T.SOURCE_VERSION: claim.version, T.RUN_ID: run_id}
    if report.get("model_format"):
        tags[T.MODEL_FORMAT] = report["model_format"]
    verdict = (report.get("verification") or {}).get("verdict")
    if verdict:
        tags[T.VERIFICATION] = verdict
    mv = client.create_model_version(
        claim.name, source=model_info.model_uri, run_id=run_id, tags=tags, run_link=run_link,
        description=describe(report, claim.version, run_link), model_id=getattr(model_info, "model_id", None),
    )
    try:
        if not holds(client, claim):
            raise ClaimLost(f"{claim.name} version {claim.version} was claimed by another worker while we worked; "
                            "our result was not registered")
        if verdict != T.VERIFICATION_FAILED:
            move_alias(client, claim.name)
    except BaseException:
        _delete_quietly(client, claim.name, mv.version)
        raise
    return str(mv.version)


def move_alias(client: MlflowClient, name: str) -> str:
    """Point the alias `sanitized` at the newest sanitized version of `name` (by version number) whose verification
    did not fail; return it.

    Computing the newest each time, rather than taking ours, keeps concurrent registrations from moving the alias
    backwards.
    """
    versions = [v for v in all_versions(client, name, {T.ROLE: T.ROLE_SANITIZED})
                if (v.tags or {}).get(T.VERIFICATION) != T.VERIFICATION_FAILED]
    newest = str(max(int(v.version) for v in versions))
    client.set_registered_model_alias(name, T.ALIAS, newest)
    return newest


def find_sanitized(client: MlflowClient, name: str, source_version: str) -> Any | None:
    """The newest sanitized version of `name` made from `source_version` (a ModelVersion), or None."""
    made = all_versions(client, name, {T.ROLE: T.ROLE_SANITIZED, T.SOURCE_VERSION: str(source_version)})
    return max(made, key=lambda v: int(v.version), default=None)


def _delete_quietly(client: MlflowClient, name: str, version: str) -> None:
    try:
        client.delete_model_version(name, version)
    except Exception:  # the error that brought us here is the one to report
        log.exception("could not delete half-registered version %s/%s; delete it by hand", name, version)


def describe(report: dict[str, Any], source_version: str, run_link: str) -> str:
    """The version description: where it came from, a before/after markdown table and how it was measured."""
    return version_description(report, source_version, run_link)
