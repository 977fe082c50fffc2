"""The patch probe: squares where the synthesized masks are densest, and the plain scan over the whole image."""

from __future__ import annotations

import copy

import pytest
import torch

from gradprune_mlflow.data.cleanset import Split
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.patch_probe import (
    PLAIN_MARGIN,
    densest_square,
    other_images,
    patch_probe,
    plain_hits,
    plain_scan,
    scan_windows,
)
from gradprune_mlflow.defense.synthesis import FamilyResult

K = 10


def test_densest_square_finds_the_block():
    mask = torch.zeros(1, 12, 12)
    mask[:, 8:11, 2:5] = 1.0
    mask[:, 0, 0] = 1.0
    assert densest_square(mask, 3) == (8, 2)


def _corner_family(shape) -> FamilyResult:
    """Every class's synthesized mask is a few pixels around the bottom-right corner, the pattern mid-grey."""
    c, h, w = shape
    masks = torch.zeros(1, K, 1, h, w)
    masks[..., h - 3 :, w - 3 :] = 0.8
    masks[..., h - 5, w - 6] = 0.3  # a stray pixel, as synthesized masks have
    return FamilyResult("patch", torch.full((1, K), 0.01), torch.ones(1, K, dtype=torch.bool), masks,
                        torch.full((1, K, c, h, w), 0.5))


@pytest.mark.slow
def test_the_patch_probe_finds_a_badnets_square_and_nothing_on_a_clean_model(badnets_cnn, clean_cnn, clean_set):
    data = clean_set.as_split()
    data = Split(data.images[::3], data.labels[::3])  # a third of the set is plenty, and the suite is near its budget
    family = _corner_family(tuple(data.images.shape[1:]))
    for model, backdoored in ((badnets_cnn, True), (clean_cnn, False)):
        net = Normalized(copy.deepcopy(model), clean_set.meta.mean, clean_set.meta.std).eval()
        hits = patch_probe(net, data, family, plain_hits(net, data, K))
        assert [h.target for h in hits] == list(range(K))
        best = max(hits, key=lambda h: h.best)
        print(f"{'badnets' if backdoored else 'clean'}: best class {best.target} {best.best:.3f} {best.fill}")
        # the square reported is the best one, or a plain one within PLAIN_MARGIN of it
        assert all(h.best - PLAIN_MARGIN <= h.response <= h.best for h in hits)
        # the best white or black square is one of the squares tried, and a plain square kept is at least as good
        assert all(h.plain <= h.best and (h.fill == "synthesized" or h.plain >= h.response) for h in hits)
        if backdoored:  # the white 3x3 in the corner is the real trigger
            assert best.target == 0 and best.best >= 0.9 and best.fill == "white" and best.plain >= 0.9
            top, left, side = best.window
            assert side in (3, 4) and top + side == 28 and left + side == 28
        else:
            assert best.best < 0.9
        assert all(h.best < 0.9 for h in hits if h.target != 0)


class _CornerSquare(torch.nn.Module):
    """Class 0 exactly when the 3x3 square at rows/columns 25-27 is white (a BadNets backdoor), class 1 otherwise."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        on = (x[:, 0, 25:, 25:].flatten(1).min(1).values > 0.99).float()
        return torch.stack([on * 100, torch.full_like(on, 1.0)] + [torch.zeros_like(on)] * 8, 1)


def test_the_patch_probe_prefers_the_smallest_square_that_works():
    """Seed 3's case: one restart's densest 3x3 sat a column off the real patch and its 4x4 covered it; unlearning
    that 4x4 left 11.8% ASR. Of the squares that work, the probe must report the 3x3 on the patch."""
    masks = torch.zeros(2, K, 1, 28, 28)
    masks[0, :, :, 25:28, 24:27] = 0.8  # restart 0: densest 3x3 at (25, 24), densest 4x4 at (24, 24)
    masks[0, :, :, 27, 27] = 0.3
    masks[1, :, :, 25:28, 25:28] = 0.8  # restart 1: on the patch
    family = FamilyResult("patch", torch.full((2, K), 0.01), torch.ones(2, K, dtype=torch.bool), masks,
                          torch.full((2, K, 1, 28, 28), 0.5))
    assert densest_square(masks[0, 0], 3) == (25, 24) and densest_square(masks[0, 0], 4) == (24, 24)
    data = Split(torch.rand(60, 1, 28, 28) * 0.5, torch.arange(60) % 9 + 1)
    hit = patch_probe(_CornerSquare(), data, family, plain_hits(_CornerSquare(), data, K))[0]
    assert hit.best == 1.0 and hit.response == 1.0
    assert (hit.fill, hit.window) == ("white", (25, 25, 3))


@pytest.mark.parametrize("size,side,stride", [(28, 4, 2), (32, 5, 2), (8, 2, 1), (28, 3, 2)])
def test_the_plain_scan_s_squares_hold_every_small_stamp_and_reach_every_edge(size, side, stride):
    windows = scan_windows((3, size, size), side, stride)
    stamp = side - stride + 1
    for top in range(size - stamp + 1):
        for left in range(size - stamp + 1):
            assert any(t <= top and top + stamp <= t + side and w <= left and left + stamp <= w + side
                       for t, w in windows), (top, left)
    assert {t for t, _ in windows} >= {0, size - side} and all(t + side <= size for t, _ in windows)


def test_the_patch_probe_finds_a_plain_stamp_where_no_synthesized_mask_lies():
    """A search can settle its masks on a natural feature far from the real stamp: the scan still finds the stamp."""
    masks = torch.zeros(1, K, 1, 28, 28)
    masks[..., 2:5, 2:5] = 0.8  # every class's mask top left; the backdoor answers bottom right
    family = FamilyResult("patch", torch.full((1, K), 0.01), torch.ones(1, K, dtype=torch.bool), masks,
                          torch.full((1, K, 1, 28, 28), 0.5))
    data = Split(torch.rand(60, 1, 28, 28) * 0.5, torch.arange(60) % 9 + 1)
    scanned = plain_scan(_CornerSquare(), data, (3, 4), other_images(data, list(range(K))))
    top, left, side = scanned[0].window
    assert scanned[0].response == 1.0 and scanned[0].fill == "white"
    assert top <= 25 and left <= 25 and top + side == 28 and left + side == 28 and side in (3, 4)
    hit = patch_probe(_CornerSquare(), data, family, scanned)[0]
    assert (hit.best, hit.plain, hit.fill, hit.window) == (1.0, 1.0, "white", scanned[0].window)
