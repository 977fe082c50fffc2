"""Every defense on the same backdoored models and clean budgets: the table users choose a defense by.

    .venv/bin/python benchmarks/compare.py --preset NAME [--split dev|test] [--defenses ...] [--attacks ...]

Trains (or reuses, from benchmarks/cache) the backdoored models of the preset, runs each defense with the same
trusted clean set, measures clean accuracy, ASR and robust accuracy on the Fashion-MNIST test images with the real
trigger (never shown to a trigger-free defense), and writes benchmarks/results/compare-PRESET.csv (one row per run,
appended, so a stopped run resumes), .md (mean ± std over seeds, the goal checks and the detection table), .png (ASR
vs accuracy) and -roc.png (the detectors' ROC curves). `--split test` runs the preset's test seeds into
compare-PRESET-test.*, and only for the configuration of the last development run (benchmark.guard).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from datetime import date
from pathlib import Path

from rich.console import Console

from gradprune_mlflow.benchmark import detection, guard, runner, tables
from gradprune_mlflow.benchmark.presets import PRESETS, SPLITS, get_preset, parse_options
from gradprune_mlflow.benchmark.registry import defense_names

HERE = Path(__file__).parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu", choices=list(PRESETS))
    ap.add_argument("--defenses", nargs="+", help=f"default: all ({', '.join(defense_names())})")
    ap.add_argument("--archs", nargs="+")
    ap.add_argument("--attacks", nargs="+")
    ap.add_argument("--per-class", nargs="+", type=int)
    ap.add_argument("--seeds", nargs="+", type=int, help="override the split's seeds")
    ap.add_argument("--split", default="dev", choices=SPLITS,
                    help="dev: the seeds settings may be chosen on (default); test: the held-out seeds")
    ap.add_argument("--accept-changed-config", metavar="REASON",
                    help="write a test table although the configuration changed after the last dev run; the reason "
                         "goes into the table's header")
    ap.add_argument("--test-images", type=int, help="measure on the first N test images (default: the preset's)")
    ap.add_argument("--train-images", type=int, help="attacker's training images (default: the preset's, 50,000)")
    ap.add_argument("--train-epochs", type=int, help="attacker's training epochs (default: the preset's)")
    ap.add_argument("--option", action="append", default=[], metavar="DEFENSE.NAME=VALUE",
                    help="a defense's own setting, e.g. anp.iterations=2000 (overrides the preset's)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", type=Path, default=HERE / "results", help="folder for the CSV, markdown and plot")
    ap.add_argument("--name", help="file stem of the dev split (default: compare-PRESET; test: STEM-test)")
    ap.add_argument("--report-only", action="store_true", help="run nothing; rewrite the .md and .png from the CSV")
    ap.add_argument("--cache", type=Path, default=HERE / "cache", help="backdoored models, reused across runs")
    args = ap.parse_args(argv)
    console = Console()
    try:
        base = get_preset(args.preset)
        defenses = args.defenses or list(base.defenses or defense_names())
        options = dict(base.options)
        for d, o in parse_options(args.option).items():
            options[d] = {**options.get(d, {}), **o}
        preset = base.with_overrides(archs=args.archs, attacks=args.attacks, per_class=args.per_class,
                                     test_images=args.test_images, options=options, n_train=args.train_images,
                                     epochs=args.train_epochs, **{f"{args.split}_seeds": args.seeds})
        preset.seeds(args.split)  # a preset without seeds for the split fails here, before any work
        dev_stem = args.out / (args.name or f"compare-{args.preset}")
        stem = dev_stem if args.split == "dev" else dev_stem.with_name(dev_stem.name + "-test")
        config = guard.configuration(preset, guard.code_version())
        if args.split == "test":
            guard.check_test(dev_stem, config, args.accept_changed_config)
        if args.report_only:
            rows = runner.read_rows(stem.with_suffix(".csv"))
        else:
            rows = runner.run(preset, defenses, stem.with_suffix(".csv"), cache_dir=args.cache, device=args.device,
                              console=console, split=args.split)
    except (ValueError, guard.ChangedConfig) as exc:  # unknown names, a changed configuration: one line, exit 2
        console.print(f"[red]error:[/] {exc}")
        return 2
    if not args.report_only:
        guard.record(dev_stem, args.split, config, reason=args.accept_changed_config)
    command = " ".join(argv if argv is not None else sys.argv[1:])
    write_report(stem, [r for r in rows if r["defense"] in defenses], defenses, preset, command, args)
    console.print(f"wrote {stem}.csv, .md, .png and -roc.png")
    return 0


def write_report(stem: Path, rows: list[dict[str, str]], defenses: list[str], preset, command: str,
                 args: argparse.Namespace) -> None:
    """The markdown (header, goals, pruning's worth, detection, tables) and the two plots."""
    label = "test" if args.split == "test" else "development"
    seeds = ", ".join(sorted({str(r["seed"]) for r in rows}))
    header = [
        f"**Split: {label}** (seeds {seeds}): "
        + ("held-out seeds, no setting chosen on them." if args.split == "test"
           else "settings may have been chosen on these seeds; not held-out figures."),
        "",
        f"Last written by: `.venv/bin/python benchmarks/compare.py {command}`"
        f" (the CSV keeps the rows of every earlier run of this preset; {len(rows)} rows here)  ",
        f"Device: {sorted({r['device'] for r in rows})}; written {date.today()} at commit {_commit()}. Percentages on "
        f"{preset.test_images or 10_000} Fashion-MNIST test images; mean ± std over the "
        f"seeds in the rows. Defense options: {preset.options or 'none'}. Clean models (attack `clean`) have no "
        "ASR: their columns are left out.",
    ]
    if args.split == "test" and args.accept_changed_config:
        header += ["", f"**Configuration changed after the last development run**, accepted because: "
                       f"{args.accept_changed_config}"]
    roc = detection.plot(rows, stem.with_name(stem.name + "-roc.png"))  # None when no ROC can be drawn
    header += [
        "", f"## Overview ({label})", "", tables.overview(rows, defenses),
        "## Goals (largest clean budget)", "", tables.goals_markdown(rows), "",
        "## What pruning adds over unlearning fine-tuning alone", "", tables.pruning_worth(rows), "",
        f"## Detection ({label})", "", detection.markdown(rows, roc.name if roc else None), "",
        f"## Tables ({label})", "",
    ]
    stem.with_suffix(".md").write_text("\n".join(header) + tables.markdown(rows, defenses))
    tables.plot(rows, defenses, stem.with_suffix(".png"))


def _commit() -> str:
    """The checkout's commit, "+ changes" when the code that decides what a defense does has uncommitted edits."""
    try:
        head = subprocess.run(["git", "-C", str(guard.REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(guard.REPO), "diff", "--quiet", "HEAD", "--", *guard.CODE]).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"
    return head + (" + uncommitted changes" if dirty else "")


if __name__ == "__main__":
    sys.exit(main())
