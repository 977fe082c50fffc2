"""Every defense on the same backdoored models and clean budgets: the table users choose a defense by.

    .venv/bin/python benchmarks/compare.py --preset cpu|gpu|smoke [--defenses ...] [--attacks ...] [--seeds ...]

Trains (or reuses, from benchmarks/cache) the backdoored models of the preset, runs each defense with the same
trusted clean set, measures clean accuracy, ASR and robust accuracy on the Fashion-MNIST test images with the real
trigger (never shown to a trigger-free defense), and writes benchmarks/results/compare-PRESET.csv (one row per run,
appended, so a stopped run resumes), .md (mean ± std over seeds, and the goal checks) and .png (ASR vs accuracy).
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

from rich.console import Console

from gradprune_mlflow.benchmark import runner, tables
from gradprune_mlflow.benchmark.presets import PRESETS, get_preset, parse_options
from gradprune_mlflow.benchmark.registry import defense_names

HERE = Path(__file__).parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu", choices=list(PRESETS))
    ap.add_argument("--defenses", nargs="+", help=f"default: all ({', '.join(defense_names())})")
    ap.add_argument("--archs", nargs="+")
    ap.add_argument("--attacks", nargs="+")
    ap.add_argument("--per-class", nargs="+", type=int)
    ap.add_argument("--seeds", nargs="+", type=int)
    ap.add_argument("--test-images", type=int, help="measure on the first N test images (default: the preset's)")
    ap.add_argument("--train-images", type=int, help="attacker's training images (default: the preset's, 50,000)")
    ap.add_argument("--train-epochs", type=int, help="attacker's training epochs (default: the preset's)")
    ap.add_argument("--option", action="append", default=[], metavar="DEFENSE.NAME=VALUE",
                    help="a defense's own setting, e.g. anp.iterations=2000 (overrides the preset's)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", type=Path, default=HERE / "results", help="folder for the CSV, markdown and plot")
    ap.add_argument("--name", help="file stem (default: compare-PRESET)")
    ap.add_argument("--report-only", action="store_true", help="run nothing; rewrite the .md and .png from the CSV")
    ap.add_argument("--cache", type=Path, default=HERE / "cache", help="backdoored models, reused across runs")
    args = ap.parse_args(argv)
    console = Console()
    try:
        defenses = args.defenses or defense_names()
        base = get_preset(args.preset)
        options = dict(base.options)
        for d, o in parse_options(args.option).items():
            options[d] = {**options.get(d, {}), **o}
        preset = base.with_overrides(archs=args.archs, attacks=args.attacks, per_class=args.per_class,
                                     seeds=args.seeds, test_images=args.test_images, options=options,
                                     n_train=args.train_images, epochs=args.train_epochs)
        stem = args.out / (args.name or f"compare-{args.preset}")
        if args.report_only:
            rows = runner.read_rows(stem.with_suffix(".csv"))
        else:
            rows = runner.run(preset, defenses, stem.with_suffix(".csv"), cache_dir=args.cache, device=args.device,
                              console=console)
    except ValueError as exc:  # unknown preset, defense, attack or model: one line, exit 2
        console.print(f"[red]error:[/] {exc}")
        return 2
    rows = [r for r in rows if r["defense"] in defenses]
    command = " ".join(argv if argv is not None else sys.argv[1:])
    seeds = ", ".join(sorted({str(r["seed"]) for r in rows}))
    header = [
        f"Last written by: `.venv/bin/python benchmarks/compare.py {command}`"
        f" (the CSV keeps the rows of every earlier run of this preset; {len(rows)} rows here)  ",
        f"Device: {sorted({r['device'] for r in rows})}; written {date.today()}. Percentages on "
        f"{preset.test_images or 10_000} Fashion-MNIST test images; mean ± std over the "
        f"seeds in the rows ({seeds}). Defense options: {preset.options or 'none'}.",
        "", "## Goals (largest clean budget)", "", tables.goals_markdown(rows), "",
        "## What pruning adds over unlearning fine-tuning alone", "", tables.pruning_worth(rows), "",
        "## Tables", "",
    ]
    stem.with_suffix(".md").write_text("\n".join(header) + tables.markdown(rows, defenses))
    tables.plot(rows, defenses, stem.with_suffix(".png"))
    console.print(f"wrote {stem}.csv, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
