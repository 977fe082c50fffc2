"""The webhook receiver (gradprune_mlflow/webhooks) against the real ASGI app, signed the way MLflow signs.

Valid deliveries are signed with MLflow's own signer (mlflow/webhooks/delivery.py), and one test sends a delivery
through MLflow's real delivery code to the receiver running under uvicorn on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import uvicorn
from mlflow.webhooks.delivery import _generate_hmac_signature
from starlette.testclient import TestClient
from typer.testing import CliRunner

from gradprune_mlflow.cli import app as cli
from gradprune_mlflow.local_services import free_port
from gradprune_mlflow.webhooks import ReplayCache, create_app, sign
from gradprune_mlflow.webhooks.receiver import MAX_BODY, PATH

SECRET = "s3cret-for-tests"


def _payload(name: str = "fashion-cnn", version: str = "1", tags: dict | None = None, entity: str = "model_version",
             action: str = "created") -> bytes:
    """The body MLflow sends (mlflow/webhooks/delivery.py::_send_webhook_request)."""
    data = {"name": name, "version": version, "source": "models:/m-123", "run_id": "abc",
            "tags": tags or {}, "description": None}
    return json.dumps({"entity": entity, "action": action, "timestamp": "2026-11-27T00:00:00+00:00",
                       "data": data}).encode()


def _headers(body: bytes, *, secret: str = SECRET, delivery_id: str | None = None, at: float | None = None):
    delivery_id = delivery_id or str(uuid.uuid4())
    timestamp = str(int(time.time() if at is None else at))
    return {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery_id,
            "X-MLflow-Timestamp": timestamp,
            "X-MLflow-Signature": _generate_hmac_signature(secret, delivery_id, timestamp, body.decode())}


class Recorder:
    """An emitter that records what it was given; fails `failures` times first."""

    def __init__(self, failures: int = 0):
        self.seen, self.failures = [], failures

    def __call__(self, created) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("prefect is down")
        self.seen.append(created)


@pytest.fixture
def emitted():
    return Recorder()


@pytest.fixture
def client(emitted):
    with TestClient(create_app(SECRET, emitted)) as c:
        yield c


def test_a_valid_delivery_emits_one_event_for_the_version(client, emitted):
    body = _payload("fashion.cnn", "7")
    resp = client.post(PATH, content=body, headers=_headers(body))
    assert resp.status_code == 202, resp.text
    assert resp.json() == {"status": "emitted", "event": "mlflow.model_version.created",
                           "resource": "mlflow.model-version.fashion.cnn.7"}
    [created] = emitted.seen
    assert (created.name, created.version, created.data["source"]) == ("fashion.cnn", "7", "models:/m-123")


def test_our_signer_matches_mlflows():
    body = _payload()
    assert sign(SECRET, "d-1", "1700000000", body) == _generate_hmac_signature(SECRET, "d-1", "1700000000",
                                                                               body.decode())


@pytest.mark.parametrize("forge", ["wrong secret", "changed body", "changed delivery id", "no signature",
                                   "bad timestamp"])
def test_forged_deliveries_are_refused_with_401(client, emitted, forge):
    body = _payload()
    headers = _headers(body, secret="not-the-secret" if forge == "wrong secret" else SECRET)
    if forge == "changed body":
        body = _payload(version="2")
    elif forge == "changed delivery id":
        headers["X-MLflow-Delivery-Id"] = str(uuid.uuid4())
    elif forge == "no signature":
        del headers["X-MLflow-Signature"]
    elif forge == "bad timestamp":
        headers["X-MLflow-Timestamp"] = "yesterday"
    resp = client.post(PATH, content=body, headers=headers)
    assert resp.status_code == 401, resp.text
    assert emitted.seen == []


@pytest.mark.parametrize("offset", [-301, 301])
def test_stale_or_future_timestamps_are_refused_with_401(client, emitted, offset):
    body = _payload()
    resp = client.post(PATH, content=body, headers=_headers(body, at=time.time() + offset))
    assert resp.status_code == 401 and "stale delivery" in resp.json()["message"]
    assert emitted.seen == []
    fresh = _headers(body, at=time.time() - 200)
    assert client.post(PATH, content=body, headers=fresh).status_code == 202


def test_a_replayed_delivery_id_is_refused_with_409(client, emitted):
    body = _payload()
    headers = _headers(body)
    assert client.post(PATH, content=body, headers=headers).status_code == 202
    resp = client.post(PATH, content=body, headers=headers)
    assert resp.status_code == 409 and "already received" in resp.json()["message"]
    assert len(emitted.seen) == 1


def test_bodies_over_one_mib_are_refused_with_413(client, emitted):
    body = _payload(tags={"pad": "x" * MAX_BODY})
    assert client.post(PATH, content=body, headers=_headers(body)).status_code == 413

    def chunks():  # no Content-Length: the receiver must stop reading once the limit is passed
        for _ in range(MAX_BODY // 65536 + 2):
            yield b" " * 65536

    streamed = client.post(PATH, content=chunks(), headers=_headers(b"irrelevant"))
    assert streamed.status_code == 413
    just_fits = _payload(tags={"pad": "x" * (MAX_BODY - len(_payload()) - 20)})
    assert len(just_fits) <= MAX_BODY
    assert client.post(PATH, content=just_fits, headers=_headers(just_fits)).status_code == 202
    assert len(emitted.seen) == 1


def test_our_own_sanitized_versions_and_other_events_are_ignored(client, emitted):
    ours = _payload(tags={"gradprune.role": "sanitized", "gradprune.source_version": "1"})
    resp = client.post(PATH, content=ours, headers=_headers(ours))
    assert resp.status_code == 200 and resp.json()["status"] == "ignored"
    other = _payload(action="updated")
    assert client.post(PATH, content=other, headers=_headers(other)).json()["status"] == "ignored"
    assert emitted.seen == []


def test_a_signed_body_that_is_not_mlflows_is_400(client, emitted):
    for body in (b"not json", b"[1, 2]", json.dumps({"entity": "model_version", "action": "created",
                                                     "data": {"name": "m"}}).encode()):
        assert client.post(PATH, content=body, headers=_headers(body)).status_code == 400
    assert emitted.seen == []


def test_a_failed_emit_is_503_and_mlflows_retry_of_the_same_delivery_goes_through():
    emitted = Recorder(failures=1)
    with TestClient(create_app(SECRET, emitted, replay=ReplayCache(ttl=600))) as c:
        body = _payload()
        headers = _headers(body)
        resp = c.post(PATH, content=body, headers=headers)
        assert resp.status_code == 503 and "prefect is down" in resp.json()["message"]
        assert c.post(PATH, content=body, headers=headers).status_code == 202
        assert c.post(PATH, content=body, headers=headers).status_code == 409
    assert [e.version for e in emitted.seen] == ["1"]


def test_replay_cache_expires_and_stays_bounded():
    cache = ReplayCache(ttl=10, max_entries=3)
    assert cache.reserve("a", now=0) and not cache.reserve("a", now=5)
    assert cache.reserve("a", now=11)
    for key in "bcde":
        cache.reserve(key, now=12)
    assert len(cache) == 3


def test_mlflows_own_delivery_code_reaches_the_receiver_under_uvicorn(monkeypatch, emitted):
    from mlflow.entities.webhook import Webhook, WebhookEvent, WebhookStatus
    from mlflow.webhooks.delivery import _create_webhook_session, _send_webhook_request

    # What an MLflow server needs to deliver to a loopback http receiver (docs/contracts.md, webhook register).
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "http,https")
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(SECRET, emitted), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 90
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        event = WebhookEvent.from_str("model_version.created")
        hook = Webhook(webhook_id="w1", name="gradprune", url=f"http://127.0.0.1:{port}{PATH}", events=[event],
                       status=WebhookStatus.ACTIVE, creation_timestamp=0, last_updated_timestamp=0, secret=SECRET)
        data = {"name": "real-delivery", "version": "3", "source": "models:/x", "run_id": None, "tags": {},
                "description": None}
        resp = _send_webhook_request(hook, data, event, _create_webhook_session())
        assert resp.status_code == 202, resp.text
        forged = Webhook(webhook_id="w2", name="forged", url=hook.url, events=[event], status=WebhookStatus.ACTIVE,
                         creation_timestamp=0, last_updated_timestamp=0, secret="guess")
        assert _send_webhook_request(forged, data, event, _create_webhook_session()).status_code == 401
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert [(e.name, e.version) for e in emitted.seen] == [("real-delivery", "3")]


def _gradprune(*args: str, **env: str) -> subprocess.CompletedProcess:
    """Run the installed `gradprune` in a new process: Prefect reads its settings (PREFECT_API_URL) once per process,
    and an earlier test in this one may have pointed them at its test server."""
    clean = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return subprocess.run([str(Path(sys.executable).parent / "gradprune"), *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_refuses_to_start_without_a_secret_or_a_prefect_api(monkeypatch):
    monkeypatch.delenv("GRADPRUNE_WEBHOOK_SECRET", raising=False)
    result = CliRunner().invoke(cli, ["webhook", "serve"])
    assert result.exit_code == 2 and "GRADPRUNE_WEBHOOK_SECRET is not set" in result.output
    result = CliRunner().invoke(cli, ["serve", "--set", "bogus=1"])
    assert result.exit_code == 2 and "unknown setting(s) ['bogus']" in result.output
    for command in (["webhook", "serve"], ["serve"]):
        result = _gradprune(*command, GRADPRUNE_WEBHOOK_SECRET=SECRET)
        assert result.returncode == 2 and result.stderr.strip().splitlines() == [
            "error: PREFECT_API_URL is not set; point it at the Prefect server (e.g. http://127.0.0.1:4200/api after "
            "`prefect server start`)"]
    nobody = f"http://127.0.0.1:{free_port()}/api"
    result = _gradprune("serve", PREFECT_API_URL=nobody)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: cannot reach the Prefect API at {nobody} (ConnectError); start it (`prefect server start`) or "
        "fix PREFECT_API_URL"]


def test_cli_register_creates_then_updates_the_webhook_and_explains_a_refusal(monkeypatch, tmp_path):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("GRADPRUNE_WEBHOOK_SECRET", SECRET)
    monkeypatch.delenv("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", raising=False)
    monkeypatch.delenv("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", raising=False)
    result = CliRunner().invoke(cli, ["webhook", "register", "--url", "http://127.0.0.1:8765/webhook"])
    assert result.exit_code == 2
    assert "MLflow refused the webhook" in result.output and "MLFLOW_WEBHOOK_ALLOWED_SCHEMES" in result.output
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "http,https")
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true")
    first = CliRunner().invoke(cli, ["webhook", "register", "--url", "http://127.0.0.1:8765/webhook"])
    assert first.exit_code == 0 and "created: model_version.created -> http://127.0.0.1:8765/webhook" in first.output
    again = CliRunner().invoke(cli, ["webhook", "register", "--url", "http://127.0.0.1:9999/webhook"])
    assert again.exit_code == 0 and "updated" in again.output
    [hook] = mlflow.MlflowClient().list_webhooks()
    assert hook.url == "http://127.0.0.1:9999/webhook" and [str(e) for e in hook.events] == ["model_version.created"]
