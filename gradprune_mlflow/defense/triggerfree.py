"""Trigger-free mode's steps around the sanitize run: finding what to unlearn (find_triggers: synthesis and detection,
the unlearning mix, the fixed-strength blend search, the trigger-agnostic share) and the verify-and-repeat recheck
after fine-tuning.

defense/pipeline.py runs them when no trigger is given; docs/algorithm.md describes the steps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.data.cleanset import Split
from gradprune_mlflow.defense.agnostic import with_agnostic
from gradprune_mlflow.defense.finetune import finetune
from gradprune_mlflow.defense.fixed_blend import fixed_strength_blend
from gradprune_mlflow.defense.patch_probe import PatchHit, densest_square, square
from gradprune_mlflow.defense.probes import NOISE_ALPHA, Search, find_backdoor
from gradprune_mlflow.defense.progress import PhaseTimer, Progress
from gradprune_mlflow.defense.searchnet import precision_of, search_copy
from gradprune_mlflow.defense.spread import SpreadHit, spread_square
from gradprune_mlflow.defense.synthesis import Detection, FamilyResult, anomaly_index, synthesize
from gradprune_mlflow.defense.triggers import MaskTrigger, Trigger
from gradprune_mlflow.defense.unlearning import NoiseBlend, RandomFill, TriggerMix, extended, triggered_copy
from gradprune_mlflow.defense.warp import WarpHit
from gradprune_mlflow.errors import DataError


def compact_windows(mask: torch.Tensor) -> list[torch.Tensor]:
    """Square regions (k x k and (k+1) x (k+1), k = sqrt of the mask's L1 size) where a synthesized mask is densest.

    Real patch triggers are compact (squares, stickers, logos), while a reverse-engineered mask is a few scattered
    pixels around them. On a BadNets model the densest 3x3 window fell exactly on the real 3x3 patch in 4 of 4
    restarts; unlearning that window cut the remaining ASR from about 21% to 7-10%, where refilling the scattered
    pixels (dilated or not) or a larger window did not help.
    """
    h, w = mask.shape[-2:]
    k = int(max(2, min(min(h, w) // 2, round(float(mask.sum()) ** 0.5))))
    windows = []
    for size in (k, k + 1):
        windows.append(square(mask.shape, *densest_square(mask, size), size))
    return windows


def unlearning_trigger(result: FamilyResult, target: int, generator: torch.Generator,
                       noise: bool = True) -> TriggerMix:
    """What trigger-free mode unlearns with for one family: the synthesized triggers plus versions closer to real ones.

    Patch: compact windows where each synthesized mask is densest, filled with the synthesized pattern and with
    random values (per-pixel noise or one solid value per image). Blend: the pattern at half and 1.5x strength and,
    when `noise`, fresh uniform noise at strength 0.1-0.3 (NoiseBlend: what the Blend models here answered to).
    """
    parts: list[Trigger] = []
    for trig in result.triggers(target):
        parts.append(trig)
        if result.family == "patch":
            for window in compact_windows(trig.mask):
                parts += [RandomFill(target, window, generator),
                          MaskTrigger(target, window, trig.pattern, source="compact-window")]
        else:
            parts += [MaskTrigger(target, trig.mask * s, trig.pattern, source=f"{trig.source}-rescaled")
                      for s in (0.5, 1.5)]
            if noise:
                parts.append(NoiseBlend(target, generator))
    return TriggerMix(parts, generator)


def unlearning_mix(families: list[FamilyResult], target: int, cfg: SanitizeConfig, gen: torch.Generator,
                   noise: bool = True) -> TriggerMix:
    """The flagging family's unlearning triggers, plus those of every other family where the target class's anomaly
    index is above `cfg.companion_threshold`; each family then gets an equal share of the images.

    A model can answer to both families. A Blend model here was flagged in the patch family (index 2.3-4.6) while
    the blend family put the same class first too (1.8-2.1); unlearning patches alone left 22.6% and 77.7% ASR (two
    trusted draws), patches and blends together 16.6% and 7.9%. Adding the other family whatever its index halves
    the flagging family's share, and that cost 5-8 ASR points where the flagging family was the only one that
    mattered (BadNets models, whose class 0 is ordinary in the blend family: index 0.67).
    """
    chosen = [families[0]] + [f for f in families[1:]
                              if float(anomaly_index(f.class_sizes())[f.column(target)]) > cfg.companion_threshold]
    if len(chosen) == 1:
        return unlearning_trigger(chosen[0], target, gen, noise)
    return TriggerMix([unlearning_trigger(f, target, gen, noise) for f in chosen], gen)


def synthesized_families(
    net: nn.Module, train: Split, cfg: SanitizeConfig, k: int, gen: torch.Generator, progress: Progress
) -> Search:
    """find_backdoor, with the results reordered so that the detection's family comes first."""
    found = find_backdoor(net, train, k, cfg, gen, progress)
    return found._replace(results=sorted(found.results, key=lambda r: r.family != found.detection.family))


def recheck(net, masks, train, val, unlearn, families, detection, cfg, gen, progress, teacher, finetune_out,
             noise):
    """Trigger-free mode's verify-and-repeat: search the flagged class's trigger again on the fine-tuned model.

    Unlearning makes a model immune to the triggers it was shown, while the real one can survive (a reverse-engineered
    patch is rarely the attacker's). So after fine-tuning, the flagged class alone (cheap: one class's rows) is searched
    again in every family; each new size gets an anomaly index against the other classes' sizes of its family from
    the first search, searched as long as those were where their evidence was read. While one is above the threshold,
    the new triggers join the unlearning mix and fine-tuning runs again. Returns (rechecks, the last fine-tuning
    outcome, the last unlearning mix); each recheck is {"round", "size", "anomaly_index", "repeated"} for the family
    with the largest index (and "family").
    """
    rechecks = []
    target = detection.target
    for rnd in range(1, cfg.recheck_rounds + 1):
        found = []
        searched = search_copy(net, train.images[:8], cfg.search_precision)
        for family in families:
            col = family.column(target)
            again = synthesize(searched, train.images, train.labels, len(family.sizes[0]), family.family,
                               steps=detection.steps, restarts=cfg.synth_restarts, generator=gen,
                               progress=progress, classes=[target])
            sizes = family.class_sizes().clone()
            sizes[col] = again.class_sizes()[0]
            found.append((float(anomaly_index(sizes)[col]), float(sizes[col]), family.family, again))
        index, size, name, again = max(found, key=lambda f: f[0])
        repeat = index > cfg.anomaly_threshold
        rechecks.append({"round": rnd, "family": name, "size": round(size, 5), "anomaly_index": round(index, 4),
                         "repeated": repeat})
        if not repeat:
            break
        # the new triggers of the family that is still anomalous join the mix, with an equal share
        unlearn = extended(unlearn, unlearning_trigger(again, target, gen, noise), gen)
        finetune_out = finetune(net, masks, train, unlearn, val, triggered_copy(val, unlearn), cfg, progress, gen,
                                teacher)
    return rechecks, finetune_out, unlearn


def with_fixed_blend(net, train: Split, target: int, cfg: SanitizeConfig, gen: torch.Generator, progress: Progress,
                      unlearn: TriggerMix) -> tuple[list[MaskTrigger], TriggerMix]:
    """Blend family flagged: search patterns that work at the noise probe's fixed strength (fixed_strength_blend) and
    give them half of the unlearning images, at 0.5x, 1x and 1.5x that strength. Returns (patterns, new mix).

    Unlearning the blend family's triggers and fresh noise alone leaves a Blend model answering to the attacker's
    image; these patterns remove more of it (docs/algorithm.md, "The trigger"; measured in benchmarks/RESULTS.md).
    """
    searched = search_copy(net, train.images[:8], cfg.search_precision)
    fixed = fixed_strength_blend(searched, train.images, train.labels, target, NOISE_ALPHA, steps=cfg.fixed_blend_steps,
                                 restarts=cfg.synth_restarts, generator=gen, progress=progress)
    if not fixed:  # no training image of another class: nothing to search with
        raise DataError("the clean set's training split has no image outside the flagged class; "
                        "give images of every class")
    parts = [MaskTrigger(t.target, t.mask * s, t.pattern, source=t.source) for t in fixed for s in (0.5, 1, 1.5)]
    return fixed, TriggerMix([TriggerMix(parts, gen), unlearn], gen)


def companion_warp(warps: list[WarpHit] | None, target: int, hit: PatchHit | WarpHit | None,
                   threshold: float) -> WarpHit | None:
    """The flagged class's warp probe hit when another detector led the flag and the warp still sends at least
    `threshold` of the other classes' images to the class; its warps then take half of the unlearning images.

    A warp trigger can flag its class through the blend anomaly or the noise probe before the warp probe, and only
    its warps remove it: a WaNet model flagged by the blend anomaly kept its backdoor when they were left out."""
    if not warps or isinstance(hit, WarpHit) or warps[target].response < threshold:
        return None
    return warps[target]


def suspect(detection: Detection) -> bool:
    """Whether the flag score is in the suspect band: not flagged, not clean."""
    return (detection.score or {}).get("verdict") == "suspect"


def sanitizes(detection: Detection, cfg: SanitizeConfig) -> bool:
    """Whether trigger-free mode goes on to unlearn: a flagged model always; an unflagged one where on_clean is
    "sanitize", or where its flag score is in the suspect band and on_suspect is "sanitize"."""
    return detection.flagged or cfg.on_clean == "sanitize" or (suspect(detection) and cfg.on_suspect == "sanitize")


@dataclass
class Found:
    """What trigger-free mode found: the detection, the families' searches, and what to unlearn and measure with."""

    detection: Detection
    families: list[FamilyResult]  # the detection's family first
    synthesized: list[Trigger]  # the closest to the real trigger first
    measure_with: Trigger
    unlearn: Trigger
    noise_response: float  # the flagged class's response to uniform noise
    noise: bool  # fresh noise is unlearned (the response is above noise_threshold)
    fixed_steps: int = 0  # steps of the fixed-strength blend search, when it ran
    precision: str = "fp32"  # what the searches computed in ("fp32" or "bf16": search_precision resolved)
    warp: bool = False  # warps are unlearned (the warp probe led the flag, or its warps joined the mix)
    spread: SpreadHit | None = None  # the spread square, where a suspect model is sanitized and it joined the mix

    def finetune_config(self, cfg: SanitizeConfig) -> SanitizeConfig:
        """`cfg` as fine-tuning uses it: where nothing is flagged (on_clean=sanitize), no away-from-target term unless
        away_weight is set; where warps are unlearned, distillation at most warp_distill_weight."""
        if not self.detection.flagged and cfg.away_weight is None:
            # no class is known to be a target, and pushing a clean model's images away from its top candidate
            # cost clean accuracy (benchmarks/RESULTS.md, "A clean model sanitized anyway")
            cfg = replace(cfg, away_weight=0.0)
        if not self.warp or cfg.warp_distill_weight is None:
            return cfg
        return replace(cfg, distill_weight=min(cfg.resolved("distill_weight"), cfg.warp_distill_weight))


def find_triggers(net: nn.Module, train: Split, cfg: SanitizeConfig, k: int, gen: torch.Generator,
                  progress: Progress, timings: PhaseTimer) -> Found:
    """Search every class in every family, decide, and build the unlearning mix (docs/algorithm.md, "The trigger")."""
    # one search copy for every search of this model before it changes (find_backdoor's and the fixed blend's)
    searched = search_copy(net, train.images[:8], cfg.search_precision)
    with timings("synthesis"):
        detection, families, hit, responses, warps = synthesized_families(searched, train, cfg, k, gen, progress)
    target = detection.target
    synthesized = [t for res in families for t in res.triggers(target)]  # flagging family first
    measure_with = families[0].smallest_trigger(target)
    # Fresh noise is unlearned only where noise itself works as the trigger (see noise_responses).
    response = responses[target]
    noise = response > cfg.noise_threshold
    unlearn: Trigger = unlearning_mix(families, target, cfg, gen, noise)
    fixed_steps = 0
    if hit is not None:
        # The probe's trigger that flagged the class (a square, or warps) is the closest thing to the real one: it
        # gets half the images.
        first = TriggerMix(hit.unlearning(), gen) if isinstance(hit, WarpHit) else hit.trigger
        synthesized, measure_with = [hit.trigger] + synthesized, hit.trigger
        unlearn = TriggerMix([first, unlearn], gen)
    elif detection.family == "blend" and cfg.fixed_blend_steps and sanitizes(detection, cfg):
        with timings("synthesis"):
            fixed, unlearn = with_fixed_blend(searched, train, target, cfg, gen, progress, unlearn)
        synthesized, measure_with, fixed_steps = fixed + synthesized, fixed[0], cfg.fixed_blend_steps
    companion = companion_warp(warps, target, hit, cfg.warp_companion)
    if companion is not None:
        unlearn = TriggerMix([TriggerMix(companion.unlearning(), gen), unlearn], gen)
        synthesized = synthesized + [companion.trigger]
    spread = None
    if cfg.spread_share and suspect(detection) and sanitizes(detection, cfg):  # a suspect model is never flagged
        with timings("synthesis"):
            spread = spread_square(net, train, k, target)
        if spread is not None:  # a trigger without one target: unlearned beside the top candidate's
            unlearn = TriggerMix([spread.trigger, unlearn], gen, weights=[cfg.spread_share, 1 - cfg.spread_share])
            synthesized = synthesized + [spread.trigger]
    unlearn = with_agnostic(unlearn, net, target, cfg, gen)
    return Found(detection, families, synthesized, measure_with, unlearn, response, noise, fixed_steps,
                 precision_of(searched), isinstance(hit, WarpHit) or companion is not None, spread)
