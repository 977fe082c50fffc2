"""The sanitizer's configuration: one flat, commented dataclass. Keyword overrides replace fields; None means unset."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from gradprune_mlflow.errors import BadInput

PRECISIONS = ("auto", "fp32", "bf16")  # the searches' and fine-tuning's (defense/searchnet.py, train_precision.py)

MODES = ("fast", "paper")
DEVICES = ("auto", "cpu", "cuda")
ON_CLEAN = ("skip", "sanitize")
ON_SUSPECT = ("report", "sanitize")
STAGES = ("prune+finetune", "prune", "finetune")
EARLY_STOPS = ("auto", "clean+triggered", "clean")  # what fine-tuning's early stopping reads (defense/finetune.py)

# Settings whose default depends on the mode: name -> (paper, fast). Paper mode keeps the authors' loop (equal loss
# weights, no distillation); fast mode's values were chosen on the Fashion-MNIST benchmark models: distillation keeps
# clean accuracy, which pays for unlearning twice as hard and for longer (docs/algorithm.md, "Fast and paper mode";
# the numbers are in benchmarks/RESULTS.md).
MODE_DEFAULTS: dict[str, tuple[Any, Any]] = {
    "prune_patience": (10, 3),
    "finetune_epochs": (30, 50),
    "finetune_patience": (4, 8),
    "distill_weight": (0.0, 5.0),
    "unlearn_weight": (1.0, 2.0),
    "away_weight": (0.0, 3.0),
}


def verify_steps(cfg: Any) -> int:
    """The verification's search steps: `cfg.verify_steps`, or half the synthesis steps (at least 1) if unset."""
    return max(1, cfg.synth_steps // 2) if cfg.verify_steps is None else cfg.verify_steps


def warp_steps(cfg: Any) -> int:
    """The warp probe's search steps: `cfg.warp_steps`, or half the synthesis steps when it is unset (so that a
    smaller synthesis budget shrinks the probe with it). `cfg` is a SanitizeConfig or the evaluator's EvalConfig."""
    return cfg.synth_steps // 2 if cfg.warp_steps is None else cfg.warp_steps


@dataclass(frozen=True)
class SanitizeConfig:
    # "fast": layer-normalised scores, several filters per step; "paper": the authors' one-filter-per-step loop.
    mode: str = "fast"
    # "auto" takes CUDA when present.
    device: str = "auto"
    seed: int = 0
    # Fraction of each class held out as the trusted validation split (at least one image per class).
    val_fraction: float = 0.1
    # Trigger-free mode when nothing is flagged: "skip" writes no model, "sanitize" unlearns the best candidate anyway.
    on_clean: str = "skip"
    # Trigger-free mode when the flag score is in the suspect band (not flagged, not clean): "report" writes no model
    # and reports the evidence; "sanitize" unlearns the best candidate as on_clean="sanitize" would, for these only.
    on_suspect: str = "report"
    batch_size: int = 128
    # Which halves of Grad-Prune run: both (the method), or one alone for the benchmark's ablations ("finetune":
    # unlearning fine-tuning without pruning; "prune": pruning without fine-tuning).
    stages: str = "prune+finetune"

    # --- pruning ---
    # Largest validation clean-accuracy drop a pruned state may have to be kept (raised to one validation image's
    # worth when the split is small: a 50-image split moves in 2-point steps).
    acc_drop_budget: float = 0.05
    # Stop after this many pruning steps without a lower validation unlearning loss.
    prune_patience: int | None = None
    # Never prune more than this fraction of all conv filters.
    max_prune_fraction: float = 0.3
    # Fast mode: filters pruned in the first step, as a fraction of all filters; the step adapts from there.
    step_fraction: float = 0.01

    # --- fine-tuning (clean CE + triggered CE with true labels, masks held) ---
    # Settings left at None take their mode's default from MODE_DEFAULTS; read them with resolved(name).
    finetune_epochs: int | None = None
    finetune_lr: float = 1e-3
    # Stop after this many epochs without a lower validation loss.
    finetune_patience: int | None = None
    # Random shifts and flips of the clean images while fine-tuning (before triggers are applied).
    finetune_augment: bool = True
    # What fine-tuning's early stopping reads on the validation split: "clean+triggered" (CE of both), "clean" (CE of
    # the clean images alone), or "auto": clean in paper mode (as the paper does), clean+triggered in fast mode.
    early_stop: str = "auto"
    # Weight of the distillation term that keeps clean predictions close to the original model's.
    distill_weight: float | None = None
    # Trigger-free mode, where a warp is unlearned (the warp probe led the flag or its warps joined the mix): the
    # distillation weight is at most this. Distillation holds the model near the backdoored one, and so keeps the part
    # of a warp backdoor that the found warps do not express. None: distill_weight alone.
    warp_distill_weight: float | None = 1.0
    # Weight of the triggered-image CE (true labels) against the clean CE.
    unlearn_weight: float | None = None
    # Weight of a term that pushes triggered images of the other classes away from the trigger's target class
    # (finetune.away_from_target): without it the known-trigger ASR stopped at the model's own confusion with the
    # target class, about 2%. Trigger-free mode leaves it out (0) where nothing is flagged, unless it is set.
    away_weight: float | None = None

    # --- trigger synthesis (trigger-free mode) ---
    synth_steps: int = 200
    synth_restarts: int = 2
    # Precision of the searches' copy of the model (synthesis, probes, rechecks, verification): "fp32", "bf16" or
    # "auto": bf16 on a GPU that supports it; on a CPU with bfloat16 instructions, bf16 only where one search step of
    # this model is clearly faster in it (it is for some architectures and not for others: defense/searchnet.py); fp32
    # on other CPUs. Measuring stays float32.
    search_precision: str = "auto"
    # Precision of fine-tuning's steps: "fp32", "bf16" (autocast; weights and optimiser stay float32) or "auto": bf16 on
    # a GPU that supports it; on a CPU with bfloat16 instructions, bf16 only where one training step of this model is
    # clearly faster in it (defense/train_precision.py); fp32 on other CPUs.
    train_precision: str = "auto"
    # A blend-family class is flagged when its anomaly index (median absolute deviation) exceeds this and its blend
    # strength is below `relative_size` times the median class's (see gradprune_mlflow.defense.probes.decide).
    anomaly_threshold: float = 2.0
    relative_size: float = 0.5
    # A class is flagged when a tiny white or black square (at most 2% of the image) sends this fraction of the other
    # classes' images to it.
    patch_threshold: float = 0.9
    # Or when the class's best square (any fill, the search's own pattern included) sends this much more of them to it
    # than the median class's best square does: on some architectures a clean model's classes answer to the search's
    # patterns (natural adversarial patches), many of them, so a synthesized square counts by how far it stands out.
    patch_margin: float = 0.8
    # The flagged class is also unlearned with another family's triggers when its index there exceeds this.
    companion_threshold: float = 1.5
    # A class is flagged when uniform noise alone (strength 0.2) sends more than this fraction of the other classes'
    # trusted images to it; fresh noise then joins the blend family's unlearning triggers.
    noise_threshold: float = 0.5
    # A class is flagged when a smooth warp that moves no pixel more than one pixel sends this fraction of the other
    # classes' trusted images to it (defense/warp.py: warp triggers such as WaNet's), found in `warp_steps` steps of
    # a search for every class (unset: half of synth_steps; 0 turns the warp probe off). It shares its vote with the
    # noise probe.
    warp_threshold: float = 0.5
    warp_steps: int | None = None
    # A flagged class whose warp response reaches this (while another detector led the flag) is unlearned with its
    # warps too: above every class of the development models without a warp trigger, below their warp targets'.
    warp_companion: float = 0.3
    # The flag decision combines the detectors above into one score per class (defense/evidence.py): each votes
    # 0.5 at its own threshold, rising with this slope; the class is flagged when the combined score reaches
    # `flag_threshold`. Below that but at or above `suspect_threshold` (set above the scores of the development
    # clean models, docs/algorithm.md) the model is `suspect`.
    flag_slope: float = 3.0
    flag_threshold: float = 0.5
    suspect_threshold: float = 0.4
    # Detection first searches every class for half of synth_steps and reads the evidence there. A class flagged at
    # that reading with a flag score of at least this stays flagged, and only its rows search on (for the triggers
    # it is unlearned with); otherwise every class searches the whole budget and the evidence is read again. Set
    # above every development clean model's score at the half budget (benchmarks/RESULTS.md, "Early flags"). Above 1
    # (no score reaches it), or None, every model is read at the whole budget; below flag_threshold, any flag at the
    # first reading stays.
    decisive_score: float | None = 0.6
    # After fine-tuning, search the flagged class's trigger again (at most this many times); while one is still
    # anomalously small, unlearn it too and fine-tune again. 0 turns the check off.
    recheck_rounds: int = 2
    # When the blend family is flagged: steps of the search for a whole-image pattern that works at the noise probe's
    # fixed strength (gradprune_mlflow.defense.fixed_blend.fixed_strength_blend); its patterns are unlearned with the
    # rest. 0 turns it off.
    fixed_blend_steps: int = 300
    # Trigger-free mode: after sanitizing, search the sanitized model for a backdoor again, independently of what was
    # unlearned (every class and family, on the validation split, with the same thresholds; defense/verify.py). A
    # search that flags a class fails the verification: the registry then withholds the alias `sanitized`.
    verify: bool = True
    # The verification's search budget: its synth_steps (unset: half of synth_steps; its warp probe takes half of
    # these unless warp_steps is set) and synth_restarts. Smaller than detection's: it only has to find a backdoor
    # that still works, and at this budget detection still flags the zoo's learned backdoors (benchmarks/RESULTS.md).
    verify_steps: int | None = None
    verify_restarts: int = 1
    # Trigger-free mode: the share of the unlearning images that carry a universal perturbation toward the flagged
    # class, searched again against the model as it learns (defense/agnostic.py), for triggers no synthesized family
    # expresses (warps, sample-specific ones). 0 turns it off.
    agnostic_share: float = 0.0
    # Where a suspect model is sanitized (not flagged; on_suspect or on_clean "sanitize"): the share of the unlearning
    # images that carry the spread square (defense/spread.py), the stamp that moves images to the most classes, as an
    # all-to-all trigger does. 0 turns it off.
    spread_share: float = 0.25
    # Its largest change of a pixel (on the [0, 1] scale) and the signed-gradient steps of each search.
    agnostic_eps: float = 0.1
    agnostic_steps: int = 5

    def resolved(self, name: str) -> Any:
        """The setting `name`, with None replaced by its mode's default (MODE_DEFAULTS)."""
        value = getattr(self, name)
        if name == "warp_steps":
            return warp_steps(self)
        if name == "verify_steps":
            return verify_steps(self)
        if value is None and name in MODE_DEFAULTS:
            return MODE_DEFAULTS[name][self.mode == "fast"]
        return value

    def with_overrides(self, **overrides: Any) -> SanitizeConfig:
        """A copy with the given fields replaced; None values are ignored. Unknown names raise BadInput."""
        names = {f.name for f in fields(self)}
        unknown = set(overrides) - names
        if unknown:
            raise BadInput(f"unknown setting(s) {sorted(unknown)}; valid: {', '.join(sorted(names))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None}).validated()

    def validated(self) -> SanitizeConfig:
        """Return self, or raise BadInput with one line naming the bad setting."""
        if self.mode not in MODES:
            raise BadInput(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.device not in DEVICES:
            raise BadInput(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.on_clean not in ON_CLEAN:
            raise BadInput(f"on_clean must be one of {', '.join(ON_CLEAN)}, got {self.on_clean!r}")
        if self.on_suspect not in ON_SUSPECT:
            raise BadInput(f"on_suspect must be one of {', '.join(ON_SUSPECT)}, got {self.on_suspect!r}")
        for name in ("search_precision", "train_precision"):
            if getattr(self, name) not in PRECISIONS:
                raise BadInput(f"{name} must be one of {', '.join(PRECISIONS)}, got {getattr(self, name)!r}")
        if self.early_stop not in EARLY_STOPS:
            raise BadInput(f"early_stop must be one of {', '.join(EARLY_STOPS)}, got {self.early_stop!r}")
        if self.stages not in STAGES:
            raise BadInput(f"stages must be one of {', '.join(STAGES)}, got {self.stages!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise BadInput(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0.0 < self.max_prune_fraction < 1.0:
            raise BadInput(f"max_prune_fraction must be in (0, 1), got {self.max_prune_fraction}")
        if not 0.0 <= self.spread_share < 1.0:
            raise BadInput(f"spread_share must be in [0, 1), got {self.spread_share}")
        if not 0.0 <= self.agnostic_share < 1.0:
            raise BadInput(f"agnostic_share must be in [0, 1), got {self.agnostic_share}")
        if not 0.0 < self.agnostic_eps <= 1.0:
            raise BadInput(f"agnostic_eps must be in (0, 1], got {self.agnostic_eps}")
        if isinstance(self.agnostic_steps, bool) or not isinstance(self.agnostic_steps, int) or self.agnostic_steps < 1:
            raise BadInput(f"agnostic_steps must be a whole number of at least 1, got {self.agnostic_steps!r}")
        if self.warp_steps is not None and (isinstance(self.warp_steps, bool) or not isinstance(self.warp_steps, int)
                                            or self.warp_steps < 0):
            raise BadInput(f"warp_steps must be a whole number of at least 0, or unset; got {self.warp_steps!r}")
        for name in ("patch_threshold", "patch_margin"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise BadInput(f"{name} must be a number >= 0 (0: always fires), got {value!r}")
        for name in ("warp_threshold", "warp_companion"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < value <= 1.0:
                raise BadInput(f"{name} must be in (0, 1], got {value!r}")
        if isinstance(self.flag_slope, bool) or not isinstance(self.flag_slope, int | float) or self.flag_slope <= 0:
            raise BadInput(f"flag_slope must be a positive number, got {self.flag_slope!r}")
        if not 0.0 < self.suspect_threshold <= self.flag_threshold < 1.0:
            raise BadInput("suspect_threshold and flag_threshold must satisfy 0 < suspect_threshold <= flag_threshold "
                           f"< 1, got {self.suspect_threshold!r} and {self.flag_threshold!r}")
        if self.decisive_score is not None and (
                isinstance(self.decisive_score, bool) or not isinstance(self.decisive_score, int | float)
                or self.decisive_score < 0):
            raise BadInput(f"decisive_score must be a number >= 0 (above 1: no early flags), got "
                           f"{self.decisive_score!r}")
        if not isinstance(self.verify, bool):
            raise BadInput(f"verify must be true or false, got {self.verify!r}")
        for name in ("synth_steps", "synth_restarts", "verify_steps", "verify_restarts"):
            value = getattr(self, name)
            if name == "verify_steps" and value is None:  # unset: half of synth_steps
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BadInput(f"{name} must be a whole number of at least 1, got {value!r}")
        for name, low in (("prune_patience", 1), ("finetune_epochs", 1), ("finetune_patience", 1),
                          ("distill_weight", 0), ("warp_distill_weight", 0), ("unlearn_weight", 0),
                          ("away_weight", 0)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or value < low):
                raise BadInput(f"{name} must be a number >= {low}, or unset; got {value!r}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Every setting as used, mode defaults resolved (what report.json records)."""
        return {name: self.resolved(name) for name in asdict(self)}
