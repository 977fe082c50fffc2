"""Neural Cleanse (Wang et al., IEEE S&P 2019): reverse-engineer a trigger per class, flag outliers, unlearn.

The reverse engineering is NC's: for every class, the smallest mask + pattern that sends clean images there (Adam,
lr 0.1, betas (0.5, 0.9), an L1 mask penalty whose weight adapts to success); we run it through our batched
synthesis (patch family) with Grad-Prune's step budget, so the two trigger-free defenses search equally hard. A
class is flagged when its anomaly index (MAD) exceeds 2, the paper's threshold; nothing flagged means nothing is done,
as in the paper. Mitigation is NC's unlearning: fine-tune with 20% of the images stamped with the reversed trigger
and their true labels. The paper fine-tunes one epoch of a large training set; with a few hundred images we train up
to 20 epochs and keep the epoch with the best validation score (clean accuracy plus accuracy under the reversed
trigger, both on the trusted validation split).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from gradprune_mlflow.benchmark.baselines.training import device_of as _device
from gradprune_mlflow.benchmark.baselines.training import sgd_finetune
from gradprune_mlflow.benchmark.registry import Defended, register
from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.data.cleanset import CleanSet, Split
from gradprune_mlflow.defense.metrics import accuracy
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.progress import SilentProgress
from gradprune_mlflow.defense.searchnet import search_copy
from gradprune_mlflow.defense.synthesis import detect, synthesize
from gradprune_mlflow.defense.triggers import Trigger

STAMP_FRACTION, MAD_THRESHOLD = 0.2, 2.0


@register("neural-cleanse", uses_trigger=False, summary="Neural Cleanse: reversed patch trigger, MAD flag, unlearning")
def neural_cleanse(
    model: nn.Module, clean: CleanSet, trigger: Trigger | None, seed: int, steps: int | None = None
) -> Defended:
    """NC; `steps` (default: Grad-Prune's `synth_steps`) is lowered only by tests that check the plumbing."""
    train, val = clean.split(0.1, seed)
    work = copy.deepcopy(model).float().eval()
    net = Normalized(work, clean.meta.mean, clean.meta.std).to(_device(work))
    cfg, gen = SanitizeConfig(), torch.Generator().manual_seed(seed)
    # the search copy Grad-Prune's synthesis uses too, so that the two are timed alike
    found = synthesize(search_copy(net, train.images[:8]), train.images, train.labels, clean.meta.num_classes, "patch",
                       steps=steps or cfg.synth_steps,
                       restarts=cfg.synth_restarts, generator=gen, progress=SilentProgress())
    det = detect([found], MAD_THRESHOLD)
    info = {"flagged": det.flagged, "detected_target": det.target, "anomaly_index": round(det.anomaly_index, 3)}
    if not det.flagged:
        return Defended(work, info)
    reversed_trigger = found.smallest_trigger(det.target)

    def stamp(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        pick = torch.rand(len(x), generator=g) < STAMP_FRACTION
        x = x.clone()
        x[pick] = reversed_trigger.apply(x[pick])
        return x

    val_stamped = Split(reversed_trigger.apply(val.images), val.labels)
    info["finetune_epochs"] = sgd_finetune(net, train, val, seed=seed, stamp=stamp,
                                           score=lambda m: accuracy(m, val) + accuracy(m, val_stamped))
    return Defended(work, info)
