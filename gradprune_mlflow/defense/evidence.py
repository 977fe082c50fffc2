"""The flag decision as one score per class, made from every detector's evidence.

Each detector's evidence for a class is first put on a common scale, its *strength*: the evidence over the detector's
own threshold, so that 1 is where that detector alone would fire. A logistic curve turns a strength into the
detector's *vote* (0.5 at its threshold, `slope` sets how fast it rises), and a class's score is the chance that at
least one vote is right (noisy-or): two detectors close to their thresholds add up, as one far above its own does.
The two whole-image probes (noise and warp) share one vote, the larger of theirs (SHARED).
The model's score is its best class's. At or above `flag_threshold` that class is flagged; between the
`suspect_threshold` (chosen above the scores of the development clean models, docs/algorithm.md) and the flag
threshold the model is *suspect*: no detector is sure, but the evidence is stronger than clean models show.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# The detectors that vote, in the order a tie is broken (the patch probe's square is the most concrete trigger).
DETECTORS = ("patch_probe", "noise_probe", "warp_probe", "blend_anomaly")
# Detectors that share one vote, the larger of theirs. The noise and warp probes ask one question (does a whole-image
# perturbation that keeps the content send the other classes here?) with two perturbations; and a logistic vote is
# never 0, so a detector with a vote of its own would raise every class's score, the clean models' that the
# thresholds were chosen above included.
SHARED = (("noise_probe", "warp_probe"),)
# Strengths are capped here so that a report stays finite (any strength this large votes 1).
MAX_STRENGTH = 1000.0


@dataclass(frozen=True)
class Thresholds:
    """Where each detector alone fires, and the score's two thresholds (SanitizeConfig's fields of the same names)."""

    patch_threshold: float
    patch_margin: float
    noise_threshold: float
    warp_threshold: float
    anomaly_threshold: float
    relative_size: float
    flag_slope: float
    flag_threshold: float
    suspect_threshold: float

    @classmethod
    def of(cls, cfg) -> Thresholds:
        """The thresholds of a SanitizeConfig or the evaluator's EvalConfig."""
        return cls(cfg.patch_threshold, cfg.patch_margin, cfg.noise_threshold, cfg.warp_threshold,
                   cfg.anomaly_threshold, cfg.relative_size, cfg.flag_slope, cfg.flag_threshold, cfg.suspect_threshold)


def strengths(patch: Sequence[float], noise: Sequence[float], blend_index: Sequence[float],
              blend_relative: Sequence[float], t: Thresholds, warp: Sequence[float] | None = None,
              plain: Sequence[float] | None = None) -> dict[str, list[float]]:
    """Per detector, per class: its evidence over its own threshold.

    patch: the patch probe's best response of any square; plain: its best of a white or black one. A class's patch
    strength is the stronger of two. Its plain response counts by how far it rises from the median class's toward
    `patch_threshold` (1 at the threshold; where the median class's is 0, the response over the threshold); the
    plain scan tries hundreds of squares, and on some architectures the best of them sends most images of a clean
    model to a class, at every class a little. Its best response counts by how far it stands above the median
    class's, over `patch_margin`: the search fills squares with patterns of its own making, and such a square (a
    natural adversarial patch) can send most images to many classes of a clean model; a backdoor's target stands out
    from them, or answers to a plain stamp. With `plain` None (evidence from before the probe kept it) every square
    counts as plain: its best response over `patch_threshold`.
    noise: the noise probe's response; warp: the warp probe's (None when it
    did not run: the detector is then absent); blend: the class's anomaly index in the
    blend family *and* its blend strength relative to the median class's, which must both pass (an easy natural class
    can have a high index, never also a much weaker blend: probes.decide), so the weaker of the two counts.
    """
    blend = [min(_over(i, t.anomaly_threshold), _over(t.relative_size, r))
             for i, r in zip(blend_index, blend_relative, strict=True)]
    if plain is None:
        by_patch = [_over(p, t.patch_threshold) for p in patch]
    else:
        typical, typical_plain = statistics.median(patch), statistics.median(plain)
        headroom = t.patch_threshold - typical_plain
        by_patch = [max(_over(q - typical_plain, headroom) if headroom > 0 else 0.0,
                        _over(p - typical, t.patch_margin))
                    for p, q in zip(patch, plain, strict=True)]
    out = {"patch_probe": by_patch,
           "noise_probe": [_over(n, t.noise_threshold) for n in noise],
           "blend_anomaly": blend}
    if warp is not None:
        out["warp_probe"] = [_over(w, t.warp_threshold) for w in warp]
    return out


def _over(evidence: float, threshold: float) -> float:
    """evidence / threshold, capped at MAX_STRENGTH (a threshold of 0 always fires)."""
    return min(evidence / threshold, MAX_STRENGTH) if threshold > 0 else MAX_STRENGTH


def vote(strength: float, slope: float) -> float:
    """A detector's vote for a class: 0.5 at its threshold (strength 1), towards 1 above it and 0 below."""
    # An anomaly index far below the median (a class whose trigger is huge) would overflow exp: its vote is 0 anyway.
    z = min(max(slope * (strength - 1.0), -700.0), 700.0)
    return 1.0 / (1.0 + math.exp(-z))


@dataclass(frozen=True)
class ClassScore:
    """One class's score and what made it: each detector's strength and vote."""

    target: int
    score: float
    strengths: dict[str, float]
    votes: dict[str, float]

    @property
    def lead(self) -> str:
        """The detector with the largest vote (ties in DETECTORS' order): what the class is unlearned as."""
        return max(self.votes, key=lambda d: (self.votes[d], -DETECTORS.index(d)))


def class_scores(by_detector: dict[str, list[float]], slope: float) -> list[ClassScore]:
    """Every class's noisy-or score of its detectors' votes (a SHARED group's counting once, its largest); a detector
    missing from `by_detector` did not run and does not vote."""
    present = [d for d in DETECTORS if d in by_detector]
    out = []
    for k in range(len(by_detector[present[0]])):
        s = {d: by_detector[d][k] for d in present}
        v = {d: vote(s[d], slope) for d in present}
        grouped = [d for group in SHARED for d in group]
        shared = [max((v[d] for d in group if d in v), default=0.0) for group in SHARED]
        alone = [v[d] for d in present if d not in grouped]
        out.append(ClassScore(k, 1.0 - math.prod(1.0 - x for x in alone + shared), s, v))
    return out


@dataclass(frozen=True)
class FlagScore:
    """The model's score (its best class's) against the two thresholds."""

    best: ClassScore
    flag_threshold: float
    suspect_threshold: float

    @property
    def verdict(self) -> str:
        if self.best.score >= self.flag_threshold:
            return "flagged"
        return "suspect" if self.best.score >= self.suspect_threshold else "clean"

    def to_report(self) -> dict:
        """report.json's detection.score (docs/contracts.md)."""
        b = self.best
        return {"verdict": self.verdict, "value": round(b.score, 4), "class": b.target, "lead": b.lead,
                "threshold": self.flag_threshold, "suspect_threshold": self.suspect_threshold,
                "contributions": {d: {"strength": round(b.strengths[d], 4), "vote": round(b.votes[d], 4)}
                                  for d in b.votes}}


def flag_score(by_detector: dict[str, list[float]], t: Thresholds) -> FlagScore:
    """The best class's score (ties to the lower class) and its verdict."""
    scores = class_scores(by_detector, t.flag_slope)
    best = max(scores, key=lambda c: (c.score, -c.target))
    return FlagScore(best, t.flag_threshold, t.suspect_threshold)


def describe(score: dict) -> str:
    """One line for a reviewer: the score against its thresholds and each detector's part, strongest first."""
    parts = sorted(score["contributions"].items(), key=lambda kv: -kv[1]["vote"])
    said = ", ".join(f"{d.replace('_', ' ')} {c['strength']:.2f} of its threshold" for d, c in parts)
    return (f"flag score {score['value']:.2f} for class {score['class']} (flagged at {score['threshold']:.2f}, "
            f"suspect from {score['suspect_threshold']:.2f}): {said}")
