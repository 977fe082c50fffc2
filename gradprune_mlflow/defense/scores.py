"""Filter importance: Grad-Prune's score per output filter of a conv layer, and the global ranking built on it.

Scores are read after a backward pass of the unlearning loss. `ranked_filters` takes the score as a callable, so a
test or an experiment can pass another criterion.
"""

from __future__ import annotations

import torch
from torch import nn

from gradprune_mlflow.defense.masks import FilterMasks


class MeanAbsGrad:
    """Grad-Prune's score: the mean absolute gradient of the unlearning loss over a filter's weights."""

    def __call__(self, conv: nn.Conv2d) -> torch.Tensor:
        grad = conv.weight.grad
        if grad is None:
            return torch.zeros(conv.out_channels)
        return grad.detach().abs().flatten(1).mean(1).float().cpu()


def ranked_filters(
    masks: FilterMasks, importance, *, layer_norm: bool
) -> list[tuple[float, str, int]]:
    """All unpruned filters as (score, layer, index), highest first, ranked globally across layers.

    With layer_norm, each layer's scores are divided by that layer's mean over its unpruned filters: raw gradients of
    first layers run several times larger and would otherwise be pruned first, wrecking clean accuracy. A layer's last
    unpruned filter is never offered: an all-zero layer cuts the network.
    """
    ranked = []
    for name, conv in masks.convs.items():
        scores = importance(conv)
        alive = ~masks.pruned[name]
        if alive.sum() <= 1:
            continue
        if layer_norm:
            scores = scores / scores[alive].mean().clamp_min(1e-12)
        ranked += [(float(scores[i]), name, int(i)) for i in torch.nonzero(alive).flatten()]
    ranked.sort(key=lambda r: -r[0])
    return ranked
