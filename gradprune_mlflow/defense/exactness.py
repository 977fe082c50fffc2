"""Checking that pruned filters read exactly 0.0 where they are consumed, by hooking the consuming modules.

The consuming module of a pruned filter is the BatchNorm right after its conv, every norm that FilterMasks zeroes
through concatenations and permutes (`masks.norms`), or the conv itself when no norm reads it. Used by the tests
and the architecture benchmark; it changes nothing in the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradprune_mlflow.defense.masks import FilterMasks


@dataclass
class Watch:
    module: nn.Module
    dim: int  # the channel dim of the module's output
    channels: list[int]
    what: str


def watch_points(masks: FilterMasks) -> list[Watch]:
    """Where each pruned filter must read exactly zero, one entry per consuming module."""
    points = []
    for name, conv in masks.convs.items():
        pruned = torch.nonzero(masks.pruned[name]).flatten().tolist()
        if not pruned:
            continue
        bn, extra = masks.bns.get(name), masks.norms.get(name, [])
        if bn is not None:
            points.append(Watch(bn, 1, pruned, f"{name} -> its BatchNorm"))
        for part in extra:
            # nn.LayerNorm itself works channels-last; LayerNorm2d and the other norms give (N, C, H, W)
            dim = -1 if type(part.norm) is nn.LayerNorm else 1
            chans = [part.start + c - part.first for c in pruned if part.first <= c < part.first + part.length]
            points.append(Watch(part.norm, dim, chans, f"{name} -> {type(part.norm).__name__} at {part.start}"))
        if bn is None and not extra:
            points.append(Watch(conv, 1, pruned, f"{name} itself"))
    return points


def outputs_at(model: nn.Module, modules: list[nn.Module], x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The output of each module (its first call) for input x, and the model's output."""
    seen: dict[int, torch.Tensor] = {}

    def keep(mod, _inputs, out) -> None:  # returns None: a hook's return value would replace the output
        seen.setdefault(id(mod), out.detach().clone())  # cloned: in-place ReLUs change it later

    handles = [m.register_forward_hook(keep) for m in {id(m): m for m in modules}.values()]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return [seen[id(m)] for m in modules], out


def channels_of(out: torch.Tensor, watch: Watch) -> torch.Tensor:
    return out.index_select(watch.dim % out.ndim, torch.tensor(watch.channels))


def not_zero(model: nn.Module, masks: FilterMasks, x: torch.Tensor) -> list[str]:
    """The consuming modules where a pruned channel is not exactly 0.0 for input x (empty: all exact)."""
    points = watch_points(masks)
    outs, _ = outputs_at(model, [p.module for p in points], x)
    return [p.what for p, out in zip(points, outs, strict=True) if torch.count_nonzero(channels_of(out, p))]


@torch.no_grad()
def randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Give every norm a non-zero beta, a gamma away from 1 and non-trivial running statistics.

    A fresh norm (beta 0, mean 0) maps a zero channel to zero even when the masks forgot it; this makes that mistake
    show in a check.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.LayerNorm | nn.GroupNorm):
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
