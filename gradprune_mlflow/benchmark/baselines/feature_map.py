"""The network's last feature map, where fine-pruning cuts: found by tracing, masked by a forward hook.

"Last convolutional layer" is ambiguous in a residual net (the final block's output is a sum of two branches), so
like BackdoorBench we mask the channels of the final feature map: the last module, in execution order, whose output
is a 4-D tensor (a last conv block, a last BatchNorm, or the global pooling that reads it: the channels are the same).
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def last_feature_module(net: nn.Module, example: torch.Tensor) -> str:
    """Qualified name (within `net`) of the last module to produce a 4-D output on `example`."""
    order: list[str] = []
    def hook(name: str):
        return lambda _m, _i, out: order.append(name) if torch.is_tensor(out) and out.dim() == 4 else None

    handles = [m.register_forward_hook(hook(name)) for name, m in net.named_modules() if name]
    try:
        net.eval()
        net(example.to(next(net.parameters()).device))  # the caller's example may sit on the CPU, the net on CUDA
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ValueError("the model produces no 4-D feature map; fine-pruning needs a convolutional network")
    return order[-1]


@torch.no_grad()
def mean_activations(net: nn.Module, module: nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Mean ReLU activation of each channel of `module`'s output over `images`."""
    sums: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: sums.append(out.float().relu().mean((2, 3)).sum(0)))
    try:
        net.eval()
        for x in images.split(batch):
            net(x.to(next(net.parameters()).device))
    finally:
        handle.remove()
    return torch.stack(sums).sum(0).cpu() / len(images)


class ChannelMask:
    """Zeroes chosen output channels of a module through a forward hook; `keep` is a 1-D 0/1 tensor."""

    def __init__(self, module: nn.Module, channels: int):
        self.keep = torch.ones(channels)
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, _m, _inp, out: torch.Tensor) -> torch.Tensor:
        return out * self.keep.to(out.device, out.dtype).view(1, -1, 1, 1)
