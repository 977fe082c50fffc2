"""Quality check: Grad-Prune on backdoored Fashion-MNIST CNNs, known-trigger and trigger-free.

    .venv/bin/python benchmarks/quality.py [--attacks badnets blend] [--per-class 100] [--runs fast-known ...]
                                           [--set KEY=VALUE ...]

Trains (or reuses, from benchmarks/cache) a small CNN on the attacker's 50,000 images with 10% poison, draws a trusted
set of `--per-class` images per class from the other 10,000, runs `gradprune_mlflow.sanitize` and measures on the
10,000 test images with the real trigger (evaluation only: it never reaches the defense). Writes
benchmarks/results/quality-seedN.csv and .md (N = --seed). Current results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from gradprune_mlflow import lab, load_clean_set, sanitize
from gradprune_mlflow.cli.common import parse_settings

HERE = Path(__file__).parent
RUNS = {  # name -> (known trigger?, mode)
    "fast-known": (True, "fast"),
    "paper-known": (True, "paper"),
    "fast-free": (False, "fast"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attacks", nargs="+", default=["badnets", "blend"], choices=sorted(lab.ATTACKS))
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--arch", default="small_cnn")
    ap.add_argument("--epochs", type=int, default=5, help="attacker's training epochs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--defense-seed", type=int, help="the defense's seed (its validation split and random draws); "
                    "default --seed. Another value gives the same model and trusted set a second, independent run")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", dest="settings",
                    help="a sanitizer setting for every run (repeatable), e.g. --set away_weight=0 for the run without "
                         "fast mode's away-from-target term; it is added to the result files' names")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    args.settings = parse_settings(args.settings)
    if args.defense_seed is None:
        args.defense_seed = args.seed
    test = lab.test_data()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clean = load_clean_set(lab.trusted_clean_set(Path(tmp) / "clean", args.per_class, seed=args.seed))
        for attack in args.attacks:
            print(f"[{attack}] training or loading the backdoored {args.arch}", flush=True)
            model = lab.backdoored_model(args.arch, attack, n_train=50_000, epochs=args.epochs, seed=args.seed,
                                         cache_dir=HERE / "cache")
            trigger = lab.attack_trigger(attack)
            for run in args.runs:
                known, mode = RUNS[run]
                start = time.perf_counter()
                result = sanitize(model, clean, trigger if known else None, mode=mode, seed=args.defense_seed,
                                  eval_trigger=trigger, test_set=test, on_clean="sanitize", **args.settings)
                rows.append(_row(attack, run, result.report, time.perf_counter() - start))
                print(_fmt(rows[-1]), flush=True)
    _write(args, rows)
    return 0


def _row(attack: str, run: str, report: dict, seconds: float) -> dict:
    before, after = report["before"], report["after"]
    det = report["detection"] or {}
    return {
        "attack": attack, "run": run,
        "acc_before": before["clean_accuracy"], "acc_after": after["clean_accuracy"],
        "acc_drop_points": round(100 * (before["clean_accuracy"] - after["clean_accuracy"]), 2),
        "asr_before": before["attack_success_rate"], "asr_after": after["attack_success_rate"],
        "ra_after": after["robust_accuracy"],
        # untriggered non-target images the model puts in the target class: the ASR's floor from its own confusion
        "clean_to_target_after": after.get("clean_target_rate"),
        "pruned": f'{report["pruned_filters"]}/{report["total_filters"]}',
        "gradient_passes": report["gradient_passes"], "finetune_epochs": report["finetune_epochs"],
        "flagged": det.get("flagged", ""), "detected_target": det.get("target", ""),
        "anomaly_index": det.get("anomaly_index", ""), "seconds": round(seconds, 1),
    }


def _fmt(row: dict) -> str:
    return (f'  {row["run"]:12s} acc {row["acc_before"]:.4f} -> {row["acc_after"]:.4f} '
            f'(-{row["acc_drop_points"]} pts)  ASR {row["asr_before"]:.4f} -> {row["asr_after"]:.4f}  '
            f'(clean {row["clean_to_target_after"]:.4f})  pruned {row["pruned"]}  passes {row["gradient_passes"]}  '
            f'{row["seconds"]} s')


def _write(args, rows: list[dict]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"quality-seed{args.seed}"
    if args.defense_seed != args.seed:
        stem = stem.with_name(f"{stem.name}-defense{args.defense_seed}")
    for key, value in args.settings.items():
        stem = stem.with_name(f"{stem.name}-{key}{value}")
    with stem.with_suffix(".csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cols = list(rows[0])
    lines = [
        f"Command: `.venv/bin/python benchmarks/quality.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, CPU; date {date.today()}; "
        f"{args.arch}, {args.per_class} trusted images per class, seed {args.seed} "
        f"(defense seed {args.defense_seed}), 10,000 test images.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ] + ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.csv and {stem}.md")


if __name__ == "__main__":
    sys.exit(main())
