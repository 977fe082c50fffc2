"""The filter mask set: a pruned filter's output channel is exactly zero, on every kind of conv net we support."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from gradprune_mlflow import sanitize
from gradprune_mlflow.data.cleanset import CleanSet
from gradprune_mlflow.data.reference import FASHION_MEAN, FASHION_STD
from gradprune_mlflow.defense.masks import FilterMasks, conv_layers, following_batchnorms
from gradprune_mlflow.defense.triggers import PatchTrigger
from gradprune_mlflow.errors import UnsupportedModel
from gradprune_mlflow.models.zoo import create_model

EXAMPLE = torch.zeros(1, 1, 28, 28)


@pytest.fixture(scope="module")
def images(fashion_test):
    """64 real Fashion-MNIST test images, normalised the way the models expect them."""
    return (fashion_test.images[:64] - FASHION_MEAN[0]) / FASHION_STD[0]


def seeded(name: str, seed: int = 0) -> nn.Module:
    """A zoo model with seeded random weights and BatchNorms that are far from their defaults.

    A fresh BatchNorm has beta = 0 and running mean 0, so a mask that forgot beta would still give zero channels;
    non-trivial affine parameters and statistics make that mistake visible.
    """
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10, in_channels=1)
    randomise_batchnorms(model, seed)
    return model.eval()


@torch.no_grad()
def randomise_batchnorms(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            if m.affine:
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen))
            m.running_mean.copy_(torch.randn(n, generator=gen))
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)


def channel_outputs(model: nn.Module, modules: dict[str, nn.Module], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The forward outputs of the named modules for input x (one forward pass, hooks removed afterwards)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out.detach().clone()))
               for name, m in modules.items()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def assert_channels_zero(out: torch.Tensor, pruned: list[int]) -> None:
    """Pruned channels hold exactly 0 everywhere; the rest of the tensor is not all zero."""
    assert torch.count_nonzero(out[:, pruned]) == 0, f"pruned channels {pruned} are not exactly zero"
    keep = [c for c in range(out.shape[1]) if c not in pruned]
    assert torch.count_nonzero(out[:, keep]) > 0


def prune_and_check(model, plan: dict[str, list[int]], observe: dict[str, str], x: torch.Tensor, train_too=True):
    """Prune `plan` (conv name -> filters) and check the observed module of each conv has those channels at zero.

    `observe` maps conv name -> the module whose output is that conv's channel as the next layer sees it (the
    BatchNorm that follows, or the conv itself). The channels are checked non-zero before pruning, so the check can
    fail, and after, in eval mode and in train mode (batch statistics).
    """
    modules = dict(model.named_modules())
    watched = {conv: modules[name] for conv, name in observe.items()}
    before = channel_outputs(model, watched, x)
    for conv, filters in plan.items():
        assert torch.count_nonzero(before[conv][:, filters]) > 0, "the channel was already zero before pruning"
    masks = FilterMasks(model, EXAMPLE)
    for conv, filters in plan.items():
        masks.prune(conv, filters, step=1)
    for mode in ("eval", "train") if train_too else ("eval",):
        getattr(model, mode)()
        after = channel_outputs(model, watched, x)
        for conv, filters in plan.items():
            assert_channels_zero(after[conv], filters)
    model.eval()
    return masks


def test_small_cnn_with_batchnorm_zeroes_the_batchnorm_output(badnets_cnn, images):
    model = copy.deepcopy(badnets_cnn)
    bn0, bn1 = model.features[1], model.features[5]
    assert bn0.bias.abs().sum() > 0 and bn1.bias.abs().sum() > 0, "a trained BatchNorm should have a non-zero beta"
    masks = prune_and_check(model, {"features.0": [0, 5], "features.4": [7, 40, 63]},
                            {"features.0": "features.1", "features.4": "features.5"}, images)
    assert masks.bns == {"features.0": bn0, "features.4": bn1}
    for bn, idx in ((bn0, [0, 5]), (bn1, [7, 40, 63])):
        assert torch.count_nonzero(bn.weight[idx]) == 0 and torch.count_nonzero(bn.bias[idx]) == 0
    assert masks.count == 5 and masks.total == 32 + 64
    assert masks.by_layer() == {"features.0": 2, "features.4": 3}


def test_small_cnn_without_batchnorm_zeroes_the_conv_bias(images):
    model = seeded("small_cnn_nobn")
    convs = conv_layers(model)
    assert all(c.bias is not None and torch.count_nonzero(c.bias) == c.out_channels for c in convs.values())
    masks = prune_and_check(model, {"features.0": [3], "features.3": [0, 12]},
                            {"features.0": "features.0", "features.3": "features.3"}, images)
    assert masks.bns == {}
    assert torch.count_nonzero(model.features[0].bias[[3]]) == 0
    assert torch.count_nonzero(model.features[3].bias[[0, 12]]) == 0


def test_tiny_resnet_pairs_every_conv_with_its_batchnorm_by_dataflow():
    model = seeded("tiny_resnet")
    pairs = following_batchnorms(model, EXAMPLE)
    modules = dict(model.named_modules())
    assert pairs["layers.1.shortcut.0"] is modules["layers.1.shortcut.1"]
    assert pairs["layers.2.shortcut.0"] is modules["layers.2.shortcut.1"]
    assert pairs["stem.0"] is modules["stem.1"]
    for block in ("layers.0", "layers.1", "layers.2"):
        assert pairs[f"{block}.conv1"] is modules[f"{block}.bn1"]
        assert pairs[f"{block}.conv2"] is modules[f"{block}.bn2"]
    assert set(pairs) == set(conv_layers(model)), "every conv of TinyResNet feeds a BatchNorm directly"


def test_tiny_resnet_shortcut_and_conv2_filters_are_zero(images):
    model = seeded("tiny_resnet", seed=1)
    prune_and_check(
        model,
        {"layers.1.shortcut.0": [2, 17], "layers.1.conv2": [5], "layers.2.conv1": [0]},
        {"layers.1.shortcut.0": "layers.1.shortcut.1", "layers.1.conv2": "layers.1.bn2",
         "layers.2.conv1": "layers.2.bn1"},
        images,
    )
    # The model still runs end to end and gives finite logits.
    assert torch.isfinite(model(images)).all()


class GroupedNet(nn.Module):
    """A depthwise conv (groups == channels) with BatchNorm and a grouped conv without one."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 16, 3, padding=1, groups=4)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.depthwise(x)))
        return self.head(torch.relu(self.grouped(x)))


def test_grouped_and_depthwise_convs_are_masked_per_output_channel(images):
    torch.manual_seed(0)
    model = GroupedNet().eval()
    randomise_batchnorms(model, 0)
    masks = prune_and_check(model, {"depthwise": [3], "grouped": [0, 5, 15]},
                            {"depthwise": "bn1", "grouped": "grouped"}, images)
    assert masks.bns == {"stem": model.bn0, "depthwise": model.bn1}
    # Only the pruned output filters were touched: the other filters of the same group keep their weights.
    assert torch.count_nonzero(model.grouped.weight[[1, 2, 3, 4]]) > 0


def test_grouped_net_goes_through_sanitize(clean_set):
    """A grouped/depthwise model is handled end to end, not refused: its grouped filters are counted and scored."""
    torch.manual_seed(0)
    model = GroupedNet().eval()
    small = subset(clean_set, per_class=20)
    result = sanitize(model, small, PatchTrigger(0), device="cpu", step_fraction=0.1, finetune_epochs=1)
    assert result.model is not None and result.report["sanitized"] is True
    assert result.report["total_filters"] == 8 + 8 + 16
    # An untrained net's unlearning loss may not fall, so the best state can be the unpruned one; but the loop
    # did prune (and score) filters of the grouped layers.
    assert max(row["pruned"] for row in result.curve) > 0
    assert result.report["pruned_filters"] == len(result.history)
    modules = dict(result.model.named_modules())
    for entry in result.history:
        assert torch.count_nonzero(modules[entry["layer"]].weight[entry["filter"]]) == 0


def subset(clean_set: CleanSet, per_class: int) -> CleanSet:
    idx = torch.cat([torch.nonzero(clean_set.labels == c).flatten()[:per_class]
                     for c in range(clean_set.meta.num_classes)])
    return CleanSet(clean_set.meta, clean_set.images[idx], clean_set.labels[idx], source="subset")


def test_replay_of_a_saved_history_reproduces_identical_weights(badnets_cnn):
    original = copy.deepcopy(badnets_cnn)
    pruned = copy.deepcopy(badnets_cnn)
    masks = FilterMasks(pruned, EXAMPLE)
    masks.prune("features.0", [1, 9], step=1, scores=[0.5, 0.4])
    masks.prune("features.4", [3], step=2, scores=[0.3])
    masks.prune("features.4", [3, 60], step=3, scores=[0.3, 0.2])  # 3 again: already pruned, not recorded twice
    assert [(h["layer"], h["filter"], h["step"]) for h in masks.history] == [
        ("features.0", 1, 1), ("features.0", 9, 1), ("features.4", 3, 2), ("features.4", 60, 3)]
    saved = json.loads(json.dumps(masks.history))  # what pruning_history.json holds

    differs = [k for k, v in pruned.state_dict().items() if not torch.equal(v, original.state_dict()[k])]
    assert differs, "pruning should have changed some weights"
    replayed = FilterMasks(original, EXAMPLE)
    replayed.replay(saved)
    for key, value in pruned.state_dict().items():
        assert torch.equal(original.state_dict()[key], value), key
    assert all(torch.equal(replayed.pruned[k], masks.pruned[k]) for k in masks.pruned)
    assert [(h["layer"], h["filter"], h["step"]) for h in replayed.history] == [
        (h["layer"], h["filter"], h["step"]) for h in saved]


def test_a_model_without_conv2d_is_unsupported():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(UnsupportedModel, match="no Conv2d"):
        FilterMasks(mlp, EXAMPLE)
    with pytest.raises(UnsupportedModel):
        conv_layers(mlp)


# A BatchNorm2d(affine=False) directly after a pruned conv has no gamma/beta to zero, so in eval mode its output
# channel would be the constant -running_mean / sqrt(running_var + eps), not 0: the pruned filter would still emit a
# bias, the "BN beta left non-zero" defect of the reference code. FilterMasks.apply also zeroes running_mean[idx] of
# the paired BatchNorm, so (0 - 0) / sqrt(var + eps) = 0.
def test_non_affine_batchnorm_after_a_pruned_conv_gives_a_zero_channel(images):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    randomise_batchnorms(model, 0)
    prune_and_check(model, {"0": [2]}, {"0": "1"}, images)
