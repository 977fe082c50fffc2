"""`gradprune demo`: the whole pipeline on local services, end to end, leaving its data for review.

1. a local MLflow server (sqlite + artifacts in DIR/mlflow) and a local S3 API (moto) on 127.0.0.1;
2. a trusted Fashion-MNIST clean set and a test set, packed and pushed to S3;
3. a BadNets-backdoored SmallCNN, trained (cached in DIR/models) and registered, its registered model tagged with
   the clean set, the test set and, for measuring only, the real trigger (gradprune.eval_trigger): the defense never
   sees it and synthesizes its own;
4. the `scan-registry` flow; then the before/after table and the command that opens the MLflow UI on DIR.

The S3 API keeps its data in memory, so it goes with the demo; local copies of both sets stay in DIR.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated, Any

import typer

MODEL_NAME = "fashion-badnets-cnn"
# Unlearn the top candidate even when nothing is flagged: the patch probe confirms BadNets only where synthesis put a
# mask on the real patch, which a short search does not always do, and a demo that ends with "nothing flagged" shows
# nothing. The run still records the anomaly index, whether the class was flagged, and by which probe.
# `--set on_clean=skip` restores the library default.
DEMO_SETTINGS = {"on_clean": "sanitize"}
BUCKET = "gradprune-demo"


def register(app: typer.Typer) -> None:
    """Add `demo` to the app."""
    app.command("demo")(demo_command)


class _Steps:
    """Numbered progress lines with elapsed time."""

    def __init__(self, total: int):
        self.total, self.count, self.start = total, 0, time.monotonic()

    def say(self, text: str) -> None:
        self.count += 1
        typer.echo(f"[{self.count}/{self.total} {time.monotonic() - self.start:5.1f}s] {text}")


def demo_command(
    directory: Annotated[Path, typer.Option("--dir", metavar="DIR", help="Where the demo keeps its data.")] = Path(
        "demo-data"),
    per_class: Annotated[int, typer.Option("--per-class", help="Trusted clean images per class.")] = 100,
    test_images: Annotated[int, typer.Option("--test-images", help="Fashion-MNIST test images to measure on.")] = 1000,
    n_train: Annotated[int, typer.Option("--train-images", help="Images the attacker trains on.")] = 20_000,
    epochs: Annotated[int, typer.Option("--epochs", help="Attacker's training epochs.")] = 2,
    settings: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help="Override a sanitizer setting (repeatable), e.g. --set synth_steps=100.")
    ] = None,
) -> None:
    """Run the whole pipeline on local services: MLflow, S3 (moto), Prefect; leaves its data in DIR."""
    from gradprune_mlflow.cli.common import parse_settings, print_outcomes, quiet_output
    from gradprune_mlflow.config import SanitizeConfig

    overrides = {**DEMO_SETTINGS, **parse_settings(settings)}
    SanitizeConfig().with_overrides(**overrides)
    root = directory.resolve()
    root.mkdir(parents=True, exist_ok=True)
    _isolate(root)
    quiet_output()
    steps = _Steps(6)
    outcomes, mlflow_dir = _run(root, steps, per_class=per_class, test_images=test_images, n_train=n_train,
                                epochs=epochs, overrides=overrides)
    print_outcomes(outcomes, title="gradprune demo")
    _print_review(root, mlflow_dir, steps)


def _isolate(root: Path) -> None:
    # Prefect reads its settings when first imported: these must be in place before flows/ is imported.
    os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ["GRADPRUNE_CACHE_DIR"] = str(root / "cache")


def _run(root: Path, steps: _Steps, *, per_class: int, test_images: int, n_train: int, epochs: int,
         overrides: dict[str, Any]) -> tuple[list[dict[str, Any]], Path]:
    import mlflow

    from gradprune_mlflow.local_services import mlflow_server, moto_s3, s3_env

    mlflow_dir = root / "mlflow"
    with moto_s3(buckets=(BUCKET,)) as endpoint:
        saved = {k: os.environ.get(k) for k in (*s3_env(endpoint), "MLFLOW_TRACKING_URI")}
        os.environ.update(s3_env(endpoint))
        try:
            with mlflow_server(mlflow_dir) as url:
                os.environ["MLFLOW_TRACKING_URI"] = url
                mlflow.set_tracking_uri(url)
                steps.say(f"MLflow server at {url} (sqlite + artifacts in {mlflow_dir}); S3 API (moto) at {endpoint}")
                uris = _publish_data(root, steps, per_class=per_class, test_images=test_images)
                _register_model(root, steps, uris, n_train=n_train, epochs=epochs)
                shown = ", ".join(f"{k}={v}" for k, v in overrides.items())
                steps.say(f"scanning the registry (Prefect flow scan-registry; the defense synthesizes its own "
                          f"trigger; settings: {shown})")
                from gradprune_flows.scan import scan_registry

                outcomes = scan_registry(model=MODEL_NAME, config=overrides or None)
                steps.say("scan done; stopping the local services")
        finally:
            mlflow.set_tracking_uri(None)
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    return outcomes, mlflow_dir


def _publish_data(root: Path, steps: _Steps, *, per_class: int, test_images: int) -> dict[str, str]:
    import shutil

    from gradprune_mlflow import lab
    from gradprune_mlflow.data.cleanset import write_clean_set
    from gradprune_mlflow.data.reference import FASHION_CLASSES, FASHION_MEAN, FASHION_STD
    from gradprune_mlflow.data.s3 import push_clean_set, push_object

    for sub in ("clean-set", "test-set"):
        shutil.rmtree(root / sub, ignore_errors=True)
    clean = lab.trusted_clean_set(root / "clean-set", per_class=per_class)
    test = lab.test_data(test_images)
    images = (test.images.squeeze(1).numpy() * 255).round().astype("uint8")
    write_clean_set(root / "test-set", images, test.labels.numpy(), name=f"fashion-mnist-test-{test_images}",
                    mean=FASHION_MEAN, std=FASHION_STD, class_names=list(FASHION_CLASSES), num_classes=10)
    uris = {"clean_data": f"s3://{BUCKET}/clean-sets/fashion-mnist-{per_class}",
            "test_data": f"s3://{BUCKET}/test-sets/fashion-mnist-{test_images}",
            "eval_trigger": f"s3://{BUCKET}/triggers/badnets.json"}
    push_clean_set(clean, uris["clean_data"])
    push_clean_set(root / "test-set", uris["test_data"])
    trigger_file = root / "badnets-trigger.json"
    trigger_file.write_text(json.dumps(lab.attack_trigger("badnets").spec(), indent=2) + "\n")
    push_object(trigger_file, uris["eval_trigger"])
    steps.say(f"clean set ({10 * per_class} images) -> {uris['clean_data']}; test set ({test_images}) -> "
              f"{uris['test_data']}; real trigger (evaluation only) -> {uris['eval_trigger']}")
    return uris


def _register_model(root: Path, steps: _Steps, uris: dict[str, str], *, n_train: int, epochs: int) -> str:
    from mlflow import MlflowClient

    from gradprune_mlflow import lab
    from gradprune_mlflow.registry.pending import set_model_inputs
    from gradprune_mlflow.registry.source import register_source_model

    model = lab.backdoored_model("small_cnn", "badnets", n_train=n_train, epochs=epochs, cache_dir=root / "models")
    version = register_source_model(
        model, MODEL_NAME, input_shape=(1, 28, 28), experiment="gradprune-demo-sources",
        description="SmallCNN trained on Fashion-MNIST with 10% BadNets poisoning (3x3 white patch -> class 0).",
    )
    set_model_inputs(MlflowClient(), MODEL_NAME, **uris)
    steps.say(f"trained a BadNets-backdoored SmallCNN and registered it as {MODEL_NAME} v{version}")
    return version


def _print_review(root: Path, mlflow_dir: Path, steps: _Steps) -> None:
    ui = (f"mlflow ui --backend-store-uri sqlite:///{mlflow_dir / 'mlflow.db'} "
          f"--artifacts-destination {mlflow_dir / 'mlartifacts'} --host 127.0.0.1 --port 5000")
    typer.echo(f"\nDone in {time.monotonic() - steps.start:.0f} s. The demo's data stays in {root}:")
    typer.echo(f"  MLflow runs, registry and artifacts: {mlflow_dir}  (local copies of the data sets: "
               f"{root / 'clean-set'}, {root / 'test-set'})")
    typer.echo("Open the MLflow UI on it (artifacts are local files, no S3 needed):")
    typer.echo(f"  {ui}")
    typer.echo(f"  then http://127.0.0.1:5000/#/models/{MODEL_NAME} (alias 'sanitized') and the experiment "
               "'gradprune' for the run, its metrics, plots and report.json")
