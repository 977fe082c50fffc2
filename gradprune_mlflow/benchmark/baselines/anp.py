"""Adversarial Neuron Pruning (Wu and Wang, NeurIPS 2021), with the published hyperparameters.

Every BatchNorm channel gets a mask m in [0, 1]. Each step first finds the worst multiplicative perturbation of the
channels (weights scaled by m + delta, biases by 1 + xi, |delta|, |xi| <= eps: one signed-gradient ascent step from a
random start), then moves m to keep the loss low both with the perturbation and without it (weight alpha on the
clean loss). Backdoor neurons are the ones the model is most sensitive to, so their masks fall. Channels whose mask
ends below the threshold have their BatchNorm weight set to zero, as the authors' pruning does (the bias stays).

Deviations: by default BatchNorm layers normalise with their running statistics while the masks are optimised
(`bn="eval"`; every other defense here keeps them frozen), where the authors' code runs the model in training mode,
normalising each batch with its own statistics (`bn="train"`: done on a copy, so the drift of the running statistics
is thrown away, as the authors' pruning step reloads the checkpoint). And if pruning at the published threshold costs
more than MAX_ACC_DROP on the trusted validation split, fewer channels (the lowest masks first) are pruned, chosen on
that split.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from gradprune_mlflow.benchmark.baselines.training import allowed_drop
from gradprune_mlflow.benchmark.baselines.training import device_of as _device
from gradprune_mlflow.benchmark.registry import Defended, register
from gradprune_mlflow.data.cleanset import CleanSet
from gradprune_mlflow.defense.metrics import accuracy
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.triggers import Trigger

# The paper's settings (CIFAR-10): eps 0.4, one ascent step, alpha 0.2, mask lr 0.2 (SGD, momentum 0.9),
# 2000 iterations of batch 128, prune masks below 0.2.
EPS, ALPHA, MASK_LR, ITERATIONS, BATCH, THRESHOLD = 0.4, 0.2, 0.2, 2000, 128, 0.2
MAX_ACC_DROP = 0.05  # Grad-Prune's pruning budget, for a like-for-like comparison


class PerturbedBN:
    """Mask and perturbation of one BatchNorm's channels, applied to its output by a forward hook."""

    def __init__(self, bn: nn.BatchNorm2d):
        n, device = bn.num_features, bn.weight.device
        self.bn = bn
        self.mask = torch.ones(n, device=device, requires_grad=True)
        self.delta = torch.zeros(n, device=device, requires_grad=True)
        self.xi = torch.zeros(n, device=device, requires_grad=True)
        self.perturb = False
        self.handle = bn.register_forward_hook(self._hook)

    def _hook(self, bn: nn.BatchNorm2d, _inp, out: torch.Tensor) -> torch.Tensor:
        # out = gamma * xhat + beta; ANP's layer computes (gamma * coeff_w) * xhat + beta * coeff_b.
        beta = bn.bias.view(1, -1, 1, 1)
        coeff_w = self.mask + self.delta if self.perturb else self.mask
        coeff_b = 1 + self.xi if self.perturb else torch.ones_like(self.xi)
        return (out - beta) * coeff_w.view(1, -1, 1, 1) + beta * coeff_b.view(1, -1, 1, 1)


def optimise_masks(
    net: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int, iterations: int = ITERATIONS,
    bn: str = "eval",
) -> dict[str, torch.Tensor]:
    """Run ANP's min-max optimisation on `net` (unchanged; with bn="train" a copy normalises with batch statistics)
    and return the final mask of every BatchNorm by name."""
    if bn not in ("eval", "train"):
        raise ValueError(f"anp.bn must be 'eval' or 'train', got {bn!r}")
    if bn == "train":
        net = copy.deepcopy(net).train()
    bns = {name: m for name, m in net.named_modules() if isinstance(m, nn.BatchNorm2d) and m.affine}
    if not bns:
        raise ValueError("ANP masks BatchNorm channels and this model has none")
    gen, device = torch.Generator().manual_seed(seed), next(net.parameters()).device
    layers = {name: PerturbedBN(bn) for name, bn in bns.items()}
    masks = [p.mask for p in layers.values()]
    noises = [t for p in layers.values() for t in (p.delta, p.xi)]
    mask_opt = torch.optim.SGD(masks, lr=MASK_LR, momentum=0.9)
    for p in net.parameters():
        p.requires_grad_(False)
    net.train(bn == "train")
    try:
        for _ in range(iterations):
            idx = torch.randint(len(images), (min(BATCH, len(images)),), generator=gen)
            x, y = images[idx].to(device), labels[idx].to(device)
            _set_perturb(layers, True)
            with torch.no_grad():  # random start inside the eps-box, then one signed ascent step of size eps
                for t in noises:
                    t.copy_(torch.empty(t.shape).uniform_(-EPS, EPS, generator=gen))
            grads = torch.autograd.grad(F.cross_entropy(net(x), y), noises)
            with torch.no_grad():
                for t, g in zip(noises, grads, strict=True):
                    t.add_(EPS * g.sign()).clamp_(-EPS, EPS)
            loss_rob = F.cross_entropy(net(x), y)
            _set_perturb(layers, False)
            loss = ALPHA * F.cross_entropy(net(x), y) + (1 - ALPHA) * loss_rob
            mask_opt.zero_grad(set_to_none=True)
            loss.backward()
            mask_opt.step()
            with torch.no_grad():
                for m in masks:
                    m.clamp_(0.0, 1.0)
    finally:
        for p in net.parameters():
            p.requires_grad_(True)
        for layer in layers.values():
            layer.handle.remove()
    return {name: layer.mask.detach().clone() for name, layer in layers.items()}


def _set_perturb(layers: dict[str, PerturbedBN], on: bool) -> None:
    for layer in layers.values():
        layer.perturb = on


def prune_lowest(net: nn.Module, masks: dict[str, torch.Tensor], count: int) -> None:
    """Zero the BatchNorm weight of the `count` channels with the lowest mask values (ANP's pruning)."""
    ranked = sorted((float(v), name, i) for name, m in masks.items() for i, v in enumerate(m.tolist()))
    with torch.no_grad():
        for _, name, i in ranked[:count]:
            net.get_submodule(name).weight[i] = 0.0


@register("anp", uses_trigger=False, summary="adversarial neuron pruning (eps 0.4, alpha 0.2, threshold 0.2)")
def anp(
    model: nn.Module, clean: CleanSet, trigger: Trigger | None, seed: int, iterations: int = ITERATIONS,
    bn: str = "eval", max_drop: float = MAX_ACC_DROP,
) -> Defended:
    """ANP; `iterations` (published: 2000) is the one setting a preset may lower to fit its hardware, `bn` chooses
    the statistics BatchNorm normalises with during the optimisation, and `max_drop` the validation budget of the
    back-off (1 turns it off: every mask below the threshold is pruned, as published; see the module's deviations)."""
    train, val = clean.split(0.1, seed)
    work = copy.deepcopy(model).float().eval()
    net = Normalized(work, clean.meta.mean, clean.meta.std).to(_device(work))
    torch.manual_seed(seed)
    masks = optimise_masks(net, train.images, train.labels, seed, iterations, bn)
    below = sum(int((m < THRESHOLD).sum()) for m in masks.values())
    base, original = accuracy(net, val), copy.deepcopy(work.state_dict())
    count = below
    while count > 0:  # back off (lowest masks kept pruned) while the validation drop is over budget
        work.load_state_dict(original)
        prune_lowest(net, masks, count)
        if accuracy(net, val) >= base - allowed_drop(val, max_drop):
            break
        count = count * 3 // 4
    if count == 0:
        work.load_state_dict(original)
    return Defended(work, {"pruned": count, "below_threshold": below, "iterations": iterations, "bn": bn,
                           "max_drop": max_drop})
