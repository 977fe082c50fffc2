"""Grad-Prune on backdoored torchvision models (colour 32x32 Fashion-MNIST), known-trigger and trigger-free.

    .venv/bin/python benchmarks/zoo_quality.py [--archs resnet18 mobilenet_v3_small] [--attacks badnets smooth]
                                               [--runs fast-known fast-free] [--per-class 50] [--train-only]
                                               [--pairs resnet18:badnets ...]

Trains (or reuses, from benchmarks/cache) each architecture with random initial weights on `--n-train` of the
attacker's images in the lab's color32 format (per-image random colours) with 10% poison, draws a trusted set of
`--per-class` images per class from the other 10,000, runs `gradprune_mlflow.sanitize` and measures on the 10,000
test images with the real trigger (evaluation only: it never reaches the defense). A model is trained when it is
first needed, and every known-trigger row runs before any trigger-free one. Writes benchmarks/results/zoo-quality.csv
and .md after every row.
"""

from __future__ import annotations

import argparse
import csv
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
from quality import RUNS, _row

from gradprune_mlflow import lab, sanitize

HERE = Path(__file__).parent
IMAGE = "color32"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=["resnet18", "mobilenet_v3_small"])
    ap.add_argument("--attacks", nargs="+", default=["badnets", "smooth"], choices=sorted(lab.ATTACKS))
    ap.add_argument("--runs", nargs="+", default=["fast-known", "fast-free"], choices=list(RUNS))
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--n-train", type=int, default=20_000, help="attacker's training images")
    ap.add_argument("--epochs", type=int, default=3, help="attacker's training epochs")
    ap.add_argument("--seed", type=int, default=0, help="the attacker's training seed, the trusted draw and the "
                    "defense's seed")
    ap.add_argument("--pairs", nargs="+", metavar="ARCH:ATTACK", help="the models to measure, in this order "
                    "(default: every arch with every attack)")
    ap.add_argument("--train-only", action="store_true", help="train and cache the models, measure nothing")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "zoo-quality")
    args = ap.parse_args(argv)
    # the code that runs is the code at the start: a commit made while it runs must not be named
    git = ["git", "-C", str(HERE)]
    args.commit = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout:
        args.commit += " with uncommitted changes"
    pairs = [tuple(p.split(":", 1)) for p in args.pairs] if args.pairs else \
        [(arch, attack) for arch in args.archs for attack in args.attacks]
    if args.train_only:
        for arch, attack in pairs:
            _model(args, arch, attack)
        return 0
    test = lab.test_data(image=IMAGE)
    clean = lab.trusted_set(args.per_class, seed=args.seed, image=IMAGE)
    rows = []
    for run in args.runs:
        known, mode = RUNS[run]
        for arch, attack in pairs:
            model, trigger = _model(args, arch, attack), lab.attack_trigger(attack)
            start = time.perf_counter()
            result = sanitize(model, clean, trigger if known else None, mode=mode, seed=args.seed,
                              eval_trigger=trigger, test_set=test, on_clean="sanitize")
            row = _row(attack, run, result.report, time.perf_counter() - start)
            unprunable = result.report.get("unprunable_layers", [])
            rows.append({"arch": arch, **row, "unprunable_layers": len(unprunable)})
            print(rows[-1], flush=True)
            _write(args, rows)
    return 0


def _model(args, arch: str, attack: str) -> torch.nn.Module:
    """The backdoored model, trained on first use and cached in benchmarks/cache."""
    start = time.perf_counter()
    model = lab.backdoored_model(arch, attack, n_train=args.n_train, epochs=args.epochs, seed=args.seed,
                                 cache_dir=HERE / "cache", image=IMAGE)
    print(f"[{arch} {attack}] trained or loaded in {time.perf_counter() - start:.0f} s", flush=True)
    return model


def write_table(out: Path, header: str, rows: list[dict]) -> None:
    """`rows` as out.csv, and as out.md: `header`, then a markdown table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.with_suffix(".csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cols = list(rows[0])
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    table += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    out.with_suffix(".md").write_text("\n".join([header] + table) + "\n")


def _write(args, rows: list[dict]) -> None:
    header = (f"Command: `.venv/bin/python benchmarks/zoo_quality.py {' '.join(sys.argv[1:])}`  \n"
              f"Date {date.today()}, commit {args.commit}; {platform.machine()}, {torch.get_num_threads()} threads, "
              "CPU. "
              f"torchvision models with random initial weights trained on {args.n_train} attacker images "
              f"({IMAGE}, {args.epochs} epochs, 10% poison to class 0), {args.per_class} trusted images per class, "
              f"seed {args.seed}, 10,000 test images; ASR with the real trigger, given for evaluation only.\n")
    write_table(args.out, header, rows)


if __name__ == "__main__":
    sys.exit(main())
