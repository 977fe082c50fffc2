"""What benchmarks/search_step.py and benchmarks/train_step.py share: the input shape of each architecture the
benchmark trains, and the command line and markdown table that compare two ways of running one step."""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable, Sequence

import torch

# (channels, side) of the inputs the benchmark's models of each architecture take; the rest take colour 32x32
SHAPES = {"small_cnn": (1, 28), "small_cnn_nobn": (1, 28)}
RGB32 = (3, 32)
ARCHS = ["small_cnn", "mobilenet_v3_small", "resnet18"]


def input_shape(arch: str) -> tuple[int, int]:
    return SHAPES.get(arch, RGB32)


Seconds = Callable[[str, int], Sequence[float]]


def compare_main(description: str, columns: tuple[str, str], seconds: Seconds, argv: list[str] | None = None,
                 alternative: tuple[str, str, tuple[str, str], Seconds] | None = None) -> None:
    """Parse --threads/--archs/--repeats and print one row per architecture: `seconds(arch, repeats)`'s two times
    (the `columns` ways of running the step) and the second's share of the first. `alternative` is (flag, help,
    columns, seconds): a flag that compares two other ways instead."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--archs", nargs="+", default=ARCHS)
    parser.add_argument("--repeats", type=int, default=5)
    if alternative is not None:
        parser.add_argument(alternative[0], action="store_true", dest="alternative", help=alternative[1])
    args = parser.parse_args(argv)
    if getattr(args, "alternative", False):
        columns, seconds = alternative[2], alternative[3]
    torch.set_num_threads(args.threads)
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"{platform.machine()}, CPU capability {capability}, {args.threads} threads, torch {torch.__version__}\n")
    first, second = columns
    print(f"| architecture | {first} s/step | {second} s/step | {second} / {first} |")
    print("|---|---|---|---|")
    for arch in args.archs:
        a, b = seconds(arch, args.repeats)
        print(f"| {arch} | {a:.3f} | {b:.3f} | {b / a:.2f} |", flush=True)
