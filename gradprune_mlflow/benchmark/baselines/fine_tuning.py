"""Fine-tuning: plain SGD on the trusted clean images, the cheapest thing a practitioner tries first."""

from __future__ import annotations

import copy

from torch import nn

from gradprune_mlflow.benchmark.baselines.training import device_of as _device
from gradprune_mlflow.benchmark.baselines.training import sgd_finetune
from gradprune_mlflow.benchmark.registry import Defended, register
from gradprune_mlflow.data.cleanset import CleanSet
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.triggers import Trigger


@register("fine-tuning", uses_trigger=False, summary="fine-tuning on the clean set (SGD lr 0.01)")
def fine_tuning(model: nn.Module, clean: CleanSet, trigger: Trigger | None, seed: int) -> Defended:
    train, val = clean.split(0.1, seed)
    work = copy.deepcopy(model).float().eval()
    epoch = sgd_finetune(Normalized(work, clean.meta.mean, clean.meta.std).to(_device(work)), train, val, seed=seed)
    return Defended(work, {"finetune_epochs": epoch})
