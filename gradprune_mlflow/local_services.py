"""Local services on loopback for `gradprune demo` and the tests: an `mlflow server` process and a moto S3 API.

Both bind 127.0.0.1 only. The MLflow server runs in its own process group and is stopped with the whole group, so
no worker outlives it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gradprune_mlflow.errors import GradpruneError

HOST = "127.0.0.1"
# moto accepts any credentials; these keep boto3 from looking for real ones.
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def s3_env(endpoint: str) -> dict[str, str]:
    """The environment that points boto3 (and MLflow's S3 artifact store) at `endpoint` with fake credentials."""
    return {**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint,
            "MLFLOW_S3_ENDPOINT_URL": endpoint}


@contextmanager
def moto_s3(buckets: tuple[str, ...] = ()) -> Iterator[str]:
    """Run moto's S3 API on a free loopback port with `buckets` created; yields its endpoint URL.

    The data lives in memory and is gone when the block ends. Raises GradpruneError when moto is not installed.
    """
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        raise GradpruneError("the local S3 API needs moto: pip install 'moto[server]'") from None
    import boto3

    # moto serves from a thread of this process; its request log would drown everything else at INFO.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = ThreadedMotoServer(ip_address=HOST, port=port, verbose=False)
    server.start()
    endpoint = f"http://{HOST}:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()


@contextmanager
def mlflow_server(
    workdir: str | Path,
    *,
    artifacts_destination: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 90.0,
    port: int | None = None,
) -> Iterator[str]:
    """Run `mlflow server` (sqlite in `workdir`/mlflow.db) on loopback `port` (default: a free one); yields its URL.

    Starting it again on the same `workdir` and port is a server restart: the data and the URL stay.

    Artifacts are proxied by the server to `artifacts_destination` (default `workdir`/mlartifacts; may be s3://...
    with the S3 settings in `env`), so clients need only the tracking URI. The server's log is `workdir`/mlflow.log.
    Raises GradpruneError when it is not healthy within `timeout` seconds (the log's tail says why).
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://{HOST}:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
           "--artifacts-destination", artifacts_destination or str(workdir / "mlartifacts")]
    log_path = workdir / "mlflow.log"
    # MLflow 3.x's server also starts a job runner with seven huey consumers (its GenAI jobs; nothing here uses
    # them) that poll without pause: measured here, 70% of a core while the server sat idle, and 20 s of CPU to start.
    # Off unless the caller's environment turns it on.
    child_env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
                 **(env or {})}
    with background_service(cmd, ready=lambda: http_ok(f"{url}/health"), log_path=log_path, env=child_env,
                            cwd=workdir, timeout=timeout, what="mlflow server"):
        yield url


@contextmanager
def background_service(
    cmd: list[str],
    *,
    ready: Callable[[], bool],
    log_path: str | Path,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 90.0,
    what: str = "service",
) -> Iterator[subprocess.Popen]:
    """Run `cmd` in its own process group, logging to `log_path`, until `ready()` is true; yields the process.

    The whole group is stopped when the block ends. Raises GradpruneError when the process exits first or is not
    ready within `timeout` seconds (the log's tail says why).
    """
    log_path = Path(log_path)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                cwd=cwd)
    try:
        _wait_ready(ready, proc, timeout, log_path, what)
        yield proc
    finally:
        stop_process_group(proc)


def http_ok(url: str) -> bool:
    """True when GET `url` answers 200 within two seconds."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _wait_ready(ready: Callable[[], bool], proc: subprocess.Popen, timeout: float, log_path: Path,
                what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise GradpruneError(f"{what} exited with code {proc.returncode}: {_tail(log_path)}")
        if ready():
            return
        time.sleep(0.25)
    raise GradpruneError(f"{what} was not ready after {timeout:.0f} s: {_tail(log_path)}")


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:]) or "(empty log)"
    except OSError:
        return "(no log)"


def stop_process_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group led by `proc`, then SIGKILL it after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            # The leader is gone; kill anything it left in the group (uvicorn workers).
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
        return
