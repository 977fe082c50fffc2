"""How far one small square spreads the images it moves: the spread square (gradprune_mlflow/defense/spread.py) of
each model, as a study.

    .venv/bin/python benchmarks/spread_probe.py [--split dev|test] [--epochs 2] [--attacks ...] [--out FILE.jsonl]
    .venv/bin/python benchmarks/spread_probe.py --md benchmarks/results/spread-probe.jsonl

Trigger-free detection looks for a class that a trigger sends the other classes' images to; an all-to-all backdoor
(class y to y + 1) sends no class more than a ninth of them. What it does show: one small square moves images of
every class, each class to a class of its own. A clean model also has squares that move many images (a white square
on a garment can make it a bag), but mostly to one or two sink classes. The study keeps, per model, the square with
the largest *spread* on the trusted training split that trigger-free mode uses for the seed. It runs on the
zoo-cpu-quick preset's small CNNs (its attacks, or `--attacks`; `--epochs` sets the attacker's training epochs) and,
at the preset's epochs, the zoo-clean-cpu preset's clean models of the split, one line per model to --out; `--md`
prints them as a table. As a detector it was not adopted: it does not separate the all-to-all model from every clean
one (benchmarks/RESULTS.md); trigger-free mode unlearns the square where it sanitizes a suspect model. Models come
from benchmarks/cache (trained when missing).
"""

from __future__ import annotations

from pathlib import Path

from gradprune_mlflow import lab
from gradprune_mlflow.benchmark.study import run_study
from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.spread import spread_square

HERE = Path(__file__).parent


def probe(model, seed: int) -> dict:
    """The spread probe's best square on the trusted training split that trigger-free mode uses for `seed`."""
    cfg = SanitizeConfig(seed=seed, device="cpu")
    clean = lab.trusted_set(50, seed=seed)
    train, _ = clean.split(cfg.val_fraction, cfg.seed)
    net = Normalized(model.float().cpu().eval(), clean.meta.mean, clean.meta.std)
    hit = spread_square(net, train, clean.meta.num_classes, target=0)
    return hit.to_report() if hit else {}


def markdown(lines: list[dict]) -> str:
    out = ["| model | epochs | seed | spread | moved | square (top, left, side, fill) | moved images per class |",
           "|---|---|---|---|---|---|---|"]
    for r in lines:
        h = r["hit"]
        win = h["window"]
        out.append(f"| {r['arch']} {r['attack']} | {r['epochs']} | {r['seed']} | {100 * h['spread']:.1f}% | "
                   f"{100 * h['moved']:.1f}% | {win['top']}, {win['left']}, {win['side']}, {h['fill']} | "
                   f"{' '.join(map(str, h['destinations']))} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    return run_study(argv, __doc__.splitlines()[0], HERE / "results" / "spread-probe.jsonl", HERE / "cache",
                     lambda attack, model, trigger, seed: {"hit": probe(model, seed)}, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
