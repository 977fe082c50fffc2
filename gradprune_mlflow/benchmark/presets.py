"""The benchmark's presets: which models, attacks, clean budgets and seeds one command runs."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class Preset:
    name: str
    archs: tuple[str, ...]
    attacks: tuple[str, ...]
    per_class: tuple[int, ...]  # trusted clean images per class
    seeds: tuple[int, ...]  # each seed: its own backdoored model, clean draw and defense randomness
    image: str = "gray28"  # see lab.IMAGE_FORMATS
    n_train: int = 50_000  # attacker's training images (Fashion-MNIST has 50,000 for the attacker)
    epochs: int = 5  # attacker's training epochs
    test_images: int | None = None  # None: all 10,000 test images
    # Per-defense keyword options, e.g. {"anp": {"iterations": 500}}; the markdown header lists them.
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def with_overrides(self, **kw) -> Preset:
        """A copy with the non-None keyword arguments replaced (tuples from lists)."""
        return replace(self, **{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items() if v is not None})


ATTACKS = ("badnets", "blend", "signal")
PRESETS = {
    "cpu": Preset("cpu", ("small_cnn", "tiny_resnet"), ATTACKS, (10, 50, 100), (0, 1, 2)),
    "gpu": Preset("gpu", ("preact_resnet18",), ATTACKS, (10, 50, 100), (0, 1, 2), image="rgb32", epochs=15),
    # minutes on 2 cores: for trying the command and for the tests, not for conclusions
    "smoke": Preset("smoke", ("small_cnn",), ("badnets",), (20,), (0,), n_train=6000, epochs=2, test_images=1000,
                    options={"anp": {"iterations": 50}}),
}


def get_preset(name: str) -> Preset:
    """The preset `name`; unknown names raise ValueError listing the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def parse_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """['anp.iterations=500', ...] -> {'anp': {'iterations': 500}}; numbers become int or float."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        defense, dot, key = name.partition(".")
        if not (sep and dot and defense and key):
            raise ValueError(f"option {item!r} must look like DEFENSE.NAME=VALUE, e.g. anp.iterations=500")
        for cast in (int, float, str):
            try:
                out.setdefault(defense, {})[key] = cast(value)
                break
            except ValueError:
                continue
    return out
