"""The model as the defense sees it: [0, 1] pixels in, logits out, normalisation inside."""

from __future__ import annotations

import torch
from torch import nn


class Normalized(nn.Module):
    """Wraps a model so that it takes [0, 1] pixels: triggers act before normalisation, as they do in the wild.

    The wrapped model's parameters are shared, not copied: training the wrapper trains the model.
    """

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)
