"""What the registry path costs per version, outside the sanitizer itself.

    .venv/bin/python benchmarks/registry_overhead.py [--versions 20] [--rejected 200]

Starts the same local services as the tests (moto S3, an `mlflow server` with sqlite, Prefect's test harness), registers
`--versions` versions of a tiny CNN (width 8) with a 100-image clean set and the known BadNets trigger, and runs one
`scan-registry` pass with a tiny sanitize config. Overhead per sanitized version = (scan wall time - the sum of the
runs' `sanitize_seconds`) / versions: claiming (with its settle delay), the run and its parameters, fetching (cached
after the first) and validating the clean set, downloading and scanning the model, logging metrics and artifacts,
logging and registering the sanitized model, moving the alias, finishing. Then `--rejected` versions whose clean set is
not on S3 are scanned (claim, run, fetch, final status): the floor of a version that ends early, as in the load test.
Prints a markdown table; `--json FILE` writes the numbers too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

TINY = {"finetune_epochs": 1, "max_prune_fraction": 0.05}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", type=int, default=20, help="versions sanitized (tiny config)")
    ap.add_argument("--rejected", type=int, default=200, help="versions that end early (clean set missing)")
    ap.add_argument("--settle", type=float, default=1.0, help="GRADPRUNE_CLAIM_SETTLE_SECONDS for the scans")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gradprune-bench-") as tmp:
        os.environ.setdefault("PREFECT_HOME", f"{tmp}/prefect")
        os.environ["GRADPRUNE_CACHE_DIR"] = f"{tmp}/cache"
        os.environ["GRADPRUNE_CLAIM_SETTLE_SECONDS"] = str(args.settle)
        rows = measure(Path(tmp), args.versions, args.rejected)
    print(f"registry overhead per version ({date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"settle {args.settle} s)\n")
    print("| versions | final status | scan wall s | sanitize s (sum) | overhead per version s |")
    print("|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['versions']} | {r['status']} | {r['wall_s']:.1f} | {r['sanitize_s']:.1f} | "
              f"{r['overhead_per_version_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def measure(work: Path, versions: int, rejected: int) -> list[dict]:
    import mlflow
    from mlflow import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from gradprune_flows.scan import scan_registry
    from gradprune_mlflow import lab
    from gradprune_mlflow.data.s3 import push_clean_set
    from gradprune_mlflow.local_services import mlflow_server, moto_s3, s3_env
    from gradprune_mlflow.models.zoo import create_model
    from gradprune_mlflow.registry.pending import set_model_inputs
    from gradprune_mlflow.registry.source import log_source_model, register_logged_model

    rows = []
    with moto_s3(buckets=("artifacts", "data")) as endpoint, prefect_test_harness(server_startup_timeout=180):
        os.environ.update(s3_env(endpoint))
        with mlflow_server(work / "mlflow", artifacts_destination="s3://artifacts/m", env=s3_env(endpoint),
                           timeout=180) as url:
            os.environ["MLFLOW_TRACKING_URI"] = url
            mlflow.set_tracking_uri(url)
            client = MlflowClient()
            push_clean_set(lab.trusted_clean_set(work / "set", per_class=10), "s3://data/set")
            trigger = work / "badnets.json"
            trigger.write_text(json.dumps(lab.attack_trigger("badnets").spec()))
            info = log_source_model(create_model("small_cnn", width=8), input_shape=(1, 28, 28))
            for name, count, clean in (("bench-sanitized", versions, "s3://data/set"),
                                       ("bench-rejected", rejected, "s3://data/missing")):
                if not count:
                    continue
                register_logged_model(info, name, count=count)
                set_model_inputs(client, name, clean_data=clean, trigger=str(trigger))
                start = time.perf_counter()
                outcomes = scan_registry(model=name, config=TINY)
                wall = time.perf_counter() - start
                sanitize = sum(client.get_run(o["run_id"]).data.metrics.get("sanitize_seconds", 0.0)
                               for o in outcomes if o.get("run_id"))
                statuses = sorted({o["status"] for o in outcomes})
                rows.append({"versions": len(outcomes), "status": "/".join(statuses), "wall_s": wall,
                             "sanitize_s": sanitize, "overhead_per_version_s": (wall - sanitize) / len(outcomes)})
            mlflow.set_tracking_uri(None)
    return rows


if __name__ == "__main__":
    sys.exit(main())
