"""Where each conv's output channels go, found by one traced forward: the norms to zero with a pruned filter, and the
convs whose filters cannot be pruned exactly.

A pruned filter must give a channel that is exactly zero as the next layer sees it. Zeroing the filter's weights and
bias makes the conv's output channel zero; that zero survives ops that map 0 to 0 channel by channel (ReLU, SiLU,
GELU, Hardswish, pooling, dropout, permutes) and concatenation, which only moves it to another channel index. A
normalisation that then consumes the channel would turn it back into a non-zero one (its beta, and its mean), so:

- BatchNorm, LayerNorm (channels-last, over the channel dim alone) and GroupNorm with an affine transform: that
  channel's gamma and beta are zeroed too, which gives an exactly zero channel after the norm in eval and train mode.
  LayerNorm and GroupNorm compute their statistics over the channels, the zero one included, so pruning a filter
  shifts the normalisation of the channels beside it: it is still removed exactly, and fine-tuning adapts the rest.
- A BatchNorm without affine transform: its running mean is zeroed (the existing rule), mapping 0 to 0.
- Every other op that maps a zero channel to something non-zero (a squeeze-excitation gate's sigmoid, a LayerNorm
  without affine transform), and a conv whose channels are the model's outputs (a conv classifier, where a pruned
  filter is a deleted class): the conv is left unpruned and named, with the reason, in `unprunable`.

Ops with several tensor inputs (add, mul, conv, linear) end the trace: the pruned channel's contribution to them is
zero. Known gap: an op that maps zero to non-zero is judged alone, so `x * sigmoid(x)` written out with two ops
leaves the conv unpruned though the product is zero (nn.SiLU, as torchvision and timm use it, is recognised).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

# norm function -> (the name of its input argument, does it normalise a channels-last tensor over its last dim?)
_NORMS = {F.batch_norm: False, F.layer_norm: True, F.group_norm: False, F.instance_norm: False}


@dataclass(frozen=True)
class NormSlice:
    """Channels [first, first + length) of a conv land in channels [start, start + length) of `norm`'s input."""

    norm: nn.Module
    first: int
    start: int
    length: int


@dataclass
class Dataflow:
    norms: dict[str, list[NormSlice]] = field(default_factory=dict)  # conv name -> norms consuming its channels
    unprunable: dict[str, str] = field(default_factory=dict)  # conv name -> why its filters cannot be zeroed exactly


@dataclass
class _Tracked:
    tensor: torch.Tensor  # kept alive so that its id cannot be reused during the forward
    dim: int  # the channel dim
    segments: list[tuple[int, str, int, int]]  # (channel in this tensor, conv name, conv channel, length)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


class _Tracer(TorchFunctionMode):
    def __init__(self, params: dict[int, nn.Module], flow: Dataflow):
        super().__init__()
        self.params, self.flow = params, flow
        self.tracked: dict[int, _Tracked] = {}

    def track(self, tensor: torch.Tensor, dim: int, segments) -> None:
        if segments:
            self.tracked[id(tensor)] = _Tracked(tensor, dim, segments)

    def lookup(self, tensor) -> _Tracked | None:
        hit = self.tracked.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        return hit if hit is not None and hit.tensor is tensor else None

    def unprunable(self, hit: _Tracked, reason: str) -> None:
        for _, conv, _, _ in hit.segments:
            self.flow.unprunable.setdefault(conv, reason)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = _tensors(list(args) + list(kwargs.values()))
        hits = [h for h in map(self.lookup, inputs) if h is not None]
        if not hits:
            return out
        name = getattr(func, "__name__", str(func))
        try:
            self.follow(func, name, args, kwargs, inputs, hits, out)
        except Exception as exc:  # an op this trace cannot read: its convs stay unpruned rather than maybe inexact
            for hit in hits:
                self.unprunable(hit, f"the channel could not be followed through {name} ({type(exc).__name__})")
        return out

    def follow(self, func, name, args, kwargs, inputs, hits, out) -> None:
        if func in _NORMS:
            self.norm(func, name, args, kwargs, hits[0])
        elif func in (torch.cat, torch.concat):
            self.cat(args, kwargs, out)
        elif func in (torch.permute, torch.Tensor.permute):
            dims = args[1:] if len(args) > 2 else (args[1] if len(args) > 1 else kwargs["dims"])
            dims = [d % hits[0].tensor.ndim for d in dims]
            self.track(out, dims.index(hits[0].dim), hits[0].segments)
        elif len(inputs) == 1 and isinstance(out, torch.Tensor):
            self.unary(func, name, args, kwargs, hits[0], out)
        elif self.lookup(out) is not None:
            del self.tracked[id(out)]  # changed in place by another tensor (x += shortcut): no longer the conv's alone

    def norm(self, func, name, args, kwargs, hit: _Tracked) -> None:
        bound = inspect.signature(func).bind(*args, **kwargs).arguments
        x, weight = bound["input"], bound.get("weight")
        channels_last = _NORMS[func]
        if channels_last and (len(bound["normalized_shape"]) != 1 or hit.dim != x.ndim - 1):
            return self.unprunable(hit, f"{name} normalises over more than the channel dim")
        if not channels_last and hit.dim != 1:
            return self.unprunable(hit, f"{name} normalises the channels along another dim")
        module = self.params.get(id(weight if weight is not None else bound.get("running_mean")))
        if module is None:
            return self.unprunable(hit, f"{name} without affine parameters maps a zero channel to a non-zero one")
        for start, conv, first, length in hit.segments:
            self.flow.norms.setdefault(conv, []).append(NormSlice(module, first, start, length))

    def cat(self, args, kwargs, out) -> None:
        parts = args[0] if args else kwargs["tensors"]
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        dim %= out.ndim
        segments, offset = [], 0
        for part in parts:
            hit = self.lookup(part)
            if hit is not None and hit.dim == dim:
                segments += [(offset + s, conv, first, n) for s, conv, first, n in hit.segments]
            offset += part.shape[dim]
        self.track(out, dim, segments)

    def unary(self, func, name, args, kwargs, hit: _Tracked, out: torch.Tensor) -> None:
        x = hit.tensor
        same_channels = out.ndim == x.ndim and out.shape[hit.dim] == x.shape[hit.dim]
        if not same_channels:
            if out.ndim == hit.dim + 1 and x.shape[hit.dim + 1:].numel() == 1:  # flatten of (N, C, 1, 1)
                self.track(out, hit.dim, hit.segments)
            return  # reshapes and reductions over the channels end the trace
        zeros = torch.zeros_like(x)
        probe = func(*[zeros if a is x else a for a in args], **kwargs)
        if isinstance(probe, torch.Tensor) and probe.shape == out.shape and torch.count_nonzero(probe) == 0:
            self.track(out, hit.dim, hit.segments)
        elif isinstance(probe, torch.Tensor):
            self.unprunable(hit, f"{name} maps a zero channel to a non-zero one")


@torch.no_grad()
def trace(model: nn.Module, convs: dict[str, nn.Conv2d], example: torch.Tensor) -> Dataflow:
    """Follow every conv's output channels through one eval-mode forward of `example` (see the module docstring)."""
    flow = Dataflow()
    params = {id(t): m for m in model.modules() for t in list(m.parameters(False)) + list(m.buffers(False))}
    tracer = _Tracer(params, flow)
    handles = [conv.register_forward_hook(
        lambda _m, _i, out, name=name: tracer.track(out, 1, [(0, name, 0, out.shape[1])])
    ) for name, conv in convs.items()]
    was_training = model.training
    try:
        model.eval()
        with tracer:
            out = model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    for result in _tensors(out):
        hit = tracer.lookup(result)
        if hit is not None:
            tracer.unprunable(hit, "its output channels are the model's outputs (a conv classifier: pruning one "
                                   "filter would delete a class)")
    return flow


@torch.no_grad()
def zero_norm_channels(norm: nn.Module, channels: torch.Tensor) -> None:
    """Make `norm` map a zero input to exactly zero on `channels`: zero gamma and beta, or, with no gamma, the mean."""
    channels = channels.flatten()
    if getattr(norm, "weight", None) is not None:
        norm.weight[channels] = 0
        if norm.bias is not None:
            norm.bias[channels] = 0
    elif getattr(norm, "running_mean", None) is not None:
        norm.running_mean[channels] = 0
