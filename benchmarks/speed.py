"""Wall time of one trigger-free sanitize, per phase: what a user waits for on a CPU.

    .venv/bin/python benchmarks/speed.py [--attack signal] [--threads 2] [--set KEY=VALUE] [--out FILE.jsonl]
    .venv/bin/python benchmarks/speed.py --md benchmarks/results/speed.jsonl

Runs `sanitize` with the product defaults (trigger-free, on_clean=skip, verification on) on one development model of
the zoo-cpu-quick preset (small CNN, grey 28x28, seed 0; trained or reused from benchmarks/cache) with 50 trusted images
per class (and any `--set` settings), and appends one JSON line (commit, threads, settings, total and per-phase
seconds, status, ASR and accuracy after) to --out. To compare two commits, run it with PYTHONPATH set to each
checkout; `--md` renders the lines as a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import gradprune_mlflow
from gradprune_mlflow import lab, sanitize
from gradprune_mlflow.cli.common import parse_settings

HERE = Path(__file__).parent
PHASES = ("synthesis", "pruning", "fine_tuning", "rechecks", "verification", "measuring")


def measure(attack: str, threads: int, settings: dict | None = None) -> dict:
    torch.set_num_threads(threads)
    common = dict(n_train=6000, epochs=2, seed=0, cache_dir=HERE / "cache", image="gray28", device="cpu")
    # the clean model (attack "clean") is measured with BadNets' trigger, as the benchmark's rows are
    model = lab.clean_model("small_cnn", **common) if attack == "clean" else lab.backdoored_model("small_cnn", attack,
                                                                                                   **common)
    trigger = lab.attack_trigger("badnets" if attack == "clean" else attack)
    clean, test = lab.trusted_set(50, seed=0), lab.test_data(1000)
    start = time.perf_counter()
    report = sanitize(model, clean, None, eval_trigger=trigger, test_set=test, seed=0, device="cpu",
                      **(settings or {})).report
    total = time.perf_counter() - start
    # the commit of the library that ran (PYTHONPATH may point at another checkout than this script's)
    library = Path(gradprune_mlflow.__file__).parent
    commit = subprocess.run(["git", "-C", str(library), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    after = report.get("after") or report["before"]
    return {"commit": commit, "attack": attack, "threads": threads, "settings": settings or {},
            "machine": platform.machine(),
            "seconds": round(total, 1), "timings": report["timings"],
            "status": report["detection"]["score"]["verdict"],
            "asr_after": after["attack_success_rate"], "acc_after": after["clean_accuracy"]}


def markdown(lines: list[dict]) -> str:
    out = ["| commit | model | threads | status | total s | " + " | ".join(PHASES) + " | ASR after | acc. after |",
           "|---" * (len(PHASES) + 7) + "|"]
    for r in lines:
        phases = " | ".join(str(round(r["timings"].get(p, 0.0))) for p in PHASES)
        settings = "".join(f", {k}={v}" for k, v in r.get("settings", {}).items())
        out.append(f"| {r['commit']} | small_cnn {r['attack']} s0{settings} | {r['threads']} | {r['status']} | "
                   f"{r['seconds']} | {phases} | {100 * r['asr_after']:.1f}% | {100 * r['acc_after']:.1f}% |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attack", default="signal", help="a lab attack, or clean (default: signal)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a SanitizeConfig setting, e.g. search_precision=bf16 (repeatable)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "speed.jsonl")
    ap.add_argument("--md", type=Path, metavar="JSONL", help="print JSONL as a markdown table; run nothing")
    args = ap.parse_args(argv)
    if args.md:
        print(markdown([json.loads(x) for x in args.md.read_text().splitlines() if x.strip()]))
        return 0
    line = measure(args.attack, args.threads, parse_settings(args.set))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as fh:
        fh.write(json.dumps(line, sort_keys=True) + "\n")
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
