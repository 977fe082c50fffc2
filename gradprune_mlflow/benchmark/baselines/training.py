"""The fine-tuning loop the baselines share: SGD on the trusted train split, model chosen on the validation split.

Same choices as Grad-Prune's fine-tuner where the papers leave room, so that differences in the table come from the
methods: BatchNorm statistics frozen (a few hundred images cannot re-estimate them), the same random shifts and flips,
and the epoch kept is the best by a validation score (epoch 0, the model as given, included).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from gradprune_mlflow.data.cleanset import Split
from gradprune_mlflow.defense.finetune import _train_mode_frozen_bn, augment
from gradprune_mlflow.defense.metrics import accuracy, training_layout

# Liu et al. 2018 and the BackdoorBench baselines fine-tune with SGD, lr 0.01, momentum 0.9, weight decay 5e-4.
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4
EPOCHS, PATIENCE, BATCH = 20, 5, 128
# Clean fine-tuning keeps its last epoch within this validation accuracy drop: the budget Grad-Prune's pruning and
# ANP get. (At 2 points, lr 0.01 on a 900-image set kept no epoch of the Fashion-MNIST CNN: it stayed untouched.)
MAX_ACC_DROP = 0.05

# step(net, optimizer, images, labels): one optimisation step on a batch (the default: plain cross-entropy SGD).
Step = Callable[[nn.Module, torch.optim.Optimizer, torch.Tensor, torch.Tensor], None]


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters live: the runner puts the model on the benchmark's device before a defense."""
    return next(model.parameters()).device


def sgd_finetune(
    net: nn.Module,
    train: Split,
    val: Split,
    *,
    seed: int,
    stamp: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    score: Callable[[nn.Module], float] | None = None,
    epochs: int = EPOCHS,
    step: Step | None = None,
) -> int:
    """Fine-tune `net` (taking [0, 1] pixels) in place with clean cross-entropy; return the epoch kept.

    `stamp(x, gen)` may return a batch with some images triggered (labels stay true: unlearning); `score(net)` is then
    the validation score to maximise, with early stopping, and the best epoch is kept. Without a score (clean
    fine-tuning, which has no signal of the backdoor on clean data) the whole schedule runs and the last epoch whose
    validation accuracy stays within MAX_ACC_DROP of the original is kept: keeping the best clean accuracy would
    keep the untouched model most of the time. `step(net, opt, x, y)` replaces the plain cross-entropy step (FT-SAM).
    """
    with training_layout(net):
        if score is None:
            return _finetune_latest_within(net, train, val, seed=seed, epochs=epochs, step=step)
        return _finetune_best(net, train, val, seed=seed, stamp=stamp, score=score, epochs=epochs, step=step)


def _finetune_best(net: nn.Module, train: Split, val: Split, *, seed: int,
                   stamp: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None,
                   score: Callable[[nn.Module], float], epochs: int, step: Step | None) -> int:
    gen = torch.Generator().manual_seed(seed)
    device = next(net.parameters()).device
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    net.eval()
    best, best_state, best_epoch, since = score(net), copy.deepcopy(net.state_dict()), 0, 0
    for epoch in range(1, epochs + 1):
        _epoch(net, opt, train, gen, device, stamp, step)
        sched.step()
        now = score(net)
        if now > best + 1e-6:
            best, best_state, best_epoch, since = now, copy.deepcopy(net.state_dict()), epoch, 0
        else:
            since += 1
            if since >= PATIENCE:
                break
    net.load_state_dict(best_state)
    net.eval()
    return best_epoch


def allowed_drop(val: Split, drop: float) -> float:
    """An accuracy-drop budget no finer than one validation image (a 20-image split moves in 5-point steps)."""
    return max(drop, 1.0 / max(len(val), 1))


def _finetune_latest_within(net: nn.Module, train: Split, val: Split, *, seed: int, epochs: int,
                            step: Step | None) -> int:
    gen = torch.Generator().manual_seed(seed)
    device = next(net.parameters()).device
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    net.eval()
    floor = accuracy(net, val) - allowed_drop(val, MAX_ACC_DROP)
    kept_state, kept_epoch = copy.deepcopy(net.state_dict()), 0
    for epoch in range(1, epochs + 1):
        _epoch(net, opt, train, gen, device, None, step)
        sched.step()
        if accuracy(net, val) >= floor:
            kept_state, kept_epoch = copy.deepcopy(net.state_dict()), epoch
    net.load_state_dict(kept_state)
    net.eval()
    return kept_epoch


def cross_entropy_step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One plain SGD step on the batch's cross-entropy."""
    loss = F.cross_entropy(net(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _epoch(net, opt, train: Split, gen: torch.Generator, device, stamp, step: Step | None = None) -> None:
    """One epoch of SGD on the train split (BatchNorm frozen), leaving the net in eval mode."""
    _train_mode_frozen_bn(net)
    for idx in torch.randperm(len(train), generator=gen).split(BATCH):
        x = augment(train.images[idx], gen)
        if stamp is not None:
            x = stamp(x, gen)
        (step or cross_entropy_step)(net, opt, x.to(device), train.labels[idx].to(device))
    net.eval()
