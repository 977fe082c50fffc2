"""Detection on clean and backdoored models: what trigger-free mode flags, and on what evidence.

    .venv/bin/python benchmarks/probe_detection.py            # about 2 minutes a model (+1-2 to train one not cached)

For each model (trained or loaded from benchmarks/cache), on the trusted training split the defense itself sees,
this runs the detection step of trigger-free mode (gradprune_mlflow.defense.probes.find_backdoor) with the default
settings and prints: the anomaly index's top class in each family, the blend strength of the blend family's top
class relative to the median class's, the patch probe's best class and response, the noise probe's, and the
decision. Clean models (poison rate 0) show the false positives; a "flagged" there is a false alarm.
Writes benchmarks/results/probe-detection.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from gradprune_mlflow import lab
from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.probes import find_backdoor, relative_size
from gradprune_mlflow.defense.progress import SilentProgress
from gradprune_mlflow.defense.synthesis import anomaly_index

HERE = Path(__file__).parent
CASES = ([("small_cnn", "clean", s) for s in range(5)] + [("tiny_resnet", "clean", s) for s in (0, 1)]
         + [("small_cnn", a, s) for a in ("badnets", "blend") for s in (0, 1, 2)]
         + [("small_cnn", "signal", 0), ("tiny_resnet", "badnets", 0)])


def row(arch: str, attack: str, seed: int) -> str:
    model = lab.backdoored_model(arch, "badnets" if attack == "clean" else attack, n_train=50_000, epochs=5,
                                 seed=seed, poison_rate=0.0 if attack == "clean" else 0.1, cache_dir=HERE / "cache")
    clean = lab.trusted_set(100, seed)
    train, _ = clean.split(0.1, seed)
    net = Normalized(model, clean.meta.mean, clean.meta.std).eval()
    torch.manual_seed(seed)
    cfg = SanitizeConfig(seed=seed)
    det, results, _, noise, _ = find_backdoor(net, train, clean.meta.num_classes, cfg,
                                              torch.Generator().manual_seed(seed), SilentProgress())
    tops = []
    for res in results:
        idx = anomaly_index(res.class_sizes())
        k = int(idx.argmax())
        tops.append(f"{k} ({float(idx[k]):.2f})")
    blend = next(r for r in results if r.family == "blend")
    k_blend = int(anomaly_index(blend.class_sizes()).argmax())
    hit = max(det.probes["patch"], key=lambda h: h["best"])
    k_noise = max(range(len(noise)), key=noise.__getitem__)
    verdict = f"**{det.target}** by {det.flagged_by}" if det.flagged else "not flagged"
    return (f"| {arch} {attack} | {seed} | {tops[0]} | {tops[1]} | {relative_size(blend, k_blend):.2f} | "
            f"{hit['target']}: {100 * hit['best']:.1f}% ({hit['fill']} {hit['window']['side']}px: "
            f"{100 * hit['response']:.1f}%) | "
            f"{k_noise}: {100 * noise[k_noise]:.1f}% | {verdict} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="arch:attack:seed cases (default: all)")
    args = parser.parse_args()
    cases = [(a, b, int(c)) for a, b, c in (x.split(":") for x in args.only)] if args.only else CASES
    lines = ["| model | seed | patch index: top class | blend index: top class | its blend strength / median | "
             "patch probe: best class | noise probe: best class | decision |", "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for case in cases:
        lines.append(row(*case))
        print(lines[-1], flush=True)
    out = HERE / "results" / "probe-detection.md"
    if not args.only:
        out.write_text("Written by `.venv/bin/python benchmarks/probe_detection.py` (trusted training split, 90 "
                       "images per class; default settings).\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
