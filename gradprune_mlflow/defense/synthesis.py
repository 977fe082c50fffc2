"""Trigger synthesis for trigger-free mode: reverse-engineer a candidate trigger for every class from clean images.

Real triggers come in two families, and each gets its own search (Neural Cleanse style: the smallest change that sends
clean images of other classes to class k):
- patch: x' = (1 - m) x + m p with a free mask m (1, H, W) and pattern p; size = mean of m (fraction of the image).
- blend: x' = (1 - a) x + a p over the whole image with one strength a per class; size = a. Blended and signal
  triggers touch every pixel a little, which a small mask cannot express.

All classes and restarts of a family are rows of one tensor computation. Each row has its own penalty weight, raised
while the row's candidate succeeds and lowered while it fails, so every class ends near its smallest working trigger.
A backdoor target needs a much smaller trigger than the other classes; the anomaly index (median absolute deviation
of the sizes) flags it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from gradprune_mlflow.defense.metrics import batch_for
from gradprune_mlflow.defense.progress import Progress
from gradprune_mlflow.defense.triggers import MaskTrigger

SUCCESS = 0.9  # a candidate "works" when it sends this fraction of other-class images to its class
BATCH = 24  # clean images per step, shared by all rows


@dataclass
class FamilyResult:
    """One family's search: best size per row (restart-major: row = restart * K + class) and the best triggers."""

    family: str
    sizes: torch.Tensor  # (R, K) smallest size that worked (the final size where none did)
    worked: torch.Tensor  # (R, K) bool
    masks: torch.Tensor  # (R, K, 1, H, W)
    patterns: torch.Tensor  # (R, K, C, H, W)
    classes: list[int] | None = None  # the class of each column; None: column k is class k

    def class_sizes(self) -> torch.Tensor:
        """Per-class size, averaged over restarts."""
        return self.sizes.mean(0)

    def triggers(self, k: int) -> list[MaskTrigger]:
        """The synthesized triggers of class k, one per restart, in the general mask form."""
        j = self.column(k)
        return [MaskTrigger(k, self.masks[r, j], self.patterns[r, j], source=f"synthesized-{self.family}")
                for r in range(self.masks.shape[0])]

    def smallest_trigger(self, k: int) -> MaskTrigger:
        """Class k's synthesized trigger from the restart with the smallest size: what ASR is measured with when
        no probe found a trigger."""
        return self.triggers(k)[int(self.sizes[:, self.column(k)].argmin())]

    def column(self, k: int) -> int:
        """The column of class k in sizes/worked/masks/patterns."""
        return k if self.classes is None else self.classes.index(k)


class _Patch:
    name = "patch"

    def init(self, rows: int, shape, gen: torch.Generator) -> list[torch.Tensor]:
        c, h, w = shape
        return [torch.randn(rows, 1, h, w, generator=gen) * 0.5 - 2.0, torch.randn(rows, c, h, w, generator=gen)]

    def parts(self, params):
        return torch.sigmoid(params[0]), torch.sigmoid(params[1])

    def size(self, params) -> torch.Tensor:
        return torch.sigmoid(params[0]).flatten(1).mean(1)


class _Blend:
    name = "blend"

    def init(self, rows: int, shape, gen: torch.Generator) -> list[torch.Tensor]:
        c, h, w = shape
        return [torch.full((rows, 1, 1, 1), -2.0), torch.randn(rows, c, h, w, generator=gen)]

    def parts(self, params):
        alpha = torch.sigmoid(params[0])
        return alpha.expand(-1, 1, *params[1].shape[-2:]), torch.sigmoid(params[1])

    def size(self, params) -> torch.Tensor:
        return torch.sigmoid(params[0]).flatten()


FAMILIES = {"patch": _Patch(), "blend": _Blend()}


@contextlib.contextmanager
def _frozen(net: nn.Module):
    """The net in eval mode with its weights frozen while a trigger is optimised through it; unfrozen after."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in net.parameters():
            p.requires_grad_(True)


def synthesize(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    family: str,
    *,
    steps: int,
    restarts: int,
    generator: torch.Generator,
    progress: Progress,
    classes: list[int] | None = None,
) -> FamilyResult:
    """Search the smallest trigger of `family` for every class (or only `classes`), all classes and restarts batched.

    The net is unchanged. The result's class axis follows `classes` when given (column j is class classes[j]).
    """
    fam = FAMILIES[family]
    device = next(net.parameters()).device
    searched = torch.arange(num_classes) if classes is None else torch.tensor(classes)
    k = len(searched)
    rows, shape = restarts * k, tuple(images.shape[1:])
    target = searched.repeat(restarts).to(device)  # row r*k + j -> class searched[j]
    params = [p.to(device).requires_grad_() for p in fam.init(rows, shape, generator)]
    opt = torch.optim.Adam(params, lr=0.1, betas=(0.5, 0.9))
    lam = torch.full((rows,), 1e-2, device=device)
    best_size = torch.full((rows,), float("inf"), device=device)
    best = [p.detach().clone() for p in fam.parts(params)]
    wins = torch.zeros(rows, device=device)
    per_pass = max(1, batch_for(device) // BATCH)  # rows per forward pass
    chunks = [slice(r, r + per_pass) for r in range(0, rows, per_pass)]
    progress.phase(f"synthesis ({family})", steps)
    with _frozen(net):
        for step in range(1, steps + 1):
            idx = torch.randint(len(images), (BATCH,), generator=generator)
            x, y = images[idx].to(device), labels[idx].to(device)
            mask, pattern = fam.parts(params)
            other = (y[None] != target[:, None]).float()  # images already of class k prove nothing
            size = fam.size(params)
            opt.zero_grad(set_to_none=True)
            parts = []
            for rs in chunks:  # rows are independent: one backward per chunk gives the same gradients
                xs = (1 - mask[rs, None]) * x[None] + mask[rs, None] * pattern[rs, None]  # (rows, B, C, H, W)
                logits = net(xs.flatten(0, 1)).view(len(xs), BATCH, -1)
                ce = F.cross_entropy(logits.flatten(0, 1), target[rs].repeat_interleave(BATCH),
                                     reduction="none").view(len(xs), -1)
                (ce * other[rs]).sum(1).div(other[rs].sum(1).clamp_min(1)).sum().backward(retain_graph=True)
                parts.append(logits.detach())
            (lam * size).sum().backward()
            opt.step()
            out = torch.cat(parts)
            with torch.no_grad():
                hit = ((out.argmax(2) == target[:, None]).float() * other).sum(1) / other.sum(1).clamp_min(1)
                ok = hit >= SUCCESS
                wins += ok.float()
                improved = ok & (size < best_size)
                best_size = torch.where(improved, size, best_size)
                # keep the trigger that was measured (before this step's update), not the updated one
                best[0][improved], best[1][improved] = mask.detach()[improved], pattern.detach()[improved]
                if step % 10 == 0:  # re-weight the penalty: smaller while it works, weaker while it fails
                    lam = torch.where(wins >= 8, lam * 1.5, lam / 1.5).clamp(1e-4, 10.0)
                    wins.zero_()
            progress.advance(1)
    with torch.no_grad():
        worked = torch.isfinite(best_size)
        final_m, final_p = fam.parts(params)
        best[0][~worked], best[1][~worked] = final_m[~worked], final_p[~worked]
        sizes = torch.where(worked, best_size, fam.size(params))
    c, h, w = shape
    return FamilyResult(
        family, sizes.view(restarts, k).cpu(), worked.view(restarts, k).cpu(),
        best[0].view(restarts, k, 1, h, w).cpu(), best[1].view(restarts, k, c, h, w).cpu(),
        None if classes is None else list(classes),
    )


def anomaly_index(sizes: torch.Tensor) -> torch.Tensor:
    """Per-class anomaly index (median - size) / (1.4826 * MAD): how far below the median a class's trigger is."""
    med = sizes.median()
    mad = 1.4826 * (sizes - med).abs().median()
    return (med - sizes) / mad.clamp_min(1e-12 + 1e-3 * med.abs())


@dataclass
class Detection:
    target: int
    anomaly_index: float
    flagged: bool
    family: str
    per_family: dict[str, dict[str, list[float]]]
    # What flagged the class: "patch_probe", "noise_probe", "warp_probe" or "anomaly_index" (None: nothing flagged).
    flagged_by: str | None = None
    probes: dict | None = None  # the probes' per-class responses (gradprune_mlflow.defense.probes)
    score: dict | None = None  # the flag score, its verdict and each detector's part (defense/evidence.py)

    def to_report(self) -> dict:
        return {"target": self.target, "anomaly_index": round(self.anomaly_index, 4), "flagged": self.flagged,
                "flagged_by": self.flagged_by, "family": self.family, "score": self.score,
                "per_family": self.per_family, "probes": self.probes}


def detect(results: list[FamilyResult], threshold: float) -> Detection:
    """The class and family with the largest anomaly index; flagged when it exceeds `threshold`."""
    best = None
    per_family = {}
    for res in results:
        idx = anomaly_index(res.class_sizes())
        per_family[res.family] = {"size": [round(v, 5) for v in res.class_sizes().tolist()],
                                  "anomaly_index": [round(v, 3) for v in idx.tolist()]}
        k = int(idx.argmax())
        if best is None or idx[k] > best[0]:
            best = (float(idx[k]), k, res.family)
    flagged = best[0] > threshold
    return Detection(best[1], best[0], flagged, best[2], per_family, "anomaly_index" if flagged else None)


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
