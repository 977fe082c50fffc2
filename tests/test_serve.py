"""Automatic scans end to end, every part a real process on loopback: `prefect server start`, `mlflow server` with
webhooks allowed to loopback, `gradprune webhook serve`, `gradprune serve`, and a moto S3 API.

Registering a model version makes the `sanitized` alias appear through the webhook -> Prefect event -> automation
path; with the receiver killed, the next version is still sanitized, by the scheduled reconciler.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet
from mlflow import MlflowClient
from services import ARTIFACT_BUCKET, DATA_BUCKET, patched_env

from gradprune_mlflow import lab
from gradprune_mlflow.data.s3 import push_clean_set, push_object
from gradprune_mlflow.local_services import (
    HOST,
    background_service,
    free_port,
    http_ok,
    mlflow_server,
    moto_s3,
    s3_env,
    stop_process_group,
)
from gradprune_mlflow.registry import tags as T
from gradprune_mlflow.registry.pending import set_model_inputs
from gradprune_mlflow.registry.source import register_source_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

BIN = Path(sys.executable).parent
MODEL = "served-cnn"
SHAPE = (1, 28, 28)
SECRET = "served-webhook-secret"
SCAN_INTERVAL = 20
# Known trigger, 30 clean images per class, few pruning steps and short fine-tuning keep each sanitization to
# seconds on two cores: this test is about the plumbing; tests/test_flows.py checks what sanitizing achieves.
# `gradprune serve --limit 1` keeps the reconciler's passes (a Python process each) from starving a sanitization.
SETTINGS = ["--set", "finetune_epochs=2", "--set", "max_prune_fraction=0.1", "--set", "step_fraction=0.05"]
# What an MLflow server needs to deliver webhooks to a loopback http receiver (docs/contracts.md, webhook register).
WEBHOOK_SERVER_ENV = {"MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                      "MLFLOW_WEBHOOK_CACHE_TTL": "1",
                      "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode()}
WAIT = 600  # generous: four engineers share two cores


def wait_for(check: Callable[[], object], what: str, logs: list[Path], timeout: float = WAIT):
    """Poll `check` until it returns something truthy; fail naming `what` and the logs' tails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(1)
    tails = "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-25:])
                      for p in logs if p.exists())
    pytest.fail(f"{what}: not within {timeout} s\n{tails}")


def prefect_post(api: str, path: str, body: dict | None = None) -> list[dict]:
    resp = httpx.post(f"{api}{path}", json=body or {}, timeout=30)
    resp.raise_for_status()
    return resp.json()


def flow_runs_for(api: str, version: str) -> list[dict]:
    """The flow runs of the sanitize deployment for MODEL `version`."""
    runs = prefect_post(api, "/flow_runs/filter", {"limit": 200})
    return [r for r in runs if r["parameters"].get("name") == MODEL and r["parameters"].get("version") == version]


def enter_together(es: ExitStack, *managers):
    """Enter context managers in parallel threads (servers that each take a while to start); returns their values.

    Each one that was entered is exited with `es`, also when another failed to start.
    """
    with ThreadPoolExecutor(len(managers)) as pool:
        futures = [pool.submit(cm.__enter__) for cm in managers]
        wait(futures)
    for cm, future in zip(managers, futures, strict=True):
        if future.exception() is None:
            es.push(cm.__exit__)
    return [f.result() for f in futures]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("serve")
    with ExitStack() as es:
        endpoint = es.enter_context(moto_s3(buckets=(ARTIFACT_BUCKET, DATA_BUCKET)))
        s3 = s3_env(endpoint)
        port = free_port()
        api = f"http://{HOST}:{port}/api"
        prefect = background_service(
            [str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(port)],
            ready=lambda: http_ok(f"{api}/health"), log_path=work / "prefect-server.log", timeout=240,
            what="prefect server",
            env={**os.environ, "PREFECT_HOME": str(work / "prefect-server"), "PREFECT_UI_ENABLED": "false"})
        mlflow = mlflow_server(work / "mlflow", artifacts_destination=f"s3://{ARTIFACT_BUCKET}/m",
                               env={**s3, **WEBHOOK_SERVER_ENV}, timeout=240)
        _, tracking = enter_together(es, prefect, mlflow)
        env = {**os.environ, **s3, "MLFLOW_TRACKING_URI": tracking, "PREFECT_API_URL": api,
               "PREFECT_HOME": str(work / "prefect-client"), "GRADPRUNE_WEBHOOK_SECRET": SECRET,
               "PREFECT_RUNNER_POLL_FREQUENCY": "2", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
        es.enter_context(patched_env({**s3, "MLFLOW_TRACKING_URI": tracking}))
        bucket = f"s3://{DATA_BUCKET}"
        push_clean_set(lab.trusted_clean_set(work / "clean-30", per_class=30), f"{bucket}/fashion")
        (work / "badnets.json").write_text(json.dumps(lab.attack_trigger("badnets").spec()))
        push_object(work / "badnets.json", f"{bucket}/triggers/badnets.json")

        receiver_port = free_port()
        receiver = es.enter_context(background_service(
            [str(BIN / "gradprune"), "webhook", "serve", "--port", str(receiver_port)],
            ready=lambda: http_ok(f"http://{HOST}:{receiver_port}/health"), log_path=work / "receiver.log",
            env=env, timeout=180, what="gradprune webhook serve"))
        registered = subprocess.run(
            [str(BIN / "gradprune"), "webhook", "register", "--url", f"http://{HOST}:{receiver_port}/webhook"],
            env=env, capture_output=True, text=True, timeout=300)
        assert registered.returncode == 0, registered.stderr
        assert "created: model_version.created" in registered.stdout

        def served() -> bool:
            names = {d["name"] for d in prefect_post(api, "/deployments/filter")}
            automations = prefect_post(api, "/automations/filter")
            return {"gradprune-sanitize", "gradprune-reconcile"} <= names and len(automations) == 1

        es.enter_context(background_service(
            [str(BIN / "gradprune"), "serve", "--scan-interval", str(SCAN_INTERVAL), "--limit", "1", *SETTINGS],
            ready=served, log_path=work / "serve.log", env=env, timeout=300, what="gradprune serve"))
        client = MlflowClient()
        client.create_registered_model(MODEL)
        set_model_inputs(client, MODEL, clean_data=f"{bucket}/fashion", trigger=f"{bucket}/triggers/badnets.json")
        yield {"client": client, "api": api, "receiver": receiver, "work": work,
               "logs": [work / n for n in ("serve.log", "receiver.log", "prefect-server.log")]}


def test_a_registered_version_is_sanitized_through_the_webhook(stack, badnets_cnn):
    client, api, logs = stack["client"], stack["api"], stack["logs"]
    source = register_source_model(badnets_cnn, MODEL, input_shape=SHAPE)
    wait_for(lambda: client.get_model_version(MODEL, source).tags.get(T.STATUS) == T.SANITIZED,
             f"{MODEL} v{source} sanitized", logs)
    alias = client.get_registered_model(MODEL).aliases[T.ALIAS]
    assert client.get_model_version(MODEL, source).tags[T.SANITIZED_VERSION] == alias
    assert client.get_model_version(MODEL, alias).tags[T.ROLE] == T.ROLE_SANITIZED
    # The event path ran: an automation started the sanitize deployment for this version, and it completed.
    by_automation = wait_for(lambda: [r for r in flow_runs_for(api, source)
                                      if (r["idempotency_key"] or "").startswith("automation")
                                      and r["state_type"] == "COMPLETED"],
                             "a completed automation-started flow run", logs, timeout=120)
    assert len(by_automation) == 1
    receiver_log = stack["work"] / "receiver.log"
    assert f"mlflow.model_version.created for mlflow.model-version.{MODEL}.{source}" in receiver_log.read_text()
    # MLflow also delivered the sanitized version; the receiver ignored it (it carries gradprune.role).
    wait_for(lambda: f"{MODEL} v{alias} carries {T.ROLE}; ignored" in receiver_log.read_text(),
             "the receiver ignoring our own sanitized version", logs, timeout=120)


def test_with_the_receiver_down_the_reconciler_sanitizes_the_version(stack, badnets_cnn):
    client, api, logs = stack["client"], stack["api"], stack["logs"]
    stop_process_group(stack["receiver"])
    source = register_source_model(badnets_cnn, MODEL, input_shape=SHAPE)
    wait_for(lambda: client.get_model_version(MODEL, source).tags.get(T.STATUS) == T.SANITIZED,
             f"{MODEL} v{source} sanitized by the reconciler", logs)
    new = client.get_model_version(MODEL, source).tags[T.SANITIZED_VERSION]
    assert client.get_registered_model(MODEL).aliases == {T.ALIAS: new}
    runs = flow_runs_for(api, source)
    assert [r["idempotency_key"] for r in runs] == [f"{MODEL}:{source}"]  # the reconciler's, and only one
    # A reconciler pass that started after the version was done finds nothing: no second sanitized version.
    done_at = datetime.now(UTC)
    wait_for(lambda: [r for r in prefect_post(api, "/flow_runs/filter", {"limit": 200})
                      if r["parameters"].get("dispatch") and r["state_type"] == "COMPLETED"
                      and datetime.fromisoformat(r["start_time"]) > done_at],
             "a reconciler pass after the version was sanitized", logs, timeout=300)
    made = [v for v in client.search_model_versions(f"name='{MODEL}'")
            if v.tags.get(T.SOURCE_VERSION) == source]
    assert len(made) == 1 and len(flow_runs_for(api, source)) == 1
