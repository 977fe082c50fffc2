"""Backdoored and clean models of any zoo architecture, trained on the attacker's data and cached by their arguments."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.lab.attacks import Poisoning, attack_trigger, poisoning
from gradprune_mlflow.lab.data import attacker_data
from gradprune_mlflow.lab.formats import COLOUR_SEEDS, channels, normalisation, to_format
from gradprune_mlflow.models.train import poison_set, train_classifier
from gradprune_mlflow.models.zoo import create_model


def backdoored_model(
    arch: str = "small_cnn",
    attack: str = "badnets",
    *,
    poison_rate: float = 0.1,
    n_train: int = 20_000,
    epochs: int = 2,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    image: str = "gray28",
    device: str = "cpu",
    clean_label: bool | None = None,
    noise_ratio: float | None = None,
) -> nn.Module:
    """Train (or load from `cache_dir`) a zoo model on poisoned attacker data; poison_rate=0 gives a clean model.

    `image` picks the input format (see IMAGE_FORMATS); `device` where training runs. `clean_label` and
    `noise_ratio` override the attack's own Poisoning (lab.attacks.POISONING; see models.train.poison_set). The
    model returned is on CPU.
    """
    trigger = attack_trigger(attack)
    options = poisoning(attack)
    options = dataclasses.replace(options, **{k: v for k, v in (("clean_label", clean_label),
                                                                ("noise_ratio", noise_ratio)) if v is not None})
    size = 28 if image == "gray28" else 32
    model = create_model(arch, num_classes=10, in_channels=channels(image), image_size=size)
    slow_norms = _slow_batchnorms(model)
    name = cache_name(model, arch, attack, poison_rate, n_train, epochs, seed, image, options)
    path = Path(cache_dir) / name if cache_dir else None
    if path is not None and path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    data = attacker_data(n_train)
    mean, std = normalisation(image)
    images = to_format(data.images, image, COLOUR_SEEDS["attacker"] + seed)
    poisoned, labels, _ = poison_set(images, data.labels, trigger, poison_rate, seed=seed,
                                     clean_label=options.clean_label, noise_ratio=options.noise_ratio)
    train_classifier(model, poisoned, labels, mean=mean, std=std, epochs=epochs, seed=seed, device=device)
    model.cpu()
    if slow_norms:
        _recalibrate(model, slow_norms, poisoned, mean, std)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval()


def cache_name(model: nn.Module, arch: str, attack: str, poison_rate: float, n_train: int, epochs: int, seed: int,
               image: str, options: Poisoning) -> str:
    """The cache file name of a trained model: "{arch}-{attack}-{digest of every argument}.pt".

    Parts are only ever added for arguments that differ from their default, so that models already trained (some took
    half an hour) keep their names.
    """
    # The parameter shapes are part of the key: a changed architecture must not load stale weights.
    shapes = [list(p.shape) for p in model.state_dict().values()]
    parts = [arch, attack, poison_rate, n_train, epochs, seed, shapes] + ([image] if image != "gray28" else [])
    if _slow_batchnorms(model):
        parts.append("batchnorm-recalibrated")
    if options != Poisoning():
        parts.append(dataclasses.asdict(options))
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
    return f"{arch}-{attack}-{digest}.pt"


def clean_model(arch: str = "small_cnn", **options: Any) -> nn.Module:
    """A model trained exactly like backdoored_model's, on the same attacker data with no poison at all.

    `options` are backdoored_model's keyword arguments (n_train, epochs, seed, cache_dir, image, device). It is
    backdoored_model(arch, "badnets", poison_rate=0): the same cache entry, which the benchmarks already use for
    their clean models.
    """
    return backdoored_model(arch, "badnets", poison_rate=0.0, **options)


def _slow_batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorms that average their statistics more slowly than PyTorch's default (mobilenet_v3_small: 0.01)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.momentum is not None and m.momentum < 0.1]


@torch.no_grad()
def _recalibrate(model: nn.Module, norms: list, images: torch.Tensor, mean, std, batch_size: int = 256) -> None:
    """Set `norms`' running statistics to the exact averages over the training images, the trained weights unchanged.

    At momentum 0.01 the statistics after a few hundred steps are still mostly their initial values: a lab-trained
    mobilenet_v3_small then put every test image in one class in eval mode, while it trained well.
    """
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over every batch
    net = Normalized(model, mean, std).train()
    for batch in images.split(batch_size):
        net(batch)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()
