"""Does fast mode's fine-tuning stop too early? Known trigger; finetune_patience 4 (default) against 8, and 8 without
pruning, on the benchmark's cached models (seed 0, 100 trusted images per class, 10,000 test images).

    .venv/bin/python benchmarks/finetune_patience.py

Prints one line per run: drop in points, ASR, fine-tuning epochs run and kept, filters pruned, seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

from gradprune_mlflow import lab, sanitize

MODELS = [("small_cnn", "badnets"), ("small_cnn", "blend"), ("small_cnn", "signal"), ("tiny_resnet", "badnets")]
SETTINGS = [{}, {"finetune_patience": 8}, {"stages": "finetune", "finetune_patience": 8}]


def main() -> None:
    test, clean = lab.test_data(), lab.trusted_set(100, 0)
    for arch, attack in MODELS:
        model = lab.backdoored_model(arch, attack, n_train=50_000, epochs=5, seed=0,
                                     cache_dir=Path(__file__).parent / "cache")
        trigger = lab.attack_trigger(attack)
        for over in SETTINGS:
            start = time.perf_counter()
            r = sanitize(model, clean, trigger, seed=0, eval_trigger=trigger, test_set=test, **over).report
            drop = 100 * (r["before"]["clean_accuracy"] - r["after"]["clean_accuracy"])
            print(f'{arch} {attack} {over or "defaults"}: drop {drop:.2f} pts, ASR '
                  f'{r["after"]["attack_success_rate"]:.4f}, epochs {r["finetune_epochs"]} (kept '
                  f'{r["finetune_best_epoch"]}), pruned {r["pruned_filters"]}, {time.perf_counter() - start:.0f} s',
                  flush=True)


if __name__ == "__main__":
    main()
