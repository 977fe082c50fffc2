"""A sample-specific invisible additive trigger, an SSBA-like stand-in (Li et al., "Invisible Backdoor Attack with
Sample-Specific Triggers").

SSBA encodes a secret string into each image with a trained steganography encoder, so every image carries its own
invisible residual. This is not that encoder: a fixed, seeded random conv net reads the image together with a fixed
random code plane (the "secret") and its output, squashed by tanh, is the image's own perturbation of at most
epsilon per pixel. It keeps what matters to a defense: the trigger differs from image to image, is small, and still
shares a learnable signature.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from gradprune_mlflow.defense.triggers import Trigger


class SampleSpecificTrigger(Trigger):
    """x' = clip(x + epsilon * tanh(gain * z / std(z))), z = conv(tanh(conv([2x - 1, code_weight * code]))), the
    weights seeded. A larger code_weight makes the code's shared signature outweigh the image's own part (easier to
    learn, less specific to each image); a larger gain spends more of the epsilon budget.
    """

    kind = "ssba-like"

    def __init__(self, target: int, epsilon: float = 8 / 255, hidden: int = 16, seed: int = 0,
                 code_weight: float = 1.0, gain: float = 1.0):
        super().__init__(target)
        if not 0.0 < float(epsilon) <= 1.0 or int(hidden) < 1 or float(code_weight) < 0 or float(gain) <= 0:
            raise ValueError("sample-specific trigger needs 0 < epsilon <= 1, hidden >= 1, code_weight >= 0, gain > 0")
        self.epsilon, self.hidden, self.seed = float(epsilon), int(hidden), int(seed)
        self.code_weight, self.gain = float(code_weight), float(gain)
        self._nets: dict[tuple[int, int, int], tuple[torch.Tensor, ...]] = {}

    def _net(self, shape: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
        """(code plane, first conv weights, second conv weights) for images of shape (C, H, W), built once."""
        if shape not in self._nets:
            c, h, w = shape
            gen = torch.Generator().manual_seed(self.seed)
            code = (torch.rand(1, 1, h, w, generator=gen) > 0.5).float() * 2 - 1
            w1 = torch.randn(self.hidden, c + 1, 3, 3, generator=gen) / (9 * (c + 1)) ** 0.5
            w2 = torch.randn(c, self.hidden, 3, 3, generator=gen) / (9 * self.hidden) ** 0.5
            self._nets[shape] = (code, w1, w2)
        return self._nets[shape]

    @torch.no_grad()
    def perturbation(self, x: torch.Tensor) -> torch.Tensor:
        """Each image's own additive perturbation, every value strictly inside (-epsilon, epsilon)."""
        code, w1, w2 = (t.to(x.device, x.dtype) for t in self._net(tuple(int(s) for s in x.shape[1:])))
        inputs = torch.cat([2 * x - 1, self.code_weight * code.expand(len(x), -1, -1, -1)], dim=1)
        z = F.conv2d(torch.tanh(F.conv2d(inputs, w1, padding=1)), w2, padding=1)
        z = z / z.flatten(1).std(1).clamp_min(1e-6).view(-1, 1, 1, 1)
        return self.epsilon * torch.tanh(self.gain * z)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) == 0:
            return x.clone()
        return (x + self.perturbation(x)).clamp(0, 1)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "epsilon": self.epsilon, "hidden": self.hidden, "seed": self.seed,
                "code_weight": self.code_weight, "gain": self.gain}
