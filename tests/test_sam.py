"""Sharpness-aware steps (defense/sam.py): where the weights go inside `ascended`, and that they come back."""

from __future__ import annotations

import torch
from torch import nn

from gradprune_mlflow.defense.sam import ascended


def _layer_with_gradients() -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight[1] = 0.0  # a pruned row
    layer(torch.randn(5, 4)).pow(2).sum().backward()
    return layer


def test_asam_moves_each_weight_in_proportion_to_its_size_and_puts_it_back():
    layer = _layer_with_gradients()
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    with ascended(layer.parameters(), rho=0.5):
        moved = {n: p.detach() - before[n] for n, p in layer.named_parameters()}
        assert torch.all(moved["weight"][1] == 0), "a zero (pruned) weight does not move"
        # ASAM's radius is measured in |w|-scaled units: || e / |w| || = rho over the weights that are not zero
        scaled = torch.cat([(moved[n] / before[n].abs())[before[n] != 0] for n in moved])
        assert torch.isclose(scaled.norm(), torch.tensor(0.5), rtol=1e-4)
        # and it is the ascent direction: the first-order change of the loss is positive
        assert sum(float((moved[n] * p.grad).sum()) for n, p in layer.named_parameters()) > 0
    for n, p in layer.named_parameters():
        assert torch.equal(p, before[n]), n


def test_plain_sam_radius_and_parameters_without_gradient():
    layer = _layer_with_gradients()
    frozen = nn.Parameter(torch.ones(3))  # no .grad: stays put
    w = layer.weight.detach().clone()
    with ascended([layer.weight, frozen], rho=0.1, adaptive=False):
        assert torch.isclose((layer.weight - w).norm(), torch.tensor(0.1), rtol=1e-4)
        assert torch.equal(frozen, torch.ones(3))
    assert torch.equal(layer.weight, w)
