"""How fast mode's fine-tuning settings were chosen: known trigger, one run per setting, on the benchmark's cached
small CNNs (100 trusted images per class), measured on the first `--test-images` test images.

    .venv/bin/python benchmarks/finetune_settings.py [--seeds 0 1] [--attacks badnets blend] [--test-images 5000]
                                                     [--settings NAME ...] [--models small_cnn ...]

Prints one line per run: drop in points, ASR %, fine-tuning epochs run and kept, filters pruned, seconds. Every
setting names all four values it differs on, so the rows stay comparable when the defaults move.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gradprune_mlflow import lab, sanitize

OLD = {"finetune_patience": 4, "finetune_epochs": 30, "distill_weight": 1.0, "unlearn_weight": 1.0}
P8 = {**OLD, "finetune_patience": 8}
SETTINGS = {
    "old-defaults": OLD,
    "patience-8": P8,
    "patience-8-no-pruning": {**P8, "stages": "finetune"},
    "distill-3": {**P8, "distill_weight": 3.0},
    "distill-5": {**P8, "distill_weight": 5.0},
    "distill-5-50-epochs": {**P8, "distill_weight": 5.0, "finetune_epochs": 50},
    "distill-5-unlearn-2": {**P8, "distill_weight": 5.0, "unlearn_weight": 2.0},
    "distill-5-unlearn-2-50-epochs": {**P8, "distill_weight": 5.0, "unlearn_weight": 2.0, "finetune_epochs": 50},
    "distill-5-lr-2e-3": {**P8, "distill_weight": 5.0, "finetune_lr": 2e-3},
    "distill-5-unlearn-3-50-epochs": {**P8, "distill_weight": 5.0, "unlearn_weight": 3.0, "finetune_epochs": 50},
    "distill-5-unlearn-4-50-epochs": {**P8, "distill_weight": 5.0, "unlearn_weight": 4.0, "finetune_epochs": 50},
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--attacks", nargs="+", default=["badnets", "blend"], choices=sorted(lab.ATTACKS))
    ap.add_argument("--models", nargs="+", default=["small_cnn"])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--test-images", type=int, default=5000)
    args = ap.parse_args(argv)
    test = lab.test_data(args.test_images)
    for seed in args.seeds:
        clean = lab.trusted_set(100, seed)
        for arch in args.models:
            for attack in args.attacks:
                model = lab.backdoored_model(arch, attack, n_train=50_000, epochs=5, seed=seed,
                                             cache_dir=Path(__file__).parent / "cache")
                trigger = lab.attack_trigger(attack)
                for name in args.settings:
                    start = time.perf_counter()
                    r = sanitize(model, clean, trigger, seed=seed, eval_trigger=trigger, test_set=test,
                                 **SETTINGS[name]).report
                    drop = 100 * (r["before"]["clean_accuracy"] - r["after"]["clean_accuracy"])
                    print(f'seed {seed} {arch} {attack} {name}: drop {drop:.2f} pts, ASR '
                          f'{100 * r["after"]["attack_success_rate"]:.2f}%, epochs {r["finetune_epochs"]} (kept '
                          f'{r["finetune_best_epoch"]}), pruned {r["pruned_filters"]}, '
                          f'{time.perf_counter() - start:.0f} s', flush=True)


if __name__ == "__main__":
    main()
