"""The triggers trigger-free mode unlearns with: random fills of a synthesized region, and mixes of triggers."""

from __future__ import annotations

import math

import torch

from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.defense.synthesis import FamilyResult
from gradprune_mlflow.defense.triggerfree import unlearning_mix
from gradprune_mlflow.defense.triggers import MaskTrigger, PatchTrigger
from gradprune_mlflow.defense.unlearning import NoiseBlend, RandomFill, TriggerMix, unlearning_plan


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


def test_noise_blend_draws_fresh_noise_per_image_within_its_strength_range():
    x = torch.full((500, 1, 8, 8), 0.5)
    out = NoiseBlend(0, torch.Generator().manual_seed(0)).apply(x)
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out[0], out[1])  # not one fixed pattern
    # |x' - x| = alpha |noise - 0.5| <= alpha / 2, and the largest per-image change comes close to it
    change = (out - x).abs().flatten(1).amax(1)
    assert change.max() <= 0.15 + 1e-6 and change.min() > 0.04
    assert change.max() - change.min() > 0.05  # strength varies from image to image


def _family(name: str, sizes: list[float]) -> FamilyResult:
    k = len(sizes)
    return FamilyResult(name, torch.tensor([sizes]), torch.ones(1, k, dtype=torch.bool), torch.rand(1, k, 1, 4, 4),
                        torch.rand(1, k, 1, 4, 4))


def test_the_mix_adds_another_family_only_where_the_target_stands_out_there_too():
    """Class 0 is flagged in the patch family; the blend family joins (with an equal share and fresh noise) only
    when class 0's anomaly index in it is above companion_threshold."""
    patch = _family("patch", [0.01, 0.08, 0.07, 0.09, 0.075, 0.085])
    low = _family("blend", [0.22, 0.24, 0.20, 0.23, 0.21, 0.25])  # class 0 ordinary here
    high = _family("blend", [0.08, 0.24, 0.20, 0.23, 0.21, 0.25])  # class 0 smallest here too
    gen = torch.Generator().manual_seed(0)
    alone = unlearning_mix([patch, low], 0, SanitizeConfig(), gen)
    assert {t.kind for t in alone.triggers} <= {"mask", "random-fill"}  # patch parts only
    both = unlearning_mix([patch, high], 0, SanitizeConfig(), gen)
    assert [t.kind for t in both.triggers] == ["mix", "mix"]  # one equal share per family
    blend_kinds = [t.kind for t in both.triggers[1].triggers]
    assert blend_kinds.count("noise-blend") == 1 and blend_kinds.count("mask") == 3  # one restart: 3 strengths + noise
    off = unlearning_mix([patch, high], 0, SanitizeConfig(companion_threshold=99), gen)
    assert [t.kind for t in off.triggers] == [t.kind for t in alone.triggers]


def test_without_noise_the_blend_family_unlearns_only_its_synthesized_triggers():
    blend = _family("blend", [0.08, 0.24, 0.20, 0.23, 0.21, 0.25])
    gen = torch.Generator().manual_seed(0)

    def kinds(noise: bool) -> list[str]:
        return [t.kind for t in unlearning_mix([blend], 0, SanitizeConfig(), gen, noise=noise).triggers]

    assert "noise-blend" in kinds(True) and "noise-blend" not in kinds(False)


def test_unlearning_plan_multiplies_the_shares_of_nested_mixes_and_adds_up_parts_of_one_name():
    gen = torch.Generator().manual_seed(0)
    mask, pattern = torch.zeros(1, 4, 4), torch.ones(1, 4, 4)
    probe = MaskTrigger(0, mask, pattern, source="probe-white")
    found = [MaskTrigger(0, mask * s, pattern, source="synthesized-patch") for s in (0.5, 1.0)]
    mix = TriggerMix([probe, TriggerMix([*found, NoiseBlend(0, gen)], gen)], gen)
    assert unlearning_plan(mix) == [{"trigger": "probe-white", "share": 0.5},
                                    {"trigger": "synthesized-patch", "share": 0.3333},
                                    {"trigger": "noise-blend", "share": 0.1667}]
    assert unlearning_plan(PatchTrigger(0)) == [{"trigger": "patch", "share": 1.0}]
