"""Seconds of one trigger-search step per architecture and search precision: whether `search_precision=bf16` pays on
this machine.

    .venv/bin/python benchmarks/search_step.py [--threads 2] [--archs small_cnn mobilenet_v3_small resnet18]

A step is what synthesis and the probes repeat: a forward and a backward pass to the input over 480 images (20 rows of
24 images: two restarts for ten classes), through the search copy the product builds (defense/searchnet.py: folded
BatchNorm, channels-last on a CPU, and for "bf16" bfloat16 weights behind float32 inputs), timed by the function
`search_precision=auto` times with (searchnet.step_seconds: the fastest of `--repeats` steps after a warm-up step,
the two precisions taking turns). Untrained weights: the time does not depend on them. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform

import torch

from gradprune_mlflow.defense.searchnet import search_copy, step_seconds
from gradprune_mlflow.models.zoo import create_model

# (channels, side) of the inputs the benchmark's models of each architecture take
SHAPES = {"small_cnn": (1, 28), "small_cnn_nobn": (1, 28)}
RGB32 = (3, 32)
IMAGES = 480


def arch_step_seconds(arch: str, precisions: list[str], repeats: int) -> list[float]:
    """Seconds per step of `arch`'s search copy in each of `precisions`, timed in turns."""
    channels, side = SHAPES.get(arch, RGB32)
    net = create_model(arch, num_classes=10, in_channels=channels, image_size=side)
    x = torch.rand(IMAGES, channels, side, side)
    return step_seconds([search_copy(net, x[:8], p) for p in precisions], x, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--archs", nargs="+", default=["small_cnn", "mobilenet_v3_small", "resnet18"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"{platform.machine()}, CPU capability {capability}, {args.threads} threads, torch {torch.__version__}\n")
    print("| architecture | fp32 s/step | bf16 s/step | bf16 / fp32 |")
    print("|---|---|---|---|")
    for arch in args.archs:
        fp32, bf16 = arch_step_seconds(arch, ["fp32", "bf16"], args.repeats)
        print(f"| {arch} | {fp32:.3f} | {bf16:.3f} | {bf16 / fp32:.2f} |", flush=True)


if __name__ == "__main__":
    main()
