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

import torch

from gradprune_mlflow.benchmark.steps import compare_main, input_shape
from gradprune_mlflow.defense.searchnet import search_copy, step_seconds
from gradprune_mlflow.models.zoo import create_model

IMAGES = 480


def arch_step_seconds(arch: str, precisions: list[str], repeats: int) -> list[float]:
    """Seconds per step of `arch`'s search copy in each of `precisions`, timed in turns."""
    channels, side = input_shape(arch)
    net = create_model(arch, num_classes=10, in_channels=channels, image_size=side)
    x = torch.rand(IMAGES, channels, side, side)
    return step_seconds([search_copy(net, x[:8], p) for p in precisions], x, repeats)


def main() -> None:
    compare_main(__doc__.splitlines()[0], ("fp32", "bf16"),
                 lambda arch, repeats: arch_step_seconds(arch, ["fp32", "bf16"], repeats))


if __name__ == "__main__":
    main()
