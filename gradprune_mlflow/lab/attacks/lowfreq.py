"""A low-frequency trigger (after Zeng et al., "Rethinking the Backdoor Attacks' Triggers: A Frequency Perspective").

Many triggers leave high-frequency artefacts that frequency-domain detectors spot; this one is made only of low
spatial frequencies: seeded Gaussian noise, low-pass filtered in the Fourier domain, added with a small amplitude.
"""

from __future__ import annotations

from typing import Any

import torch

from gradprune_mlflow.defense.triggers import Trigger


class LowFrequencyTrigger(Trigger):
    """x' = clip(x + p): p has no energy above `cutoff` cycles per image (radially) and max |p| = amplitude.

    The constant component is left out too (a plain brightness shift is not a pattern). One pattern per channel.
    """

    kind = "low-frequency"

    def __init__(self, target: int, amplitude: float = 0.1, cutoff: float = 3, seed: int = 0):
        super().__init__(target)
        if not 0.0 < float(amplitude) <= 1.0 or float(cutoff) < 1:
            raise ValueError("low-frequency trigger needs 0 < amplitude <= 1 and cutoff >= 1")
        self.amplitude, self.cutoff, self.seed = float(amplitude), float(cutoff), int(seed)
        self._patterns: dict[tuple[int, int, int], torch.Tensor] = {}

    def pattern(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """The additive (C, H, W) pattern for images of that shape."""
        shape = tuple(int(s) for s in shape)
        if shape not in self._patterns:
            c, h, w = shape
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(self.seed), dtype=torch.float64)
            fy = torch.fft.fftfreq(h, dtype=torch.float64).mul(h).view(-1, 1)  # cycles per image
            fx = torch.fft.rfftfreq(w, dtype=torch.float64).mul(w).view(1, -1)
            radius = (fy**2 + fx**2).sqrt()
            keep = (radius <= self.cutoff) & (radius > 0)
            p = torch.fft.irfft2(torch.fft.rfft2(noise) * keep, s=(h, w))
            self._patterns[shape] = (self.amplitude * p / p.abs().amax()).float()
        return self._patterns[shape]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.pattern(tuple(x.shape[1:])).to(x.device, x.dtype)).clamp(0, 1)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "amplitude": self.amplitude, "cutoff": self.cutoff, "seed": self.seed}
