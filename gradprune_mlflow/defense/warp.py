"""The warp probe: does a smooth, sub-pixel warp of the whole image send most images of the other classes to class k?

A warp trigger (WaNet) moves pixels rather than painting them, so neither synthesized family can express it: a
patch or a blend changes the image's values in place. The probe searches, for every class at once, a displacement
field on a coarse GRID x GRID grid (smooth when upsampled to the image) with every pixel moved by at most MAX_SHIFT
pixels, that sends the trusted images of the other classes to the class. A smooth shift this small keeps an image's
content, so a clean model's classes answer to it about as little as they do to noise, while a warp backdoor's target
takes a large share (benchmarks/RESULTS.md, "The warp probe"). Like the other probes it only reads the model and
draws from its own generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from gradprune_mlflow.data.cleanset import Split
from gradprune_mlflow.defense.metrics import batch_for, target_rate
from gradprune_mlflow.defense.progress import Progress
from gradprune_mlflow.defense.synthesis import keep_rows
from gradprune_mlflow.defense.triggers import Trigger

GRID = 4  # the displacement field's control points per side (WaNet's paper uses 4 as well)
MAX_SHIFT = 1.0  # the largest displacement of any pixel, in pixels
BATCH = 24  # clean images per search step, shared by every class's rows
PROBE_IMAGES = 400  # images of the other classes each class's warp is measured on (as the patch probe)


def _identity(h: int, w: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack((xs, ys), dim=-1)


def sampling_grid(field: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """grid_sample's (R, H, W, 2) grid for R unbounded fields (R, 2, GRID, GRID): each pixel moved by at most
    MAX_SHIFT pixels along each axis, smoothly (bicubic upsampling of tanh(field))."""
    scale = torch.tensor([2 * MAX_SHIFT / max(w - 1, 1), 2 * MAX_SHIFT / max(h - 1, 1)], device=field.device)
    flow = F.interpolate(torch.tanh(field), size=(h, w), mode="bicubic", align_corners=True).clamp(-1, 1)
    return (_identity(h, w).to(field.device) + flow.permute(0, 2, 3, 1) * scale).clamp(-1, 1)


class FlowTrigger(Trigger):
    """A synthesized warp: x' = grid_sample(x, identity + a smooth displacement of at most MAX_SHIFT pixels)."""

    kind = "synthesized-warp"

    def __init__(self, target: int, field: torch.Tensor, strength: float = 1.0):
        super().__init__(target)
        self.field = field.detach().float().cpu().reshape(1, 2, *field.shape[-2:])
        self.strength = float(strength)  # scales the displacement: 1 is the field as found

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) == 0:
            return x.clone()
        h, w = x.shape[-2:]
        grid = _identity(h, w).to(x.device) + self.displacement(h, w, x.device)
        out = F.grid_sample(x.float(), grid.expand(len(x), -1, -1, -1), align_corners=True, padding_mode="border")
        return out.clamp(0, 1).to(x.dtype)

    def displacement(self, h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(1, H, W, 2): where each pixel of an h x w image is read from, relative to itself, in grid_sample's
        [-1, 1] coordinates (x first), at this warp's strength."""
        identity = _identity(h, w).to(device)
        return self.strength * (sampling_grid(self.field.to(device), h, w) - identity)

    def shift_map(self, h: int, w: int) -> torch.Tensor:
        """(H, W): how far this warp moves each pixel of an h x w image, in pixels."""
        moved = self.displacement(h, w)[0]
        return torch.hypot(moved[..., 0] * (w - 1) / 2, moved[..., 1] * (h - 1) / 2)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "target": self.target, "grid": list(self.field.shape[-2:]),
                "max_shift_pixels": MAX_SHIFT * self.strength}

    @classmethod
    def from_displacement(cls, target: int, displacement: Any, strength: float = 1.0) -> FlowTrigger:
        """The warp of a trigger file (kind "warp"): the control points' displacements in pixels, (2, G, G) with
        x first, each at most MAX_SHIFT. Raises ValueError naming what is wrong."""
        try:
            shift = torch.as_tensor(displacement, dtype=torch.float32)
        except (TypeError, ValueError):
            raise ValueError("'displacement' must be nested lists of numbers, shaped [2][G][G]") from None
        if shift.ndim != 3 or shift.shape[0] != 2 or shift.shape[1] < 2 or shift.shape[2] < 2:
            raise ValueError(f"'displacement' must be shaped [2][G][G] with G >= 2, got {list(shift.shape)}")
        if not bool(torch.isfinite(shift).all()) or float(shift.abs().max()) > MAX_SHIFT:
            raise ValueError(f"every displacement must be a number of pixels in [-{MAX_SHIFT:g}, {MAX_SHIFT:g}]")
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 < strength <= 4:
            raise ValueError(f"'strength' must be a number in (0, 4], got {strength!r}")
        limit = 1 - 1e-6  # atanh(+-1) is infinite: a control point at the bound moves by the bound
        return cls(target, torch.atanh((shift / MAX_SHIFT).clamp(-limit, limit)), strength)

    def to_file(self) -> dict[str, Any]:
        """This warp as a trigger file's JSON (kind "warp"); FlowTrigger.from_displacement reads it back."""
        shift = (torch.tanh(self.field[0]) * MAX_SHIFT).tolist()
        return {"kind": "warp", "target": self.target,
                "displacement": [[[round(v, 6) for v in row] for row in axis] for axis in shift],
                "strength": self.strength}


@dataclass
class WarpHit:
    """The warp probe's result for one class: the share of other-class images its best warp sent there."""

    target: int
    response: float
    trigger: FlowTrigger  # the best restart's warp
    triggers: list[FlowTrigger]  # every restart's

    def unlearning(self) -> list[Trigger]:
        """What is unlearned when the warp probe flags the class: every restart's warp, as found and 1.5x as far
        (the attacker's warp need not be the one found, only near it)."""
        return [w for t in self.triggers for w in (t, FlowTrigger(t.target, t.field, 1.5))]


def warp_probe(net: nn.Module, data: Split, num_classes: int, *, steps: int, restarts: int,
               generator: torch.Generator, progress: Progress) -> list[WarpHit]:
    """Search a warp toward every class (all classes and restarts batched, `steps` Adam steps), then measure each
    on up to PROBE_IMAGES images of the other classes. `net` (taking [0, 1] pixels) is not changed."""
    search = WarpSearch(net, data, num_classes, restarts=restarts, generator=generator)
    search.run(steps, progress)
    return search.hits()


class WarpSearch:
    """The warp probe's search, resumable like the families' (synthesis.FamilySearch): run(steps) goes on where the
    last call stopped, keep(classes) drops every other class's rows, hits() measures the warps as they stand. Each
    step's images are shared by every row and each row's Adam state is its own, so a row searched in two calls, or
    after keep, follows the path it would have followed in one call over every class."""

    def __init__(self, net: nn.Module, data: Split, num_classes: int, *, restarts: int, generator: torch.Generator):
        self.net, self.data, self.generator, self.restarts = net, data, generator, restarts
        self.device = next(net.parameters()).device
        self.classes = list(range(num_classes))
        self.target = torch.arange(num_classes).repeat(restarts).to(self.device)  # row r * K + k -> class k
        rows = restarts * num_classes
        self.field = (torch.randn(rows, 2, GRID, GRID, generator=generator) * 0.1).to(self.device).requires_grad_()
        self.opt = torch.optim.Adam([self.field], lr=0.1)

    def run(self, steps: int, progress: Progress) -> None:
        """`steps` more Adam steps for every row left."""
        net, data, target, field = self.net, self.data, self.target, self.field
        h, w = data.images.shape[-2:]
        per_pass = max(1, batch_for(self.device) // BATCH)
        progress.phase("synthesis (warp probe)", steps)
        was_training = net.training
        net.eval()
        for _ in range(steps):
            idx = torch.randint(len(data), (BATCH,), generator=self.generator)
            x, y = data.images[idx].to(self.device), data.labels[idx].to(self.device)
            other = (y[None] != target[:, None]).float()
            self.opt.zero_grad(set_to_none=True)
            for start in range(0, len(target), per_pass):  # rows are independent: one backward per chunk
                rs = slice(start, start + per_pass)
                grid = sampling_grid(field[rs], h, w)
                n = grid.shape[0]
                warped = F.grid_sample(x.repeat(n, 1, 1, 1), grid.repeat_interleave(BATCH, 0), align_corners=True,
                                       padding_mode="border")
                ce = F.cross_entropy(net(warped), target[rs].repeat_interleave(BATCH), reduction="none").view(n, -1)
                (ce * other[rs]).sum(1).div(other[rs].sum(1).clamp_min(1)).sum().backward()
            self.opt.step()
            progress.advance(1)
        net.train(was_training)

    def keep(self, classes: list[int]) -> None:
        """Search on for `classes` alone (a subset of this search's), each row where it stands."""
        rows, [self.field], self.opt = keep_rows([self.field], self.opt, self.classes, self.restarts, classes)
        self.target, self.classes = self.target[rows], list(classes)

    @torch.no_grad()
    def hits(self) -> list[WarpHit]:
        """Per class of the search, in order: each restart's warp measured on up to PROBE_IMAGES images of the other
        classes, the best one first."""
        fields = self.field.detach().cpu().view(self.restarts, len(self.classes), 2, GRID, GRID)
        hits = []
        for j, k in enumerate(self.classes):
            others = self.data.images[self.data.labels != k][:PROBE_IMAGES]
            found = [FlowTrigger(k, fields[r, j]) for r in range(self.restarts)]
            rates = [target_rate(self.net, t.apply(others), k) for t in found]
            best = max(range(self.restarts), key=rates.__getitem__)
            hits.append(WarpHit(k, rates[best], found[best], found))
        return hits
