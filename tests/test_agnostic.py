"""The trigger-agnostic source on a small stub network (bounded, aimed at its class, side-effect free), and the
weighted unlearning mix that gives it its share."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradprune_mlflow import sanitize
from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.data.cleanset import CleanSet
from gradprune_mlflow.defense.agnostic import TargetedPerturbation, with_agnostic
from gradprune_mlflow.defense.triggers import MaskTrigger
from gradprune_mlflow.defense.unlearning import TriggerMix, extended, unlearning_plan
from gradprune_mlflow.errors import BadInput
from gradprune_mlflow.models.zoo import SmallCNN


def _stub() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 3))


def _images(n: int = 16) -> torch.Tensor:
    # inside [0.2, 0.8]: a perturbation of at most 0.1 is never clipped
    return 0.2 + 0.6 * torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_the_perturbation_is_bounded_shared_and_lowers_the_loss_toward_the_target():
    net, x = _stub().eval(), _images()
    trig = TargetedPerturbation(2, net, torch.Generator().manual_seed(0), eps=0.1, steps=5)
    out = trig.apply(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    diff = out - x
    assert 0 < diff.abs().max() <= 0.1 + 1e-6
    assert torch.allclose(diff, diff[:1].expand_as(diff), atol=1e-6)  # one universal perturbation for the batch
    goal = torch.full((len(x),), 2)
    with torch.no_grad():
        assert F.cross_entropy(net(out), goal) < F.cross_entropy(net(x), goal)


def test_the_search_leaves_the_model_alone_and_repeats_with_its_generator():
    net, x = _stub().train(), _images()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():  # a triggered copy may be made without gradients; the search makes its own
        a = TargetedPerturbation(0, net, torch.Generator().manual_seed(3)).apply(x)
    b = TargetedPerturbation(0, net, torch.Generator().manual_seed(3)).apply(x)
    assert torch.equal(a, b)
    assert net.training and all(p.grad is None for p in net.parameters())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # BatchNorm statistics too


def test_it_is_named_in_the_unlearning_plan():
    net, gen = _stub(), torch.Generator().manual_seed(0)
    mix = TriggerMix([TargetedPerturbation(1, net, gen), TargetedPerturbation(1, net, gen, eps=0.2)], gen)
    assert unlearning_plan(mix) == [{"trigger": "targeted-perturbation", "share": 1.0}]
    assert TargetedPerturbation(1, net, gen).spec() == {"kind": "targeted-perturbation", "target": 1, "eps": 0.1,
                                                         "steps": 5}


def _named(source: str, value: float) -> MaskTrigger:
    return MaskTrigger(0, torch.ones(1, 8, 8), torch.full((1, 8, 8), value), source=source)


def test_a_weighted_mix_gives_each_trigger_its_share_and_keeps_it_when_extended():
    gen = torch.Generator().manual_seed(0)
    mix = TriggerMix([_named("a", 0.0), _named("b", 1.0)], gen, weights=[3, 1])
    out = mix.apply(torch.full((4000, 1, 8, 8), 0.5))
    assert abs(float((out[:, 0, 0, 0] == 0).float().mean()) - 0.75) < 0.03
    assert unlearning_plan(mix) == [{"trigger": "a", "share": 0.75}, {"trigger": "b", "share": 0.25}]
    nested = TriggerMix([TriggerMix([_named("a", 0.0), _named("b", 0.2)], gen), _named("c", 1.0)], gen, [2, 1])
    plan = {p["trigger"]: p["share"] for p in unlearning_plan(extended(nested, _named("d", 0.4), gen))}
    assert plan == {"a": 0.2222, "b": 0.2222, "d": 0.2222, "c": 0.3333}  # the recheck's part joins the first
    flat = {p["trigger"] for p in unlearning_plan(extended(TriggerMix([_named("a", 0)], gen), _named("d", 0), gen))}
    assert flat == {"a", "d"}
    with pytest.raises(ValueError, match="one non-negative weight per trigger"):
        TriggerMix([_named("a", 0.0)], gen, weights=[1, 1])


def test_with_agnostic_gives_the_configured_share_and_nothing_at_zero():
    net, gen = _stub(), torch.Generator().manual_seed(0)
    base = TriggerMix([_named("a", 0.0), _named("b", 1.0)], gen)
    assert with_agnostic(base, net, 1, SanitizeConfig(), gen) is base  # off by default
    mixed = with_agnostic(base, net, 1, SanitizeConfig(agnostic_share=0.3, agnostic_eps=0.05), gen)
    plan = {p["trigger"]: p["share"] for p in unlearning_plan(mixed)}
    assert plan == {"targeted-perturbation": 0.3, "a": 0.35, "b": 0.35}
    for bad in ({"agnostic_share": 1.0}, {"agnostic_eps": 0.0}, {"agnostic_steps": 0}):
        with pytest.raises(BadInput, match=next(iter(bad))):
            SanitizeConfig().with_overrides(**bad)


def test_a_trigger_free_run_unlearns_with_its_share_of_targeted_perturbations(clean_set):
    # A short run on an untrained net: what is checked is the plumbing (the report's plan), not the removal.
    idx = torch.cat([torch.nonzero(clean_set.labels == c).flatten()[:6] for c in range(clean_set.meta.num_classes)])
    small = CleanSet(clean_set.meta, clean_set.images[idx], clean_set.labels[idx], source="subset")
    torch.manual_seed(0)
    result = sanitize(SmallCNN(), small, None, device="cpu", on_clean="sanitize", synth_steps=3, synth_restarts=1,
                      finetune_epochs=1, fixed_blend_steps=0, recheck_rounds=0, verify=False, agnostic_share=0.25)
    plan = {p["trigger"]: p["share"] for p in result.report["unlearning_plan"]}
    assert plan["targeted-perturbation"] == 0.25 and abs(sum(plan.values()) - 1) < 1e-3
    assert result.report["config"]["agnostic_share"] == 0.25
    # the away-from-target term only where a class was flagged (what fine-tuning used, beside the setting)
    assert result.report["away_weight"] == (3.0 if result.report["detection"]["flagged"] else 0.0)
    # the spread square only where an unflagged model is suspect
    detection = result.report["detection"]
    suspect = not detection["flagged"] and detection["score"]["verdict"] == "suspect"
    assert (detection["spread_square"] is not None) == suspect
