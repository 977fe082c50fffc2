"""Defenses registered by name behind one interface, timm style: an unknown name lists the valid ones.

A defense gets the backdoored model, the trusted clean set, the known trigger (only when it is a known-trigger
defense; trigger-free defenses get None) and a seed, and returns the defended model. It never sees test data or the
evaluation trigger: the runner measures afterwards, so no threshold can be tuned on what is reported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from gradprune_mlflow.data.cleanset import CleanSet
from gradprune_mlflow.defense.triggers import Trigger


@dataclass
class Defended:
    """What a defense returns: the model and anything worth a column (flagged, pruned filters, ...)."""

    model: nn.Module
    info: dict[str, Any] = field(default_factory=dict)


# fn(model, clean_set, trigger_or_None, seed, **options) -> Defended; options are the defense's own keyword
# arguments (e.g. ANP's iterations), set per preset or with --option on the command line.
DefenseFn = Callable[..., Defended]


@dataclass(frozen=True)
class Defense:
    name: str
    fn: DefenseFn
    uses_trigger: bool  # True: the known trigger is handed over; False: the defense gets None
    summary: str


DEFENSES: dict[str, Defense] = {}


def register(name: str, *, uses_trigger: bool, summary: str) -> Callable[[DefenseFn], DefenseFn]:
    """Decorator: add `fn` to DEFENSES under `name`."""

    def deco(fn: DefenseFn) -> DefenseFn:
        if name in DEFENSES:
            raise ValueError(f"defense {name!r} is registered twice")
        DEFENSES[name] = Defense(name, fn, uses_trigger, summary)
        return fn

    return deco


def get_defense(name: str) -> Defense:
    """The registered defense `name`; unknown names raise ValueError listing the valid ones."""
    _load_all()
    if name not in DEFENSES:
        raise ValueError(f"unknown defense {name!r}; choose from {', '.join(DEFENSES)}")
    return DEFENSES[name]


# The order of the table: the baselines as practitioners know them, then Grad-Prune, then its ablations.
TABLE_ORDER = ("none", "fine-tuning", "ft-sam", "fine-pruning", "anp", "neural-cleanse", "grad-prune-paper",
               "grad-prune-fast", "grad-prune-free", "grad-prune-detect", "unlearn-ft-known", "unlearn-ft-free",
               "prune-only-known", "prune-only-free")


def defense_names() -> list[str]:
    """Every registered name, in the order of the table (defenses outside TABLE_ORDER last)."""
    _load_all()
    rank = {name: i for i, name in enumerate(TABLE_ORDER)}
    return sorted(DEFENSES, key=lambda n: rank.get(n, len(rank)))


def run_defense(
    defense: Defense, model: nn.Module, clean: CleanSet, trigger: Trigger | None, seed: int, **options: Any
) -> Defended:
    """Call a defense with what it may see: the known trigger only if it is a known-trigger defense."""
    return defense.fn(model, clean, trigger if defense.uses_trigger else None, seed, **options)


def _load_all() -> None:
    # Importing the modules runs their @register decorators.
    from gradprune_mlflow.benchmark import gradprune  # noqa: F401
    from gradprune_mlflow.benchmark.baselines import (  # noqa: F401
        anp,
        fine_pruning,
        fine_tuning,
        ft_sam,
        neural_cleanse,
        no_defense,
    )
