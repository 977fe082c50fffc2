"""Faults on the real registry path: S3 down (at the start, mid-download), the MLflow server restarted mid-flow, and
registry writes that fail at the worst moments (the alias move, the final status write).

Services are real (moto S3, `mlflow server` on a fixed port so it can be restarted, Prefect's test harness); faults are
real too: the client reaches S3 and, where a test says so, MLflow through tests/faults.FlakyProxy, which drops
connections or answers HTTP errors. Each case asserts the final status and reason, that nothing half-registered is
left and no alias moved, and that a later scan finishes the version.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import mlflow
import pytest
from faults import FlakyProxy, Rule
from mlflow import MlflowClient
from services import ARTIFACT_BUCKET, DATA_BUCKET, free_port, mlflow_server, moto_s3, patched_env, s3_env

from gradprune_flows.scan import scan_registry
from gradprune_mlflow import lab
from gradprune_mlflow.data.s3 import push_clean_set
from gradprune_mlflow.models.zoo import create_model
from gradprune_mlflow.registry import tags as T
from gradprune_mlflow.registry.pending import set_model_inputs
from gradprune_mlflow.registry.source import log_source_model, register_logged_model

SHAPE = (1, 28, 28)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CONFIG = {"finetune_epochs": 1, "max_prune_fraction": 0.05}
FAST_FAILURE = {
    # One boto retry per request and short Prefect retries, so that "down" turns into `failed` in seconds.
    "AWS_MAX_ATTEMPTS": "2",
    "GRADPRUNE_FETCH_RETRY_DELAYS": "0.5,1",
    "GRADPRUNE_CLAIM_SETTLE_SECONDS": "0.2",
}


class RestartableMlflow:
    """An `mlflow server` on a fixed port and data folder: `restart()` stops the process and starts a new one."""

    def __init__(self, workdir: Path, env: dict[str, str]):
        self.workdir, self.env, self.port = workdir, env, free_port()
        self._stack = ExitStack()
        self.starts = 0

    def start(self) -> str:
        url = self._stack.enter_context(mlflow_server(self.workdir, artifacts_destination=f"s3://{ARTIFACT_BUCKET}/m",
                                                      env=self.env, port=self.port, timeout=180))
        self.starts += 1
        return url

    def stop(self) -> None:
        self._stack.close()
        self._stack = ExitStack()

    def restart(self, down_seconds: float = 2.0) -> None:
        self.stop()
        time.sleep(down_seconds)
        self.start()


@pytest.fixture(scope="module")
def env(tmp_path_factory, prefect_harness):
    """moto S3 behind a FlakyProxy (the client's clean-data traffic), a restartable MLflow server and a FlakyProxy
    in front of it, a tiny CNN logged once, the known BadNets trigger as a local file."""
    work = tmp_path_factory.mktemp("faults")
    with moto_s3(buckets=(ARTIFACT_BUCKET, DATA_BUCKET)) as endpoint, FlakyProxy(endpoint) as s3:
        server = RestartableMlflow(work / "mlflow", s3_env(endpoint))
        url = server.start()
        try:
            with FlakyProxy(url) as registry, patched_env({**s3_env(s3.url), **FAST_FAILURE,
                                                           "MLFLOW_TRACKING_URI": url}):
                mlflow.set_tracking_uri(url)
                try:
                    trigger = work / "badnets.json"
                    trigger.write_text(json.dumps(lab.attack_trigger("badnets").spec()))
                    yield {"client": MlflowClient(), "s3": s3, "registry": registry, "server": server, "url": url,
                           "bucket": f"s3://{DATA_BUCKET}", "work": work, "trigger": str(trigger),
                           "model": log_source_model(create_model("small_cnn", width=8), input_shape=SHAPE)}
                finally:
                    # Inside patched_env: set_tracking_uri(None) also deletes MLFLOW_TRACKING_URI, which
                    # patched_env then puts back. The other order left the next module on ./mlflow.db.
                    mlflow.set_tracking_uri(None)
        finally:
            server.stop()


def _new_model(env, name: str, per_class: int = 10, seed: int = 0) -> str:
    """Register `name` v1 with its own clean set (its own content, so the download cache never hides a fetch)."""
    folder = lab.trusted_clean_set(env["work"] / name, per_class=per_class, seed=seed)
    uri = f"{env['bucket']}/{name}"
    env["s3"].up()
    push_clean_set(folder, uri)
    (version,) = register_logged_model(env["model"], name)
    set_model_inputs(env["client"], name, clean_data=uri, trigger=env["trigger"])
    return version


def _sanitized_versions(client, name: str) -> list[str]:
    return [str(v.version) for v in client.search_model_versions(f"name='{name}'")
            if (v.tags or {}).get(T.ROLE) == T.ROLE_SANITIZED]


def _assert_failed_and_untouched(client, name: str, outcome: dict, reason: str) -> None:
    tags = client.get_model_version(name, "1").tags
    assert outcome["status"] == tags[T.STATUS] == T.FAILED, outcome["reason"]
    assert reason in tags[T.REASON] and "--retry-failed" in tags[T.REASON]
    assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == ["1"]
    assert client.get_registered_model(name).aliases == {}
    assert client.get_run(outcome["run_id"]).info.status == "FAILED"


def _assert_sanitized_once(client, name: str, outcome: dict) -> None:
    assert outcome["status"] == T.SANITIZED, outcome["reason"]
    made = _sanitized_versions(client, name)
    assert made == [outcome["sanitized_version"]]
    assert client.get_registered_model(name).aliases == {T.ALIAS: made[0]}
    tags = client.get_model_version(name, "1").tags
    assert tags[T.STATUS] == T.SANITIZED and tags[T.SANITIZED_VERSION] == made[0]
    assert T.LEASE_UNTIL not in tags


@pytest.mark.parametrize(("case", "after"), [("down-at-start", None), ("down-mid-download", 5)])
def test_s3_down_fails_after_retries_and_a_later_scan_succeeds(env, case, after):
    client, s3 = env["client"], env["s3"]
    _new_model(env, case, seed=len(case))
    s3.dropped = 0
    s3.down(after=after)  # None: every request dropped; 5: dataset.json, manifest.csv, 3 images, then nothing
    (outcome,) = scan_registry(model=case, config=CONFIG)
    _assert_failed_and_untouched(client, case, outcome, "check the S3 endpoint")
    # Three attempts of the fetch task (two retries with backoff), each with two tries of its first dropped request.
    assert s3.dropped >= 6
    cache = Path(os.environ["GRADPRUNE_CACHE_DIR"])
    assert not [p for p in cache.glob(".partial-*")], "a failed download left its partial folder behind"

    s3.up()
    (outcome,) = scan_registry(model=case, config=CONFIG, retry_failed=True)
    _assert_sanitized_once(client, case, outcome)


def test_mlflow_server_restarted_mid_flow_the_client_retries(env):
    client, server = env["client"], env["server"]
    _new_model(env, "restarted")
    restarted = threading.Event()
    seen_running = []

    def restart_once_running() -> None:
        watcher = MlflowClient(env["url"])
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            tags = watcher.get_model_version("restarted", "1").tags
            if tags.get(T.STATUS) == T.RUNNING:
                seen_running.append(tags[T.CLAIM_ID])
                server.restart()
                restarted.set()
                return
            time.sleep(0.05)

    starts = server.starts
    watcher = threading.Thread(target=restart_once_running, daemon=True)
    watcher.start()
    (outcome,) = scan_registry(model="restarted", config=CONFIG)
    watcher.join(timeout=300)
    assert restarted.is_set() and server.starts == starts + 1
    _assert_sanitized_once(client, "restarted", outcome)
    assert client.get_model_version("restarted", "1").tags[T.CLAIM_ID] == seen_running[0]


def test_a_failed_alias_move_registers_nothing_and_the_source_stays_retriable(env, monkeypatch):
    client, proxy = env["client"], env["registry"]
    _new_model(env, "alias-fails")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    proxy.rules.append(Rule(lambda method, path, body: method == "POST" and path.endswith("registered-models/alias"),
                            times=None))
    with _through(proxy):
        (outcome,) = scan_registry(model="alias-fails", config=CONFIG)
    proxy.up()
    assert "injected fault" in outcome["reason"] or "500" in outcome["reason"]
    _assert_failed_and_untouched(client, "alias-fails", outcome, "")  # the created version was deleted again

    (outcome,) = scan_registry(model="alias-fails", config=CONFIG, retry_failed=True)
    _assert_sanitized_once(client, "alias-fails", outcome)


def test_a_failed_final_status_write_is_reconciled_not_left_failed(env, monkeypatch):
    client, proxy = env["client"], env["registry"]
    _new_model(env, "status-write-fails")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")

    def sanitized_status(method: str, path: str, body: bytes) -> bool:
        return path.endswith("model-versions/set-tag") and b'"gradprune.status"' in body and b'"sanitized"' in body

    proxy.rules.append(Rule(sanitized_status, times=1))
    with _through(proxy):
        (outcome,) = scan_registry(model="status-write-fails", config=CONFIG)
    assert proxy.rules[0].times == 0  # the fault did happen
    proxy.up()
    _assert_sanitized_once(client, "status-write-fails", outcome)
    assert "registered by an earlier run" in outcome["reason"]
    assert client.get_run(outcome["run_id"]).info.status == "FINISHED"


@contextmanager
def _through(proxy: FlakyProxy) -> Iterator[None]:
    """Point this process's MLflow client at the proxy inside the block."""
    saved = mlflow.get_tracking_uri()
    with patched_env({"MLFLOW_TRACKING_URI": proxy.url}):
        mlflow.set_tracking_uri(proxy.url)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(saved)
