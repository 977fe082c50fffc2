"""The fixed-strength blend search: whole-image patterns that send other classes' images to a flagged class when
blended in at one given strength (trigger-free mode runs it when the blend family flags a class)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from gradprune_mlflow.defense.progress import Progress
from gradprune_mlflow.defense.synthesis import BATCH, _frozen
from gradprune_mlflow.defense.triggers import MaskTrigger


def fixed_strength_blend(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    target: int,
    alpha: float,
    *,
    steps: int,
    restarts: int,
    generator: torch.Generator,
    progress: Progress,
) -> list[MaskTrigger]:
    """Whole-image patterns that, blended in at the fixed strength `alpha`, send other classes' images to `target`:
    one per restart, each started from uniform noise (universal adversarial blends towards the class).

    The blend family's search shrinks the strength until its pattern barely works, which gives patterns far from
    the attacker's (benchmarks/blend_probe.py). At a fixed strength there is nothing to shrink, and the search ends
    on patterns that work at the strength a noise-like trigger has. They are not the attacker's image either (their
    correlation with it is measured by benchmarks/blend_probe.py), but unlearning them removes more of what a Blend
    model has learned from it than fresh noise does (docs/algorithm.md, "The trigger").
    """
    device = next(net.parameters()).device
    others = images[labels != target]
    if len(others) == 0:
        return []
    shape = tuple(images.shape[1:])
    start = torch.rand(restarts, *shape, generator=generator).clamp(0.02, 0.98)
    param = torch.logit(start).to(device).requires_grad_()
    opt = torch.optim.Adam([param], lr=0.05)
    y = torch.full((restarts * BATCH,), target, device=device)
    progress.phase("synthesis (fixed-strength blend)", steps)
    with _frozen(net):
        for _ in range(steps):
            x = others[torch.randint(len(others), (BATCH,), generator=generator)].to(device)
            xs = (1 - alpha) * x[None] + alpha * torch.sigmoid(param)[:, None]  # (restarts, B, C, H, W)
            loss = F.cross_entropy(net(xs.flatten(0, 1)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            progress.advance(1)
    mask = torch.full((1, *shape[1:]), float(alpha))
    return [MaskTrigger(target, mask, pattern, source="synthesized-fixed-blend")
            for pattern in torch.sigmoid(param).detach().cpu()]
