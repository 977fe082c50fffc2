"""All-to-all backdoors (the BadNets paper's second attack): a triggered image of class y goes to (y + 1) mod K.

A trigger says which kind it is with `mode`: "all-to-one" (the default of every trigger without the attribute) sends
every triggered image to `.target`; "all-to-all" sends each to `targets(labels)`. The training path and the metrics
(defense.metrics.backdoor_targets) read the mode, so any trigger can be made all-to-all by wrapping it.
"""

from __future__ import annotations

from typing import Any

import torch

from gradprune_mlflow.defense.triggers import Trigger


class AllToAllTrigger(Trigger):
    """`base`'s pixels, with the label of a triggered image of class y shifted to (y + shift) mod num_classes.

    `.target` is kept as the base trigger's, for code that needs one class; it is not where the backdoor sends images.
    """

    mode = "all-to-all"

    def __init__(self, base: Trigger, num_classes: int = 10, shift: int = 1):
        super().__init__(base.target)
        if int(num_classes) < 2 or int(shift) % int(num_classes) == 0:
            raise ValueError("all-to-all needs num_classes >= 2 and a shift that is not a multiple of it")
        self.base, self.num_classes, self.shift = base, int(num_classes), int(shift)
        self.kind = base.kind

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.base.apply(x)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """The class each triggered image of class `labels` is sent to."""
        return (labels + self.shift) % self.num_classes

    def spec(self) -> dict[str, Any]:
        return {**self.base.spec(), "mode": self.mode, "num_classes": self.num_classes, "shift": self.shift}
