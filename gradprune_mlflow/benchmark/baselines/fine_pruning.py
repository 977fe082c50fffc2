"""Fine-pruning (Liu, Dolan-Gavitt and Garg, RAID 2018): prune dormant channels, then fine-tune.

Channels of the last feature map are pruned in increasing order of their mean activation on clean images (backdoor
neurons sleep on clean data); pruning stops before the validation clean accuracy falls more than 4 points below the
original (the paper's threshold, measured here on the trusted validation split only; never finer than one validation
image); then the network is fine-tuned on the clean images with the pruned channels held at zero, keeping the epoch
with the best validation accuracy.
"""

from __future__ import annotations

import copy

from torch import nn

from gradprune_mlflow.benchmark.baselines.feature_map import ChannelMask, last_feature_module, mean_activations
from gradprune_mlflow.benchmark.baselines.training import allowed_drop, sgd_finetune
from gradprune_mlflow.benchmark.baselines.training import device_of as _device
from gradprune_mlflow.benchmark.registry import Defended, register
from gradprune_mlflow.data.cleanset import CleanSet
from gradprune_mlflow.defense.metrics import accuracy
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.triggers import Trigger

MAX_ACC_DROP = 0.04  # the paper's stopping rule


@register("fine-pruning", uses_trigger=False, summary="fine-pruning: dormant last-layer channels, then fine-tuning")
def fine_pruning(model: nn.Module, clean: CleanSet, trigger: Trigger | None, seed: int) -> Defended:
    train, val = clean.split(0.1, seed)
    work = copy.deepcopy(model).float().eval()
    net = Normalized(work, clean.meta.mean, clean.meta.std).to(_device(work))
    name = last_feature_module(net, train.images[:2])
    module = net.get_submodule(name)
    order = mean_activations(net, module, train.images).argsort()  # most dormant first
    mask = ChannelMask(module, len(order))
    base, pruned, limit = accuracy(net, val), 0, allowed_drop(val, MAX_ACC_DROP)
    for k in range(1, len(order)):  # never the last channel: the net would be constant
        mask.keep[order[k - 1]] = 0.0
        if accuracy(net, val) < base - limit:
            mask.keep[order[k - 1]] = 1.0
            break
        pruned = k
    # The fine-tuning here is to win back what pruning cost: keep the epoch with the best validation accuracy.
    epoch = sgd_finetune(net, train, val, seed=seed, score=lambda m: accuracy(m, val))
    return Defended(work, {"pruned": pruned, "finetune_epochs": epoch, "layer": name.removeprefix("model.")})

