"""Claiming a version before work, so that two scans never sanitize the same version twice.

MLflow has no compare-and-set on tags, so the claim is optimistic: write a lease (an expiry time), a claim id and
`gradprune.status=running`, wait a moment for any concurrent claimer's writes to land, and re-read. The last writer
wins; everyone else sees another id and backs off without writing anything more. The winner checks again right
before it registers (`holds`), so a claim lost later (a lease that ran out) never registers a second result.
A worker killed mid-run leaves `running` with a lease that runs out; the next scan takes the version up again.

The settle delay must exceed the time between a claimer's check and its writes (two HTTP calls, milliseconds);
the default second leaves a wide margin.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from gradprune_mlflow.registry import tags as T
from gradprune_mlflow.registry.pending import is_pending

DEFAULT_LEASE_SECONDS = float(os.environ.get("GRADPRUNE_LEASE_SECONDS", 2 * 3600))
DEFAULT_SETTLE_SECONDS = float(os.environ.get("GRADPRUNE_CLAIM_SETTLE_SECONDS", 1.0))


@dataclass(frozen=True)
class Claim:
    """A version we hold: its name, version, our claim id and when the lease runs out (epoch seconds)."""

    name: str
    version: str
    claim_id: str
    lease_until: float


def new_claim_id() -> str:
    """host:pid:random, so that a stuck claim says where it came from."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def claim_version(
    client: MlflowClient,
    name: str,
    version: str | int,
    *,
    lease_seconds: float | None = None,
    settle_seconds: float | None = None,
) -> Claim | None:
    """Claim `name` version `version` for this worker.

    Returns the Claim, or None when the version is not pending or another worker won it (nothing is written then,
    or our writes are overwritten by the winner's). Raises MlflowException when the registry cannot be reached.
    """
    version = str(version)
    lease = DEFAULT_LEASE_SECONDS if lease_seconds is None else lease_seconds
    settle = DEFAULT_SETTLE_SECONDS if settle_seconds is None else settle_seconds
    if not is_pending(_tags(client, name, version)):
        return None
    claim = Claim(name, version, new_claim_id(), time.time() + lease)
    # Lease first and status last: whoever sees `running` also finds a lease, so a crash between the writes
    # never leaves a version that is running forever.
    set_tag(client, name, version, T.LEASE_UNTIL, f"{claim.lease_until:.3f}")
    set_tag(client, name, version, T.CLAIM_ID, claim.claim_id)
    set_tag(client, name, version, T.STATUS, T.RUNNING)
    time.sleep(settle)
    return claim if holds(client, claim) else None


def holds(client: MlflowClient, claim: Claim) -> bool:
    """True while the version still carries our claim id, status `running` and an unexpired lease."""
    current = _tags(client, claim.name, claim.version)
    return (current.get(T.CLAIM_ID) == claim.claim_id and current.get(T.STATUS) == T.RUNNING
            and claim.lease_until > time.time())


def finish(client: MlflowClient, claim: Claim, status: str, reason: str | None = None, **extra: str) -> None:
    """Write the final status of a claimed version (plus `extra` tags, and the reason for any non-success status).

    The status goes last, so a reader that sees it also sees the tags it refers to. The lease is removed; the claim
    id stays, as a record of who did the work.
    """
    if status not in T.STATUSES or status == T.RUNNING:
        raise ValueError(f"final status must be one of {T.STATUSES[1:]}, got {status!r}")
    for key, value in extra.items():
        set_tag(client, claim.name, claim.version, f"{T.PREFIX}{key}", str(value))
    if reason:
        set_tag(client, claim.name, claim.version, T.REASON, one_line(reason)[: T.MAX_REASON])
    set_tag(client, claim.name, claim.version, T.STATUS, status)
    client.delete_model_version_tag(claim.name, claim.version, T.LEASE_UNTIL)


def set_tag(client: MlflowClient, name: str, version: str, key: str, value: str, attempts: int = 5) -> None:
    """Set a version tag, retrying when a concurrent writer of the same key wins the race inside the server.

    MLflow's SQL store writes a tag as select-then-insert: two workers writing a new key at once make one of them
    fail with a unique-constraint error. The retry finds the row and updates it; who owns the claim is settled by
    reading the tags back, not by whose write failed.
    """
    for attempt in range(attempts):
        try:
            client.set_model_version_tag(name, version, key, value)
            return
        except MlflowException as exc:
            if attempt == attempts - 1 or not _write_conflict(exc):
                raise
            time.sleep(0.05 * (attempt + 1))


def _write_conflict(exc: MlflowException) -> bool:
    text = str(exc).lower()
    return any(s in text for s in ("unique constraint", "integrityerror", "duplicate", "already exists",
                                   "database is locked"))


def one_line(text: str) -> str:
    """Fold whitespace and newlines: tag values and CLI messages are one line."""
    return " ".join(str(text).split())


def _tags(client: MlflowClient, name: str, version: str) -> dict[str, str]:
    return dict(client.get_model_version(name, version).tags or {})
