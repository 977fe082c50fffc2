"""The warp probe: smooth sub-pixel warps, searched toward every class, and what they send there."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradprune_mlflow.config import SanitizeConfig, warp_steps
from gradprune_mlflow.data.cleanset import Split
from gradprune_mlflow.defense.patch_probe import PatchHit
from gradprune_mlflow.defense.progress import SilentProgress
from gradprune_mlflow.defense.synthesis import Detection
from gradprune_mlflow.defense.triggerfree import Found, companion_warp
from gradprune_mlflow.defense.triggers import MaskTrigger
from gradprune_mlflow.defense.unlearning import TriggerMix, unlearning_plan
from gradprune_mlflow.defense.warp import MAX_SHIFT, FlowTrigger, WarpHit, WarpSearch, warp_probe
from gradprune_mlflow.errors import BadInput
from scripts import benchmark_script

H = W = 16


def ramp(n: int = 2) -> torch.Tensor:
    """Images whose value is the column index over W - 1: a warp's horizontal shift is readable off the values."""
    return torch.linspace(0, 1, W).expand(n, 1, H, W).clone()


def test_a_zero_field_is_the_identity_and_no_field_moves_a_pixel_further_than_the_bound():
    x = ramp()
    assert torch.allclose(FlowTrigger(0, torch.zeros(2, 4, 4)).apply(x), x, atol=1e-6)
    extreme = torch.full((2, 4, 4), 50.0)  # tanh saturates: every pixel moved by the bound
    for strength in (1.0, 1.5):
        moved = FlowTrigger(0, extreme, strength).apply(x)
        shift = (moved - x).abs() * (W - 1)  # in pixels
        assert float(shift.max()) <= MAX_SHIFT * strength + 1e-4
        assert float(shift[..., 2:-2].min()) >= MAX_SHIFT * strength - 1e-3  # away from the border it moves fully
    assert FlowTrigger(3, extreme).spec() == {"kind": "synthesized-warp", "target": 3, "grid": [4, 4],
                                              "max_shift_pixels": MAX_SHIFT}
    assert FlowTrigger(0, extreme).apply(x[:0]).shape == (0, 1, H, W)


class ShiftDetector(nn.Module):
    """Class 0 for the blob where it is; class 3 once the blob moves right by about a pixel (a warp backdoor's
    target, stripped to its essence); classes 1, 2 and 4-9 never."""

    def __init__(self, blob: torch.Tensor):
        super().__init__()
        shifted = torch.roll(blob, 1, dims=-1)
        self.direction = nn.Parameter((shifted - blob).flatten(), requires_grad=False)
        self.blob = blob.flatten()
        self.gap = float((shifted - blob).flatten() @ (shifted - blob).flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moved = (x.flatten(1) - self.blob) @ self.direction / self.gap  # 0 where it is, 1 one pixel right
        logits = torch.full((len(x), 10), -10.0)
        logits[:, 0] = 0.0
        logits[:, 3] = 10.0 * (moved - 0.5)
        return logits


def blob_split(n: int = 40) -> tuple[Split, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    blob = torch.exp(-((ys - 7.5) ** 2 + (xs - 7.5) ** 2) / 8.0)[None]
    return Split(blob.expand(n, 1, H, W).clone(), torch.arange(n) % 10), blob


def test_the_probe_finds_the_warp_that_sends_the_other_classes_to_the_target():
    data, blob = blob_split()
    net = ShiftDetector(blob)
    hits = warp_probe(net, data, 10, steps=40, restarts=2, generator=torch.Generator().manual_seed(0),
                      progress=SilentProgress())
    assert [h.target for h in hits] == list(range(10))
    assert hits[3].response >= 0.9  # a smooth warp of a pixel at most moves the blob over
    assert hits[0].response == 1.0  # images of the other classes already go to class 0: no warp needed
    assert all(h.response == 0.0 for h in hits if h.target not in (0, 3))
    warped = hits[3].trigger.apply(data.images)
    assert (net(warped).argmax(1) == 3).float().mean() >= 0.9
    # what is unlearned: each restart's warp as found and 1.5x as far
    assert [t.strength for t in hits[3].unlearning()] == [1.0, 1.5, 1.0, 1.5]


def test_the_probe_is_repeatable_and_leaves_the_network_alone():
    data, blob = blob_split(20)
    net = ShiftDetector(blob).train()
    runs = [warp_probe(net, data, 10, steps=5, restarts=1, generator=torch.Generator().manual_seed(1),
                       progress=SilentProgress()) for _ in range(2)]
    assert [h.response for h in runs[0]] == [h.response for h in runs[1]]
    assert torch.equal(runs[0][3].trigger.field, runs[1][3].trigger.field)
    assert net.training and net.direction.grad is None


def test_a_warp_searched_in_two_calls_or_after_keep_follows_the_one_call_path():
    """Detection reads the warp probe at half its steps and, on an early flag, searches on for the flagged class
    alone: that class's warp must be the one a single call over every class finds."""
    data, blob = blob_split(20)
    net = ShiftDetector(blob)
    one = warp_probe(net, data, 10, steps=12, restarts=2, generator=torch.Generator().manual_seed(2),
                     progress=SilentProgress())
    staged = WarpSearch(net, data, 10, restarts=2, generator=torch.Generator().manual_seed(2))
    staged.run(6, SilentProgress())
    assert [h.target for h in staged.hits()] == list(range(10))
    staged.keep([3])
    staged.run(6, SilentProgress())
    [kept] = staged.hits()
    assert kept.target == 3 and kept.response == one[3].response
    assert all(torch.equal(a.field, b.field) for a, b in zip(kept.triggers, one[3].triggers, strict=True))


def test_a_strong_warp_joins_the_unlearning_mix_whichever_detector_flagged_the_class():
    flat = [FlowTrigger(k, torch.zeros(2, 4, 4)) for k in range(3)]
    warps = [WarpHit(k, r, flat[k], [flat[k]]) for k, r in enumerate((0.05, 0.41, 0.29))]
    square = MaskTrigger(1, torch.ones(1, H, W), torch.ones(1, H, W))
    patch = PatchHit(1, 0.95, square, "white", (0, 0, 3))
    # class 1's warp works on 41% of the other classes' images: it joins, after a patch lead or a blend lead
    assert companion_warp(warps, 1, patch, 0.3) is warps[1]
    assert companion_warp(warps, 1, None, 0.3) is warps[1]
    # not below the threshold, not when the warp probe led (its warps are already half the mix), not without it
    assert companion_warp(warps, 2, None, 0.3) is None
    assert companion_warp(warps, 1, warps[1], 0.3) is None
    assert companion_warp(None, 1, None, 0.3) is None
    # as find_triggers builds it: the warps take half of the images, the rest keeps the other half
    gen = torch.Generator().manual_seed(0)
    mix = TriggerMix([TriggerMix(warps[1].unlearning(), gen), square], gen)
    plan = {row["trigger"]: row["share"] for row in unlearning_plan(mix)}
    assert plan["synthesized-warp"] == pytest.approx(0.5)


def test_fine_tuning_distils_less_where_warps_are_unlearned():
    def found(warp: bool) -> Found:
        return Found(Detection(1, 3.0, True, "patch", {}), [], [], None, None, 0.0, False, warp=warp)

    cfg = SanitizeConfig()
    assert found(False).finetune_config(cfg) is cfg
    assert found(True).finetune_config(cfg).resolved("distill_weight") == cfg.warp_distill_weight
    assert cfg.warp_distill_weight < cfg.resolved("distill_weight")
    # at most warp_distill_weight: a lower distill_weight (paper mode's 0 included) stays; None turns the rule off
    assert found(True).finetune_config(cfg.with_overrides(distill_weight=0.5,
                                                          warp_distill_weight=2)).resolved("distill_weight") == 0.5
    assert found(True).finetune_config(SanitizeConfig(mode="paper")).resolved("distill_weight") == 0
    assert found(True).finetune_config(SanitizeConfig(warp_distill_weight=None)).resolved("distill_weight") \
        == cfg.resolved("distill_weight")
    for bad in (-1, True, "low"):
        with pytest.raises(BadInput):
            cfg.with_overrides(warp_distill_weight=bad)


def test_its_budget_follows_the_synthesis_budget_unless_set():
    assert warp_steps(SanitizeConfig()) == SanitizeConfig.synth_steps // 2
    assert warp_steps(SanitizeConfig(synth_steps=10)) == 5
    assert warp_steps(SanitizeConfig(synth_steps=10, warp_steps=0)) == 0
    assert SanitizeConfig(synth_steps=10).to_dict()["warp_steps"] == 5
    for bad in ({"warp_steps": -1}, {"warp_steps": 2.5}, {"warp_threshold": 0}, {"warp_threshold": 1.5},
                {"warp_companion": 0}, {"warp_companion": True}):
        with pytest.raises(BadInput):
            SanitizeConfig().with_overrides(**bad)


def test_the_benchmark_table_gives_the_target_and_the_strongest_other_class():
    script = benchmark_script("warp_probe")
    lines = [{"arch": "small_cnn", "attack": "wanet", "epochs": 2, "seed": 0, "target": 0,
              "responses": [0.52, 0.01, 0.09] + [0.0] * 7},
             {"arch": "small_cnn", "attack": "clean", "epochs": 2, "seed": 0, "target": None,
              "responses": [0.04, 0.125] + [0.0] * 8}]
    rows = script.markdown(lines).splitlines()[2:]
    assert rows == ["| small_cnn wanet | 2 | 0 | 52.0% | 9.0% (2) |", "| small_cnn clean | 2 | 0 |  | 12.5% (1) |"]
