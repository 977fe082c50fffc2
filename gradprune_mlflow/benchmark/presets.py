"""The benchmark's presets: which models, attacks, clean budgets and seeds one command runs.

Seeds are kept apart: settings may be chosen on the development seeds (`--split dev`, the default) only, and the test
seeds (`--split test`) give the figures that are reported as held-out (benchmark.guard checks that nothing changed
in between). The attack "clean" is the lab's clean model of the same architecture: the detection table's negatives.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from gradprune_mlflow.lab.attacks import ATTACKS as LAB_ATTACKS


def lab_attacks() -> tuple[str, ...]:
    """Every attack the lab has, in its order."""
    return tuple(LAB_ATTACKS)


@dataclass(frozen=True)
class Preset:
    name: str
    archs: tuple[str, ...]
    attacks: tuple[str, ...]
    per_class: tuple[int, ...]  # trusted clean images per class
    # Each seed: its own backdoored model, clean draw and defense randomness; development and test seeds never meet.
    dev_seeds: tuple[int, ...]
    test_seeds: tuple[int, ...] = ()
    image: str = "gray28"  # see lab.IMAGE_FORMATS
    n_train: int = 50_000  # attacker's training images (Fashion-MNIST has 50,000 for the attacker)
    epochs: int = 5  # attacker's training epochs
    test_images: int | None = None  # None: all 10,000 test images
    # Per-defense keyword options, e.g. {"anp": {"iterations": 500}}; the markdown header lists them.
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    defenses: tuple[str, ...] | None = None  # the command's default list; None: every registered defense

    def seeds(self, split: str = "dev") -> tuple[int, ...]:
        """The seeds of `split` ("dev" or "test")."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        seeds = self.dev_seeds if split == "dev" else self.test_seeds
        if not seeds:
            raise ValueError(f"preset {self.name!r} has no {split} seeds")
        return seeds

    def with_overrides(self, **kw) -> Preset:
        """A copy with the non-None keyword arguments replaced (tuples from lists)."""
        return replace(self, **{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items() if v is not None})


SPLITS = ("dev", "test")
CLEAN = "clean"  # the attack name of the lab's clean models
ATTACKS = ("badnets", "blend", "signal")
# Clean models and one attack of five families (docs/attacks.md), what fits the CPU's hour; zoo-gpu runs them all.
ZOO_QUICK_ATTACKS = (CLEAN, "badnets", "blend", "signal", "wanet", "badnets-all-to-all")
# The two detectors (the detection table: Neural Cleanse and trigger-free Grad-Prune as the product runs it, clean
# models left alone), the two fine-tunings, and Grad-Prune with the known trigger.
ZOO_QUICK_DEFENSES = ("none", "fine-tuning", "ft-sam", "neural-cleanse", "grad-prune-fast", "grad-prune-detect")
PRESETS = {
    "cpu": Preset("cpu", ("small_cnn", "tiny_resnet"), ATTACKS, (10, 50, 100), (0, 1, 2), test_seeds=(5, 6, 7)),
    "gpu": Preset("gpu", ("preact_resnet18",), ATTACKS, (10, 50, 100), (0, 1, 2), test_seeds=(5, 6, 7), image="rgb32",
                  epochs=15),
    # minutes on 2 cores: for trying the command and for the tests, not for conclusions
    "smoke": Preset("smoke", ("small_cnn",), ("badnets",), (20,), (0,), test_seeds=(1,), n_train=6000, epochs=2,
                    test_images=1000, options={"anp": {"iterations": 50}}),
    # Planned for about an hour on 2 CPU cores (docs/development.md, "Benchmark zoo"): small models, few epochs.
    "zoo-cpu-quick": Preset("zoo-cpu-quick", ("small_cnn",), ZOO_QUICK_ATTACKS, (50,), (0,), test_seeds=(100, 101),
                            n_train=6000, epochs=2, test_images=1000, defenses=ZOO_QUICK_DEFENSES),
    # Clean models only, many seeds: the detectors' false-positive rate, with the product's default on_clean=skip.
    "zoo-clean-cpu": Preset("zoo-clean-cpu", ("small_cnn", "small_cnn_nobn"), (CLEAN,), (50,), (0, 1, 2),
                            test_seeds=tuple(range(100, 110)), n_train=6000, epochs=2, test_images=1000,
                            defenses=("none", "neural-cleanse", "grad-prune-detect")),
    # Every lab attack on the two small CNNs (with and without BatchNorm), for a longer CPU run.
    "zoo-cpu": Preset("zoo-cpu", ("small_cnn", "small_cnn_nobn"), (CLEAN, *lab_attacks()), (10, 50), (0, 1),
                      test_seeds=(100, 101, 102), n_train=6000, epochs=2, test_images=1000,
                      defenses=(*ZOO_QUICK_DEFENSES, "grad-prune-free", "fine-pruning", "anp")),
    "zoo-gpu": Preset("zoo-gpu", ("resnet18", "mobilenet_v3_small", "vgg11_bn", "efficientnet_b0"),
                      (CLEAN, *lab_attacks()),
                      (10, 50, 100, 250), (0, 1, 2), test_seeds=(100, 101, 102, 103, 104), image="color32",
                      epochs=15),
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


def small_cnn_zoo(split: str, epochs: int, attacks: list[str] | None = None):
    """(preset, arch, attack, seed) of the zoo-cpu-quick preset's small CNNs of `split` (its attacks, or `attacks`,
    trained for `epochs`) and, at that preset's own epochs, of the zoo-clean-cpu preset's clean models: the models
    the per-model probe studies (benchmarks/warp_probe.py, benchmarks/spread_probe.py) run on."""
    base = get_preset("zoo-cpu-quick")
    quick = base.with_overrides(epochs=epochs, attacks=attacks)
    for seed in quick.seeds(split):
        for attack in quick.attacks:
            yield quick, "small_cnn", attack, seed
    if epochs == base.epochs:  # the clean models of the false-positive preset (its own training budget)
        clean = get_preset("zoo-clean-cpu")
        for arch in clean.archs:
            for seed in clean.seeds(split):
                if arch != "small_cnn" or seed not in quick.seeds(split):
                    yield clean, arch, CLEAN, seed
