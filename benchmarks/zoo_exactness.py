"""Pruned channels read exactly 0.0 after their consuming layer on every zoo architecture at a large input size.

    .venv/bin/python benchmarks/zoo_exactness.py [--size 224] [--archs resnet18 ...]

The tests check 28x28 and 32x32 inputs; this runs the same check (gradprune_mlflow.defense.exactness) at `--size`
(224x224 by default, the size these architectures were designed for), with random initial weights and randomised
norms, two filters pruned in every prunable conv. Writes benchmarks/results/zoo-exactness-SIZE.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from gradprune_mlflow.defense.exactness import not_zero, randomise_norms
from gradprune_mlflow.defense.masks import FilterMasks
from gradprune_mlflow.models.zoo import VISION, create_model

HERE = Path(__file__).parent


def check(arch: str, size: int) -> dict:
    start = time.perf_counter()
    torch.manual_seed(0)
    model = create_model(arch, num_classes=1000, in_channels=3, image_size=size).eval()
    randomise_norms(model)
    x = torch.rand(2, 3, size, size)
    masks = FilterMasks(model, x[:1])
    for name, conv in masks.convs.items():
        masks.prune(name, sorted({0, conv.out_channels // 2}), step=1)
    failures = not_zero(model, masks, x)
    with torch.no_grad():
        shape = tuple(model(x).shape)
    return {"arch": arch, "convs": len(masks.convs) + len(masks.unprunable), "unprunable": len(masks.unprunable),
            "pruned_filters": masks.count, "output": shape, "not_exactly_zero": len(failures),
            "first_failure": failures[0] if failures else "", "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--archs", nargs="+", default=list(VISION), choices=list(VISION))
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    rows = []
    for arch in args.archs:
        rows.append(check(arch, args.size))
        print(rows[-1], flush=True)
    cols = list(rows[0])
    text = [f"Command: `.venv/bin/python benchmarks/zoo_exactness.py {' '.join(sys.argv[1:])}`  ",
            f"Date {date.today()}, commit {commit}; {args.size}x{args.size} RGB inputs, 1000 classes, random weights "
            "and randomised norms, two filters pruned in every prunable conv; `not_exactly_zero` counts consuming "
            "layers where a pruned channel was not exactly 0.0.", "",
            "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    text += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    out = HERE / "results" / f"zoo-exactness-{args.size}.md"
    out.write_text("\n".join(text) + "\n")
    print(f"wrote {out}")
    return 1 if any(r["not_exactly_zero"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
