"""How many trusted images a smooth one-pixel warp sends to each model's classes: what `warp_threshold` is set against.

    .venv/bin/python benchmarks/warp_probe.py [--split dev|test] [--epochs 2] [--attacks ...] [--out FILE.jsonl]
    .venv/bin/python benchmarks/warp_probe.py --md benchmarks/results/warp-probe.jsonl

Trigger-free mode's warp probe (gradprune_mlflow/defense/warp.py) flags a class where the warp searched toward it
sends `warp_threshold` (0.5) of the other classes' trusted images there. This runs the probe as `sanitize` does
(the default configuration, the trusted training split of 50 images per class, the probe's own generator) on the
zoo-cpu-quick preset's small CNNs (its attacks, or `--attacks`; `--epochs` sets the attacker's training epochs) and,
at the preset's epochs, the zoo-clean-cpu preset's clean models of the split, and appends per model the response of
every class to --out. `--md` prints the backdoor target's response and the highest response of another class. Models
come from benchmarks/cache (trained when missing).
"""

from __future__ import annotations

from pathlib import Path

import torch

from gradprune_mlflow import lab
from gradprune_mlflow.benchmark.presets import CLEAN
from gradprune_mlflow.benchmark.study import run_study
from gradprune_mlflow.config import SanitizeConfig, warp_steps
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.probes import WARP_SEED
from gradprune_mlflow.defense.progress import SilentProgress
from gradprune_mlflow.defense.searchnet import search_copy
from gradprune_mlflow.defense.warp import warp_probe
from gradprune_mlflow.lab.attacks import AllToAllTrigger

HERE = Path(__file__).parent


def responses(model, seed: int) -> list[float]:
    """The warp probe's response per class, as trigger-free detection computes it for `seed`."""
    cfg = SanitizeConfig(seed=seed, device="cpu")
    clean = lab.trusted_set(50, seed=seed)
    train, _ = clean.split(cfg.val_fraction, cfg.seed)
    net = search_copy(Normalized(model.float().cpu().eval(), clean.meta.mean, clean.meta.std), train.images[:8])
    hits = warp_probe(net, train, clean.meta.num_classes, steps=warp_steps(cfg), restarts=cfg.synth_restarts,
                      generator=torch.Generator().manual_seed(cfg.seed + WARP_SEED), progress=SilentProgress())
    return [round(h.response, 4) for h in hits]


def markdown(lines: list[dict]) -> str:
    out = ["| model | epochs | seed | target's response | highest other class (class) |", "|---|---|---|---|---|"]
    for r in lines:
        rates, target = r["responses"], r["target"]
        others = [(v, k) for k, v in enumerate(rates) if k != target]
        top, k = max(others)
        shown = "" if target is None else f"{100 * rates[target]:.1f}%"
        out.append(f"| {r['arch']} {r['attack']} | {r['epochs']} | {r['seed']} | {shown} | {100 * top:.1f}% ({k}) |")
    return "\n".join(out)


def measure(attack: str, model, trigger, seed: int) -> dict:
    target = None if attack == CLEAN or isinstance(trigger, AllToAllTrigger) else trigger.target
    return {"target": target, "responses": responses(model, seed)}


def main(argv: list[str] | None = None) -> int:
    return run_study(argv, __doc__.splitlines()[0], HERE / "results" / "warp-probe.jsonl", HERE / "cache", measure,
                     markdown)


if __name__ == "__main__":
    raise SystemExit(main())
