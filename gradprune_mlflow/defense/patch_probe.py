"""The patch probe: does a tiny square, filled white, black or with a synthesized pattern, send most images of the
other classes to a class? The squares are placed where each synthesized mask is densest and, for white and black,
anywhere on the image (the plain scan). Forward passes only, on the trusted training split; no random draws.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from gradprune_mlflow.data.cleanset import Split
from gradprune_mlflow.defense.metrics import batch_for, target_rate
from gradprune_mlflow.defense.synthesis import FamilyResult
from gradprune_mlflow.defense.triggers import MaskTrigger

# The patch probe's square covers at most this fraction of the image (4x4 on 28x28; 5x5 on 32x32).
PATCH_AREA = 0.02
# Images of the other classes each probe candidate is measured on (the first ones of the split, for every class).
PROBE_IMAGES = 400
# A plain (white or black) square this close to the best response is preferred to the synthesized fill.
PLAIN_MARGIN = 0.02
# Images a class (a class-balanced sample of the split) that every square of the plain scan is first tried on.
SCAN_PER_CLASS = 5
# The plain scan's fills: pixel values on [0, 1] images.
PLAIN_FILLS = (("white", 1.0), ("black", 0.0))


@dataclass
class PatchHit:
    """The patch probe's best candidate for one class: the fraction of other-class images it sent there, and how."""

    target: int
    response: float  # this square's
    trigger: MaskTrigger
    fill: str  # "synthesized", "white" or "black"
    window: tuple[int, int, int]  # top, left, side (pixels)
    # the highest response of any square tried for the class: flagging compares its margin over the median class's
    best: float = 0.0
    # the highest response of a white or black square: a backdoor's stamp can be plain, while the squares that a clean
    # model answers to are synthesized patterns (natural adversarial patches)
    plain: float = 0.0

    def to_report(self) -> dict:
        top, left, side = self.window
        return {"target": self.target, "response": round(self.response, 4), "best": round(self.best, 4),
                "plain": round(self.plain, 4), "fill": self.fill, "window": {"top": top, "left": left, "side": side}}


def densest_square(mask: torch.Tensor, side: int) -> tuple[int, int]:
    """Top-left corner of the side x side square holding the most of `mask` (1, H, W)."""
    h, w = mask.shape[-2:]
    density = F.avg_pool2d(mask.reshape(1, 1, h, w).float(), side, stride=1)[0, 0]
    top, left = divmod(int(density.argmax()), density.shape[1])
    return top, left


def square(shape: tuple[int, int, int], top: int, left: int, side: int) -> torch.Tensor:
    """A (1, H, W) mask that is 1 on the square and 0 elsewhere."""
    window = torch.zeros(1, *shape[-2:])
    window[:, top : top + side, left : left + side] = 1.0
    return window


def probe_sides(shape: tuple[int, ...], area: float = PATCH_AREA) -> tuple[int, int]:
    """The patch probe's two square sides on images of `shape` (..., H, W): the largest within `area` of the image,
    and one pixel less."""
    side = max(2, round((area * shape[-2] * shape[-1]) ** 0.5))
    return side - 1, side


def scan_windows(shape: tuple[int, int, int], side: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of side x side squares over the whole image, `stride` apart and flush with every edge: any
    stamp up to side - stride + 1 pixels wide lies wholly inside one of them."""
    h, w = shape[-2:]

    def starts(n: int) -> list[int]:
        return sorted(set(range(0, n - side + 1, stride)) | {n - side})

    return [(top, left) for top in starts(h) for left in starts(w)]


def plain_squares(shape: tuple[int, ...], sides: tuple[int, ...]) -> list[tuple[str, float, int, int, int]]:
    """(fill, value, top, left, side) of every white and black square the plain scan tries: each of `sides`, half the
    largest side apart, over the whole image."""
    stride = max(1, max(sides) // 2)
    return [(fill, value, top, left, side) for side in sides for top, left in scan_windows(shape, side, stride)
            for fill, value in PLAIN_FILLS]


@torch.no_grad()
def stamped_predictions(net: nn.Module, images: torch.Tensor, candidates: list[tuple[str, float, int, int, int]]):
    """For each square of `candidates` (plain_squares), in order: the net's predicted class of every one of `images`
    with the square stamped on it (on CPU). Many squares share one forward pass."""
    device = next(net.parameters()).device
    per_pass = max(1, batch_for(device) // max(len(images), 1))
    for group in range(0, len(candidates), per_pass):
        stamped = images.repeat(len(candidates[group : group + per_pass]), 1, 1, 1)
        for j, (_, value, top, left, side) in enumerate(candidates[group : group + per_pass]):
            stamped[j * len(images) : (j + 1) * len(images), :, top : top + side, left : left + side] = value
        yield from net(stamped.to(device)).argmax(1).cpu().reshape(-1, len(images))


def other_images(data: Split, classes: list[int]) -> dict[int, torch.Tensor]:
    """Per class: the first PROBE_IMAGES images of the other classes in `data`, that its candidates are measured on."""
    return {k: data.images[data.labels != k][:PROBE_IMAGES] for k in classes}


@torch.no_grad()
def plain_scan(net: nn.Module, data: Split, sides: tuple[int, ...], others_of: dict[int, torch.Tensor]
               ) -> dict[int, PatchHit]:
    """Per class of `others_of` (other_images): the white or black square of one of `sides`, anywhere on the image
    (half the largest side apart), that sends the most images of other classes there. Every square is tried once on
    a class-balanced sample (SCAN_PER_CLASS a class), all classes read off the same predictions; each class's best
    square is then measured on its `others_of` images, as the probe measures any candidate.

    A plain stamp need not lie where the synthesized masks are densest (a search can settle on a natural feature of
    the target class elsewhere), and a white or black square stays evidence on models whose synthesized squares do
    not (their natural adversarial patches: defense/evidence.py). Two sizes, because a backdoor can answer to its
    stamp with at most a pixel of border around it and not to a square two pixels larger."""
    shape = tuple(data.images.shape[1:])
    num_classes = max(others_of) + 1
    sample = torch.cat([(data.labels == c).nonzero().flatten()[:SCAN_PER_CLASS] for c in range(num_classes)])
    images, labels = data.images[sample], data.labels[sample]
    candidates = plain_squares(shape, sides)
    counts = []
    for row in stamped_predictions(net, images, candidates):
        # images sent to a class other than their own, by the class they were sent to
        counts.append(torch.bincount(row[row != labels], minlength=num_classes)[:num_classes].float())
    others = torch.tensor([float((labels != k).sum()) for k in range(num_classes)]).clamp_min(1.0)
    best = (torch.stack(counts) / others).argmax(0)
    hits = {}
    for k, images_k in others_of.items():
        fill, value, top, left, side = candidates[int(best[k])]
        trigger = MaskTrigger(k, square(shape, top, left, side), torch.full(shape, value), source=f"probe-{fill}")
        hits[k] = PatchHit(k, target_rate(net, trigger.apply(images_k), k), trigger, fill, (top, left, side))
    return hits


def plain_hits(net: nn.Module, data: Split, num_classes: int, area: float = PATCH_AREA) -> dict[int, PatchHit]:
    """plain_scan's hit for every class, at the patch probe's sides: what patch_probe takes as `scanned`."""
    return plain_scan(net, data, probe_sides(tuple(data.images.shape[1:]), area),
                      other_images(data, list(range(num_classes))))


@torch.no_grad()
def patch_probe(net: nn.Module, data: Split, patch: FamilyResult, scanned: dict[int, PatchHit],
                area: float = PATCH_AREA) -> list[PatchHit]:
    """For every class of the patch family's search: the best tiny square (at most `area` of the image), placed
    where each synthesized mask is densest and filled with the synthesized pattern, white or black, or white or black
    anywhere on the image (`scanned`: plain_hits on this net and data, which read no synthesis), measured on images
    of the other classes.

    Real patch triggers are compact and often plain (BadNets: a white square), while a synthesized mask scatters a
    few pixels around them; classes that are not a target stay well below the threshold
    (benchmarks/results/probe-detection.md).
    """
    shape = tuple(data.images.shape[1:])
    sides = probe_sides(shape, area)
    classes = patch.classes if patch.classes is not None else list(range(patch.sizes.shape[1]))
    others_of = other_images(data, classes)
    hits = []
    for k, others in others_of.items():
        found = [scanned[k]]
        for trig in patch.triggers(k):
            for side in sides:
                top, left = densest_square(trig.mask, side)
                window = square(shape, top, left, side)
                fills = (("white", torch.ones(shape)), ("black", torch.zeros(shape)), ("synthesized", trig.pattern))
                for fill, pattern in fills:
                    candidate = MaskTrigger(k, window, pattern, source=f"probe-{fill}")
                    found.append(PatchHit(k, target_rate(net, candidate.apply(others), k), candidate, fill,
                                          (top, left, side)))
        # Within PLAIN_MARGIN of the best, a plain fill wins, then the smaller square, then the higher response:
        # the square that flagged the class is unlearned, and it should be the real patch, not one around it:
        # unlearning a synthesized fill, or a larger plain square around the real one, leaves more of the real patch
        # working than unlearning the plain square that covers it.
        top_rate = max(h.response for h in found)
        close = [h for h in found if h.response >= top_rate - PLAIN_MARGIN]
        chosen = min(close, key=lambda h: (h.fill == "synthesized", h.window[2], -h.response))
        chosen = replace(chosen, best=top_rate, plain=max(h.response for h in found if h.fill != "synthesized"))
        hits.append(chosen)
    return hits
