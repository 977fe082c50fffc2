"""Fine-tuning after pruning: clean CE + triggered CE with TRUE labels, masks held, early stopping on validation.

Triggered copies are essential: with clean images alone, the backdoor came back. BatchNorm layers stay in eval mode,
so their running statistics are never re-estimated from triggered images (a defect of the reference code) and a
few hundred trusted images cannot drift them. Fast mode adds a distillation term: the sanitized model's clean-image
predictions are pulled towards the original model's (soft targets carry more than 900 hard labels do). It keeps
enough clean accuracy to weight the triggered CE twice and fine-tune longer (docs/algorithm.md, "Fast and paper
mode"). Early stopping looks at the validation loss
clean + triggered (fast mode) or clean only (paper mode, as the paper does; it can pick the untouched model); the
`early_stop` setting chooses either in any mode.

Fast mode also pushes triggered images of the other classes away from the target class (`away_from_target`). With
true-label CE alone, triggered images go to the target class about as often as clean ones do (the model's own
confusion, mostly shirts taken for T-shirts on Fashion-MNIST): the backdoor is gone, but a model with no backdoor
sends fewer triggered images there. The term lowers the ASR below that floor; its effect is measured in
benchmarks/RESULTS.md ("The away-from-target term").
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.data.cleanset import Split
from gradprune_mlflow.defense.masks import FilterMasks
from gradprune_mlflow.defense.metrics import mean_loss, training_layout
from gradprune_mlflow.defense.progress import Progress
from gradprune_mlflow.defense.train_precision import train_autocast, train_precision
from gradprune_mlflow.defense.triggers import Trigger


@dataclass
class FinetuneOutcome:
    epochs: int = 0
    best_epoch: int = 0
    passes: int = 0
    precision: str = "fp32"  # what the steps computed in (train_precision resolved: defense/train_precision.py)


def _train_mode_frozen_bn(model: nn.Module) -> None:
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def augment(x: torch.Tensor, generator: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random shifts of up to `shift` pixels and horizontal flips: a few hundred images go further this way.

    Applied to clean images before any trigger, so the trigger stays where it is.
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    dy, dx = (torch.randint(0, 2 * shift + 1, (2, n), generator=generator)).tolist()
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def away_from_target(logits: torch.Tensor, labels: torch.Tensor, target: int) -> torch.Tensor:
    """Mean -log(1 - p_target) over the triggered images whose true class is not the target."""
    keep = labels != target
    if not keep.any():
        return logits.new_zeros(())
    log_p = F.log_softmax(logits[keep].float(), 1)
    # log(1 - p_t) = log(sum of the other classes' probabilities), stable where p_t is near 1
    others = torch.cat([log_p[:, :target], log_p[:, target + 1 :]], 1)
    return -torch.logsumexp(others, 1).mean()


def batch_loss(net: nn.Module, teacher: nn.Module | None, x: torch.Tensor, xt: torch.Tensor, y: torch.Tensor,
               target: int, *, unlearn: float, away: float, distill: float) -> torch.Tensor:
    """One batch's fine-tuning loss: clean CE, `unlearn` x triggered CE (true labels), `away` x away_from_target on the
    triggered images, and `distill` x the KL divergence from the teacher's predictions on the clean ones."""
    clean_logits, trig_logits = net(x), net(xt)
    loss = F.cross_entropy(clean_logits, y) + unlearn * F.cross_entropy(trig_logits, y)
    if away:
        loss = loss + away * away_from_target(trig_logits, y, target)
    if distill:
        with torch.no_grad():
            soft = F.softmax(teacher(x).float(), 1)
        log_p = F.log_softmax(clean_logits.float(), 1)
        loss = loss + distill * F.kl_div(log_p, soft, reduction="batchmean")
    return loss


def validation_loss(net: nn.Module, val_clean: Split, val_triggered: Split, clean_only: bool, batch_size: int) -> float:
    """The early-stopping criterion: clean CE, plus triggered CE unless clean_only."""
    loss = mean_loss(net, val_clean.images, val_clean.labels, batch_size)
    if not clean_only:
        loss += mean_loss(net, val_triggered.images, val_triggered.labels, batch_size)
    return loss


def finetune(
    net: nn.Module,
    masks: FilterMasks | None,
    train: Split,
    trigger: Trigger,
    val_clean: Split,
    val_triggered: Split,
    cfg: SanitizeConfig,
    progress: Progress,
    generator: torch.Generator,
    teacher: nn.Module | None = None,
) -> FinetuneOutcome:
    """Fine-tune `net` in place and leave it at the epoch with the lowest validation loss (epoch 0 included).

    `teacher` is the original (unpruned) model, whose clean predictions fast mode distils from.
    """
    device = next(net.parameters()).device
    clean_only = cfg.early_stop == "clean" or (cfg.early_stop == "auto" and cfg.mode == "paper")
    distill = cfg.resolved("distill_weight") if teacher is not None else 0.0
    unlearn_weight, epochs, patience = (cfg.resolved(n) for n in ("unlearn_weight", "finetune_epochs",
                                                                    "finetune_patience"))
    away = cfg.resolved("away_weight")
    # the teacher only runs forward, which the layout speeds up as well
    with training_layout(net), training_layout(teacher):
        opt = torch.optim.Adam(net.parameters(), lr=cfg.finetune_lr)
        steps = epochs * -(-len(train) // cfg.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
        best_loss = validation_loss(net, val_clean, val_triggered, clean_only, cfg.batch_size)
        best_state = copy.deepcopy(net.state_dict())
        out, since_best = FinetuneOutcome(), 0
        out.precision = train_precision(net, train.images[:8].to(device), cfg.train_precision)
        progress.phase("fine-tuning", epochs)
        for epoch in range(1, epochs + 1):
            _train_mode_frozen_bn(net)
            for idx in torch.randperm(len(train), generator=generator).split(cfg.batch_size):
                x, y = train.images[idx], train.labels[idx].to(device)
                if cfg.finetune_augment:
                    x = augment(x, generator)
                xt = trigger.apply(x).to(device)
                x = x.to(device)
                with train_autocast(device, out.precision):
                    loss = batch_loss(net, teacher, x, xt, y, trigger.target, unlearn=unlearn_weight, away=away,
                                      distill=distill)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                out.passes += 1
                if masks is not None:
                    masks.apply()  # hold the masks: pruned filters cannot regrow
            net.eval()
            out.epochs = epoch
            loss = validation_loss(net, val_clean, val_triggered, clean_only, cfg.batch_size)
            progress.advance(1, val_loss=round(loss, 4))
            if loss < best_loss - 1e-4:
                best_loss, best_state, out.best_epoch, since_best = loss, copy.deepcopy(net.state_dict()), epoch, 0
            else:
                since_best += 1
                if since_best >= patience:
                    break
        net.load_state_dict(best_state)
    net.eval()
    return out
