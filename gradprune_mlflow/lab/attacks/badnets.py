"""BadNets (Gu et al., "BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply Chain").

A small square patch stamped over the image. The defense's PatchTrigger is the solid white patch at a fixed place;
StampTrigger adds coloured checkers and textures, and a position that changes from image to image.
"""

from __future__ import annotations

from typing import Any

import torch

from gradprune_mlflow.defense.triggers import LOCATIONS, Trigger

PATTERNS = ("checker", "noise", "solid")
RED, GREEN = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)


class StampTrigger(Trigger):
    """A `size` x `size` patch replacing the pixels under it (BadNets), at a corner, the centre or "random".

    Patterns: "checker" alternates `colours` (red/green by default); on grey images, where red and green have the
    same brightness once averaged, it alternates white and black instead. "noise" is a texture of seeded uniform
    values, one per pixel and channel. "solid" is the first colour. With location "random" each image gets its own
    place, drawn from a hash of its pixels: the same image always gets the same place, whatever batch it is in.
    """

    kind = "stamp"

    def __init__(self, target: int, size: int = 3, location: str = "bottom-right", pattern: str = "checker",
                 colours: tuple[tuple[float, float, float], tuple[float, float, float]] = (RED, GREEN),
                 margin: int = 0, seed: int = 0):
        super().__init__(target)
        if location not in (*LOCATIONS, "random"):
            raise ValueError(f"stamp location {location!r} is not one of {', '.join(LOCATIONS)}, random")
        if pattern not in PATTERNS:
            raise ValueError(f"stamp pattern {pattern!r} is not one of {', '.join(PATTERNS)}")
        if int(size) < 1 or int(margin) < 0:
            raise ValueError("stamp needs size >= 1 and margin >= 0")
        self.size, self.location, self.pattern = int(size), location, pattern
        self.margin, self.seed = int(margin), int(seed)
        self.colours = tuple(tuple(float(v) for v in c) for c in colours)

    def patch(self, c: int) -> torch.Tensor:
        """The (c, size, size) pixels stamped on images of c channels."""
        s = self.size
        if self.pattern == "noise":
            return torch.rand((c, s, s), generator=torch.Generator().manual_seed(self.seed))
        first, second = (torch.tensor(col).view(3, 1, 1) for col in self.colours)
        if c != 3:
            first, second = torch.ones(c, 1, 1), torch.zeros(c, 1, 1)
        if self.pattern == "solid":
            return first.expand(c, s, s).clone()
        odd = (torch.arange(s).view(-1, 1) + torch.arange(s).view(1, -1)) % 2 == 1
        return torch.where(odd, second, first)

    def positions(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top, left) of the patch on each image of x, as integer tensors of length N."""
        n, _, h, w = x.shape
        s, g = self.size, self.margin
        if s + g > min(h, w):
            raise ValueError(f"stamp of size {s} with margin {g} does not fit a {h}x{w} image")
        if self.location == "random":
            rows, cols = h - 2 * g - s + 1, w - 2 * g - s + 1
            key = self._hash(x)
            return g + key % rows, g + (key // rows) % cols
        top = {"top": g, "bottom": h - g - s}.get(self.location.split("-")[0], (h - s) // 2)
        left = {"left": g, "right": w - g - s}.get(self.location.split("-")[-1], (w - s) // 2)
        return torch.full((n,), top), torch.full((n,), left)

    def _hash(self, x: torch.Tensor) -> torch.Tensor:
        # Integer arithmetic on 8-bit pixels, so the same image hashes alike on every device and in every batch.
        pixels = (x.detach().flatten(1).cpu().float() * 255).round().long()
        weights = torch.randint(1, 1 << 16, (pixels.shape[1],), generator=torch.Generator().manual_seed(self.seed))
        return (pixels * weights).sum(1) % 1_000_003

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        if len(x) == 0:
            return out
        patch, s = self.patch(x.shape[1]).to(x.device, x.dtype), self.size
        tops, lefts = self.positions(x)
        if self.location != "random":
            top, left = int(tops[0]), int(lefts[0])
            out[:, :, top : top + s, left : left + s] = patch
            return out
        for i, (top, left) in enumerate(zip(tops.tolist(), lefts.tolist(), strict=True)):
            out[i, :, top : top + s, left : left + s] = patch
        return out

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "size": self.size, "location": self.location, "pattern": self.pattern,
                "colours": [list(c) for c in self.colours], "margin": self.margin, "seed": self.seed}
