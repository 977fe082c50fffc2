"""WaNet (Nguyen and Tran, "WaNet - Imperceptible Warping-based Backdoor Attack").

The trigger is a smooth warp of the whole image by a fixed random flow field: a k x k grid of random displacements,
upsampled to the image, scaled by the strength s and applied with grid_sample. The paper's setting is k=4, s=0.5.
Its "noise mode" trains on extra images warped by the same field plus random noise on the grid, with their true
labels, so that the model learns the exact warp and not warping in general (see `noisy`; the training path's
noise_ratio).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from gradprune_mlflow.defense.triggers import Trigger


class WarpTrigger(Trigger):
    """x' = grid_sample(x, clamp(identity + s * flow / H, -1, 1)), flow the upsampled k x k random field (WaNet)."""

    kind = "wanet"

    def __init__(self, target: int, k: int = 4, strength: float = 0.5, seed: int = 0):
        super().__init__(target)
        if int(k) < 2 or float(strength) <= 0:
            raise ValueError("warp needs k >= 2 and strength > 0")
        self.k, self.strength, self.seed = int(k), float(strength), int(seed)
        self._grids: dict[tuple[int, int], torch.Tensor] = {}

    def grid(self, h: int, w: int) -> torch.Tensor:
        """The (1, H, W, 2) sampling grid of the warp for H x W images, in grid_sample's [-1, 1] coordinates."""
        if (h, w) not in self._grids:
            gen = torch.Generator().manual_seed(self.seed)
            field = torch.rand(1, 2, self.k, self.k, generator=gen) * 2 - 1
            field = field / field.abs().mean()  # the paper's normalisation: mean displacement 1 before scaling
            flow = F.interpolate(field, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
            identity = torch.stack((xs, ys), dim=-1).unsqueeze(0)
            self._grids[(h, w)] = (identity + self.strength * flow / h).clamp(-1, 1)
        return self._grids[(h, w)]

    def _warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        if len(x) == 0:
            return x.clone()
        out = F.grid_sample(x, grid.to(x.device, x.dtype).expand(len(x), -1, -1, -1), align_corners=True)
        return out.clamp(0, 1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self._warp(x, self.grid(*x.shape[-2:]))

    def noisy(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise mode: the warp plus uniform noise in [-1/H, 1/H] on each image's grid, about half a pixel either way
        (the training path keeps these images' labels)."""
        h, w = x.shape[-2:]
        noise = (torch.rand(len(x), h, w, 2, generator=generator) * 2 - 1) / h
        return self._warp(x, (self.grid(h, w) + noise).clamp(-1, 1))

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "k": self.k, "strength": self.strength, "seed": self.seed}
