"""Backdoored models and trusted clean sets built from reference data: the attacker's side of the story.

Used by the tests, `gradprune demo` and the benchmark, so that all three measure the same thing. Fashion-MNIST's
60,000 training images are split once: the attacker trains on the first 50,000, the trusted clean set is drawn from the
last 10,000, and the 10,000 test images are used only for measuring. Any architecture of models.zoo can be trained,
the torchvision and timm ones included, in any image format of IMAGE_FORMATS, with any attack of ATTACKS
(lab.attacks; docs/attacks.md).
"""

from __future__ import annotations

from gradprune_mlflow.lab.attacks import (
    ATTACKS,
    POISONING,
    AllToAllTrigger,
    LowFrequencyTrigger,
    Poisoning,
    SampleSpecificTrigger,
    SmoothImageTrigger,
    StampTrigger,
    WarpTrigger,
    attack_trigger,
    poisoning,
)
from gradprune_mlflow.lab.data import ATTACKER_SPLIT, attacker_data, test_data, trusted_clean_set, trusted_set
from gradprune_mlflow.lab.formats import (
    COLOUR_MEAN,
    COLOUR_SEEDS,
    COLOUR_STD,
    IMAGE_FORMATS,
    channels,
    normalisation,
    to_format,
)
from gradprune_mlflow.lab.training import backdoored_model, clean_model

__all__ = [
    "ATTACKER_SPLIT", "ATTACKS", "COLOUR_MEAN", "COLOUR_SEEDS", "COLOUR_STD", "IMAGE_FORMATS", "POISONING",
    "AllToAllTrigger", "LowFrequencyTrigger", "Poisoning", "SampleSpecificTrigger", "SmoothImageTrigger",
    "StampTrigger", "WarpTrigger", "attack_trigger", "attacker_data", "backdoored_model", "channels", "clean_model",
    "normalisation", "poisoning", "test_data", "to_format", "trusted_clean_set", "trusted_set",
]
