"""The backdoored model as it came: the row every other defense is measured against."""

from __future__ import annotations

import copy

from torch import nn

from gradprune_mlflow.benchmark.registry import Defended, register
from gradprune_mlflow.data.cleanset import CleanSet
from gradprune_mlflow.defense.triggers import Trigger


@register("none", uses_trigger=False, summary="no defense: the backdoored model")
def no_defense(model: nn.Module, clean: CleanSet, trigger: Trigger | None, seed: int) -> Defended:
    return Defended(copy.deepcopy(model).eval())
