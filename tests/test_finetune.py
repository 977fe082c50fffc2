"""Fine-tuning after pruning: masks are held (pruned filters cannot regrow), BatchNorm statistics stay put."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.data.cleanset import CleanSet
from gradprune_mlflow.defense.finetune import away_from_target, finetune, validation_loss
from gradprune_mlflow.defense.masks import FilterMasks
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.progress import SilentProgress
from gradprune_mlflow.defense.triggers import PatchTrigger
from gradprune_mlflow.defense.unlearning import triggered_copy
from gradprune_mlflow.errors import BadInput
from gradprune_mlflow.models.zoo import create_model

PER_CLASS = 40
TRIGGER = PatchTrigger(0)


@pytest.fixture(scope="module")
def data(clean_set):
    idx = torch.cat([torch.nonzero(clean_set.labels == c).flatten()[:PER_CLASS] for c in range(10)])
    train, val = CleanSet(clean_set.meta, clean_set.images[idx], clean_set.labels[idx]).split(0.1, seed=0)
    return train, val, triggered_copy(val, TRIGGER)


# In SmallCNN a pruned channel goes through BatchNorm (gamma = beta = 0) into a ReLU at exactly 0, whose gradient is 0:
# the channel is dead and nothing would regrow it even without masks. In TinyResNet the BatchNorm output of conv2 and
# of the 1x1 shortcut is added to the residual before the ReLU, so gradients do reach the pruned filters.
PLANS = {
    "small_cnn": {"features.0": [1, 4], "features.4": [2, 10, 33]},
    "tiny_resnet": {"layers.1.conv2": [3, 9], "layers.1.shortcut.0": [1], "layers.2.shortcut.0": [0, 63]},
}


def tune(model, plan, data, meta, *, hold=True, epochs=3, precision="fp32"):
    """Prune `plan` on a copy of `model`, fine-tune it (masks held unless hold=False); return everything to check."""
    work = copy.deepcopy(model).float().eval()
    net = Normalized(work, meta.mean, meta.std)
    masks = FilterMasks(work, torch.zeros(1, *meta.input_shape))
    for layer, filters in plan.items():
        masks.prune(layer, filters, step=1)
    before = copy.deepcopy(work.state_dict())
    train, val, val_t = data
    cfg = SanitizeConfig(device="cpu").with_overrides(finetune_epochs=epochs, finetune_patience=epochs,
                                                      train_precision=precision)
    teacher = Normalized(copy.deepcopy(model).float().eval(), meta.mean, meta.std).eval()
    out = finetune(net, masks if hold else None, train, TRIGGER, val, val_t, cfg, SilentProgress(),
                   torch.Generator().manual_seed(0), teacher)
    return work, masks, before, out, net


def pruned_params(work, masks, plan):
    """(name, tensor) of every parameter slice that must stay exactly zero: filter, bias, BatchNorm gamma and beta."""
    for layer, filters in plan.items():
        conv = masks.convs[layer]
        yield f"{layer}.weight", conv.weight[filters]
        if conv.bias is not None:
            yield f"{layer}.bias", conv.bias[filters]
        bn = masks.bns.get(layer)
        if bn is not None:
            yield f"bn of {layer}: gamma", bn.weight[filters]
            yield f"bn of {layer}: beta", bn.bias[filters]


def seeded_resnet() -> torch.nn.Module:
    """A seeded TinyResNet whose BatchNorms have non-trivial statistics (no trained fixture is needed here)."""
    torch.manual_seed(0)
    model = create_model("tiny_resnet", num_classes=10, in_channels=1).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


@pytest.fixture(params=list(PLANS))
def model(request, badnets_cnn):
    return request.param, badnets_cnn if request.param == "small_cnn" else seeded_resnet()


def test_pruned_filters_stay_exactly_zero_while_the_rest_trains(model, data, clean_set):
    name, net0 = model
    plan = PLANS[name]
    work, masks, before, out, _net = tune(net0, plan, data, clean_set.meta)
    assert out.best_epoch >= 1, "fine-tuning should have improved the validation loss"
    slices = list(pruned_params(work, masks, plan))
    assert len(slices) == 3 * len(plan) and all(p.numel() > 0 for _n, p in slices)
    for what, values in slices:
        assert torch.count_nonzero(values) == 0, f"{what} regrew during fine-tuning"
    after = work.state_dict()
    for layer, filters in plan.items():
        keep = [f for f in range(masks.convs[layer].out_channels) if f not in filters]
        assert not torch.equal(after[f"{layer}.weight"][keep], before[f"{layer}.weight"][keep]), layer


def test_bfloat16_fine_tuning_learns_holds_the_masks_and_keeps_float32_weights(data, clean_set, badnets_cnn):
    plan = PLANS["small_cnn"]
    work, masks, _before, out, _net = tune(badnets_cnn, plan, data, clean_set.meta, epochs=2, precision="bf16")
    assert out.precision == "bf16" and out.best_epoch >= 1
    assert {p.dtype for p in work.parameters()} == {torch.float32}, "autocast: the weights stay float32"
    assert all(torch.count_nonzero(values) == 0 for _what, values in pruned_params(work, masks, plan))


def test_batchnorm_statistics_are_never_updated_from_triggered_images(data, clean_set, badnets_cnn):
    work, _masks, before, out, _net = tune(badnets_cnn, PLANS["small_cnn"], data, clean_set.meta, epochs=1)
    assert out.best_epoch == 1
    for key, value in work.state_dict().items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(value, before[key]), key


def test_without_held_masks_pruned_filters_regrow(data, clean_set):
    """The control: in a residual net the optimiser does move zeroed filters; holding the masks is what stops it."""
    plan = PLANS["tiny_resnet"]
    work, masks, _before, out, _net = tune(seeded_resnet(), plan, data, clean_set.meta, hold=False, epochs=1)
    assert out.best_epoch == 1
    regrown = [what for what, values in pruned_params(work, masks, plan) if torch.count_nonzero(values) > 0]
    assert regrown, "without masks the pruned BatchNorm/conv parameters should have moved"


def test_the_best_epoch_is_kept(data, clean_set, badnets_cnn):
    train, val, val_t = data
    _work, _masks, _before, out, net = tune(badnets_cnn, PLANS["small_cnn"], data, clean_set.meta, epochs=2)
    start = copy.deepcopy(badnets_cnn)
    for layer, filters in PLANS["small_cnn"].items():
        FilterMasks(start, torch.zeros(1, 1, 28, 28)).prune(layer, filters, step=1)
    start_net = Normalized(start, clean_set.meta.mean, clean_set.meta.std)
    first = validation_loss(start_net, val, val_t, clean_only=False, batch_size=128)
    final = validation_loss(net, val, val_t, clean_only=False, batch_size=128)
    assert out.epochs == 2 and out.best_epoch >= 1 and out.passes == 2 * -(-len(train) // 128)
    assert final < first


@pytest.mark.parametrize(("early_stop", "mode", "clean_only"), [("auto", "fast", False), ("auto", "paper", True),
                                                                 ("clean", "fast", True),
                                                                 ("clean+triggered", "paper", False)])
def test_early_stopping_reads_the_losses_its_setting_names(data, badnets_cnn, clean_set, monkeypatch, early_stop,
                                                            mode, clean_only):
    from gradprune_mlflow.defense import finetune as ft

    seen = []
    monkeypatch.setattr(ft, "validation_loss", lambda *args: seen.append(args[3]) or 1.0)
    train, val, val_t = data
    net = Normalized(copy.deepcopy(badnets_cnn), clean_set.meta.mean, clean_set.meta.std)
    cfg = SanitizeConfig(device="cpu", mode=mode, early_stop=early_stop, finetune_epochs=1, train_precision="fp32")
    finetune(net, None, train, TRIGGER, val, val_t, cfg, SilentProgress(), torch.Generator().manual_seed(0))
    assert seen == [clean_only, clean_only]  # the untouched model's loss, then the epoch's
    with pytest.raises(BadInput, match="early_stop"):
        cfg.with_overrides(early_stop="triggered")


def test_mode_defaults_resolve_and_explicit_settings_win():
    fast, paper = SanitizeConfig(), SanitizeConfig(mode="paper")
    assert (fast.resolved("finetune_patience"), paper.resolved("finetune_patience")) == (8, 4)
    assert (fast.resolved("distill_weight"), paper.resolved("distill_weight")) == (5.0, 0.0)
    assert paper.with_overrides(distill_weight=1.0).resolved("distill_weight") == 1.0
    # report.json records what was used, never None
    assert paper.to_dict()["finetune_epochs"] == 30 and fast.to_dict()["unlearn_weight"] == 2.0
    assert (fast.resolved("away_weight"), paper.resolved("away_weight")) == (3.0, 0.0)
    with pytest.raises(BadInput, match="finetune_patience must be a number >= 1"):
        fast.with_overrides(finetune_patience=0)


def test_the_away_term_is_left_out_where_trigger_free_mode_flagged_nothing():
    from gradprune_mlflow.defense.synthesis import Detection
    from gradprune_mlflow.defense.triggerfree import Found

    def found(flagged: bool) -> Found:
        return Found(Detection(3, 1.0, flagged, "patch", {}), [], [], None, None, 0.0, False)

    cfg = SanitizeConfig()
    assert found(True).finetune_config(cfg) is cfg and cfg.resolved("away_weight") == 3.0
    assert found(False).finetune_config(cfg).resolved("away_weight") == 0.0  # on_clean=sanitize: no known target
    assert found(False).finetune_config(cfg.with_overrides(away_weight=1.5)).resolved("away_weight") == 1.5


def test_the_triggered_loss_weight_is_what_unlearns(data, clean_set, badnets_cnn):
    """With the triggered CE weighted 0 the backdoor stays; weighted 2 it is unlearned (validation triggered loss)."""
    train, val, val_t = data
    losses = []
    for weight in (0.0, 2.0):
        net = Normalized(copy.deepcopy(badnets_cnn).float().eval(), clean_set.meta.mean, clean_set.meta.std)
        cfg = SanitizeConfig(device="cpu").with_overrides(finetune_epochs=2, finetune_patience=2,
                                                          unlearn_weight=weight, distill_weight=0.0, away_weight=0.0)
        finetune(net, None, train, TRIGGER, val, val_t, cfg, SilentProgress(), torch.Generator().manual_seed(0))
        losses.append(validation_loss(net, val, val_t, False, 128) - validation_loss(net, val, val_t, True, 128))
    assert losses[1] < 0.5 * losses[0]


def test_away_from_target_is_minus_log_of_the_other_classes_share():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [60.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    labels = torch.tensor([1, 2, 1, 0])  # the last is of the target class: left out
    p_target = torch.softmax(logits, 1)[:3, 0].double()
    expected = -torch.log1p(-p_target[:2]).sum() + (60.0 - math.log(2.0))  # -log(1 - p) ~ 60 - log 2 at logit 60
    assert away_from_target(logits, labels, 0).item() == pytest.approx(expected.item() / 3, rel=1e-4)
    assert away_from_target(logits[3:], labels[3:], 0).item() == 0.0, "target-class images alone: nothing to push"


def test_the_away_term_lowers_the_target_share_of_triggered_images(data, clean_set, badnets_cnn):
    """Same run but for away_weight: with it, triggered images of the other classes give the target class less
    probability (measured on the training split, where the term acts: the validation split is 36 images)."""
    train, val, val_t = data
    train_t = triggered_copy(train, TRIGGER)
    others = train_t.labels != TRIGGER.target
    shares = []
    for away in (0.0, 3.0):
        net = Normalized(copy.deepcopy(badnets_cnn).float().eval(), clean_set.meta.mean, clean_set.meta.std)
        cfg = SanitizeConfig(device="cpu").with_overrides(finetune_epochs=3, finetune_patience=3, away_weight=away)
        finetune(net, None, train, TRIGGER, val, val_t, cfg, SilentProgress(), torch.Generator().manual_seed(0),
                 teacher=copy.deepcopy(net))
        with torch.no_grad():
            shares.append(torch.softmax(net(train_t.images[others]), 1)[:, TRIGGER.target].mean().item())
    # measured here: 0.187 without, 0.100 with (both kept epoch 1 of 3)
    assert shares[1] < 0.8 * shares[0], shares


def test_training_runs_channels_last_on_a_cpu_and_leaves_the_default_layout():
    from gradprune_mlflow.defense.metrics import training_layout

    net = create_model("small_cnn").eval()
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        want = net(x)
    with training_layout(net):
        conv = net.features[4].weight  # 32 input channels: the first conv has one, which both layouts share
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
        with torch.no_grad():
            assert torch.allclose(net(x), want, atol=1e-5)
    assert net.features[4].weight.is_contiguous()
    with training_layout(None) as nothing:  # no teacher: nothing to lay out
        assert nothing is None


def test_a_fine_tuned_model_comes_back_in_the_default_layout(data):
    train, val, val_triggered = data
    net = Normalized(create_model("small_cnn"), (0.5,), (0.5,))
    cfg = SanitizeConfig(finetune_epochs=1)
    finetune(net, None, train, TRIGGER, val, val_triggered, cfg, SilentProgress(), torch.Generator().manual_seed(0),
             teacher=copy.deepcopy(net))
    assert all(p.is_contiguous() for p in net.parameters())
