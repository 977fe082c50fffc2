"""One sanitize run: check inputs, find the trigger (given or synthesized), prune, fine-tune, verify, measure, report.

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
from gradprune_mlflow.defense.progress import PhaseTimer, Progress
from gradprune_mlflow.defense.prune import prune
from gradprune_mlflow.defense.result import SCHEMA, SanitizeResult
from gradprune_mlflow.defense.synthesis import FAMILIES
from gradprune_mlflow.defense.triggerfree import find_triggers, recheck, sanitizes
from gradprune_mlflow.defense.triggers import Trigger, check_trigger_fits
from gradprune_mlflow.defense.unlearning import triggered_copy, unlearning_plan
from gradprune_mlflow.defense.verify import report_block, verify
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
    # a saved-format adapter's (pt2, TorchScript) modules are not nn.Conv2d: its convs are 4-D weights
    convs = [p for p in model.parameters() if p.ndim == 4] if hasattr(model, "inner") else \
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

    timings = PhaseTimer()
    rechecks: list[dict[str, Any]] = []
    found = find_triggers(net, train, cfg, meta.num_classes, gen, progress, timings) if trigger is None else None
    detection = found.detection if found else None
    unlearn = found.unlearn if found else trigger
    measure_with = found.measure_with if found else trigger
    tuning = found.finetune_config(cfg) if found else cfg

    skipped = detection is not None and not sanitizes(detection, cfg)
    prune_out = finetune_out = verified = None
    if not skipped:
        train_triggered, val_triggered = triggered_copy(train, unlearn), triggered_copy(val, unlearn)
        if "prune" in cfg.stages:
            with timings("pruning"):
                prune_out = prune(net, masks, train_triggered, val, val_triggered, cfg, progress)
        if "finetune" in cfg.stages:
            with timings("fine_tuning"):
                finetune_out = finetune(net, masks, train, unlearn, val, val_triggered, tuning, progress, gen,
                                        teacher)
            if detection is not None:
                with timings("rechecks"):
                    rechecks, finetune_out, unlearn = recheck(net, masks, train, val, unlearn, found.families,
                                                              detection, tuning, gen, progress, teacher,
                                                              finetune_out, found.noise)
        masks.apply()
        if trigger is None and cfg.verify:
            # Last, on a copy, with its own generator: it changes neither the weights nor the defense's draws.
            with timings("verification"):
                verified = verify(net, val, meta.num_classes, cfg, progress,
                                  defended_target=detection.target if detection.flagged else None)
    progress.close()

    sanitized = None if skipped else work.cpu().eval()
    data, evaluated_on = (test, "test") if test is not None else (val, "validation")
    shown = eval_trigger or measure_with
    with timings("measuring"):
        before = evaluate(Normalized(copy.deepcopy(model).float().cpu().eval(), meta.mean, meta.std), data, shown)
        after = None if skipped else evaluate(Normalized(sanitized, meta.mean, meta.std), data, shown)
    if eval_trigger is None and trigger is None:  # a synthesized trigger's success is not the attack's
        before, after = synthesized_labels(before), synthesized_labels(after)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "mode": cfg.mode,
        "device": device.type,
        "seconds": round(time.perf_counter() - start, 3),
        # seconds per phase; a phase that did not run is absent
        "timings": timings.seconds,
        # a saved format's name from its adapter; "module" for an nn.Module given directly (callers that loaded it
        # from a file or MLflow name the format)
        "model_format": getattr(model, "model_format", "module"),
        "trigger_source": "known" if trigger is not None else "synthesized",
        "asr_measured_with": "eval" if eval_trigger else ("known" if trigger is not None else "synthesized"),
        "detection": {**detection.to_report(), "rechecks": rechecks,
                      "noise_response": round(found.noise_response, 4),
                      # the spread square, where a suspect model was sanitized (defense/spread.py)
                      "spread_square": found.spread.to_report() if found.spread else None} if found else None,
        # what the unlearning images carried, and in what share (the last mix, after any recheck added to it)
        "unlearning_plan": unlearning_plan(unlearn) if not skipped else [],
        "before": before,
        "after": after,
        # an independent search of the sanitized model for a trigger that still works (defense/verify.py)
        "verification": report_block(verified, known=trigger is not None, skipped=skipped, after=after,
                                     measured_with="evaluation" if eval_trigger else "known"),
        "sanitized": not skipped,
        "pruned_filters": masks.count,
        "total_filters": masks.total,
        "pruned_by_layer": {k: v for k, v in masks.by_layer().items() if v},
        # convs whose filters cannot give an exactly zero channel, never pruned (defense/dataflow.py)
        "unprunable_layers": masks.unprunable,
        "gradient_passes": prune_out.passes if prune_out else 0,
        "finetune_epochs": finetune_out.epochs if finetune_out else 0,
        # the distillation weight fine-tuning used: distill_weight, or at most warp_distill_weight where warps were
        # unlearned
        "distill_weight": tuning.resolved("distill_weight") if finetune_out else None,
        # the away-from-target weight fine-tuning used: away_weight, or 0 in trigger-free mode where nothing was flagged
        "away_weight": tuning.resolved("away_weight") if finetune_out else None,
        "finetune_best_epoch": finetune_out.best_epoch if finetune_out else 0,
        # what trigger-free mode's searches computed in: search_precision as this machine resolved it
        "search_precision": found.precision if found else None,
        # what fine-tuning's steps computed in: train_precision as this machine resolved it
        "train_precision": finetune_out.precision if finetune_out else None,
        # one search per family (every class, or after an early flag the flagged class alone for its second half),
        # then one per family over the flagged class per recheck, and the fixed-strength blend search when it ran
        "synthesis_steps": ((cfg.synth_steps + found.detection.steps * len(rechecks)) * len(FAMILIES)
                            + found.fixed_steps) * cfg.synth_restarts if found else 0,
        "evaluated_on": evaluated_on,
        "evaluated_images": len(data),
        "clean_set": {"name": meta.name, "images": len(clean_set), "train": len(train), "validation": len(val),
                      "manifest_sha256": clean_set.manifest_sha256},
        "config": cfg.to_dict(),
    }
    if sanitized is not None:
        sanitized.eval()
    return SanitizeResult(sanitized, report, list(masks.history), prune_out.curve if prune_out else [],
                          found.synthesized if found else [])


SYNTHESIZED_KEYS = {"attack_success_rate": "synthesized_trigger_success_rate",
                    "robust_accuracy": "synthesized_trigger_robust_accuracy"}


def synthesized_labels(scores: dict[str, Any] | None) -> dict[str, Any] | None:
    """Scores measured with a synthesized trigger, under names that say so: `attack_success_rate` and
    `robust_accuracy` only ever mean the real trigger's (a known or an evaluation trigger)."""
    return None if scores is None else {SYNTHESIZED_KEYS.get(k, k): v for k, v in scores.items()}


def _test_split(test_set: Split | CleanSet | None, clean_set: CleanSet) -> Split | None:
    if test_set is None:
        return None
    if isinstance(test_set, CleanSet):
        a, b = test_set.meta, clean_set.meta
        if a.input_shape != b.input_shape or a.num_classes != b.num_classes:
            raise DataError("the test data's input_shape or num_classes differs from the clean set's")
        return test_set.as_split()
    return test_set
