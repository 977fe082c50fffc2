"""What a sanitize run returns: `SanitizeResult`, and the report.json schema version it carries.

The pipeline builds it and the front door (gradprune_mlflow.api) re-exports it, so neither imports the other's
module to name it. The report's fields are described in docs/contracts.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from gradprune_mlflow.defense.triggers import Trigger

# report.json's "schema": raised when a field changes meaning or goes away.
SCHEMA = 1


@dataclass
class SanitizeResult:
    """What a sanitize run produced. Unpacks as `model, report = sanitize(...)`.

    - model: the sanitized nn.Module (masks folded into plain weights), or None when trigger-free mode flagged
      nothing and `on_clean="skip"`.
    - report: the report.json dict (schema SCHEMA; see docs/contracts.md).
    - history: the pruning history, one dict per pruned filter: {"layer", "filter", "step", "score"}.
    - curve: the pruning curve, one dict per pruning step: {"step", "pruned", "val_clean_accuracy",
      "val_unlearning_loss"}.
    - triggers: the synthesized triggers worth showing (mask triggers and warps), empty in known-trigger mode.
    """

    model: nn.Module | None
    report: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)
    triggers: list[Trigger] = field(default_factory=list)

    def __iter__(self):
        return iter((self.model, self.report))
