"""How often uniform noise alone sends trusted images to each model's target: what `noise_threshold` is set against.

    .venv/bin/python benchmarks/noise_probe.py

Trigger-free mode flags a class, and unlearns fresh noise, where the noise probe (`noise_responses`,
gradprune_mlflow/defense/probes.py) is above `noise_threshold` (0.5). This prints that response, on the trusted
training split the defense itself sees, for the
benchmark's cached small CNNs (clean, BadNets, Blend, SIG; trained or loaded from benchmarks/cache) and the tiny
ResNet, at the target (class 0), and for the class noise sends the most images to. Forward passes only: seconds,
once the models are cached (training one takes about a minute).
"""

from __future__ import annotations

from pathlib import Path

from gradprune_mlflow import lab
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.probes import noise_responses

HERE = Path(__file__).parent

CASES = [("small_cnn", "clean", s) for s in (0, 1)] + [
    ("small_cnn", attack, s) for attack in ("badnets", "blend") for s in (0, 1, 2)
] + [("small_cnn", "signal", 0), ("tiny_resnet", "badnets", 0)]


def main() -> int:
    print("model                     seed  to class 0   most (class)")
    for arch, attack, seed in CASES:
        model = lab.backdoored_model(arch, "badnets" if attack == "clean" else attack, n_train=50_000, epochs=5,
                                     seed=seed, poison_rate=0.0 if attack == "clean" else 0.1,
                                     cache_dir=HERE / "cache")
        clean = lab.trusted_set(100, seed)
        train, _ = clean.split(0.1, seed)
        net = Normalized(model, clean.meta.mean, clean.meta.std).eval()
        rates = noise_responses(net, train, clean.meta.num_classes, seed)
        top = max(range(len(rates)), key=rates.__getitem__)
        print(f"{arch + ' ' + attack:25s} {seed:4d}  {100 * rates[0]:9.1f}%  {100 * rates[top]:6.1f}% ({top})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
