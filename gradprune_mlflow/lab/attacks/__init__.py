"""The attacks of the lab, by name: one table of triggers, and how each is poisoned into the training set.

Every trigger maps [0, 1] images (N, C, H, W) to [0, 1] images of the same shape and is deterministic. All attacks
send triggered images to class 0 (all-to-one) except those named "...-all-to-all"; docs/attacks.md describes each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gradprune_mlflow.defense.triggers import BlendTrigger, PatchTrigger, Trigger
from gradprune_mlflow.lab.attacks.all_to_all import AllToAllTrigger
from gradprune_mlflow.lab.attacks.badnets import StampTrigger
from gradprune_mlflow.lab.attacks.blended import SmoothImageTrigger
from gradprune_mlflow.lab.attacks.lowfreq import LowFrequencyTrigger
from gradprune_mlflow.lab.attacks.sample_specific import SampleSpecificTrigger
from gradprune_mlflow.lab.attacks.sig import sig
from gradprune_mlflow.lab.attacks.wanet import WarpTrigger


@dataclass(frozen=True)
class Poisoning:
    """How an attack's trigger enters the training set, besides the poison rate.

    clean_label: poison only images of the target class and keep every label (else: images of other classes,
    relabelled to the backdoor's target). noise_ratio: WaNet's noise mode, that many noise samples per poisoned one
    (the trigger's `noisy`, true labels kept); 0 for none.
    """

    clean_label: bool = False
    noise_ratio: float = 0.0


ATTACKS: dict[str, Callable[[], Trigger]] = {
    # BadNets: a white 3x3 patch bottom right; a red/green checker; a noise texture; other places; a random place.
    "badnets": lambda: PatchTrigger(0, size=3, location="bottom-right"),
    "badnets-checker": lambda: StampTrigger(0, size=3, location="bottom-right", pattern="checker"),
    "badnets-texture": lambda: StampTrigger(0, size=4, location="bottom-right", pattern="noise", seed=0),
    "badnets-top-left": lambda: PatchTrigger(0, size=3, location="top-left"),
    "badnets-center": lambda: PatchTrigger(0, size=3, location="center"),
    "badnets-random": lambda: StampTrigger(0, size=4, location="random", pattern="checker"),
    "badnets-clean-label": lambda: PatchTrigger(0, size=3, location="bottom-right"),
    "badnets-all-to-all": lambda: AllToAllTrigger(PatchTrigger(0, size=3, location="bottom-right"), num_classes=10),
    # Blended: seeded noise at alpha 0.2; a smooth, natural-looking picture at alpha 0.15.
    "blend": lambda: BlendTrigger(0, alpha=0.2, pattern="noise", seed=0),
    "smooth": lambda: SmoothImageTrigger(0, alpha=0.15),
    # SIG: an additive sinusoid, relabelled from other classes or clean-label as in the paper.
    "signal": lambda: sig(0, delta=0.12, frequency=6),
    "sig-clean-label": lambda: sig(0, delta=0.12, frequency=6),
    "wanet": lambda: WarpTrigger(0, k=4, strength=0.5, seed=0),
    "ssba-like": lambda: SampleSpecificTrigger(0, epsilon=8 / 255, seed=0),
    "lowfreq": lambda: LowFrequencyTrigger(0, amplitude=0.1, cutoff=3, seed=0),
}

# Attacks poisoned otherwise than by the default Poisoning().
POISONING: dict[str, Poisoning] = {
    "badnets-clean-label": Poisoning(clean_label=True),
    "sig-clean-label": Poisoning(clean_label=True),
    "wanet": Poisoning(noise_ratio=2.0),  # the paper's cross ratio: twice as many noise samples as poisoned ones
}


def known_attack(name: str, also: tuple[str, ...] = ()) -> str:
    """`name` if it is an attack (or one of `also`); otherwise ValueError listing the valid names."""
    if name not in ATTACKS and name not in also:
        raise ValueError(f"unknown attack {name!r}; choose one of {', '.join((*also, *ATTACKS))}")
    return name



def attack_trigger(name: str) -> Trigger:
    """The trigger of a named attack; unknown names list the valid ones."""
    return ATTACKS[known_attack(name)]()


def poisoning(name: str) -> Poisoning:
    """How the named attack is poisoned into the training set."""
    return POISONING.get(known_attack(name), Poisoning())


__all__ = ["ATTACKS", "POISONING", "AllToAllTrigger", "LowFrequencyTrigger", "Poisoning", "SampleSpecificTrigger",
           "SmoothImageTrigger", "known_attack", "StampTrigger", "WarpTrigger", "attack_trigger", "poisoning"]
