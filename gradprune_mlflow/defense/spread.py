"""The spread square: the white or black square that sends the trusted images it is stamped on to the most classes.

Detection looks for one class that a trigger sends the other classes' images to. An all-to-all backdoor (class y to
y + 1) sends each class somewhere else, no class more than a ninth of the images: such models are not flagged, and
score near the suspect threshold, above or under it. Its stamp still moves images of every class, each to a class of
its own, while the squares a clean model answers to send what they move to one or two sink classes. The spread of a
square is the share of the images the model gets right that it moves to a class outside the SINKS classes that take
most of them.

The spread does not separate all-to-all models from clean ones well enough to decide anything (benchmarks/RESULTS.md,
"An all-to-all probe that was not adopted"). What it is good for: where a suspect model is sanitized, the square with
the largest spread joins the unlearning mix (with true labels), so a stamp that has no single target is unlearned too.
Forward passes only, over the plain scan's squares; no random draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradprune_mlflow.data.cleanset import Split
from gradprune_mlflow.defense.patch_probe import plain_squares, probe_sides, square, stamped_predictions
from gradprune_mlflow.defense.triggers import MaskTrigger

IMAGES = 100  # trusted images the squares are tried on: the first ones of the split that the model gets right
SINKS = 2  # destinations whose images do not count as spread: a clean model's squares move images to one or two


@dataclass
class SpreadHit:
    """The square with the largest spread: where, how, and how many of the images it moved."""

    spread: float  # share of the images moved to a class outside the SINKS classes that take most of the moved ones
    moved: float  # share of the images moved off their label at all
    window: tuple[int, int, int]  # top, left, side (pixels)
    fill: str  # "white" or "black"
    destinations: list[int]  # moved images, by the class they went to
    trigger: MaskTrigger

    def to_report(self) -> dict:
        top, left, side = self.window
        return {"spread": round(self.spread, 4), "moved": round(self.moved, 4), "fill": self.fill,
                "window": {"top": top, "left": left, "side": side}, "destinations": self.destinations}


@torch.no_grad()
def spread_square(net: nn.Module, data: Split, num_classes: int, target: int,
                  sides: tuple[int, ...] | None = None) -> SpreadHit | None:
    """The plain square (of `sides`, default the patch probe's) with the largest spread on the first IMAGES images of
    `data` that `net` gets right; None when it gets none of them right. `net` takes [0, 1] pixels. The trigger is
    labelled `target` (the class the run unlearns: true-label unlearning does not use it)."""
    shape = tuple(data.images.shape[1:])
    device = next(net.parameters()).device
    x, y = data.images[:IMAGES], data.labels[:IMAGES]
    right = net(x.to(device)).argmax(1).cpu() == y
    x, y = x[right], y[right]
    if not len(x):
        return None
    candidates = plain_squares(shape, sides or probe_sides(shape))
    best = None
    for (fill, value, top, left, side), row in zip(candidates, stamped_predictions(net, x, candidates), strict=True):
        moved = row != y
        dest = torch.bincount(row[moved], minlength=num_classes)[:num_classes]
        spread = float(dest.sort(descending=True).values[SINKS:].sum()) / len(x)
        if best is None or spread > best[0]:
            best = (spread, float(moved.float().mean()), (top, left, side), fill, dest.tolist(), value)
    spread, moved, (top, left, side), fill, dest, value = best
    trigger = MaskTrigger(target, square(shape, top, left, side), torch.full(shape, value), source=f"spread-{fill}")
    return SpreadHit(spread, moved, (top, left, side), fill, dest, trigger)
