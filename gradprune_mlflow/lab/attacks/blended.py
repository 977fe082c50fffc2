"""Blended (Chen et al., "Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning").

x' = (1 - alpha) x + alpha p over the whole image. The defense's BlendTrigger blends seeded noise or a PNG;
SmoothImageTrigger blends a structured, natural-looking picture drawn here without any file.
"""

from __future__ import annotations

import math

import torch

from gradprune_mlflow.defense.triggers import _ShapedTrigger


class SmoothImageTrigger(_ShapedTrigger):
    """Blends a smooth, structured colour image into the whole picture: x' = (1 - alpha) x + alpha p (Blended).

    Not noise: p is three low-frequency sinusoids at different angles and phases, one per channel (a soft colour
    interference pattern, like a sky or a reflection), so the trigger looks like a natural tint rather than grain.
    Grey images get the channels' mean.
    """

    kind = "smooth-blend"

    def __init__(self, target: int, alpha: float = 0.15):
        super().__init__(target)
        self.alpha = float(alpha)

    def _make(self, shape):
        c, h, w = shape
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        waves = [(1.0, 0.5, 0.0), (-0.7, 1.2, 2.0), (0.4, -0.9, 4.0)]  # (cycles down, cycles across, phase)
        rgb = torch.stack([0.5 + 0.5 * torch.sin(2 * math.pi * (fy * yy + fx * xx) + ph) for fy, fx, ph in waves])
        pattern = rgb if c == 3 else rgb.mean(0, keepdim=True).expand(c, h, w)
        return torch.full((1, h, w), self.alpha), pattern.contiguous()

    def spec(self):
        return {**super().spec(), "alpha": self.alpha}
