"""The trigger-agnostic trigger source: a small universal perturbation that pushes a batch toward the flagged class,
searched again against the current model for every batch it is asked for.

Synthesized triggers can only be what their family expresses (a patch, a blend). A warp or a sample-specific trigger
is neither, and unlearning the families' triggers can leave it working. What every backdoor shares is that the model
has an easy way into the target class; unlearning adversarial perturbations toward that class (with the true labels)
closes easy ways in whatever their shape, the idea behind i-BAU's universal perturbations.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.defense.metrics import eval_mode
from gradprune_mlflow.defense.triggers import Trigger
from gradprune_mlflow.defense.unlearning import TriggerMix


class TargetedPerturbation(Trigger):
    """x' = clip(x + d), one d (|d| <= eps per pixel) per call, found by `steps` signed-gradient steps from a random
    start that lower the cross-entropy of the whole batch toward `target` on `net` as it is at that moment.

    Inside fine-tuning it follows the model as it learns, so the unlearning set never goes stale; in a triggered copy
    it is the perturbation against the model at that time. `net` takes [0, 1] pixels (the Normalized wrapper).
    """

    kind = "targeted-perturbation"

    def __init__(self, target: int, net: nn.Module, generator: torch.Generator, eps: float = 0.1, steps: int = 5):
        super().__init__(target)
        self.net, self.generator, self.eps, self.steps = net, generator, float(eps), int(steps)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) == 0:
            return x.clone()
        device = next(self.net.parameters()).device
        xd = x.to(device, torch.float32)
        start = (torch.rand(1, *x.shape[1:], generator=self.generator) * 2 - 1) * self.eps
        delta = start.to(device)
        goal = torch.full((len(x),), self.target, device=device)
        step = 2.5 * self.eps / max(self.steps, 1)
        # its own graph: the model's parameters get no gradient from the search, whatever the caller has enabled
        with torch.enable_grad(), eval_mode(self.net):
            for _ in range(self.steps):
                delta.requires_grad_(True)
                loss = F.cross_entropy(self.net((xd + delta).clamp(0, 1)), goal)
                (grad,) = torch.autograd.grad(loss, delta)
                delta = (delta.detach() - step * grad.sign()).clamp(-self.eps, self.eps)
        return (xd + delta.detach()).clamp(0, 1).to(x.device, x.dtype)

    def spec(self):
        return {"kind": self.kind, "target": self.target, "eps": self.eps, "steps": self.steps}


def with_agnostic(unlearn: Trigger, net: nn.Module, target: int, cfg: SanitizeConfig,
                  generator: torch.Generator) -> Trigger:
    """`unlearn` with `cfg.agnostic_share` of the images given to a TargetedPerturbation toward `target` instead
    (`unlearn` itself when the share is 0)."""
    if not cfg.agnostic_share:
        return unlearn
    source = TargetedPerturbation(target, net, generator, cfg.agnostic_eps, cfg.agnostic_steps)
    return TriggerMix([unlearn, source], generator, weights=[1 - cfg.agnostic_share, cfg.agnostic_share])
