"""Which model versions are waiting for us, and with which inputs.

A version is pending when it has neither `gradprune.status` nor `gradprune.role`, and its registered model has a clean
set: the registered-model tag `gradprune.clean_data`, else the environment's `GRADPRUNE_CLEAN_DATA`. A version left
`running` by a worker whose lease ran out (it crashed or was killed) is pending again.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from gradprune_mlflow.errors import BadInput
from gradprune_mlflow.registry import tags as T

_PAGE = 200


@dataclass(frozen=True)
class PendingVersion:
    """A version to sanitize and the URIs of its inputs (local paths or s3://); None where the model sets none."""

    name: str
    version: str
    clean_data: str
    trigger: str | None = None
    eval_trigger: str | None = None
    test_data: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_inputs(model_tags: dict[str, str]) -> dict[str, str | None] | None:
    """The input URIs a registered model's tags name, or None when it has no clean set (tag or env default)."""
    clean = model_tags.get(T.CLEAN_DATA) or os.environ.get(T.CLEAN_DATA_ENV) or None
    if not clean:
        return None
    return {"clean_data": clean, "trigger": model_tags.get(T.TRIGGER) or None,
            "eval_trigger": model_tags.get(T.EVAL_TRIGGER) or None, "test_data": model_tags.get(T.TEST_DATA) or None}


def set_model_inputs(
    client: MlflowClient,
    name: str,
    *,
    clean_data: str | None = None,
    trigger: str | None = None,
    eval_trigger: str | None = None,
    test_data: str | None = None,
) -> None:
    """Tag registered model `name` with the URIs of its inputs (only those given; local paths or s3://)."""
    given = {T.CLEAN_DATA: clean_data, T.TRIGGER: trigger, T.EVAL_TRIGGER: eval_trigger, T.TEST_DATA: test_data}
    for key, value in given.items():
        if value:
            client.set_registered_model_tag(name, key, str(value))


def is_pending(version_tags: dict[str, str], now: float | None = None) -> bool:
    """True for a version we have not touched (no status, no role) or whose `running` lease has expired."""
    if T.ROLE in version_tags:
        return False
    status = version_tags.get(T.STATUS)
    if status is None:
        return True
    return status == T.RUNNING and lease_expired(version_tags, now)


def lease_expired(version_tags: dict[str, str], now: float | None = None) -> bool:
    """True when the version's lease tag lies in the past. A missing or unreadable lease never expires."""
    try:
        until = float(version_tags[T.LEASE_UNTIL])
    except (KeyError, ValueError):
        return False
    return until < (time.time() if now is None else now)


def find_pending(client: MlflowClient | None = None, model: str | None = None) -> list[PendingVersion]:
    """All pending versions, oldest first per model; only those of registered model `model` when given.

    Raises BadInput when `model` names no registered model.
    """
    client = client or MlflowClient()
    models = registered_models(client, model)
    found: list[PendingVersion] = []
    for rm in models:
        inputs = model_inputs(dict(rm.tags or {}))
        if inputs is None:
            continue
        now = time.time()
        versions = [v for v in all_versions(client, rm.name) if is_pending(dict(v.tags or {}), now)]
        found += [PendingVersion(rm.name, str(v.version), **inputs) for v in sorted(versions, key=_number)]
    return found


def pending_version(client: MlflowClient, name: str, version: str | int) -> PendingVersion | None:
    """The PendingVersion for one version, or None when it is not pending (touched already, or no clean set).

    Raises BadInput when the model or version does not exist.
    """
    rm = _get_model(client, name)
    inputs = model_inputs(dict(rm.tags or {}))
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException:
        raise BadInput(f"registered model {name!r} has no version {version}") from None
    if inputs is None or not is_pending(dict(mv.tags or {})):
        return None
    return PendingVersion(name, str(mv.version), **inputs)


def registered_models(client: MlflowClient, model: str | None = None) -> list:
    """Registered model `model` (BadInput when missing), or every registered model when None."""
    return [_get_model(client, model)] if model else _all_models(client)


def _get_model(client: MlflowClient, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException:
        raise BadInput(f"no registered model named {name!r}; check the name (and MLFLOW_TRACKING_URI)") from None


def _all_models(client: MlflowClient) -> list:
    out, token = [], None
    while True:
        page = client.search_registered_models(max_results=_PAGE, page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out


def all_versions(client: MlflowClient, name: str, tags: dict[str, str] | None = None) -> list:
    """Every version of registered model `name` (only those carrying all of `tags`, when given), all pages.

    The tag filter runs in the registry, so finding one version among hundreds does not fetch them all.
    """
    where = f"name={_quote(name)}" + "".join(f" AND tags.`{k}` = {_quote(v)}" for k, v in (tags or {}).items())
    out, token = [], None
    while True:
        page = client.search_model_versions(where, max_results=_PAGE, page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out


def _quote(value: str) -> str:
    return f'"{value}"' if "'" in value else f"'{value}'"


def _number(version) -> int:
    return int(version.version)
