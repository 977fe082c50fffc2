"""The pruning loop: score filters by the unlearning gradient, remove the highest, stop on the validation split.

- paper mode (the authors' loop): one filter per step, gradients recomputed every step, raw scores ranked globally,
  best state by validation unlearning loss with patience.
- fast mode: scores normalised within each layer, several filters per step with an adaptive step size (doubled while
  the validation unlearning loss keeps falling, halved when a step breaks the accuracy budget, which is then undone),
  and a clean-accuracy drop budget on the validation split.

Both keep the best state seen (lowest validation unlearning loss within the budget) and restore it at the end.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.data.cleanset import Split
from gradprune_mlflow.defense.masks import FilterMasks
from gradprune_mlflow.defense.metrics import accuracy, mean_loss
from gradprune_mlflow.defense.progress import Progress
from gradprune_mlflow.defense.scores import MeanAbsGrad, ranked_filters
from gradprune_mlflow.defense.unlearning import unlearning_gradients


@dataclass
class PruneOutcome:
    """How pruning went: passes = gradient passes over the scoring set; curve = one row per step."""

    passes: int = 0
    best_step: int = 0
    curve: list[dict[str, Any]] = field(default_factory=list)


def _pick(ranked: list[tuple[float, str, int]], masks: FilterMasks, count: int) -> dict[str, list[tuple[int, float]]]:
    """The `count` best-ranked filters, never taking a layer's last unpruned filter."""
    alive = {name: int((~p).sum()) for name, p in masks.pruned.items()}
    chosen: dict[str, list[tuple[int, float]]] = defaultdict(list)
    taken = 0
    for score, layer, idx in ranked:
        if taken == count:
            break
        if alive[layer] - len(chosen[layer]) > 1:
            chosen[layer].append((idx, score))
            taken += 1
    return chosen


def prune(
    net: nn.Module,
    masks: FilterMasks,
    train_triggered: Split,
    val_clean: Split,
    val_triggered: Split,
    cfg: SanitizeConfig,
    progress: Progress,
) -> PruneOutcome:
    """Prune `net` in place (through `masks`) and leave it at the best state. Uses validation data only to stop."""
    paper = cfg.mode == "paper"
    importance = MeanAbsGrad()
    limit = int(cfg.max_prune_fraction * masks.total)
    base_acc = accuracy(net, val_clean, cfg.batch_size)
    # A validation split of n images moves in steps of 1/n: a budget finer than that is noise.
    budget = None if paper else max(cfg.acc_drop_budget, 1.0 / max(len(val_clean), 1))
    out = PruneOutcome()
    best_loss = mean_loss(net, val_triggered.images, val_triggered.labels, cfg.batch_size)
    best = (copy.deepcopy(net.state_dict()), masks.state())
    out.curve.append({"step": 0, "pruned": 0, "val_clean_accuracy": base_acc, "val_unlearning_loss": best_loss})
    step_size = 1 if paper else max(1, round(cfg.step_fraction * masks.total))
    since_best, step, reported = 0, 0, 0
    progress.phase("pruning", limit)
    while masks.count < limit and since_best < cfg.resolved("prune_patience"):
        unlearning_gradients(net, train_triggered, cfg.batch_size)
        out.passes += 1
        ranked = ranked_filters(masks, importance, layer_norm=not paper)
        chosen = _pick(ranked, masks, min(step_size, limit - masks.count))
        if not chosen:
            break
        step += 1
        before = (copy.deepcopy(net.state_dict()), masks.state()) if budget is not None else None
        for layer, picks in chosen.items():
            masks.prune(layer, [i for i, _ in picks], step, [s for _, s in picks])
        acc = accuracy(net, val_clean, cfg.batch_size)
        loss = mean_loss(net, val_triggered.images, val_triggered.labels, cfg.batch_size)
        row = {"step": step, "pruned": masks.count, "val_clean_accuracy": acc, "val_unlearning_loss": loss}
        if budget is not None and acc < base_acc - budget:
            # Over budget: undo this step and try a smaller one; at one filter a step, the budget is reached.
            net.load_state_dict(before[0])
            masks.load_state(before[1])
            out.curve.append({**row, "undone": True})
            if step_size == 1:
                break
            step_size = max(1, step_size // 2)
            continue
        out.curve.append(row)
        progress.advance(masks.count - reported, val_acc=round(acc, 4), val_unlearn=round(loss, 4))
        reported = masks.count
        if loss < best_loss - 1e-4:
            best_loss, best, out.best_step, since_best = loss, (copy.deepcopy(net.state_dict()), masks.state()), step, 0
            if not paper:
                step_size *= 2
        else:
            since_best += 1
    net.load_state_dict(best[0])
    masks.load_state(best[1])
    return out

