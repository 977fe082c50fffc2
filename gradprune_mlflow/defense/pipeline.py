"""One sanitize run: check inputs, find the trigger (given or synthesized), prune, fine-tune, measure, report.

Measuring comes last and uses no randomness, so an evaluation-only trigger cannot change the defense.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.data.cleanset import CleanSet, Split
from gradprune_mlflow.defense.finetune import finetune
from gradprune_mlflow.defense.masks import FilterMasks
from gradprune_mlflow.defense.metrics import evaluate
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.probes import NOISE_ALPHA, PatchHit, densest_square, find_backdoor, square
from gradprune_mlflow.defense.progress import Progress
from gradprune_mlflow.defense.prune import prune
from gradprune_mlflow.defense.result import SCHEMA, SanitizeResult
from gradprune_mlflow.defense.synthesis import (
    FAMILIES,
    Detection,
    FamilyResult,
    anomaly_index,
    fixed_strength_blend,
    synthesize,
)
from gradprune_mlflow.defense.triggers import MaskTrigger, Trigger, check_trigger_fits
from gradprune_mlflow.defense.unlearning import NoiseBlend, RandomFill, TriggerMix, triggered_copy
from gradprune_mlflow.errors import BadInput, DataError, UnsupportedModel


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU. Asking for CUDA where there is none is a bad input."""
    if name == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda was asked for but no CUDA device is available; use --device auto or cpu")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def check_model(model: nn.Module, clean_set: CleanSet) -> None:
    """Raise UnsupportedModel/BadInput unless the model is a finite conv net that maps input_shape to num_classes."""
    if not isinstance(model, nn.Module):
        raise BadInput(f"the model is a {type(model).__name__}, not a torch nn.Module; save the whole module")
    # a saved-format adapter (pt2, TorchScript) names its convs from its graph: its modules are not nn.Conv2d
    convs = model.conv_filters()[0] if hasattr(model, "conv_filters") else \
        [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UnsupportedModel(
            "the model has no Conv2d layer; Grad-Prune prunes conv filters, so it cannot be sanitized"
        )
    if any(not torch.isfinite(p).all() for p in model.parameters()):
        raise UnsupportedModel("the model has NaN or infinite weights; it cannot be evaluated or sanitized")
    meta = clean_set.meta
    try:
        with torch.no_grad():
            out = copy.deepcopy(model).cpu().float().eval()(torch.zeros(2, *meta.input_shape))
    except Exception as exc:  # any failure here means the model and the data set disagree
        raise BadInput(
            f"the model does not accept inputs of shape {list(meta.input_shape)} from dataset.json ({exc})"
        ) from None
    if out.ndim != 2 or out.shape[1] != meta.num_classes:
        raise BadInput(
            f"the model outputs shape {list(out.shape[1:])} but the clean set has {meta.num_classes} classes"
        )


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
                parts += [RandomFill(target, window, generator), MaskTrigger(target, window, trig.pattern)]
        else:
            parts += [MaskTrigger(target, trig.mask * s, trig.pattern, source=trig.source) for s in (0.5, 1.5)]
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


def _synthesized(
    net: nn.Module, train: Split, cfg: SanitizeConfig, k: int, gen: torch.Generator, progress: Progress
) -> tuple[Detection, list[FamilyResult], PatchHit | None, list[float]]:
    """find_backdoor, with the results reordered so that the detection's family comes first."""
    detection, results, hit, noise = find_backdoor(net, train, k, cfg, gen, progress)
    return detection, sorted(results, key=lambda r: r.family != detection.family), hit, noise


def _recheck(net, masks, train, val, unlearn, families, detection, cfg, gen, progress, teacher, finetune_out,
             noise):
    """Trigger-free mode's verify-and-repeat: search the flagged class's trigger again on the fine-tuned model.

    Unlearning makes a model immune to the triggers it was shown, while the real one can survive (a reverse-engineered
    patch is rarely the attacker's). So after fine-tuning, the flagged class alone (cheap: one class's rows) is searched
    again in every family; each new size gets an anomaly index against the other classes' sizes of its family from
    the first search. While one is above the threshold, the new triggers join the unlearning mix and fine-tuning runs
    again. Returns (rechecks, the last fine-tuning outcome); each recheck is {"round", "size", "anomaly_index",
    "repeated"} for the family with the largest index (and "family").
    """
    rechecks = []
    target = detection.target
    for rnd in range(1, cfg.recheck_rounds + 1):
        found = []
        for family in families:
            col = family.column(target)
            again = synthesize(net, train.images, train.labels, len(family.sizes[0]), family.family,
                               steps=cfg.synth_steps, restarts=cfg.synth_restarts, generator=gen, progress=progress,
                               classes=[target])
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
        unlearn = TriggerMix(unlearn.triggers + [unlearning_trigger(again, target, gen, noise)], gen)
        finetune_out = finetune(net, masks, train, unlearn, val, triggered_copy(val, unlearn), cfg, progress, gen,
                                teacher)
    return rechecks, finetune_out


def _with_fixed_blend(net, train: Split, target: int, cfg: SanitizeConfig, gen: torch.Generator, progress: Progress,
                      unlearn: TriggerMix) -> tuple[list[MaskTrigger], TriggerMix]:
    """Blend family flagged: search patterns that work at the noise probe's fixed strength (fixed_strength_blend) and
    give them half of the unlearning images, at 0.5x, 1x and 1.5x that strength. Returns (patterns, new mix).

    After unlearning the blend family's triggers and fresh noise, the benchmark's Blend models still answered to the
    attacker's image (4.6-6.1% ASR) while fresh noise sent only 1.4-2.3% to the target. Adding these patterns brought
    the five models to 2.0-3.8% (README, "Measured quality").
    """
    fixed = fixed_strength_blend(net, train.images, train.labels, target, NOISE_ALPHA, steps=cfg.fixed_blend_steps,
                                 restarts=cfg.synth_restarts, generator=gen, progress=progress)
    if not fixed:  # no training image of another class: nothing to search with
        raise DataError("the clean set's training split has no image outside the flagged class; "
                        "give images of every class")
    parts = [MaskTrigger(t.target, t.mask * s, t.pattern, source=t.source) for t in fixed for s in (0.5, 1, 1.5)]
    return fixed, TriggerMix([TriggerMix(parts, gen), unlearn], gen)


def run_sanitize(
    model: nn.Module,
    clean_set: CleanSet,
    trigger: Trigger | None,
    cfg: SanitizeConfig,
    *,
    eval_trigger: Trigger | None,
    test_set: Split | CleanSet | None,
    progress: Progress,
) -> SanitizeResult:
    """See gradprune_mlflow.sanitize."""
    start = time.perf_counter()
    meta = clean_set.meta
    check_model(model, clean_set)
    for trig in (trigger, eval_trigger):
        if trig is not None:
            check_trigger_fits(trig, meta.num_classes, meta.input_shape)
    test = _test_split(test_set, clean_set)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    train, val = clean_set.split(cfg.val_fraction, cfg.seed)
    if len(val) == 0 or len(train) == 0:
        raise DataError("the clean set is too small to split into train and validation; give at least 2 images a class")

    work = copy.deepcopy(model).float().to(device).eval()
    net = Normalized(work, meta.mean, meta.std).to(device)
    teacher = copy.deepcopy(net).eval()
    masks = FilterMasks(work, torch.zeros(1, *meta.input_shape, device=device))

    detection, synthesized, measure_with, rechecks, response, fixed_steps = None, [], trigger, [], None, 0
    if trigger is None:
        detection, families, hit, responses = _synthesized(net, train, cfg, meta.num_classes, gen, progress)
        synthesized = [t for res in families for t in res.triggers(detection.target)]  # flagging family first
        measure_with = families[0].smallest_trigger(detection.target)
        # Fresh noise is unlearned only where noise itself works as the trigger (see noise_responses).
        response = responses[detection.target]
        noise = response > cfg.noise_threshold
        unlearn = unlearning_mix(families, detection.target, cfg, gen, noise)
        if hit is not None:
            # The square that flagged the class is the closest thing to the real trigger: it gets half the images.
            synthesized, measure_with = [hit.trigger] + synthesized, hit.trigger
            unlearn = TriggerMix([hit.trigger, unlearn], gen)
        elif detection.family == "blend" and cfg.fixed_blend_steps and (
                detection.flagged or cfg.on_clean == "sanitize"):
            fixed, unlearn = _with_fixed_blend(net, train, detection.target, cfg, gen, progress, unlearn)
            synthesized, measure_with, fixed_steps = fixed + synthesized, fixed[0], cfg.fixed_blend_steps
    else:
        unlearn = trigger

    skipped = detection is not None and not detection.flagged and cfg.on_clean == "skip"
    prune_out = finetune_out = None
    if not skipped:
        train_triggered, val_triggered = triggered_copy(train, unlearn), triggered_copy(val, unlearn)
        if "prune" in cfg.stages:
            prune_out = prune(net, masks, train_triggered, val, val_triggered, cfg, progress)
        if "finetune" in cfg.stages:
            finetune_out = finetune(net, masks, train, unlearn, val, val_triggered, cfg, progress, gen, teacher)
            if detection is not None:
                rechecks, finetune_out = _recheck(net, masks, train, val, unlearn, families, detection, cfg, gen,
                                                  progress, teacher, finetune_out, noise)
        masks.apply()
    progress.close()

    sanitized = None if skipped else work.cpu().eval()
    data, evaluated_on = (test, "test") if test is not None else (val, "validation")
    shown = eval_trigger or measure_with
    before = evaluate(Normalized(copy.deepcopy(model).float().cpu().eval(), meta.mean, meta.std), data, shown)
    after = None if skipped else evaluate(Normalized(sanitized, meta.mean, meta.std), data, shown)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": cfg.mode,
        "device": device.type,
        "seconds": round(time.perf_counter() - start, 3),
        # a saved format's name from its adapter; "module" for an nn.Module given directly (callers that loaded it
        # from a file or MLflow name the format)
        "model_format": getattr(model, "model_format", "module"),
        "trigger_source": "known" if trigger is not None else "synthesized",
        "asr_measured_with": "eval" if eval_trigger else ("known" if trigger is not None else "synthesized"),
        "detection": {**detection.to_report(), "rechecks": rechecks, "noise_response": round(response, 4)}
        if detection else None,
        "before": before,
        "after": after,
        "sanitized": not skipped,
        "pruned_filters": masks.count,
        "total_filters": masks.total,
        "pruned_by_layer": {k: v for k, v in masks.by_layer().items() if v},
        # convs whose filters cannot give an exactly zero channel, never pruned (defense/dataflow.py)
        "unprunable_layers": masks.unprunable,
        "gradient_passes": prune_out.passes if prune_out else 0,
        "finetune_epochs": finetune_out.epochs if finetune_out else 0,
        "finetune_best_epoch": finetune_out.best_epoch if finetune_out else 0,
        # one search per family over every class, then one per family over the flagged class per recheck, and the
        # fixed-strength blend search when it ran
        "synthesis_steps": cfg.synth_steps * cfg.synth_restarts * len(FAMILIES) * (1 + len(rechecks))
        + fixed_steps * cfg.synth_restarts if trigger is None else 0,
        "evaluated_on": evaluated_on,
        "evaluated_images": len(data),
        "clean_set": {"name": meta.name, "images": len(clean_set), "train": len(train), "validation": len(val),
                      "manifest_sha256": clean_set.manifest_sha256},
        "config": cfg.to_dict(),
    }
    if sanitized is not None:
        sanitized.eval()
    return SanitizeResult(sanitized, report, list(masks.history), prune_out.curve if prune_out else [], synthesized)


def _test_split(test_set: Split | CleanSet | None, clean_set: CleanSet) -> Split | None:
    if test_set is None:
        return None
    if isinstance(test_set, CleanSet):
        a, b = test_set.meta, clean_set.meta
        if a.input_shape != b.input_shape or a.num_classes != b.num_classes:
            raise DataError("the test data's input_shape or num_classes differs from the clean set's")
        return test_set.as_split()
    return test_set
