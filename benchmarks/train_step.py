"""Seconds of one fine-tuning step per architecture, in the default memory layout and channels-last: what
defense/metrics.training_layout buys on this CPU; with --precision, channels-last in float32 and under bfloat16
autocast: what train_precision=auto weighs (defense/train_precision.py).

    .venv/bin/python benchmarks/train_step.py [--precision] [--threads 2] [--archs small_cnn resnet18 ...]

A step is what fast mode's fine-tuning repeats (defense/finetune.py): a forward pass over 128 clean and 128 triggered
images, the teacher's forward pass over the clean ones, cross-entropy on both and the distillation term (its
`batch_loss`, without the away-from-target term), a backward pass and an Adam step, with BatchNorm frozen. Untrained
weights: the time does not depend on them. The two layouts take turns; each column is the fastest of `--repeats`
steps after two warm-up steps. Prints a markdown table.
"""

from __future__ import annotations

import contextlib
import time

import torch

from gradprune_mlflow.benchmark.steps import compare_main, input_shape
from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.defense.finetune import _train_mode_frozen_bn, batch_loss
from gradprune_mlflow.defense.metrics import training_layout
from gradprune_mlflow.defense.train_precision import train_autocast
from gradprune_mlflow.models.zoo import create_model

BATCH = 128
# fast mode's loss weights, as fine-tuning resolves them
UNLEARN, DISTILL = (SanitizeConfig().resolved(name) for name in ("unlearn_weight", "distill_weight"))


def _step(net, teacher, opt, precision, x, xt, y) -> float:
    start = time.perf_counter()
    with train_autocast(x.device, precision):
        loss = batch_loss(net, teacher, x, xt, y, 0, unlearn=UNLEARN, away=0.0, distill=DISTILL)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def layout_seconds(arch: str, repeats: int) -> tuple[float, float]:
    """The fastest step of `arch` in the default layout and channels-last (training_layout), taking turns."""
    return _seconds(arch, repeats, [(False, "fp32"), (True, "fp32")])


def precision_seconds(arch: str, repeats: int) -> tuple[float, float]:
    """The fastest step of `arch` channels-last in float32 and under bfloat16 autocast, taking turns."""
    return _seconds(arch, repeats, [(True, "fp32"), (True, "bf16")])


def _seconds(arch: str, repeats: int, ways: list[tuple[bool, str]]) -> tuple[float, float]:
    channels, side = input_shape(arch)
    x, xt = torch.rand(BATCH, channels, side, side), torch.rand(BATCH, channels, side, side)
    y = torch.randint(0, 10, (BATCH,))
    runs = []
    with contextlib.ExitStack() as stack:
        for layout, precision in ways:
            net = create_model(arch, num_classes=10, in_channels=channels, image_size=side)
            teacher = create_model(arch, num_classes=10, in_channels=channels, image_size=side).eval()
            if layout:
                stack.enter_context(training_layout(net))
                stack.enter_context(training_layout(teacher))
            _train_mode_frozen_bn(net)
            runs.append((net, teacher, torch.optim.Adam(net.parameters(), lr=1e-3), precision))
        for run in runs:
            for _ in range(2):
                _step(*run, x, xt, y)
        best = [float("inf")] * len(runs)
        for _ in range(repeats):
            for i, run in enumerate(runs):
                best[i] = min(best[i], _step(*run, x, xt, y))
    return best[0], best[1]


def main(argv: list[str] | None = None) -> None:
    compare_main(__doc__.splitlines()[0], ("default", "channels-last"), layout_seconds, argv,
                 alternative=("--precision", "compare float32 and bfloat16 autocast, both channels-last",
                              ("float32", "bfloat16"), precision_seconds))


if __name__ == "__main__":
    main()
