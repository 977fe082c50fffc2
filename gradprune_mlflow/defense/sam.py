"""Sharpness-aware minimisation for any loss: SAM (Foret et al. 2021) with ASAM's adaptive radius (Kwon et al. 2021).

A SAM step takes the gradient g of the loss at the weights w, moves to the worst point nearby, w + e, takes the
gradient there, and applies that one from w. ASAM's e = rho |w|^2 g / || |w| g || (elementwise) moves each weight in
proportion to its own size, so a pruned (zero) filter does not move at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def ascended(params: Iterable[nn.Parameter], rho: float, adaptive: bool = True) -> Iterator[None]:
    """Inside: the parameters moved to w + e along their current .grad; after: put back to w exactly (w + e - e
    need not be w in floats). Parameters without a gradient stay where they are."""
    params = [p for p in params if p.grad is not None]
    with torch.no_grad():
        factors = [p.abs() if adaptive else torch.ones_like(p) for p in params]
        norm = torch.stack([(t * p.grad).norm(2) for t, p in zip(factors, params, strict=True)]).norm(2)
        originals = [p.detach().clone() for p in params]
        for t, p in zip(factors, params, strict=True):
            p.add_(t * t * p.grad * (rho / (norm + 1e-12)))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, w in zip(params, originals, strict=True):
                p.copy_(w)
