"""Probes: plain, concrete triggers tried on every class, as evidence beside the anomaly index.

The patch probe is defense/patch_probe.py; the noise probe, the decision and the search that runs every probe are
here. The anomaly index says which class needs the smallest synthesized trigger compared with the others, and an easy
natural class can stand out as much as a backdoor does: on clean Fashion-MNIST CNNs the top class (often "bag") can
have a higher index than most backdoor targets (benchmarks/probe_detection.py). A probe asks a sharper question, one a
natural class fails: does a tiny square with a plain fill, or uniform noise, send most images of the other classes to
this class? Both probes use the trusted training split, forward passes only, and their own random generator, so they
change none of the defense's random draws.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
from torch import nn

from gradprune_mlflow.config import warp_steps
from gradprune_mlflow.data.cleanset import Split
from gradprune_mlflow.defense.evidence import Thresholds, flag_score, strengths
from gradprune_mlflow.defense.metrics import batch_for
from gradprune_mlflow.defense.patch_probe import PatchHit, patch_probe, plain_hits
from gradprune_mlflow.defense.progress import Progress
from gradprune_mlflow.defense.searchnet import search_copy
from gradprune_mlflow.defense.synthesis import (
    FAMILIES,
    Detection,
    FamilyResult,
    FamilySearch,
    anomaly_index,
    detect,
    with_class,
)
from gradprune_mlflow.defense.unlearning import NoiseBlend
from gradprune_mlflow.defense.warp import WarpHit, WarpSearch

# Added to the seed for the warp probe's own generator: it draws none of the defense's random numbers.
WARP_SEED = 7919
# The strength at which the noise probe blends uniform noise in (and trigger-free mode searches a fixed-strength
# blend pattern for a class flagged in the blend family).
NOISE_ALPHA = 0.2


@torch.no_grad()
def noise_responses(net: nn.Module, data: Split, num_classes: int, seed: int, alpha: float = NOISE_ALPHA,
                    batch_size: int = 512) -> list[float]:
    """Per class k: the fraction of `data`'s images of other classes that uniform noise, drawn fresh per image and
    blended in at `alpha`, sends to k. Does a backdoor answer to noise itself?

    On the benchmark's Blend models nearly all of them go to the target; on clean and BadNets models no class gets
    near half (benchmarks/noise_probe.py; benchmarks/results/probe-detection.md).
    """
    device = next(net.parameters()).device
    noise = NoiseBlend(0, torch.Generator().manual_seed(seed), low=alpha, high=alpha)
    # the noise is drawn per `batch_size` images whatever the device, so that every device sees the same noise
    noisy = torch.cat([noise.apply(x) for x in data.images.split(batch_size)])
    preds = torch.cat([net(x.to(device)).argmax(1).cpu() for x in noisy.split(batch_for(device))])
    out = []
    for k in range(num_classes):
        others = data.labels != k
        out.append(float((preds[others] == k).float().mean()) if others.any() else 0.0)
    return out


def relative_size(result: FamilyResult, k: int) -> float:
    """Class k's trigger size over the median class's: how much smaller its trigger is than a typical class's."""
    sizes = result.class_sizes()
    return float(sizes[result.column(k)] / sizes.median().clamp_min(1e-12))


def evidence(index: dict[str, torch.Tensor], hits: list[PatchHit], patch: list[float], noise: list[float],
             blend: list[float], relative: list[float] | None, t: Thresholds, warp: list[float] | None = None
             ) -> list[dict]:
    """Each detector's evidence for its strongest class: {"detector", "class", "score", "threshold", "fires"}.
    The patch probe's is the class with the strongest square (`patch`: its strengths, the best plain square over
    `patch_threshold` or the best square's margin over the median class's over `patch_margin`), scored with its best
    response and its best plain one ("plain").
    The blend anomaly's score is the class's blend strength over the median class's (`relative`, None without a blend
    family), for the class whose index and strength together are strongest (`blend`: the blend anomaly's strengths);
    each family's anomaly index is listed so that a reviewer sees how far its top class stood out, and never fires
    alone."""
    out = []
    if hits:
        best = max(hits, key=lambda h: patch[h.target])
        out.append({"detector": "patch_probe", "class": best.target, "score": round(best.best, 4),
                    "plain": round(best.plain, 4), "threshold": t.patch_threshold,
                    "margin": t.patch_margin, "fires": patch[best.target] >= 1.0})
    if noise:
        top = max(range(len(noise)), key=noise.__getitem__)
        out.append({"detector": "noise_probe", "class": top, "score": round(noise[top], 4),
                    "threshold": t.noise_threshold, "fires": noise[top] >= t.noise_threshold})
    if warp:
        top = max(range(len(warp)), key=warp.__getitem__)
        out.append({"detector": "warp_probe", "class": top, "score": round(warp[top], 4),
                    "threshold": t.warp_threshold, "fires": warp[top] >= t.warp_threshold})
    if relative is not None:
        k = max(range(len(blend)), key=blend.__getitem__)
        out.append({"detector": "blend_anomaly", "class": k, "score": round(relative[k], 4),
                    "threshold": t.relative_size, "fires": blend[k] >= 1.0})
    for family, idx in index.items():
        k = int(idx.argmax())
        out.append({"detector": f"{family}_anomaly_index", "class": k, "score": round(float(idx[k]), 4),
                    "threshold": None, "fires": False})
    return out


def decide(detection: Detection, results: list[FamilyResult], hits: list[PatchHit], noise: list[float],
           t: Thresholds, warp: list[WarpHit] | None = None) -> tuple[Detection, PatchHit | WarpHit | None]:
    """Score every class on every detector's evidence (defense/evidence.py) and flag the best class when its score
    reaches the flag threshold; returns the detection and, when the patch or the warp probe led the flag, its hit.

    The detectors: the patch probe (a tiny square sends most of the other classes' images to the class), the noise
    probe (uniform noise does), the warp probe (a smooth sub-pixel warp does; `warp`, None when it did not run:
    defense/warp.py), and the blend anomaly (the class's anomaly index in the blend family *and* its blend
    strength against the median class's). The anomaly index alone is no detector: on clean models the top class can
    score as high as backdoor targets do; what sets a target apart is its blend strength relative to the median
    class's (benchmarks/results/probe-detection.md). The lead detector says how the flagged class is unlearned: as
    the probe's square (patch family) or as a blend. Unflagged, the detection keeps the top anomaly index's class.
    """
    by_family = {r.family: r for r in results}
    index = {r.family: anomaly_index(r.class_sizes()) for r in results}
    num_classes = len(noise)
    best_by_class = {h.target: h for h in hits}
    patch = [best_by_class[k].best if k in best_by_class else 0.0 for k in range(num_classes)]
    plain = [best_by_class[k].plain if k in best_by_class else 0.0 for k in range(num_classes)]
    blend_family = by_family.get("blend")
    if blend_family is not None:
        blend_index = [float(index["blend"][blend_family.column(k)]) for k in range(num_classes)]
        blend_relative = [relative_size(blend_family, k) for k in range(num_classes)]
    else:
        blend_index, blend_relative = [0.0] * num_classes, [1.0] * num_classes
    warp_rates = [h.response for h in warp] if warp else None
    by_detector = strengths(patch, noise, blend_index, blend_relative, t, warp_rates, plain)
    score = flag_score(by_detector, t)
    probes = {"patch": [h.to_report() for h in hits], "noise": [round(r, 4) for r in noise],
              "evidence": evidence(index, hits, by_detector["patch_probe"], noise, by_detector["blend_anomaly"],
                                   blend_relative if blend_family is not None else None, t, warp_rates)}
    if warp_rates is not None:
        probes["warp"] = [round(r, 4) for r in warp_rates]
    if score.verdict != "flagged":
        return replace(detection, flagged=False, flagged_by=None, probes=probes, score=score.to_report()), None
    k, lead = score.best.target, score.best.lead
    family = "patch" if lead == "patch_probe" and k in best_by_class else "blend"
    res = by_family[family]
    flagged_by = lead if lead in ("patch_probe", "noise_probe", "warp_probe") else "anomaly_index"
    flagged = Detection(k, float(index[family][res.column(k)]), True, family, detection.per_family, flagged_by,
                        probes, score.to_report())
    if family == "patch":
        return flagged, best_by_class[k]
    return flagged, warp[k] if lead == "warp_probe" else None


class Search(NamedTuple):
    """What find_backdoor found: the decision, the family searches, the probe's hit when the patch or warp probe led
    the flag, the noise responses per class, and the warp probe's hits per class (None when it did not run)."""

    detection: Detection
    results: list[FamilyResult]
    hit: PatchHit | WarpHit | None
    noise: list[float]
    warp: list[WarpHit] | None


def find_backdoor(net: nn.Module, data: Split, num_classes: int, cfg, generator: torch.Generator, progress: Progress
                  ) -> Search:
    """Search both families for every class, run the probes and decide. `cfg` names synth_steps, synth_restarts,
    warp_steps, seed, decisive_score and the thresholds of `decide` (a SanitizeConfig or the evaluator's EvalConfig).
    Unless decisive_score is None, the evidence is read at half the steps first, and a class flagged there with a
    score of at least decisive_score stays flagged, only its rows searching the rest of the budget (Detection.steps
    says where the evidence was read). The warp probe is staged the same way, at half of warp_steps."""
    net = search_copy(net, data.images[:8], cfg.search_precision)
    searches = [FamilySearch(net, data.images, data.labels, num_classes, family, restarts=cfg.synth_restarts,
                             generator=generator) for family in FAMILIES]
    noise = noise_responses(net, data, num_classes, cfg.seed)
    steps = warp_steps(cfg)
    warp = WarpSearch(net, data, num_classes, restarts=cfg.synth_restarts,
                      generator=torch.Generator().manual_seed(cfg.seed + WARP_SEED)) if steps else None
    scanned = plain_hits(net, data, num_classes)
    decisive = cfg.decisive_score
    staged = decisive is not None and cfg.synth_steps >= 2
    first = cfg.synth_steps // 2 if staged else cfg.synth_steps
    warp_first = steps // 2 if staged and steps >= 2 else steps  # the warp probe is read at half its steps too
    for search in searches:
        search.run(first, progress)
    if warp is not None:
        warp.run(warp_first, progress)
    found = _read(net, data, searches, noise, warp, scanned, cfg)
    if first == cfg.synth_steps:
        return found
    if found.detection.flagged and found.detection.score["value"] >= decisive:
        target = found.detection.target
        for search in searches:  # the flagged class's triggers get the whole budget; the evidence stays as read
            search.keep([target])
            search.run(cfg.synth_steps - first, progress)
        results = [with_class(r, s.result(), target) for r, s in zip(found.results, searches, strict=True)]
        if warp is None:
            return found._replace(results=results)
        warp.keep([target])  # its warps too, which are unlearned where the warp probe led or joins as a companion
        warp.run(steps - warp_first, progress)
        final = warp.hits()[0]
        warps = [final if h.target == target else h for h in found.warp]
        hit = final if isinstance(found.hit, WarpHit) else found.hit
        return found._replace(results=results, warp=warps, hit=hit)
    for search in searches:
        search.run(cfg.synth_steps - first, progress)
    if warp is not None:
        warp.run(steps - warp_first, progress)
    return _read(net, data, searches, noise, warp, scanned, cfg)


def _read(net, data, searches, noise, warp_search, scanned, cfg) -> Search:
    """The evidence of the searches as they stand, with the probes that read them, and the decision."""
    results = [s.result() for s in searches]
    warp = warp_search.hits() if warp_search is not None else None
    hits = patch_probe(net, data, next(r for r in results if r.family == "patch"), scanned=scanned)
    detection, hit = decide(detect(results, cfg.anomaly_threshold), results, hits, noise, Thresholds.of(cfg), warp)
    return Search(replace(detection, steps=searches[0].steps), results, hit, noise, warp)
