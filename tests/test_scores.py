"""Filter scores: mean |grad| of the unlearning loss per filter, and the global ranking (raw or layer-normalised)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from gradprune_mlflow.data.cleanset import Split
from gradprune_mlflow.defense.masks import FilterMasks
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.scores import MeanAbsGrad, ranked_filters
from gradprune_mlflow.defense.triggers import PatchTrigger
from gradprune_mlflow.defense.unlearning import triggered_copy, unlearning_gradients

N = 200  # trusted images used for the gradient


@pytest.fixture
def graded(badnets_cnn, clean_set):
    """A copy of the backdoored CNN with the unlearning-loss gradient of N triggered clean images in its .grad,
    computed by unlearning_gradients in small batches; plus its masks and the triggered images."""
    work = copy.deepcopy(badnets_cnn).eval()
    net = Normalized(work, clean_set.meta.mean, clean_set.meta.std).eval()
    data = triggered_copy(Split(clean_set.images[:N], clean_set.labels[:N]), PatchTrigger(0))
    unlearning_gradients(net, data, batch_size=64)  # 4 batches: the per-batch sums must add up to the mean
    return work, net, FilterMasks(work, torch.zeros(1, 1, 28, 28)), data


def test_mean_abs_grad_is_the_hand_computed_mean_of_the_unlearning_gradient(graded):
    work, net, masks, data = graded
    # The unlearning gradient computed independently: one batch, mean CE on TRUE labels, eval mode.
    convs = list(masks.convs.values())
    net.eval()  # BatchNorm on its running statistics, as unlearning_gradients does
    loss = F.cross_entropy(net(data.images), data.labels)
    grads = torch.autograd.grad(loss, [c.weight for c in convs])
    score = MeanAbsGrad()
    for conv, grad in zip(convs, grads, strict=True):
        got = score(conv)
        assert got.shape == (conv.out_channels,) and got.dtype == torch.float32
        expected = torch.tensor([grad[f].double().abs().sum().item() / grad[f].numel()
                                 for f in range(conv.out_channels)], dtype=torch.float64)
        assert torch.allclose(got.double(), expected, rtol=1e-4, atol=1e-9)
        assert (got > 0).all()


def test_a_conv_without_gradient_scores_zero(badnets_cnn):
    conv = copy.deepcopy(badnets_cnn).features[0]
    assert conv.weight.grad is None
    assert torch.equal(MeanAbsGrad()(conv), torch.zeros(conv.out_channels))


def test_layer_norm_divides_by_the_layer_mean_over_unpruned_filters(graded):
    _work, _net, masks, _data = graded
    masks.prune("features.4", list(range(10)), step=1)  # pruned filters must drop out of the layer mean
    ranked = ranked_filters(masks, MeanAbsGrad(), layer_norm=True)

    expected = {}
    for name, conv in masks.convs.items():
        raw = MeanAbsGrad()(conv)
        alive = ~masks.pruned[name]
        mean = raw[alive].mean()
        expected.update({(name, int(i)): float(raw[i] / mean) for i in torch.nonzero(alive).flatten()})
    got = {(layer, idx): score for score, layer, idx in ranked}
    assert got.keys() == expected.keys()
    assert all(abs(got[k] - expected[k]) <= 1e-5 * abs(expected[k]) for k in got)
    assert not any(layer == "features.4" and idx < 10 for _s, layer, idx in ranked), "pruned filters are offered"
    scores = [s for s, _l, _i in ranked]
    assert scores == sorted(scores, reverse=True)
    # Normalised, each layer's unpruned filters average 1: no layer wins the global ranking by scale alone.
    for name in masks.convs:
        layer = [s for s, lay, _i in ranked if lay == name]
        assert sum(layer) / len(layer) == pytest.approx(1.0, rel=1e-5)


def test_raw_ranking_keeps_the_raw_scores(graded):
    _work, _net, masks, _data = graded
    ranked = ranked_filters(masks, MeanAbsGrad(), layer_norm=False)
    raw = {name: MeanAbsGrad()(conv) for name, conv in masks.convs.items()}
    assert len(ranked) == masks.total
    assert all(score == float(raw[layer][idx]) for score, layer, idx in ranked)
    assert [s for s, _l, _i in ranked] == sorted((s for s, _l, _i in ranked), reverse=True)


@pytest.mark.parametrize("layer_norm", [True, False])
def test_a_layers_last_unpruned_filter_is_never_offered(graded, layer_norm):
    _work, _net, masks, _data = graded
    masks.prune("features.0", list(range(1, 32)), step=1)  # one filter left in the first layer
    masks.prune("features.4", list(range(2, 64)), step=1)  # two left in the second
    ranked = ranked_filters(masks, MeanAbsGrad(), layer_norm=layer_norm)
    assert not [r for r in ranked if r[1] == "features.0"], "the last filter of a layer must not be offered"
    assert sorted(idx for _s, layer, idx in ranked if layer == "features.4") == [0, 1]
