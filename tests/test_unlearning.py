"""The triggers trigger-free mode unlearns with: random fills of a synthesized region, and mixes of triggers."""

from __future__ import annotations

import math

import torch

from gradprune_mlflow.defense.triggers import MaskTrigger
from gradprune_mlflow.defense.unlearning import RandomFill, TriggerMix


def region(h: int = 8, w: int = 8) -> torch.Tensor:
    r = torch.zeros(1, h, w)
    r[:, 5:8, 5:8] = 1.0
    return r


def test_random_fill_changes_only_its_region_and_stays_in_pixel_range():
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    out = RandomFill(0, region(), torch.Generator().manual_seed(0)).apply(x)
    inside = region().bool().expand_as(x[0])
    assert torch.equal(out[:, ~inside], x[:, ~inside])
    assert not torch.equal(out[:, inside], x[:, inside])
    assert out.min() >= 0 and out.max() <= 1


def test_solid_fills_are_per_channel_and_often_saturated():
    """Half the images get one solid colour in the region; its values follow sin^2(pi u / 2) (arcsine), which puts
    about 20% of them above 0.9, where a uniform draw puts 10%: real patches are usually saturated."""
    n = 4000
    out = RandomFill(0, region(), torch.Generator().manual_seed(0)).apply(torch.zeros(n, 3, 8, 8))
    patch = out[:, :, 5:8, 5:8].flatten(2)  # (n, C, 9)
    solid = (patch.amax(2) == patch.amin(2)).all(1)  # every channel constant over the region
    assert 0.4 < solid.float().mean() < 0.6
    colours = patch[solid][:, :, 0]  # (m, C)
    assert (colours[:, 0] != colours[:, 1]).float().mean() > 0.99  # channels drawn independently
    expected = 1 - 2 / math.pi * math.asin(math.sqrt(0.9))  # P(v > 0.9) under the arcsine law, about 0.205
    assert abs((colours > 0.9).float().mean().item() - expected) < 0.03


def test_trigger_mix_gives_each_image_one_of_its_triggers():
    a = MaskTrigger(0, torch.ones(1, 4, 4), torch.zeros(1, 4, 4))  # all black
    b = MaskTrigger(0, torch.ones(1, 4, 4), torch.ones(1, 4, 4))  # all white
    out = TriggerMix([a, b], torch.Generator().manual_seed(0)).apply(torch.full((200, 1, 4, 4), 0.5))
    black, white = (out == 0).flatten(1).all(1), (out == 1).flatten(1).all(1)
    assert (black ^ white).all() and 50 < black.sum() < 150
