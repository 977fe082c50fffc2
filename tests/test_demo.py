"""`gradprune demo` as a user runs it: a subprocess, real services, the whole pipeline, data left behind."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from gradprune_mlflow.registry import tags as T

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900),
              # MLflow's own sqlite store, read directly below, trips a SQLAlchemy deprecation inside MLflow.
              pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")]


def _listening(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, int(port))) == 0


def test_demo_runs_end_to_end_and_leaves_its_data(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("MLFLOW_TRACKING_URI", None)
    # Small settings keep this near 80 s alone; on_clean=sanitize makes the run register a model even when the
    # short synthesis flags nothing, so the whole path (synthesized triggers, registration, alias) is exercised.
    # No recheck: tests/test_sanitize.py checks it. (6,000 attacker images: with 4,000 the backdoor reached 51%.)
    cmd = [sys.executable, "-m", "gradprune_mlflow.cli", "demo", "--dir", str(out), "--per-class", "20",
           "--test-images", "200", "--train-images", "6000", "--epochs", "1", "--set", "synth_steps=15",
           "--set", "finetune_epochs=2", "--set", "recheck_rounds=0", "--set", "on_clean=sanitize"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=850)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    text = proc.stdout
    assert "gradprune demo (before -> after)" in text
    assert re.search(r"fashion-badnets-cnn\s.*\s1\s.*\ssanitized\s.*\d+\.\d% -> \d+\.\d%", text)
    assert f"mlflow ui --backend-store-uri sqlite:///{out / 'mlflow' / 'mlflow.db'}" in text
    # Both servers are gone.
    mlflow_url, s3_url = re.search(r"MLflow server at (http://[\d.:]+) .* S3 API \(moto\) at (http://[\d.:]+)",
                                   text).groups()
    assert not _listening(mlflow_url) and not _listening(s3_url)
    # The registry is still there, readable without the server.
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    source = client.get_model_version("fashion-badnets-cnn", "1")
    assert source.tags[T.STATUS] == T.SANITIZED
    new = client.get_model_version_by_alias("fashion-badnets-cnn", T.ALIAS)
    assert new.tags[T.SOURCE_VERSION] == "1" and str(new.version) == source.tags[T.SANITIZED_VERSION]
    run = client.get_run(source.tags[T.RUN_ID])
    assert run.data.params["eval_trigger"].endswith("triggers/badnets.json") and run.data.params["trigger"] == "none"
    assert run.data.metrics["attack_success_rate/before"] > 0.5
    assert any((out / "mlflow" / "mlartifacts").rglob("report.json"))
    assert (out / "clean-set" / "manifest.csv").is_file() and (out / "badnets-trigger.json").is_file()
