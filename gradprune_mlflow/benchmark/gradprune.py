"""Grad-Prune in the benchmark: the three modes of `sanitize` and the ablations that show what each half is worth.

Every variant goes through the same front door as the CLI and the flows. Trigger-free runs use
`on_clean="sanitize"`: the benchmark measures what unlearning achieves when the detector misses, and the `flagged`
column says when it did. `grad-prune-detect` runs the product default (`skip`): a model nothing was flagged in comes
back as given, which is what a registry's clean models see.
"""

from __future__ import annotations

from torch import nn

from gradprune_mlflow.api import sanitize
from gradprune_mlflow.benchmark.registry import Defended, register
from gradprune_mlflow.data.cleanset import CleanSet
from gradprune_mlflow.defense.triggers import Trigger

# name -> (uses the known trigger?, SanitizeConfig overrides, summary)
VARIANTS = {
    "grad-prune-paper": (True, {"mode": "paper"}, "Grad-Prune, the authors' loop, known trigger"),
    "grad-prune-fast": (True, {"mode": "fast"}, "Grad-Prune fast mode, known trigger"),
    "grad-prune-free": (False, {"mode": "fast"}, "Grad-Prune fast mode, trigger-free (synthesized triggers)"),
    "grad-prune-detect": (False, {"mode": "fast", "on_clean": "skip"},
                          "Grad-Prune trigger-free as the product runs it: unflagged models are left as given"),
    "unlearn-ft-known": (True, {"stages": "finetune"}, "ablation: unlearning fine-tuning only, known trigger"),
    "unlearn-ft-free": (False, {"stages": "finetune"}, "ablation: unlearning fine-tuning only, synthesized trigger"),
    "prune-only-known": (True, {"stages": "prune"}, "ablation: gradient pruning only, known trigger"),
    "prune-only-free": (False, {"stages": "prune"}, "ablation: gradient pruning only, synthesized trigger"),
}


def _variant(overrides: dict):
    def run(model: nn.Module, clean: CleanSet, trigger: Trigger | None, seed: int, **options) -> Defended:
        result = sanitize(model, clean, trigger, seed=seed, **{"on_clean": "sanitize", **overrides, **options})
        rep, det = result.report, result.report["detection"] or {}
        score = det.get("score") or {}
        # on_clean="skip" and nothing flagged: no sanitized model, the registry keeps the one given
        return Defended(result.model if result.model is not None else model, {
            "pruned": rep["pruned_filters"], "finetune_epochs": rep["finetune_epochs"],
            # report.json's gradient_passes: passes of the unlearning loss over the scoring set while pruning
            "scoring_passes": rep["gradient_passes"],
            "flagged": det.get("flagged", ""), "detected_target": det.get("target", ""),
            "anomaly_index": det.get("anomaly_index", ""),
            # the flag score (the detection table's score) and its verdict: flagged, suspect or clean
            "flag_score": score.get("value", ""), "verdict": score.get("verdict", ""),
            # where the evidence was read: half of synth_steps for an early flag (docs/algorithm.md)
            "search_steps": det.get("search_steps", ""),
            # the independent search after sanitizing (defense/verify.py): passed, failed, measured or not run
            "verification": (rep.get("verification") or {}).get("verdict", ""),
            "timings": rep["timings"],  # seconds per phase (report.json's)
            # the distillation weight fine-tuning used: lower where warps were unlearned (report.json's)
            "distill_weight": rep["distill_weight"],
            "away_weight": rep["away_weight"],  # 0 where trigger-free mode flagged nothing (report.json's)
        })

    return run


for _name, (_known, _over, _summary) in VARIANTS.items():
    register(_name, uses_trigger=_known, summary=_summary)(_variant(_over))
