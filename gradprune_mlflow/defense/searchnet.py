"""A fast copy of the model for searches that only read it: trigger synthesis, the probes, the verification.

Those searches run thousands of forward and backward passes through a network whose weights stay fixed, so the copy
may be rearranged for speed as long as it computes the same function: every BatchNorm that directly follows a conv is
folded into that conv (eval mode, so it is an affine map), and on a CPU the tensors are laid out channels-last, which
oneDNN's convolutions prefer. The result equals the model up to float rounding; a copy that does not, a model
that cannot be rearranged (TorchScript, code that torch.fx cannot trace), or one whose trace holds its weights as
constants rather than parameters (the pt2 adapter) falls back to a plain frozen copy.

With precision "bf16" the copy then holds its weights in bfloat16 and casts each input down and its logits back up:
a GPU computes bfloat16 natively, and a trigger search needs the direction of a gradient, not its last digits. On a
CPU whether it pays depends on the architecture as well as the CPU (benchmarks/search_step.py), so "auto" there times
one search step of the model in both precisions and keeps float32 unless bfloat16 is clearly faster; a CPU without
bfloat16 instructions keeps float32 untimed. Measuring (accuracy, ASR) never uses it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse

# Largest difference of the logits allowed between the model and its rearranged copy, relative to the logits' scale:
# the check is there to catch a wrong trace, not rounding. CUDA convolutions in TF32 (PyTorch's default) round each
# product to about 1e-3, so the two can differ by more there without either being wrong.
TOLERANCE = 1e-4
TF32_TOLERANCE = 2e-2
# bfloat16 keeps 8 bits of each number: its logits differ from float32's by about a percent of their scale. A model
# that differs by more than this does not survive bfloat16 (overflow, a layer that needs the range) and stays float32.
BF16_TOLERANCE = 0.1
# On a CPU, "auto" takes bfloat16 only when its search step takes at most this share of float32's: a near tie is not
# worth a result that could flip between two runs on one machine.
AUTO_GAIN = 0.8
# Images in the timed step. A synthesis step passes 480; fewer keep the timing short, and where bfloat16's gain grows
# with the batch (ResNet-18) they err toward float32, the choice that needs no justification.
TIMED_IMAGES = 96
# Set on every copy search_copy returns: handing one back in returns it as it is rather than copying it again.
MARK = "is_search_copy"


def _tolerance(device: torch.device) -> float:
    return TF32_TOLERANCE if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else TOLERANCE


def _frozen(net: nn.Module) -> nn.Module:
    net = net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _marked(net: nn.Module) -> nn.Module:
    setattr(net, MARK, True)
    return net


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _folded(module: nn.Module) -> nn.Module:
    """`module` with BatchNorms folded into the convs before them, in every subtree that has no hooks: a trace would
    drop a hook (the benchmark counts passes with one), so a hooked module stays a module and its children fold."""
    if not any(_hooked(m) for m in module.modules()):
        return fuse(module, inplace=True)  # symbolic trace, then conv+BatchNorm folding
    for name, child in module.named_children():
        setattr(module, name, _folded(child))
    return module


def _rearranged(net: nn.Module, device: torch.device) -> nn.Module:
    out = _folded(copy.deepcopy(net))
    if device.type == "cpu":
        out = out.to(memory_format=torch.channels_last)
    return out


class _Bfloat16(nn.Module):
    """`net` in bfloat16 behind float32 inputs and logits, so that callers see the tensors they always did."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(torch.bfloat16)).float()


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX). Without them oneDNN emulates bfloat16, which
    never pays, and timing it would cost more than the steps it decides on."""
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolved_precision(precision: str, device: torch.device) -> str:
    """"fp32", "bf16" or "timed": `precision` itself, or for "auto" bf16 on a GPU that computes it, fp32 on another
    GPU, "timed" on a CPU that computes it (bfloat16 pays there for some architectures and costs for others:
    faster_precision), and fp32 on another CPU."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "timed" if cpu_computes_bf16() else "fp32"


def _step(net: nn.Module, x: torch.Tensor) -> float:
    xs = x.clone().requires_grad_()
    start = time.perf_counter()
    net(xs).logsumexp(1).sum().backward()
    return time.perf_counter() - start


def fastest_in_turns(steps: list[Callable[[], float]], repeats: int = 3) -> list[float]:
    """For each of `steps` (each runs once and returns its seconds), the fastest of `repeats` runs after a warm-up
    run each. The steps take turns, so that a busy spell of the machine slows them alike rather than one of them."""
    for step in steps:
        step()
    best = [float("inf")] * len(steps)
    for _ in range(repeats):
        for i, step in enumerate(steps):
            best[i] = min(best[i], step())
    return best


def step_seconds(nets: list[nn.Module], x: torch.Tensor, repeats: int = 3) -> list[float]:
    """For each of `nets`, the fastest of `repeats` search steps (forward, then backward to the input) over the
    images `x`, taking turns after a warm-up step each: what "auto" compares, and what benchmarks/search_step.py
    reports."""
    return fastest_in_turns([lambda net=net: _step(net, x) for net in nets], repeats)


def timing_key(net: nn.Module, example: torch.Tensor) -> tuple:
    """What a timed precision choice depends on: the architecture, the input shape and the machine's threads, not the
    weights (a run asks again for every state of the model it trains or searches)."""
    return (type(net).__name__, tuple((n, tuple(p.shape)) for n, p in net.named_parameters()),
            tuple(example.shape[1:]), torch.get_num_threads())


def repeated(example: torch.Tensor, images: int) -> torch.Tensor:
    """`images` images made of `example`'s, repeated: a timed step's batch."""
    return example.repeat((images + len(example) - 1) // len(example), *[1] * (example.ndim - 1))[:images]


def close_in_bf16(want: torch.Tensor, got: torch.Tensor) -> bool:
    """Whether logits computed in bfloat16 (`got`) stay within BF16_TOLERANCE of float32's (`want`)."""
    scale = float(want.abs().max()) + 1.0
    return bool(torch.isfinite(got).all()) and float((got - want).abs().max()) <= BF16_TOLERANCE * scale


# faster_precision's answers, by timing_key
_TIMED: dict[tuple, str] = {}


def faster_precision(fp32: nn.Module, bf16: nn.Module, example: torch.Tensor) -> str:
    """"bf16" when a search step through `bf16` takes at most AUTO_GAIN of one through `fp32` (two copies of one
    model on a CPU), else "fp32"."""
    key = timing_key(fp32, example)
    if key not in _TIMED:
        x = repeated(example, TIMED_IMAGES).to(next(fp32.parameters()).device)
        fp32_seconds, bf16_seconds = step_seconds([fp32, bf16], x)
        _TIMED[key] = "bf16" if bf16_seconds <= AUTO_GAIN * fp32_seconds else "fp32"
    return _TIMED[key]


def search_copy(net: nn.Module, example: torch.Tensor, precision: str = "fp32") -> nn.Module:
    """An eval-mode copy of `net` with frozen weights, rearranged for speed where it computes the same logits on
    `example` (a few [0, 1] images of the model's input shape), in `precision` ("fp32", "bf16" or "auto",
    resolved_precision); `net` itself is not touched. A search copy given back is returned as it is: its weights are
    frozen, so it still computes what it was checked to compute."""
    if getattr(net, MARK, False):
        return net
    copied = _float32_copy(net, example)
    device = next(copied.parameters()).device
    wanted = resolved_precision(precision, device)
    if wanted == "fp32":
        return copied
    try:
        low = _marked(_frozen(_Bfloat16(copy.deepcopy(copied))))
        with torch.no_grad():
            x = example.to(device)
            want, got = copied(x), low(x)
    except Exception:  # weights held as constants stay float32 and refuse bfloat16 inputs: keep float32
        return copied
    close = close_in_bf16(want, got)
    if close and wanted == "timed":
        close = faster_precision(copied, low, example) == "bf16"
    return low if close else copied


def precision_of(net: nn.Module) -> str:
    """"bf16" for a bfloat16 search copy, else "fp32": what a run's searches computed in."""
    return "bf16" if isinstance(net, _Bfloat16) else "fp32"


def _float32_copy(net: nn.Module, example: torch.Tensor) -> nn.Module:
    plain = _marked(_frozen(copy.deepcopy(net)))
    device = next(plain.parameters()).device
    try:
        fast = _frozen(_rearranged(plain, device))
        with torch.no_grad():
            x = example.to(device)
            want, got = plain(x), fast(x)
    except Exception:  # whatever torch.fx cannot trace keeps the plain copy, which is always right
        return plain
    fast = _marked(fast)
    if next(fast.parameters(), None) is None:  # the searches read the device off the parameters
        return plain
    if got.shape != want.shape or not torch.isfinite(got).all():
        return plain
    scale = float(want.abs().max()) + 1.0
    return fast if float((got - want).abs().max()) <= _tolerance(device) * scale else plain
