"""Train (possibly backdoored) classifiers: the attacker's side, for tests, the demo and the benchmark."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.triggers import Trigger, poison


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


def train_backdoored(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    trigger: Trigger,
    *,
    poison_rate: float = 0.1,
    seed: int = 0,
    **train_kwargs,
) -> nn.Module:
    """Poison `poison_rate` of the training set all-to-one with `trigger`, then train on it (BadNets-style)."""
    poisoned_x, poisoned_y, _ = poison(images, labels, trigger, poison_rate, seed=seed)
    return train_classifier(model, poisoned_x, poisoned_y, seed=seed, **train_kwargs)
