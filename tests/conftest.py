"""Shared test set-up: an isolated environment, and real models and data reused across the test run.

The environment is set at import time, before any test module imports Prefect or MLflow, so that no test writes into
the user's home or talks to a server the user happens to have configured.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

_SANDBOX = Path(tempfile.mkdtemp(prefix="gradprune-tests-"))
atexit.register(shutil.rmtree, _SANDBOX, True)

os.environ.update({
    "PREFECT_HOME": str(_SANDBOX / "prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # A user's real tracking server must never receive test runs; tests that need MLflow set their own URI.
    "MLFLOW_TRACKING_URI": f"sqlite:///{_SANDBOX / 'mlflow.db'}",
    "DO_NOT_TRACK": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "MPLBACKEND": "Agg",
    "GRADPRUNE_CACHE_DIR": str(_SANDBOX / "clean-sets"),
    "XDG_CACHE_HOME": str(_SANDBOX / "xdg-cache"),
    "AWS_EC2_METADATA_DISABLED": "true",
})
for _name in ("PREFECT_API_URL", "PREFECT_API_KEY", "GRADPRUNE_DEBUG"):
    os.environ.pop(_name, None)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # The processes the tests start (`gradprune sanitize`, `scan`, `demo`, served flows) take one thread too: with
    # two each, beside the other worker, the CLI's known-trigger sanitize test took 77 s instead of 22 s.
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from gradprune_mlflow import lab  # noqa: E402
from gradprune_mlflow.data.cleanset import load_clean_set  # noqa: E402

# The test machine has two cores. Under pytest-xdist (scripts/test.sh runs two workers) each worker takes one, so
# that the workers' math does not fight over them while the other worker waits on a server (OMP_NUM_THREADS above
# does the same for the processes they start).
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

REPO = Path(__file__).resolve().parents[1]


# The longest modules (one worker runs a module start to end), first: left for last, one would run alone at the
# end while the other worker sits idle. docs/development.md lists the slowest modules.
LONG_MODULES = ("test_concurrency", "test_faults", "test_serve", "test_demo", "test_bad_inputs", "test_flows")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: other modules keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; none is available here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sandbox() -> Path:
    """The test run's scratch folder (PREFECT_HOME, the MLflow database and caches live under it)."""
    return _SANDBOX


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """Trained test models, kept between runs in the repo's gitignored .cache/test-models."""
    path = REPO / ".cache" / "test-models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _trained(cache: Path, attack: str, poison_rate: float = 0.1) -> torch.nn.Module:
    # Engineers share the tree and the cache: one process trains, the others wait and then load its file.
    # Trained on one thread whatever the run's thread count: CPU training depends on it, and a test that checks what
    # a defense does to this model must see the same model under pytest-xdist (one thread) and without it (two).
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return lab.backdoored_model("small_cnn", attack, poison_rate=poison_rate, n_train=20_000, epochs=2,
                                        cache_dir=cache)
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def badnets_cnn(model_cache) -> torch.nn.Module:
    """SmallCNN on Fashion-MNIST with a 3x3 white bottom-right patch backdoor to class 0 (10% poisoned)."""
    return _trained(model_cache, "badnets")


@pytest.fixture(scope="session")
def blend_cnn(model_cache) -> torch.nn.Module:
    """SmallCNN with a blended-noise backdoor (alpha 0.2) to class 0."""
    return _trained(model_cache, "blend")


@pytest.fixture(scope="session")
def clean_cnn(model_cache) -> torch.nn.Module:
    """SmallCNN trained on unpoisoned data."""
    return _trained(model_cache, "badnets", poison_rate=0.0)


@pytest.fixture(scope="session")
def fashion_test():
    """The first 2,000 Fashion-MNIST test images ([0, 1], (N, 1, 28, 28)) and labels."""
    return lab.test_data(2000)


@pytest.fixture(scope="session")
def clean_set_dir(tmp_path_factory) -> Path:
    """A trusted clean-set folder: 100 Fashion-MNIST images per class, from the non-attacker split."""
    return lab.trusted_clean_set(tmp_path_factory.mktemp("clean-set"), per_class=100)


@pytest.fixture(scope="session")
def clean_set(clean_set_dir):
    """The clean set of clean_set_dir, loaded and verified."""
    return load_clean_set(clean_set_dir)


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness (a temporary API server and database), shared by every flow test of the run.

    Flow-run heartbeats are off in this process: Prefect 3.9 joins each run's heartbeat thread at exit, which cost
    about 1 s per flow run here (30 sub-flows: 35 s with heartbeats, 6-8 s without). Nothing here relies on them: a
    dead worker is detected by our lease (tests/test_concurrency.py), not by Prefect's zombie detection. Processes
    the tests start (`gradprune scan`, `serve`, `demo`) keep them.
    """
    from prefect.settings import temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120), \
            temporary_settings(updates={"flows.heartbeat_frequency": None}):
        yield


@pytest.fixture(scope="module", autouse=True)
def _tracking_is_restored(request):
    """Each module leaves MLflow pointed at the sandbox's store, where it found it.

    A module that leaves a server's URL behind (in MLFLOW_TRACKING_URI or mlflow's global) sends the next module on
    that worker to a server that is gone or, worse, to a live one of another test: a fault that would surface later,
    in someone else's module. This check names the module that leaked instead.
    """
    import mlflow

    expected = os.environ["MLFLOW_TRACKING_URI"]
    yield
    found = (os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri())
    if found != (expected, expected):
        mlflow.set_tracking_uri(None)  # this also deletes MLFLOW_TRACKING_URI: put it back after
        os.environ["MLFLOW_TRACKING_URI"] = expected
        pytest.fail(f"{request.module.__name__} left MLflow's tracking URI at {found}, not the sandbox's {expected}")
