"""Train (possibly backdoored) classifiers: the attacker's side, for tests, the demo and the benchmark."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from gradprune_mlflow.defense.metrics import backdoor_targets, is_all_to_all
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.triggers import Trigger


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    device: str = "cpu",
    on_epoch: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train `model` in place with Adam on [0, 1] images (normalised with mean/std) and return it in eval mode."""
    torch.manual_seed(seed)
    model.to(device).train()
    net = Normalized(model, mean, std).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * -(-len(labels) // batch_size))
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        total = 0.0
        for idx in torch.randperm(len(labels), generator=gen).split(batch_size):
            x, y = images[idx].to(device), labels[idx].to(device)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if on_epoch:
            on_epoch(epoch, total / len(labels))
    return model.eval()


def poison_set(
    images: torch.Tensor,
    labels: torch.Tensor,
    trigger: Trigger,
    rate: float,
    *,
    seed: int = 0,
    clean_label: bool = False,
    noise_ratio: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Poison a training set; returns new (images, labels, poisoned indices).

    `rate` is a fraction of all samples. By default the poisoned samples are drawn among those the backdoor moves
    (not of the target class; every class for an all-to-all trigger) and relabelled to the backdoor's target.
    `clean_label` draws them among the target class instead (at most all of it) and keeps every label. `noise_ratio`
    > 0 is WaNet's noise mode: round(noise_ratio * poisoned) other samples get `trigger.noisy(x, generator)` and keep
    their true labels.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"poison rate must be in [0, 1], got {rate}")
    if clean_label and is_all_to_all(trigger):
        raise ValueError("a clean-label attack needs one target class; an all-to-all trigger has none")
    if noise_ratio < 0 or (noise_ratio > 0 and not hasattr(trigger, "noisy")):
        raise ValueError(f"noise_ratio must be >= 0, and > 0 only for a trigger with a noise mode ({trigger.kind})")
    gen = torch.Generator().manual_seed(seed)
    if clean_label:
        candidates = torch.nonzero(labels == trigger.target).flatten()
    elif is_all_to_all(trigger):
        candidates = torch.arange(len(labels))
    else:
        candidates = torch.nonzero(labels != trigger.target).flatten()
    count = min(len(candidates), int(round(rate * len(labels))))
    chosen = candidates[torch.randperm(len(candidates), generator=gen)[:count]]
    images, labels = images.clone(), labels.clone()
    images[chosen] = trigger.apply(images[chosen])
    if not clean_label:
        labels[chosen] = backdoor_targets(trigger, labels[chosen])
    if noise_ratio > 0:
        rest = torch.ones(len(labels), dtype=torch.bool)
        rest[chosen] = False
        rest = torch.nonzero(rest).flatten()
        noisy = rest[torch.randperm(len(rest), generator=gen)[: min(len(rest), int(round(noise_ratio * count)))]]
        images[noisy] = trigger.noisy(images[noisy], gen)
    return images, labels, chosen


def train_backdoored(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    trigger: Trigger,
    *,
    poison_rate: float = 0.1,
    seed: int = 0,
    clean_label: bool = False,
    noise_ratio: float = 0.0,
    **train_kwargs,
) -> nn.Module:
    """Poison `poison_rate` of the training set with `trigger` (see poison_set), then train on it (BadNets-style)."""
    poisoned_x, poisoned_y, _ = poison_set(images, labels, trigger, poison_rate, seed=seed, clean_label=clean_label,
                                           noise_ratio=noise_ratio)
    return train_classifier(model, poisoned_x, poisoned_y, seed=seed, **train_kwargs)
