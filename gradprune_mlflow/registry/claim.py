"""Claiming a version before work, so that two scans never sanitize the same version twice.

MLflow has no compare-and-set on tags, so the claim is optimistic: write a lease (an expiry time), a claim id and
`gradprune.status=running`, wait a moment for any concurrent claimer's writes to land, and re-read. The last writer
wins; everyone else sees another id and backs off without writing anything more. The winner checks again right
before it registers (`holds`), so a claim lost later (a lease that ran out) never registers a second result.
A worker killed mid-run leaves `running` with a lease that runs out; the next scan takes the version up again.

The settle delay must exceed the time between a claimer's check and its writes (two HTTP calls, milliseconds);
the default second leaves a wide margin.

While a worker runs, `LeaseKeeper` renews its lease from a background thread, so a run longer than the lease keeps its
claim, and a short lease (`GRADPRUNE_LEASE_SECONDS`) still frees a dead worker's version soon.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from gradprune_mlflow.registry import tags as T
from gradprune_mlflow.registry.pending import is_pending, lease_expired

log = logging.getLogger(__name__)


def lease_seconds_default() -> float:
    """`GRADPRUNE_LEASE_SECONDS`, else two hours. Read at each claim, so a worker's environment decides."""
    return float(os.environ.get("GRADPRUNE_LEASE_SECONDS") or 2 * 3600)


def settle_seconds_default() -> float:
    """`GRADPRUNE_CLAIM_SETTLE_SECONDS`, else one second."""
    return float(os.environ.get("GRADPRUNE_CLAIM_SETTLE_SECONDS") or 1.0)


@dataclass(frozen=True)
class Claim:
    """A version we hold: its name, version, our claim id, when the lease first runs out (epoch seconds) and how long
    each renewal extends it."""

    name: str
    version: str
    claim_id: str
    lease_until: float
    lease_seconds: float = 2 * 3600.0
    # The claim id a worker before us left on the version (its lease ran out, or it was retried), else None: only
    # then can a result of an earlier run exist.
    previous_claim: str | None = None


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
    lease = lease_seconds_default() if lease_seconds is None else lease_seconds
    settle = settle_seconds_default() if settle_seconds is None else settle_seconds
    before = _tags(client, name, version)
    if not is_pending(before):
        return None
    claim = Claim(name, version, new_claim_id(), time.time() + lease, lease, before.get(T.CLAIM_ID))
    # Lease first and status last: whoever sees `running` also finds a lease, so a crash between the writes
    # never leaves a version that is running forever.
    set_tag(client, name, version, T.LEASE_UNTIL, f"{claim.lease_until:.3f}")
    set_tag(client, name, version, T.CLAIM_ID, claim.claim_id)
    set_tag(client, name, version, T.STATUS, T.RUNNING)
    time.sleep(settle)
    return claim if holds(client, claim) else None


def holds(client: MlflowClient, claim: Claim) -> bool:
    """True while the version still carries our claim id, status `running` and an unexpired lease (the lease on the
    version, which LeaseKeeper renews)."""
    current = _tags(client, claim.name, claim.version)
    return (current.get(T.CLAIM_ID) == claim.claim_id and current.get(T.STATUS) == T.RUNNING
            and not lease_expired(current))


def renew(client: MlflowClient, claim: Claim) -> bool:
    """Push the lease `claim.lease_seconds` into the future while the claim is ours; returns whether it was."""
    if not holds(client, claim):
        return False
    set_tag(client, claim.name, claim.version, T.LEASE_UNTIL, f"{time.time() + claim.lease_seconds:.3f}")
    return True


class LeaseKeeper:
    """A context manager that renews a claim's lease every third of its length from a daemon thread.

    Renewal stops when the block ends or the claim is lost; a failed renewal (registry briefly down) is logged and
    tried again at the next tick. The thread dies with the process, so a killed worker's lease still runs out.
    """

    def __init__(self, client: MlflowClient, claim: Claim, every: float | None = None):
        self.client, self.claim = client, claim
        self.every = max(0.5, claim.lease_seconds / 3) if every is None else every
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{claim.name}-{claim.version}", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                if not renew(self.client, self.claim):
                    return
                self.renewals += 1
            except Exception as exc:  # the next tick tries again; the lease has two more ticks of slack
                log.warning("could not renew the lease on %s v%s: %s", self.claim.name, self.claim.version, exc)


def finish(client: MlflowClient, claim: Claim, status: str, reason: str | None = None, **extra: str) -> None:
    """Write the final status of a claimed version (plus `extra` tags, and the reason for any non-success status).

    The status goes last, so a reader that sees it also sees the tags it refers to. The lease is removed; the claim
    id stays, as a record of who did the work. Finishing again with the same values changes nothing.
    """
    if status not in T.STATUSES or status == T.RUNNING:
        raise ValueError(f"final status must be one of {T.STATUSES[1:]}, got {status!r}")
    for key, value in extra.items():
        set_tag(client, claim.name, claim.version, f"{T.PREFIX}{key}", str(value))
    if reason:
        set_tag(client, claim.name, claim.version, T.REASON, one_line(reason)[: T.MAX_REASON])
    set_tag(client, claim.name, claim.version, T.STATUS, status)
    try:
        _versions(client).delete_model_version_tag(claim.name, claim.version, T.LEASE_UNTIL)
    except MlflowException as exc:  # finishing twice is fine: the lease is gone already
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def set_tag(client: MlflowClient, name: str, version: str, key: str, value: str, attempts: int = 5) -> None:
    """Set a version tag, retrying when a concurrent writer of the same key wins the race inside the server.

    MLflow's SQL store writes a tag as select-then-insert: two workers writing a new key at once make one of them
    fail with a unique-constraint error. The retry finds the row and updates it; who owns the claim is settled by
    reading the tags back, not by whose write failed.
    """
    for attempt in range(attempts):
        try:
            _versions(client).set_model_version_tag(name, version, key, value)
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
    return dict(_versions(client).get_model_version(name, version).tags or {})


def _versions(client: MlflowClient):
    """Where claims read and write version tags: the registry client under MlflowClient.

    MlflowClient asks the server whether the name is a prompt before every model-version call (one more
    get_registered_model request each): about a third of a version's registry requests, 30 s of the 200-version load
    test. Claims touch only versions that `pending_version` has already read through MlflowClient (with that check),
    so the registry client underneath, which makes the same calls without it, is enough. Falls back to the client
    itself if a later MLflow moves that accessor.
    """
    registry = getattr(client, "_get_registry_client", None)
    return registry() if registry is not None else client
