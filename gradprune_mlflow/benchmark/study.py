"""The command line of a per-model probe study (benchmarks/warp_probe.py, benchmarks/spread_probe.py): run a
measurement on every small CNN of the zoo (small_cnn_zoo) and append one JSON line per model, or print a file of
such lines as a markdown table."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gradprune_mlflow.benchmark.presets import small_cnn_zoo
from gradprune_mlflow.benchmark.runner import model_for


def run_study(argv: list[str] | None, description: str, default_out: Path, cache: Path,
              measure: Callable[[str, Any, Any, int], dict], markdown: Callable[[list[dict]], str]) -> int:
    """`measure(attack, model, trigger, seed)` gives a model's fields; `markdown(lines)` the table (header first)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--split", default="dev", choices=["dev", "test"])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--attacks", nargs="+", help="default: the zoo-cpu-quick preset's")
    ap.add_argument("--out", type=Path, default=default_out)
    ap.add_argument("--md", type=Path, help="print the lines of this file as a table and run nothing")
    args = ap.parse_args(argv)
    if args.md:
        print(markdown([json.loads(line) for line in args.md.read_text().splitlines() if line.strip()]))
        return 0
    for preset, arch, attack, seed in small_cnn_zoo(args.split, args.epochs, args.attacks):
        model, trigger = model_for(attack, arch, preset, seed, cache, torch.device("cpu"))
        start = time.perf_counter()
        fields = measure(attack, model, trigger, seed)
        line = {"arch": arch, "attack": attack, "epochs": preset.epochs, "seed": seed, "split": args.split,
                **fields, "seconds": round(time.perf_counter() - start, 1)}
        with args.out.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        print(markdown([line]).splitlines()[-1], flush=True)
    return 0
