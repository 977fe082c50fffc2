"""Conv filters defined on parameters, so that every model format can be pruned the same way.

Sanitizing changes parameter values only (filters zeroed, weights fine-tuned, BatchNorm frozen). A filter is an
output channel of a 4-D conv weight; the normalisation that consumes the conv's output, found from the model's
graph, has its per-channel parameters zeroed with it. These records quack like nn.Conv2d and nn.BatchNorm2d for
what FilterMasks and the importance scores read (weight, bias, out_channels; affine, running_mean, num_features), and
hold the model's own tensors, so zeroing them zeroes the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(eq=False)
class ConvParams:
    """One conv layer's weight (out, in/groups, kh, kw) and optional bias, as the model's own tensors."""

    weight: nn.Parameter
    bias: nn.Parameter | None = None

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])


@dataclass(eq=False)
class NormParams:
    """The BatchNorm that takes a conv's output directly: its gamma and beta (None when not affine) and running mean."""

    weight: nn.Parameter | None
    bias: nn.Parameter | None
    running_mean: torch.Tensor | None

    @property
    def affine(self) -> bool:
        return self.weight is not None and self.bias is not None

    @property
    def num_features(self) -> int:
        ref = self.weight if self.weight is not None else self.running_mean
        return int(ref.shape[0]) if ref is not None else 0


@dataclass(frozen=True)
class FilterSpec:
    """Where a conv filter's tensors live, by qualified name; resolved against the current copy of the model."""

    layer: str
    weight: str
    bias: str | None = None
    norm_weight: str | None = None
    norm_bias: str | None = None
    norm_mean: str | None = None

    def resolve(self, tensors: dict[str, torch.Tensor]) -> tuple[ConvParams, NormParams | None]:
        conv = ConvParams(tensors[self.weight], tensors.get(self.bias) if self.bias else None)
        if not (self.norm_weight or self.norm_mean):
            return conv, None
        norm = NormParams(tensors.get(self.norm_weight) if self.norm_weight else None,
                          tensors.get(self.norm_bias) if self.norm_bias else None,
                          tensors.get(self.norm_mean) if self.norm_mean else None)
        return conv, (norm if norm.num_features == conv.out_channels else None)


def layer_name(weight_name: str) -> str:
    """'features.0.weight' -> 'features.0': the same layer names as the eager path's module names."""
    return weight_name.removesuffix(".weight")


def resolve_all(specs: list[FilterSpec], module: nn.Module) -> tuple[dict[str, ConvParams], dict[str, NormParams]]:
    """Map each spec to the module's current tensors: (convs by layer, norms by layer)."""
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    convs, norms = {}, {}
    for spec in specs:
        conv, norm = spec.resolve(tensors)
        convs[spec.layer] = conv
        if norm is not None:
            norms[spec.layer] = norm
    return convs, norms


PASS, CONSUMED = "pass", "consumed"


def first_obstacle(start, users, judge) -> str | None:
    """Why a pruned filter would still change the model's output, or None when its contribution vanishes exactly.

    Walks forward from `start` (the conv's output, or its BatchNorm's, which are zeroed with the filter). `users(node)`
    gives (key, user node) pairs; `judge(user, node)` says PASS (zero in, zero out: follow it), CONSUMED (taken as an
    input channel of a conv or linear layer, where a zero channel adds nothing) or a reason (a gate, another norm,
    the model's output). Walking through everything else is what keeps a squeeze-excitation gate, a norm on a
    concatenation or a conv classifier unpruned instead of changed silently.
    """
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        for key, user in users(node):
            verdict = judge(user, node)
            if verdict == PASS:
                if key not in seen:
                    seen.add(key)
                    todo.append(user)
            elif verdict != CONSUMED:
                return verdict
    return None
