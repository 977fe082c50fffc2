"""An all-to-all probe that was tried and not adopted: how far one small square spreads the images it moves.

    .venv/bin/python benchmarks/spread_probe.py [--split dev|test] [--epochs 2] [--attacks ...] [--out FILE.jsonl]
    .venv/bin/python benchmarks/spread_probe.py --md benchmarks/results/spread-probe.jsonl

Trigger-free detection looks for a class that a trigger sends the other classes' images to; an all-to-all backdoor
(class y to y + 1) sends no class more than a tenth of them. What it does show: one small square moves images of
every class, each class to a class of its own. A clean model also has squares that move many images (a white square
on a garment can make it a bag), but mostly to one or two sink classes. This probe slides white and black squares of
the patch probe's sides over the image (every STRIDE pixels, and the last rows and columns) and keeps, per model, the
square with the largest *spread*: the share of the first IMAGES trusted training images the model gets right that
it moves to a class outside the SINKS classes that take most of the moved images. It runs on the zoo-cpu-quick
preset's small CNNs (its attacks, or `--attacks`; `--epochs` sets the attacker's training epochs) and, at the
preset's epochs, the zoo-clean-cpu preset's clean models of the split, one line per model to --out; `--md` prints
them as a table. It is not part of trigger-free mode: on the development models it does not separate the all-to-all
model from every clean one (benchmarks/RESULTS.md). Models come from benchmarks/cache (trained when missing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gradprune_mlflow import lab
from gradprune_mlflow.benchmark.study import run_study
from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.data.cleanset import Split
from gradprune_mlflow.defense.metrics import batch_for
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.patch_probe import PATCH_AREA

HERE = Path(__file__).parent
IMAGES = 100  # trusted images the squares are tried on (the first ones of the split that the model gets right)
STRIDE = 2  # pixels between the squares' positions
SINKS = 2  # destinations whose images do not count as spread: a clean model's squares move images to one or two


@dataclass
class SpreadHit:
    """The square with the largest spread: where, how and how many of the images it moved."""

    spread: float  # moved to a class outside the SINKS classes that take most of the moved images
    moved: float  # moved off their label at all
    window: tuple[int, int, int]  # top, left, side (pixels)
    fill: str  # "white" or "black"
    destinations: list[int]  # moved images per class they went to

    def to_report(self) -> dict:
        top, left, side = self.window
        return {"spread": round(self.spread, 4), "moved": round(self.moved, 4), "fill": self.fill,
                "window": {"top": top, "left": left, "side": side}, "destinations": self.destinations}


def squares(h: int, w: int, sides: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Every (top, left, side) on a STRIDE grid, for each side, covering the image's last rows and columns too."""
    out = []
    for side in sides:
        tops = sorted({*range(0, h - side + 1, STRIDE), h - side})
        lefts = sorted({*range(0, w - side + 1, STRIDE), w - side})
        out += [(t, left, side) for t in tops for left in lefts]
    return out


@torch.no_grad()
def spread_probe(net: nn.Module, data: Split, num_classes: int, sides: tuple[int, ...]) -> SpreadHit | None:
    """The square (of `sides` pixels, white or black) whose moved images spread over the most classes; None when the
    model gets none of the first IMAGES trusted images right. `net` takes [0, 1] pixels and is not changed."""
    device = next(net.parameters()).device
    x, y = data.images[:IMAGES].to(device), data.labels[:IMAGES].to(device)
    right = net(x).argmax(1) == y
    x, y = x[right], y[right]
    if not len(x):
        return None
    h, w = x.shape[-2:]
    per_pass = max(1, batch_for(device) // len(x))
    candidates = [(win, fill) for win in squares(h, w, sides) for fill in ("white", "black")]
    best = None
    for start in range(0, len(candidates), per_pass):
        chunk = candidates[start : start + per_pass]
        stamped = x.repeat(len(chunk), 1, 1, 1)
        for i, ((top, left, side), fill) in enumerate(chunk):
            stamped[i * len(x) : (i + 1) * len(x), :, top : top + side, left : left + side] = float(fill == "white")
        preds = net(stamped).argmax(1).view(len(chunk), len(x))
        for i, (window, fill) in enumerate(chunk):
            moved = preds[i] != y
            dest = torch.bincount(preds[i][moved], minlength=num_classes)
            spread = float(dest.sort(descending=True).values[SINKS:].sum()) / len(x)
            if best is None or spread > best.spread:
                best = SpreadHit(spread, float(moved.float().mean()), window, fill, dest.cpu().tolist())
    return best



def probe(model, seed: int) -> dict:
    """The spread probe's best square on the trusted training split that trigger-free mode uses for `seed`."""
    cfg = SanitizeConfig(seed=seed, device="cpu")
    clean = lab.trusted_set(50, seed=seed)
    train, _ = clean.split(cfg.val_fraction, cfg.seed)
    net = Normalized(model.float().cpu().eval(), clean.meta.mean, clean.meta.std)
    _, h, w = clean.images.shape[1:]
    side = max(2, round((PATCH_AREA * h * w) ** 0.5))
    hit = spread_probe(net, train, clean.meta.num_classes, (side - 1, side))
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
