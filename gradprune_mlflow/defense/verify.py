"""Verification: an independent search of the sanitized model for a backdoor that still works.

Trigger-free mode measures its "after" with a trigger from the same search that built the unlearning set, and a model
becomes immune to exactly what it unlearned while the attacker's trigger can survive. So after sanitizing, the
detector runs again from scratch on the sanitized model: every class, every family, both probes, on the validation
split (no synthesis ran on it and no fine-tuning step trained on it), with a generator of its own and its own
search budget (`verify_steps`, `verify_restarts`). It flags with the defense's own thresholds; nothing here is tuned
for it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from gradprune_mlflow.config import verify_steps
from gradprune_mlflow.data.cleanset import Split
from gradprune_mlflow.defense.metrics import attack_metrics
from gradprune_mlflow.defense.probes import find_backdoor
from gradprune_mlflow.defense.progress import Progress
from gradprune_mlflow.defense.triggers import Trigger

# Added to cfg.seed for the verification's generator and noise probe: its draws are not the defense's, and drawing
# them consumes none of the defense's.
SEED_OFFSET = 104_729
# A flagged class fails the verification only when the trigger found for it works: it sends at least this fraction of
# the held-out images of the other classes there. A search on few images can make a class stand out with a trigger
# that works on none of them, and that is no backdoor.
WORKING_RATE = 0.5


@dataclass
class Verification:
    """What the independent search found on the sanitized model. `verdict` is "failed" when it flagged a class and
    the trigger it found for it works (WORKING_RATE)."""

    images: int
    flagged: bool
    target: int
    anomaly_index: float
    flagged_by: str | None
    family: str
    success_rate: float | None  # the found trigger's, on validation images of the other classes
    same_target: bool  # flagged, and at the class the defense flagged
    searched_on: str = "validation"
    steps: int = 0  # the search budget: steps of each family's search, and restarts
    restarts: int = 0

    @property
    def verdict(self) -> str:
        works = self.success_rate is None or self.success_rate >= WORKING_RATE
        return "failed" if self.flagged and works else "passed"

    def to_report(self) -> dict[str, Any]:
        rate = None if self.success_rate is None else round(self.success_rate, 4)
        return {"verdict": self.verdict, "searched_on": self.searched_on, "images": self.images,
                "flagged": self.flagged, "class": self.target, "anomaly_index": round(self.anomaly_index, 4),
                "flagged_by": self.flagged_by, "family": self.family, "synthesized_trigger_success_rate": rate,
                "same_target": self.same_target, "steps": self.steps, "restarts": self.restarts}


def verify(net: nn.Module, val: Split, num_classes: int, cfg, progress: Progress, *,
           defended_target: int | None = None) -> Verification:
    """Search `net` (taking [0, 1] pixels) for a remaining backdoor on `val`; `net` itself is not touched.

    `cfg` is the run's SanitizeConfig: its thresholds are the defense's, its search budget the verification's own
    (verify_steps, verify_restarts), its seed is offset.
    `defended_target` is the class the defense flagged, to say whether the same class is found again.
    """
    seed = cfg.seed + SEED_OFFSET
    generator = torch.Generator().manual_seed(seed)
    # find_backdoor searches a frozen copy of `net`; the found trigger is measured on `net` itself (eval mode, no
    # gradients), so the rate is the sanitized model's own
    # one reading of the evidence at the end of its budget: an early flag would only end a failing search sooner
    budget = replace(cfg, seed=seed, synth_steps=verify_steps(cfg), synth_restarts=cfg.verify_restarts,
                     decisive_score=None)
    detection, results, hit, _, _ = find_backdoor(net, val, num_classes, budget, generator, progress)
    if hit is not None:
        trigger: Trigger = hit.trigger
    else:
        family = next(r for r in results if r.family == detection.family)
        trigger = family.smallest_trigger(detection.target)
    rate = attack_metrics(net, val, trigger)[0]
    return Verification(len(val), detection.flagged, detection.target, detection.anomaly_index,
                        detection.flagged_by, detection.family, rate,
                        detection.flagged and detection.target == defended_target,
                        steps=budget.synth_steps, restarts=budget.synth_restarts)


def report_block(found: Verification | None, *, known: bool, skipped: bool, after: dict[str, Any] | None,
                 measured_with: str) -> dict[str, Any]:
    """report.json's `verification`: the search's result, or why none ran. With a known trigger the real trigger's
    success rate on the sanitized model (`after`) is the verification: verdict "measured"."""
    if found is not None:
        return found.to_report()
    if known:
        return {"verdict": "measured", "with": f"{measured_with} trigger",
                "attack_success_rate": (after or {}).get("attack_success_rate")}
    if skipped:
        return {"verdict": "not run", "reason": "no model was written (nothing flagged, on_clean=skip)"}
    return {"verdict": "not run", "reason": "turned off (verify=false)"}
