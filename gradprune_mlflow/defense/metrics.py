"""What we measure: clean accuracy, attack success rate (ASR) and robust accuracy (RA), and the validation losses.

- clean accuracy: correct predictions on clean images.
- ASR: triggered images of every class but the target that the model assigns to the target. For an all-to-all
  trigger (`mode == "all-to-all"`, which sends class y to `trigger.targets(y)`): triggered images of every class that
  the model assigns to their own shifted class.
- RA: those same triggered images that the model still assigns to their true class.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn import functional as F

from gradprune_mlflow.data.cleanset import Split
from gradprune_mlflow.defense.triggers import Trigger


def autocast(device: torch.device):
    """bf16 autocast on CUDA (safe for forward passes of conv nets); nothing on CPU, where results must be exact."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def training_layout(net: nn.Module | None):
    """`net`'s weights laid out channels-last for the block when it trains on a CPU, then back to the default layout.
    oneDNN's convolutions and their gradients are faster in it for most architectures (benchmarks/RESULTS.md, "Speed
    of a trigger-free run"); the function computed is the same up to float rounding. A 3-D conv has no such layout,
    and None (no model, e.g. no teacher) leaves nothing to lay out."""
    convert = (net is not None and next(net.parameters()).device.type == "cpu"
               and all(p.dim() <= 4 for p in net.parameters()))
    if convert:
        net.to(memory_format=torch.channels_last)
    try:
        yield net
    finally:
        if convert:
            net.to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def eval_mode(net: nn.Module):
    """`net` in eval mode for the block, then every module back in its own mode (not all in the wrapper's: a model
    may keep some modules, e.g. frozen BatchNorm, in eval mode while training)."""
    modes = {m: m.training for m in net.modules()}
    net.eval()
    try:
        yield net
    finally:
        for m, mode in modes.items():
            m.training = mode


# Images per forward pass. On a CPU, large batches are slower per image: activations above glibc's mmap threshold
# (32 MB at most) are mapped and page-faulted afresh on every pass (benchmarks/RESULTS.md, "Speed").
CUDA_BATCH, CPU_BATCH = 512, 128


def batch_for(device: torch.device) -> int:
    """Images per forward pass on `device`."""
    return CUDA_BATCH if device.type == "cuda" else CPU_BATCH


@torch.no_grad()
def logits(net: nn.Module, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Logits of `net` (in eval mode) for [0, 1] images, computed in batches on the net's device (batch_for it
    when `batch_size` is None); returned on CPU."""
    device = next(net.parameters()).device
    out = []
    with eval_mode(net), autocast(device):
        for chunk in images.split(batch_size or batch_for(device)):
            out.append(net(chunk.to(device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def target_rate(net: nn.Module, images: torch.Tensor, target: int) -> float:
    """The fraction of `images` that `net` (a frozen search copy, in eval mode) puts in class `target`: how a probe
    measures its candidate trigger."""
    device = next(net.parameters()).device
    hits = sum(int((net(x.to(device)).argmax(1) == target).sum()) for x in images.split(batch_for(device)))
    return hits / max(len(images), 1)


def accuracy(net: nn.Module, data: Split, batch_size: int | None = None) -> float:
    """Fraction of `data` classified correctly."""
    if len(data) == 0:
        return float("nan")
    return (logits(net, data.images, batch_size).argmax(1) == data.labels).float().mean().item()


def mean_loss(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int | None = None) -> float:
    """Mean cross-entropy of `net` on (images, labels)."""
    return F.cross_entropy(logits(net, images, batch_size), labels).item()


def attack_metrics(
    net: nn.Module, data: Split, trigger: Trigger, batch_size: int | None = None
) -> tuple[float | None, float | None, float | None]:
    """(ASR, RA, clean target rate) of `trigger` on the images of `data` not of the trigger's target class; None when
    there are none (NaN would make report.json invalid JSON).

    The clean target rate is the share of the same images, untriggered, that the model already puts in the target
    class: the part of the ASR that is the model's own confusion, not the backdoor (ASR cannot be expected below it).
    An all-to-all trigger is measured on every image of `data`, each against its own target (`backdoor_targets`).
    """
    if is_all_to_all(trigger):
        return _all_to_all_metrics(net, data, trigger, batch_size)
    keep = data.labels != trigger.target
    if not keep.any():
        return None, None, None
    preds = logits(net, trigger.apply(data.images[keep]), batch_size).argmax(1)
    clean = logits(net, data.images[keep], batch_size).argmax(1)
    return ((preds == trigger.target).float().mean().item(), (preds == data.labels[keep]).float().mean().item(),
            (clean == trigger.target).float().mean().item())


def is_all_to_all(trigger: Trigger) -> bool:
    """Whether `trigger` sends each class to its own target (`mode == "all-to-all"`, with `targets(labels)`)."""
    return getattr(trigger, "mode", "all-to-one") == "all-to-all"


def backdoor_targets(trigger: Trigger, labels: torch.Tensor) -> torch.Tensor:
    """The class the backdoor sends a triggered image of each class in `labels` to."""
    if is_all_to_all(trigger):
        return trigger.targets(labels)
    return torch.full_like(labels, trigger.target)


def _all_to_all_metrics(
    net: nn.Module, data: Split, trigger: Trigger, batch_size: int | None
) -> tuple[float | None, ...]:
    """attack_metrics for an all-to-all trigger: every image counts, each against its own shifted label."""
    if len(data) == 0:
        return None, None, None
    targets = backdoor_targets(trigger, data.labels)
    preds = logits(net, trigger.apply(data.images), batch_size).argmax(1)
    clean = logits(net, data.images, batch_size).argmax(1)
    return ((preds == targets).float().mean().item(), (preds == data.labels).float().mean().item(),
            (clean == targets).float().mean().item())


def evaluate(
    net: nn.Module, data: Split, trigger: Trigger | None, batch_size: int | None = None
) -> dict[str, float | None]:
    """The report's metric block: clean_accuracy, attack_success_rate, robust_accuracy and clean_target_rate (the
    last three None without a trigger)."""
    acc = accuracy(net, data, batch_size)
    out: dict[str, float | None] = {"clean_accuracy": None if acc != acc else round(acc, 6)}
    rates = attack_metrics(net, data, trigger, batch_size) if trigger is not None else (None, None, None)
    for key, value in zip(("attack_success_rate", "robust_accuracy", "clean_target_rate"), rates, strict=True):
        out[key] = None if value is None else round(value, 6)
    return out
