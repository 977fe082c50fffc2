"""How well the trigger-free detectors tell clean models from backdoored ones: scores, ROC, AUROC and rates.

Clean models (attack "clean") are the negatives, backdoored ones the positives. A detector's score is Grad-Prune's
flag score (docs/algorithm.md) or Neural Cleanse's anomaly index; its decision is its own `flagged`, and Grad-Prune's
`suspect` verdict (a score between its suspect and flag thresholds) is counted apart. The right-target rate counts
flagged models whose flagged class is the attack's real target; all-to-all attacks have no single target and are
counted apart.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from gradprune_mlflow.benchmark.presets import CLEAN
from gradprune_mlflow.defense.metrics import is_all_to_all

# Trigger-free defenses that report a detection, and the info key of their score.
SCORES = {"neural-cleanse": "anomaly_index", "grad-prune-free": "flag_score", "grad-prune-detect": "flag_score",
          "unlearn-ft-free": "flag_score", "prune-only-free": "flag_score"}
ALL_TO_ALL = "all-to-all"


@dataclass(frozen=True)
class Case:
    """One defended model as its detector saw it."""

    arch: str
    attack: str
    seed: str
    per_class: int
    score: float | None
    flagged: bool
    detected: int | None  # the class flagged (or the top-scoring one)
    target: int | str | None  # the attack's target class, ALL_TO_ALL, or None for a clean model
    suspect: bool = False  # not flagged, but the score is in the suspect band
    asr: tuple[float | None, float | None] = (None, None)  # the real trigger's, before and after
    accuracy: tuple[float | None, float | None] = (None, None)  # clean accuracy before and after
    verification: str | None = None  # the verification's verdict, where one ran

    @property
    def positive(self) -> bool:
        return self.target is not None


@cache
def attack_target(attack: str) -> int | str | None:
    """The class an attack sends triggered images to; ALL_TO_ALL for all-to-all attacks; None for clean models."""
    if attack == CLEAN:
        return None
    from gradprune_mlflow import lab  # only for rows with attacks: the tables stay importable without data

    trigger = lab.attack_trigger(attack)
    return ALL_TO_ALL if is_all_to_all(trigger) else int(trigger.target)


def _float(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def cases(rows: list[dict[str, str]], defense: str, target=attack_target) -> list[Case]:
    """The rows of `defense` that carry a detection (errors and rows without `flagged` left out)."""
    out = []
    for r in rows:
        if r["defense"] != defense or r.get("error") or str(r.get("flagged")) not in ("True", "False"):
            continue
        info = json.loads(r.get("info") or "{}")
        detected = info.get("detected_target")
        out.append(Case(r["arch"], r["attack"], str(r["seed"]), int(r["per_class"]),
                        _float(info.get(SCORES.get(defense, "anomaly_index"))), str(r["flagged"]) == "True",
                        int(detected) if isinstance(detected, int | float) else None, target(r["attack"]),
                        info.get("verdict") == "suspect", (_float(r.get("asr_before")), _float(r.get("asr"))),
                        (_float(r.get("acc_before")), _float(r.get("clean_acc"))), info.get("verification")))
    return out


def auroc(negatives: list[float], positives: list[float]) -> float | None:
    """Area under the ROC curve by the rank formula (ties share their mean rank); None without both classes.

    The chance that a backdoored model scores above a clean one, ties counting one half.
    """
    if not negatives or not positives:
        return None
    scored = sorted([(s, 0) for s in negatives] + [(s, 1) for s in positives])
    rank_sum, i = 0.0, 0
    while i < len(scored):
        j = i
        while j < len(scored) and scored[j][0] == scored[i][0]:
            j += 1
        mean_rank = (i + 1 + j) / 2  # ranks i+1 .. j share their mean
        rank_sum += mean_rank * sum(label for _, label in scored[i:j])
        i = j
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def roc(negatives: list[float], positives: list[float]) -> list[tuple[float, float]]:
    """(false-positive rate, true-positive rate) for every threshold "score >= t", from (0, 0) to (1, 1)."""
    if not negatives or not positives:
        return []
    def above(scores: list[float], t: float) -> float:
        return sum(s >= t for s in scores) / len(scores)

    return [(0.0, 0.0)] + [(above(negatives, t), above(positives, t))
                           for t in sorted(set(negatives) | set(positives), reverse=True)]


def rates(group: list[Case]) -> dict:
    """Counts, AUROC and the rates at the detector's own threshold (its `flagged`) over one group of cases."""
    neg = [c for c in group if not c.positive]
    pos = [c for c in group if c.positive]
    one = [c for c in pos if c.target != ALL_TO_ALL]
    many = [c for c in pos if c.target == ALL_TO_ALL]

    def share(flags: list[bool]) -> tuple[int, int]:
        return sum(flags), len(flags)

    return {
        "clean": len(neg), "backdoored": len(pos),
        "auroc": auroc([c.score for c in neg if c.score is not None], [c.score for c in pos if c.score is not None]),
        "false_positive": share([c.flagged for c in neg]),
        "detected": share([c.flagged for c in pos]),
        "suspect": (sum(c.suspect for c in neg), sum(c.suspect for c in pos)),
        "right_target": share([c.flagged and c.detected == c.target for c in one]),
        "all_to_all_flagged": share([c.flagged for c in many]),
    }


def _change(pair: tuple[float | None, float | None]) -> str:
    """"95.7 -> 2.2" in percent, "" where either side is missing."""
    before, after = pair
    return "" if before is None or after is None else f"{100 * before:.1f} -> {100 * after:.1f}"


def _frac(pair: tuple[int, int]) -> str:
    k, n = pair
    return f"{k}/{n} ({100 * k / n:.0f}%)" if n else "n/a"


def markdown(rows: list[dict[str, str]], roc_name: str | None) -> str:
    """The detection table per defense and clean budget, the ROC plot's link (when there is one: a ROC needs clean and
    backdoored models) and every model's score."""
    present = [d for d in SCORES if any(r["defense"] == d for r in rows)]
    if not present:
        return "No trigger-free defense with a detection in these rows."
    curves = f" ROC curves: [{roc_name}]({roc_name})." if roc_name else ""
    lines = [f"Clean models are the negatives, backdoored ones the positives; score: Grad-Prune's flag score, Neural "
             f"Cleanse's anomaly index. False positives and detections at each defense's own threshold (`flagged`); "
             f"`suspect` (clean / backdoored): neither flagged nor clean.{curves}", "",
             "| defense | per class | clean / backdoored | AUROC | false positives | detected | suspect | right target "
             "(all-to-one) | flagged (all-to-all) |", "|---|---|---|---|---|---|---|---|---|"]
    listing = []
    for d in present:
        by_budget: dict[int, list[Case]] = defaultdict(list)
        for c in cases(rows, d):
            by_budget[c.per_class].append(c)
            listing.append(f"| {d} | {c.arch} | {c.attack} | {c.seed} | {c.per_class} | "
                           f"{'n/a' if c.score is None else f'{c.score:.3f}'} | "
                           f"{'suspect' if c.suspect else c.flagged} | "
                           f"{'' if c.detected is None else c.detected} | {'' if c.target is None else c.target} | "
                           f"{_change(c.asr) if c.positive else ''} | {_change(c.accuracy)} | {c.verification or ''} |")
        for n, group in sorted(by_budget.items()):
            s = rates(group)
            area = "n/a" if s["auroc"] is None else f"{s['auroc']:.3f}"
            lines.append(f"| {d} | {n} | {s['clean']} / {s['backdoored']} | {area} | {_frac(s['false_positive'])} | "
                         f"{_frac(s['detected'])} | {s['suspect'][0]} / {s['suspect'][1]} | "
                         f"{_frac(s['right_target'])} | {_frac(s['all_to_all_flagged'])} |")
    lines += ["", "<details><summary>Every model's score</summary>", "",
              "| defense | model | attack | seed | per class | score | flagged | flagged class | target | ASR % | "
              "accuracy % | verification |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|", *listing, "", "</details>"]
    return "\n".join(lines)


def plot(rows: list[dict[str, str]], path: Path) -> Path | None:
    """ROC curves, one per detecting defense (all budgets pooled); None when no defense has both classes."""
    curves = {}
    for d in SCORES:
        group = [c for c in cases(rows, d) if c.score is not None]
        neg, pos = [c.score for c in group if not c.positive], [c.score for c in group if c.positive]
        points = roc(neg, pos)
        if points:
            curves[d] = (points, auroc(neg, pos))
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for d, (points, area) in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=f"{d} (AUROC {area:.2f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set(xlabel="false-positive rate (clean models)", ylabel="true-positive rate (backdoored models)",
           title="Detection ROC (flag score; NC: anomaly index)", xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
