"""The MLflow evaluator plugin `gradprune` (entry point group `mlflow.model_evaluator`).

    mlflow.models.evaluate(model_uri, data, targets="label", model_type="classifier", evaluators=["gradprune"],
                           evaluator_config={"gradprune": {"mean": [0.286], "std": [0.353]}})

logs backdoor detection (trigger-free synthesis and the anomaly index) and attack metrics for a pytorch model,
without changing it: the evaluator works on a copy. `data` holds what the model takes: one row per image, one column
with the image's pixels normalised with `mean`/`std` and flattened (C*H*W floats; MLflow reshapes such a column to a
[-1, C, H, W] tensor signature), plus the label column. `evaluation_frame` builds it from a clean set.

MLflow's default (classifier) evaluator needs class labels, and our models output logits, so next to it the model is
given as predictions: a `prediction` column in `data` (`evaluation_frame(..., model=...)`), `predictions=
"prediction"`, no model argument, and evaluator_config `model_uri`, which this evaluator loads itself (scanned before
unpickling, as every model gradprune loads). docs/contracts.md, "MLflow evaluator plugin", lists the config keys.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.models.evaluation import EvaluationResult, ModelEvaluator

from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.data.cleanset import CleanSet, Split
from gradprune_mlflow.defense.metrics import evaluate as measure
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.probes import find_backdoor
from gradprune_mlflow.defense.progress import SilentProgress
from gradprune_mlflow.defense.triggers import check_trigger_fits
from gradprune_mlflow.errors import BadInput

NAME = "gradprune"
PREFIX = "gradprune/"
CONFIG_KEYS = {"model_uri", "mean", "std", "input_shape", "eval_trigger", "synthesize", "synth_steps", "synth_restarts",
               "anomaly_threshold", "relative_size", "patch_threshold", "patch_margin",
               "noise_threshold", "warp_threshold",
               "warp_steps", "search_precision", "flag_slope", "flag_threshold", "suspect_threshold", "decisive_score",
               "seed", "device"}
SHARED_KEYS = CONFIG_KEYS & {f.name for f in fields(SanitizeConfig)}
# Pixels un-normalised with mean/std must land in [0, 1]; this much float noise is tolerated.
PIXEL_SLACK = 1e-3


@dataclass(frozen=True)
class EvalConfig:
    """The evaluator's settings, read from evaluator_config (defaults from SanitizeConfig)."""

    model_uri: str | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    input_shape: tuple[int, int, int] | None = None
    eval_trigger: str | None = None
    synthesize: bool = True
    synth_steps: int = SanitizeConfig.synth_steps
    synth_restarts: int = SanitizeConfig.synth_restarts
    anomaly_threshold: float = SanitizeConfig.anomaly_threshold
    relative_size: float = SanitizeConfig.relative_size
    patch_threshold: float = SanitizeConfig.patch_threshold
    patch_margin: float = SanitizeConfig.patch_margin
    noise_threshold: float = SanitizeConfig.noise_threshold
    warp_threshold: float = SanitizeConfig.warp_threshold
    warp_steps: int | None = SanitizeConfig.warp_steps
    search_precision: str = SanitizeConfig.search_precision
    flag_slope: float = SanitizeConfig.flag_slope
    flag_threshold: float = SanitizeConfig.flag_threshold
    suspect_threshold: float = SanitizeConfig.suspect_threshold
    decisive_score: float | None = SanitizeConfig.decisive_score
    seed: int = 0
    device: str = "auto"

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> EvalConfig:
        """Parse evaluator_config (not changed); raises BadInput naming an unknown key or a bad value."""
        raw = dict(raw or {})
        unknown = set(raw) - CONFIG_KEYS
        if unknown:
            raise BadInput(f"gradprune evaluator: unknown evaluator_config key(s) {sorted(unknown)}; "
                           f"valid: {', '.join(sorted(CONFIG_KEYS))}")
        for key in ("mean", "std"):
            if key in raw:
                raw[key] = _floats(raw[key], key)
        # The settings it shares with sanitize are checked by sanitize's own rules, so the two cannot disagree.
        try:
            SanitizeConfig(**{k: v for k, v in raw.items() if k in SHARED_KEYS}).validated()
        except BadInput as err:
            raise BadInput(f"gradprune evaluator: {err}") from None
        if any(s <= 0 for s in raw.get("std", (1.0,))):
            raise BadInput("gradprune evaluator: std values must be positive")
        if raw.get("input_shape") is not None:
            shape = tuple(raw["input_shape"])
            if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
                raise BadInput(f"gradprune evaluator: input_shape must be [C, H, W], got {raw['input_shape']!r}")
            raw["input_shape"] = shape
        return cls(**raw)


def _floats(value: Any, key: str) -> tuple[float, ...]:
    values = value if isinstance(value, list | tuple) else [value]
    if not values or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise BadInput(f"gradprune evaluator: {key} must be a number or a list of numbers (one per channel)")
    return tuple(float(v) for v in values)


class GradpruneEvaluator(ModelEvaluator):
    """Backdoor detection and attack metrics for a pytorch image classifier; the model is never changed."""

    name = NAME

    @classmethod
    def can_evaluate(cls, *, model_type, evaluator_config, **kwargs) -> bool:
        """Classifiers, and evaluations that name no model type."""
        return model_type in (None, "classifier")

    def evaluate(self, *, model_type, dataset, run_id, evaluator_config, model=None, **kwargs) -> EvaluationResult:
        """Measure clean accuracy, and ASR/RA with `eval_trigger`; synthesize candidate triggers and flag the likely
        target class. Logs metrics (prefix `gradprune/`) and `gradprune/detection.json` to run `run_id`.

        Returns an EvaluationResult with the metrics. Raises BadInput for data or config it cannot use.
        """
        cfg = EvalConfig.from_dict(evaluator_config)
        net, schema = _module(model, cfg)
        split, shape = _images(dataset, cfg, schema)
        net = Normalized(net, _per_channel(cfg.mean, shape[0]), _per_channel(cfg.std, shape[0])).eval()
        num_classes = _num_classes(net, shape)
        metrics, detection = scan(net, split, num_classes, cfg)
        client = MlflowClient()
        client.log_batch(run_id, metrics=_as_metrics(metrics))
        if detection is not None:
            client.log_text(run_id, json.dumps(detection, indent=2) + "\n", f"{PREFIX}detection.json")
        return EvaluationResult(metrics=metrics, artifacts={}, run_id=run_id)


def scan(net: torch.nn.Module, data: Split, num_classes: int, cfg: EvalConfig) -> tuple[dict[str, float], dict | None]:
    """The measurements on `net` (pixels in [0, 1] in, logits out): returns (metrics, detection report or None)."""
    from gradprune_mlflow.defense.pipeline import resolve_device
    from gradprune_mlflow.registry.inputs import load_trigger_uri

    device = resolve_device(cfg.device)
    net = net.to(device)
    metrics: dict[str, float] = {}
    trigger = load_trigger_uri(cfg.eval_trigger) if cfg.eval_trigger else None
    if trigger is not None:
        check_trigger_fits(trigger, num_classes, tuple(data.images.shape[1:]))
    _put(metrics, measure(net, data, trigger))
    detection = None
    if cfg.synthesize:
        gen = torch.Generator().manual_seed(cfg.seed)
        found, results, hit, _, _ = find_backdoor(net, data, num_classes, cfg, gen, SilentProgress())
        family = next(r for r in results if r.family == found.family)
        best = hit.trigger if hit else family.smallest_trigger(found.target)
        synth = measure(net, data, best)
        detection = found.to_report()
        metrics |= {f"{PREFIX}anomaly_index": found.anomaly_index, f"{PREFIX}flagged": float(found.flagged),
                    f"{PREFIX}target_class": float(found.target), f"{PREFIX}flag_score": found.score["value"],
                    f"{PREFIX}suspect": float(found.score["verdict"] == "suspect")}
        if synth["attack_success_rate"] is not None:
            metrics[f"{PREFIX}synthesized_attack_success_rate"] = synth["attack_success_rate"]
    return metrics, detection


def _put(metrics: dict[str, float], scores: dict[str, float | None]) -> None:
    metrics.update({f"{PREFIX}{k}": float(v) for k, v in scores.items() if v is not None})


def _module(model, cfg: EvalConfig):
    """A copy of the model's nn.Module and its input schema (or None)."""
    if model is None and cfg.model_uri:
        from mlflow.models import get_model_info

        from gradprune_mlflow.models.io import load_model

        signature = get_model_info(cfg.model_uri).signature
        return load_model(cfg.model_uri).float().cpu().eval(), signature.inputs if signature else None
    if model is None:
        raise BadInput("gradprune evaluator: no model; pass the model to evaluate, or evaluator_config model_uri "
                       "when MLflow evaluates a predictions column")
    try:
        raw = model.get_raw_model()
    except (AttributeError, NotImplementedError):
        raw = None
    if not isinstance(raw, torch.nn.Module):
        raise BadInput("gradprune evaluator: only pytorch models (mlflow.pytorch flavor) can be evaluated")
    from gradprune_mlflow.models.adapter import Source
    from gradprune_mlflow.models.pt2 import ExportedModel, is_exported_module
    from gradprune_mlflow.models.torchscript import ScriptedModel

    if is_exported_module(raw):  # a pt2 model: it refuses .eval() and may take batches of one only
        raw = ExportedModel.of_module(raw)
    elif isinstance(raw, torch.jit.ScriptModule):  # copied by the adapter: a plain deepcopy leaves non-leaf weights
        raw = ScriptedModel(raw, Source(""))
    # A copy: synthesis toggles requires_grad and moves the network between devices; the caller's stays as it was.
    return copy.deepcopy(raw).float().cpu().eval(), model.metadata.get_input_schema()


def _per_channel(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise BadInput(f"gradprune evaluator: mean/std list {len(values)} values for {channels} channel(s)")
    return values


def _input_shape(cfg: EvalConfig, schema) -> tuple[int, int, int]:
    if cfg.input_shape is not None:
        return cfg.input_shape
    spec = schema.inputs[0] if schema is not None and schema.is_tensor_spec() and len(schema.inputs) == 1 else None
    shape = tuple(spec.shape) if spec is not None else ()
    if len(shape) == 4 and all(s > 0 for s in shape[1:]):
        return tuple(int(s) for s in shape[1:])
    raise BadInput("gradprune evaluator: the model's signature gives no [-1, C, H, W] input; "
                   "set evaluator_config input_shape to [C, H, W]")


def _images(dataset, cfg: EvalConfig, schema) -> tuple[Split, tuple[int, int, int]]:
    """The data's rows as [0, 1] pixel tensors (N, C, H, W) and labels."""
    shape = _input_shape(cfg, schema)
    labels = dataset.labels_data
    if labels is None or not dataset.has_targets:
        raise BadInput("gradprune evaluator: the data needs labels; pass targets=<label column> to evaluate")
    features = dataset.features_data
    per_image = shape[0] * shape[1] * shape[2]
    try:
        if hasattr(features, "columns") and len(features.columns) == 1:  # one column, one pixel array a row
            values = np.stack([np.asarray(v, dtype=np.float32).reshape(-1) for v in features.iloc[:, 0]])
        else:
            values = np.asarray(features, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise BadInput(f"gradprune evaluator: the data's features are not pixel arrays ({exc}); "
                       "see evaluation_frame") from None
    if values.ndim != 2 or values.shape[1] != per_image:
        raise BadInput(f"gradprune evaluator: each row must hold {per_image} pixel values (C*H*W of {list(shape)}), "
                       f"got {values.shape[1] if values.ndim == 2 else values.shape}; see evaluation_frame")
    x = torch.from_numpy(values).view(-1, *shape)
    mean = torch.tensor(_per_channel(cfg.mean, shape[0])).view(1, -1, 1, 1)
    std = torch.tensor(_per_channel(cfg.std, shape[0])).view(1, -1, 1, 1)
    pixels = x * std + mean
    low, high = float(pixels.min()), float(pixels.max())
    if low < -PIXEL_SLACK or high > 1 + PIXEL_SLACK:
        raise BadInput(f"gradprune evaluator: pixels un-normalised with mean={list(cfg.mean)} std={list(cfg.std)} "
                       f"span [{low:.3g}, {high:.3g}], not [0, 1]; set evaluator_config mean/std to the model's "
                       "input normalisation")
    y = torch.as_tensor(labels.astype("int64") if hasattr(labels, "astype") else labels, dtype=torch.int64)
    return Split(pixels.clamp(0, 1), y.flatten()), shape


def _num_classes(net: torch.nn.Module, shape: tuple[int, int, int]) -> int:
    with torch.no_grad():
        out = net(torch.zeros(2, *shape))
    if out.ndim != 2 or out.shape[1] < 2:
        raise BadInput(f"gradprune evaluator: the model outputs shape {list(out.shape[1:])}, not class logits")
    return int(out.shape[1])


def _as_metrics(metrics: dict[str, float]):
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, v, now, 0) for k, v in metrics.items()]


def evaluation_frame(clean_set: CleanSet, model: torch.nn.Module | None = None, *, label: str = "label",
                     column: str = "image", prediction: str = "prediction"):
    """The DataFrame this evaluator takes for a clean set, and MLflow's pyfunc feeds to a model with a
    [-1, C, H, W] tensor signature: one row per image, column `column` holding the image's pixels normalised with
    dataset.json's mean/std, flattened (C*H*W floats), and the label column `label`. With `model` (taking normalised
    pixels, returning logits), also the predicted class in column `prediction`, for MLflow's default evaluator."""
    import pandas as pd

    from gradprune_mlflow.defense.metrics import logits

    meta = clean_set.meta
    mean = torch.tensor(meta.mean).view(1, -1, 1, 1)
    std = torch.tensor(meta.std).view(1, -1, 1, 1)
    x = (clean_set.images - mean) / std
    frame = pd.DataFrame({column: list(x.flatten(1).numpy()), label: clean_set.labels.numpy()})
    if model is not None:
        frame[prediction] = logits(copy.deepcopy(model).float().eval(), x).argmax(1).numpy()
    return frame
