"""Concurrency on the real registry path: `gradprune scan` processes racing for the same versions, a worker killed
with SIGKILL mid-run, a pass over versions that span several listing pages, and what a scan leaves behind (secrets,
temporary files).

Scans run as real `gradprune scan` processes (the `scan-registry` flow against the test harness's Prefect API) or,
where no process boundary matters, in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import prefect.settings
import pytest
from mlflow import MlflowClient
from services import patched_env, registry_stack, stop_process_group

from gradprune_flows.scan import scan_registry
from gradprune_mlflow import lab
from gradprune_mlflow.data.s3 import push_clean_set
from gradprune_mlflow.models.zoo import create_model
from gradprune_mlflow.registry import tags as T
from gradprune_mlflow.registry.pending import set_model_inputs
from gradprune_mlflow.registry.source import log_source_model, register_logged_model

SHAPE = (1, 28, 28)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

# Sanitizing stays tiny: a width-8 CNN, the known trigger (no synthesis), one fine-tuning epoch, a small prune budget.
TINY = {"finetune_epochs": 1, "max_prune_fraction": 0.05}
SECRET = "s3cr3t-d0-not-leak-7f3a9c"
WEBHOOK_SECRET = "whsec-d0-not-leak-51b2e8"


@pytest.fixture(scope="module")
def env(tmp_path_factory, prefect_harness):
    work = tmp_path_factory.mktemp("concurrency")
    with registry_stack(work / "mlflow") as stack:
        bucket = f"s3://{stack.data_bucket}"
        push_clean_set(lab.trusted_clean_set(work / "set", per_class=10), f"{bucket}/set")
        trigger = work / "badnets.json"
        trigger.write_text(json.dumps(lab.attack_trigger("badnets").spec()))
        yield {"client": MlflowClient(), "clean": f"{bucket}/set", "trigger": str(trigger), "work": work,
               "model": log_source_model(create_model("small_cnn", width=8), input_shape=SHAPE), "stack": stack}


def _register(env, name: str, count: int, **inputs) -> list[str]:
    versions = register_logged_model(env["model"], name, count=count)
    set_model_inputs(env["client"], name, **({"clean_data": env["clean"], "trigger": env["trigger"]} | inputs))
    return versions


def _scan_process(name: str, settings: dict, log: Path, **env: str) -> subprocess.Popen:
    """`gradprune scan --model NAME` as its own process (and process group), on the harness's Prefect API."""
    cmd = [sys.executable, "-m", "gradprune_mlflow.cli", "scan", "--model", name]
    cmd += [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    child_env = {**os.environ, "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value(), **env}
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env, start_new_session=True)


def _sources_of_sanitized(client, name: str) -> list[str]:
    return sorted((v.tags[T.SOURCE_VERSION] for v in client.search_model_versions(f"name='{name}'")
                   if (v.tags or {}).get(T.ROLE) == T.ROLE_SANITIZED), key=int)


def test_two_scan_processes_sanitize_each_of_ten_versions_exactly_once(env):
    client = env["client"]
    sources = _register(env, "race-cnn", 10)
    logs = [env["work"] / f"scan-{i}.log" for i in range(2)]
    procs = [_scan_process("race-cnn", TINY, log) for log in logs]
    try:
        codes = [p.wait(timeout=900) for p in procs]
    finally:
        for p in procs:
            stop_process_group(p)
    outputs = [log.read_text(errors="replace") for log in logs]
    assert codes == [0, 0], outputs
    assert _sources_of_sanitized(client, "race-cnn") == sources  # ten new versions, one per source
    for version in sources:
        tags = client.get_model_version("race-cnn", version).tags
        assert tags[T.STATUS] == T.SANITIZED and T.LEASE_UNTIL not in tags
        assert client.get_model_version("race-cnn", tags[T.SANITIZED_VERSION]).tags[T.SOURCE_VERSION] == version
    newest = max(int(v) for v in client.search_model_versions("name='race-cnn'") for v in [v.version])
    assert client.get_registered_model("race-cnn").aliases == {T.ALIAS: str(newest)}
    # Both workers took part: each printed its table, and together they sanitized every version once.
    assert all("gradprune scan" in out for out in outputs)


def test_a_worker_killed_mid_run_is_finished_by_the_next_scan(env):
    client = env["client"]
    (version,) = _register(env, "killed-cnn", 1)
    # Long fine-tuning keeps the worker busy until it is killed in the middle of the defense.
    long_run = {"finetune_epochs": 500, "finetune_patience": 500}
    proc = _scan_process("killed-cnn", long_run, env["work"] / "killed.log", GRADPRUNE_LEASE_SECONDS="9")
    leases, dead = set(), None
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            tags = client.get_model_version("killed-cnn", version).tags
            if tags.get(T.STATUS) == T.RUNNING:
                leases.add(tags[T.LEASE_UNTIL])
                dead = tags[T.CLAIM_ID]
                if len(leases) >= 2 and _defense_started(client, "killed-cnn", version):
                    break
            time.sleep(0.2)
        assert proc.poll() is None, (env["work"] / "killed.log").read_text(errors="replace")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        stop_process_group(proc)
    assert len(leases) >= 2, "the lease was never renewed while the worker ran"
    tags = client.get_model_version("killed-cnn", version).tags
    assert tags[T.STATUS] == T.RUNNING and tags[T.CLAIM_ID] == dead
    assert _sources_of_sanitized(client, "killed-cnn") == []
    time.sleep(max(0.0, float(tags[T.LEASE_UNTIL]) - time.time()) + 0.5)  # nobody renews it now
    (outcome,) = scan_registry(model="killed-cnn", config=TINY)
    assert outcome["status"] == T.SANITIZED, outcome["reason"]
    assert _sources_of_sanitized(client, "killed-cnn") == [version]
    tags = client.get_model_version("killed-cnn", version).tags
    assert tags[T.STATUS] == T.SANITIZED and tags[T.CLAIM_ID] != dead and T.LEASE_UNTIL not in tags


def _defense_started(client, name: str, version: str) -> bool:
    """True once the worker's run has logged the data it sanitizes with (the step right before the defense)."""
    runs = client.search_runs([client.get_experiment_by_name(T.EXPERIMENT).experiment_id],
                              f"tags.`gradprune.model` = '{name}' and tags.`gradprune.version` = '{version}'")
    return any("clean_data_manifest_sha256" in r.data.params for r in runs)


def test_every_version_across_listing_pages_ends_with_a_final_status(env, monkeypatch):
    """30 versions listed 8 a page (4 pages, the last one short) in one pass: each is found once and ends at a final
    status. They end cheaply (their clean set is not on S3: `rejected`), so this checks the registry path, not the
    sanitizer. Paging is what a large registry adds, and 4 small pages exercise it as 200 versions on the real
    200-a-page listing did not; benchmarks/registry_overhead.py --rejected 200 times a pass at that scale."""
    from gradprune_mlflow.registry import pending

    monkeypatch.setattr(pending, "_PAGE", 8)
    client = env["client"]
    versions = _register(env, "paged-cnn", 30, clean_data=f"{env['clean']}-missing")
    with patched_env({"GRADPRUNE_CLAIM_SETTLE_SECONDS": "0"}):
        outcomes = scan_registry(model="paged-cnn", config=TINY)
    assert sorted((o["version"] for o in outcomes), key=int) == versions
    assert {o["status"] for o in outcomes} == {T.REJECTED}
    final = {v.version: v.tags.get(T.STATUS) for v in client.search_model_versions("name='paged-cnn'",
                                                                                    max_results=1000)}
    assert len(final) == 30 and set(final.values()) == {T.REJECTED}
    assert client.get_registered_model("paged-cnn").aliases == {}


def test_secrets_never_reach_logs_runs_or_tags_and_temp_files_are_removed(env, tmp_path):
    client = env["client"]
    (version,) = _register(env, "hygiene-cnn", 1)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    log = env["work"] / "hygiene.log"
    proc = _scan_process("hygiene-cnn", TINY, log, TMPDIR=str(tmp), GRADPRUNE_DEBUG="1",
                         AWS_SECRET_ACCESS_KEY=SECRET, GRADPRUNE_WEBHOOK_SECRET=WEBHOOK_SECRET)
    try:
        assert proc.wait(timeout=600) == 0, log.read_text(errors="replace")
    finally:
        stop_process_group(proc)
    tags = client.get_model_version("hygiene-cnn", version).tags
    assert tags[T.STATUS] == T.SANITIZED
    new = tags[T.SANITIZED_VERSION]
    run = client.get_run(tags[T.RUN_ID])
    seen = [log.read_text(errors="replace"), json.dumps(tags), json.dumps(run.data.params), json.dumps(run.data.tags),
            json.dumps(client.get_model_version("hygiene-cnn", new).tags),
            client.get_model_version("hygiene-cnn", new).description or ""]
    seen += _artifact_texts(client, run.info.run_id, env["work"] / "artifacts")
    assert len(seen) > 8  # the run's artifacts were read, not just its tags
    for secret in (SECRET, WEBHOOK_SECRET):
        assert not [i for i, text in enumerate(seen) if secret in text]
    # Downloads, model folders and trigger copies live in temporary folders that the scan removed.
    assert list(tmp.iterdir()) == []


def _artifact_texts(client, run_id: str, dst: Path) -> list[str]:
    folder = Path(client.download_artifacts(run_id, "", str(dst)))
    return [p.read_bytes().decode("utf-8", errors="replace") for p in folder.rglob("*") if p.is_file()]
