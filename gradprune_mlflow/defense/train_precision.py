"""What fine-tuning computes in: float32, or bfloat16 autocast where that is safe and pays.

Under autocast the convolutions and matrix products run in bfloat16 while the weights, Adam's state and the losses'
reductions stay float32. A GPU that computes bfloat16 natively gets it by default. On a CPU whether it pays depends
on the architecture (benchmarks/train_step.py --precision), so "auto" there times one training step of the model in
both and takes bfloat16 only where it is clearly faster, with the bar the searches' "auto" uses (defense/searchnet.py).
Unlike a search, a training step's rounding changes what the model learns: what that did on the zoo is in
benchmarks/RESULTS.md ("Fine-tuning in bfloat16").
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn
from torch.nn import functional as F

from gradprune_mlflow.defense.metrics import eval_mode
from gradprune_mlflow.defense.searchnet import (
    AUTO_GAIN,
    close_in_bf16,
    fastest_in_turns,
    repeated,
    resolved_precision,
    timing_key,
)

# Images in the timed step: a fine-tuning step passes a batch of clean and one of triggered images (2 x 128). Over
# fewer, the small CNN's bfloat16 share came out anywhere between 0.47 and 0.82 of float32's, too near AUTO_GAIN for a
# choice that decides the weights; over these it stayed near a half.
TIMED_IMAGES = 256


def train_autocast(device: torch.device, precision: str):
    """bfloat16 autocast on `device` for precision "bf16"; nothing for "fp32"."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _train_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str) -> float:
    start = time.perf_counter()
    with train_autocast(x.device, precision):
        loss = F.cross_entropy(net(x), y)
    loss.backward()
    return time.perf_counter() - start


# train_precision's answers on a CPU, by searchnet.timing_key
_TIMED: dict[tuple, str] = {}


def train_precision(net: nn.Module, example: torch.Tensor, precision: str = "auto") -> str:
    """"fp32" or "bf16": `precision` itself, or for "auto" bf16 on a GPU that computes it, fp32 on another GPU
    (searchnet.resolved_precision), and on a CPU bf16 where the model's logits under autocast stay close to float32's
    (searchnet.close_in_bf16) and its training step (forward, cross-entropy, backward to the weights over
    TIMED_IMAGES) takes at most AUTO_GAIN of float32's.
    `example` is a few [0, 1] images of the model's input shape; the weights' values and gradients are left as they
    were. A pt2 program runs its graph as exported, where autocast gains nothing, so "auto" keeps float32 for it."""
    device = next(net.parameters()).device
    wanted = resolved_precision(precision, device)
    if wanted != "timed":
        return wanted
    key = timing_key(net, example)
    if key not in _TIMED:
        _TIMED[key] = _faster(net, example.to(device))
    return _TIMED[key]


def _faster(net: nn.Module, example: torch.Tensor) -> str:
    x = repeated(example, TIMED_IMAGES)
    # set aside, not kept in place: backward would accumulate into them
    grads = [p.grad for p in net.parameters()]
    for p in net.parameters():
        p.grad = None
    try:
        with eval_mode(net):  # no BatchNorm statistics move while timing
            return _faster_in_eval(net, x)
    finally:
        for p, g in zip(net.parameters(), grads, strict=True):
            p.grad = g


def _faster_in_eval(net: nn.Module, x: torch.Tensor) -> str:
    with torch.no_grad():
        want = net(x).float()
        with train_autocast(x.device, "bf16"):
            got = net(x).float()
    if not close_in_bf16(want, got):
        return "fp32"
    y = torch.zeros(len(x), dtype=torch.long, device=x.device)
    fp32_seconds, bf16_seconds = fastest_in_turns([lambda: _train_step(net, x, y, "fp32"),
                                                   lambda: _train_step(net, x, y, "bf16")])
    return "bf16" if bf16_seconds <= AUTO_GAIN * fp32_seconds else "fp32"
