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
    search = FamilySearch(net, images, labels, num_classes, family, restarts=restarts, generator=generator,
                          classes=classes)
    search.run(steps, progress)
    return search.result()


def keep_rows(params: list[torch.Tensor], opt: torch.optim.Adam, classes: list[int], restarts: int,
              keep: list[int]) -> tuple[torch.Tensor, list[torch.Tensor], torch.optim.Adam]:
    """The rows of the classes `keep` in a batched search whose row r * len(classes) + j is restart r of classes[j]:
    their indices, copies of their parameters, and an Adam optimiser over those that goes on where `opt` stood."""
    k = len(classes)
    rows = torch.tensor([r * k + classes.index(c) for r in range(restarts) for c in keep])
    kept = [p.detach()[rows].clone().requires_grad_() for p in params]
    new_opt = torch.optim.Adam(kept, **{key: opt.defaults[key] for key in ("lr", "betas")})
    for old, new in zip(params, kept, strict=True):
        state = opt.state.get(old)
        if state:  # Adam's moments are per element: the kept rows' own
            new_opt.state[new] = {key: v if v.ndim == 0 else v[rows].clone() for key, v in state.items()}
    return rows, kept, new_opt


class FamilySearch:
    """One family's search, resumable: run(steps) goes on where the last call stopped, keep(classes) drops every
    other class's rows, result() gives the best triggers so far. Each row's optimiser state and penalty are its own
    and the search draws its images from its own generator (seeded from `generator`), so a row searched in two
    calls, or after keep, follows the path it would have followed in one call over every class."""

    def __init__(self, net: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int, family: str, *,
                 restarts: int, generator: torch.Generator, classes: list[int] | None = None):
        self.net, self.images, self.labels, self.family = net, images, labels, family
        self.fam = FAMILIES[family]
        self.device = next(net.parameters()).device
        self.all_classes = classes is None
        self.classes = list(range(num_classes)) if classes is None else list(classes)
        self.restarts, self.steps = restarts, 0
        self.generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        rows, shape = restarts * len(self.classes), tuple(images.shape[1:])
        self.target = torch.tensor(self.classes).repeat(restarts).to(self.device)  # row r*k + j -> class j
        self.params = [p.to(self.device).requires_grad_() for p in self.fam.init(rows, shape, self.generator)]
        self.opt = torch.optim.Adam(self.params, lr=0.1, betas=(0.5, 0.9))
        self.lam = torch.full((rows,), 1e-2, device=self.device)
        self.best_size = torch.full((rows,), float("inf"), device=self.device)
        self.best = [p.detach().clone() for p in self.fam.parts(self.params)]
        self.wins = torch.zeros(rows, device=self.device)

    def run(self, steps: int, progress: Progress) -> None:
        """`steps` more steps for every row left."""
        fam, net, target = self.fam, self.net, self.target
        per_pass = max(1, batch_for(self.device) // BATCH)  # rows per forward pass
        chunks = [slice(r, r + per_pass) for r in range(0, len(target), per_pass)]
        progress.phase(f"synthesis ({self.family})", steps)
        with _frozen(net):
            for _ in range(steps):
                self.steps += 1
                idx = torch.randint(len(self.images), (BATCH,), generator=self.generator)
                x, y = self.images[idx].to(self.device), self.labels[idx].to(self.device)
                mask, pattern = fam.parts(self.params)
                other = (y[None] != target[:, None]).float()  # images already of class k prove nothing
                size = fam.size(self.params)
                self.opt.zero_grad(set_to_none=True)
                parts = []
                for rs in chunks:  # rows are independent: one backward per chunk gives the same gradients
                    xs = (1 - mask[rs, None]) * x[None] + mask[rs, None] * pattern[rs, None]  # (rows, B, C, H, W)
                    logits = net(xs.flatten(0, 1)).view(len(xs), BATCH, -1)
                    ce = F.cross_entropy(logits.flatten(0, 1), target[rs].repeat_interleave(BATCH),
                                         reduction="none").view(len(xs), -1)
                    (ce * other[rs]).sum(1).div(other[rs].sum(1).clamp_min(1)).sum().backward(retain_graph=True)
                    parts.append(logits.detach())
                (self.lam * size).sum().backward()
                self.opt.step()
                out = torch.cat(parts)
                with torch.no_grad():
                    hit = ((out.argmax(2) == target[:, None]).float() * other).sum(1) / other.sum(1).clamp_min(1)
                    ok = hit >= SUCCESS
                    self.wins += ok.float()
                    improved = ok & (size < self.best_size)
                    self.best_size = torch.where(improved, size, self.best_size)
                    # keep the trigger that was measured (before this step's update), not the updated one
                    self.best[0][improved] = mask.detach()[improved]
                    self.best[1][improved] = pattern.detach()[improved]
                    if self.steps % 10 == 0:  # re-weight the penalty: smaller while it works, weaker while it fails
                        self.lam = torch.where(self.wins >= 8, self.lam * 1.5, self.lam / 1.5).clamp(1e-4, 10.0)
                        self.wins.zero_()
                progress.advance(1)

    def keep(self, classes: list[int]) -> None:
        """Search on for `classes` alone (a subset of this search's), each row where it stands."""
        rows, self.params, self.opt = keep_rows(self.params, self.opt, self.classes, self.restarts, classes)
        self.target, self.lam, self.best_size, self.wins = (t[rows] for t in (self.target, self.lam, self.best_size,
                                                                              self.wins))
        self.best = [b[rows] for b in self.best]
        self.classes, self.all_classes = list(classes), False

    def result(self) -> FamilyResult:
        """The smallest working trigger of each row so far (the current one where none worked yet)."""
        with torch.no_grad():
            worked = torch.isfinite(self.best_size)
            final_m, final_p = self.fam.parts(self.params)
            masks, patterns = self.best[0].clone(), self.best[1].clone()
            masks[~worked], patterns[~worked] = final_m[~worked], final_p[~worked]
            sizes = torch.where(worked, self.best_size, self.fam.size(self.params))
        r, k = self.restarts, len(self.classes)
        c, h, w = self.images.shape[1:]
        return FamilyResult(self.family, sizes.view(r, k).cpu(), worked.view(r, k).cpu(),
                            masks.view(r, k, 1, h, w).cpu(), patterns.view(r, k, c, h, w).cpu(),
                            None if self.all_classes else list(self.classes))


def with_class(result: FamilyResult, searched_on: FamilyResult, k: int) -> FamilyResult:
    """`result` with class k's triggers (masks, patterns, whether they worked) taken from `searched_on`, a search of
    class k that went on from where `result` stood. The sizes stay `result`'s, so that class k's anomaly index is
    still measured against the other classes at one budget."""
    j, src = result.column(k), searched_on.column(k)
    worked, masks, patterns = result.worked.clone(), result.masks.clone(), result.patterns.clone()
    worked[:, j] = searched_on.worked[:, src]
    masks[:, j] = searched_on.masks[:, src]
    patterns[:, j] = searched_on.patterns[:, src]
    return FamilyResult(result.family, result.sizes, worked, masks, patterns, result.classes)


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
    steps: int | None = None  # the search steps a restart had taken where the evidence was read

    def to_report(self) -> dict:
        return {"target": self.target, "anomaly_index": round(self.anomaly_index, 4), "flagged": self.flagged,
                "flagged_by": self.flagged_by, "family": self.family, "score": self.score,
                "search_steps": self.steps, "per_family": self.per_family, "probes": self.probes}


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
