"""The unlearning loss and the triggers the defense unlearns with.

Unlearning loss: cross-entropy of the model on triggered clean images against their TRUE labels. Its gradient says
which filters carry the backdoor (pruning), and minimising it teaches the model to ignore the trigger (fine-tuning).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from gradprune_mlflow.data.cleanset import Split
from gradprune_mlflow.defense.metrics import eval_mode
from gradprune_mlflow.defense.triggers import Trigger


def unlearning_gradients(net: nn.Module, triggered: Split, batch_size: int = 256) -> float:
    """Backward the mean unlearning loss over all of `triggered` (images already triggered), in eval mode.

    Gradients are left in the parameters' .grad (zeroed first). Eval mode: BatchNorm statistics are the model's own,
    never re-estimated from triggered images. Returns the loss.
    """
    device = next(net.parameters()).device
    net.zero_grad(set_to_none=True)
    total, n = 0.0, len(triggered)
    with eval_mode(net):
        for x, y in zip(triggered.images.split(batch_size), triggered.labels.split(batch_size), strict=True):
            loss = F.cross_entropy(net(x.to(device)), y.to(device), reduction="sum") / n
            loss.backward()
            total += loss.item()
    return total


class RandomFill(Trigger):
    """A synthesized trigger's region refilled for every image: half get per-pixel uniform noise, half one random
    solid colour (real patches are often solid, and noise alone averages to grey). Solid values are drawn from the
    arcsine distribution, sin^2(pi u / 2), per channel: real patches tend to be saturated (white squares, coloured
    stickers), and a uniform draw comes near white in only a few percent of images.

    A reverse-engineered patch is often a few scattered pixels that do not carry over to the real trigger; unlearning
    "anything in this region" does.
    """

    kind = "random-fill"

    def __init__(self, target: int, region: torch.Tensor, generator: torch.Generator):
        super().__init__(target)
        self.region = region.float()
        self.generator = generator

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.rand(x.shape, generator=self.generator)
        u = torch.rand(len(x), x.shape[1], 1, 1, generator=self.generator)
        solid = torch.sin(torch.pi * u / 2).square().expand_as(noise)
        pick = (torch.rand(len(x), 1, 1, 1, generator=self.generator) < 0.5).expand_as(noise)
        noise = torch.where(pick, solid, noise).to(x.device, x.dtype)
        r = self.region.to(x.device, x.dtype)
        return (1 - r) * x + r * noise


class NoiseBlend(Trigger):
    """Uniform noise drawn fresh for every image, blended in at a strength drawn from [low, high] per image.

    Blend-trigger models measured here learned "noise sends to the target", not the attacker's exact pattern: fresh
    uniform noise at strength 0.2 sent 98.7-99.1% of images to the target (benchmarks/blend_probe.py), while the
    synthesized blend had almost no overlap with the real pattern. Unlearning "any noise" covers that. It does not
    cover a blend of a structured image, which only the synthesized pattern can.
    """

    kind = "noise-blend"

    def __init__(self, target: int, generator: torch.Generator, low: float = 0.1, high: float = 0.3):
        super().__init__(target)
        self.generator, self.low, self.high = generator, low, high

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.low + (self.high - self.low) * torch.rand(len(x), 1, 1, 1, generator=self.generator)
        noise = torch.rand(x.shape, generator=self.generator)
        return ((1 - alpha) * x.cpu() + alpha * noise).to(x.device, x.dtype)

    def spec(self):
        return {"kind": self.kind, "target": self.target, "alpha": [self.low, self.high]}


class TriggerMix(Trigger):
    """Each image gets one trigger of a list, drawn at random: unlearning with all candidates at once. Equal shares
    unless `weights` (one per trigger, any positive scale) are given."""

    kind = "mix"

    def __init__(self, triggers: list[Trigger], generator: torch.Generator, weights: list[float] | None = None):
        super().__init__(triggers[0].target)
        if weights is not None and (len(weights) != len(triggers) or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(f"a TriggerMix needs one non-negative weight per trigger, got {weights}")
        self.triggers = triggers
        self.generator = generator
        self.weights = None if weights is None else [w / sum(weights) for w in weights]

    def shares(self) -> list[float]:
        """Each trigger's expected share of the images."""
        return self.weights or [1 / len(self.triggers)] * len(self.triggers)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            choice = torch.randint(len(self.triggers), (len(x),), generator=self.generator)
        else:
            choice = torch.multinomial(torch.tensor(self.weights), len(x), replacement=True, generator=self.generator)
        choice = choice.to(x.device)
        out = x.clone()
        for i, trig in enumerate(self.triggers):
            sel = choice == i
            if sel.any():
                out[sel] = trig.apply(x[sel])
        return out

    def spec(self):
        spec = {"kind": self.kind, "target": self.target, "parts": [t.spec() for t in self.triggers]}
        return spec if self.weights is None else {**spec, "weights": [round(w, 4) for w in self.weights]}


def extended(mix: Trigger, part: Trigger, generator: torch.Generator) -> TriggerMix:
    """`mix` with `part` as one more equal-share trigger. A weighted mix keeps its weights and extends its first part
    (the synthesized triggers; the parts after it have shares of their own)."""
    if isinstance(mix, TriggerMix) and mix.weights is not None:
        return TriggerMix([extended(mix.triggers[0], part, generator), *mix.triggers[1:]], generator, mix.weights)
    if isinstance(mix, TriggerMix):
        return TriggerMix(mix.triggers + [part], generator)
    return TriggerMix([mix, part], generator)


def triggered_copy(data: Split, trigger: Trigger) -> Split:
    """Triggered copies of every image in `data`, with their TRUE labels (the unlearning set)."""
    return Split(trigger.apply(data.images), data.labels.clone())


def unlearning_plan(trigger: Trigger) -> list[dict[str, object]]:
    """What the unlearning images carry, and in what share: [{"trigger": name, "share": fraction}], largest first.

    A TriggerMix gives each of its parts its share (equal unless weighted) of its own images, so nested mixes
    multiply; parts of the same name (a synthesized trigger at three strengths, say) are added up. Names are a
    MaskTrigger's source, else the kind.
    """
    shares: dict[str, float] = {}

    def walk(trig: Trigger, share: float) -> None:
        if isinstance(trig, TriggerMix):
            for part, part_share in zip(trig.triggers, trig.shares(), strict=True):
                walk(part, share * part_share)
        else:
            name = getattr(trig, "source", None) or trig.kind
            shares[name] = shares.get(name, 0.0) + share

    walk(trigger, 1.0)
    return [{"trigger": name, "share": round(share, 4)}
            for name, share in sorted(shares.items(), key=lambda kv: -kv[1])]
