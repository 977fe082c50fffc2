"""Where each conv's output channels go, found by one traced forward at the level of aten ops: the norms to zero with a
pruned filter, and the convs whose filters cannot be pruned exactly.

The trace runs below every model format: an eager module, a pt2 program and a TorchScript script all execute the same
aten ops, and a TorchDispatchMode sees them with the model's own parameter tensors as arguments. So one rule serves
every format, and a conv is any aten convolution whose weight is a 4-D parameter of the model.

A pruned filter must give a channel that is exactly zero as the next layer sees it. Zeroing the filter's weights and
bias makes the conv's output channel zero; that zero survives ops that map 0 to 0 channel by channel (ReLU, SiLU,
GELU, Hardswish, pooling, permutes) and concatenation, which only moves it to another channel index. A normalisation
that then consumes the channel would turn it back into a non-zero one (its beta, and its mean), so:

- BatchNorm, LayerNorm (channels-last, over the channel dim alone) and GroupNorm with an affine transform: that
  channel's gamma and beta are zeroed too, which gives an exactly zero channel after the norm in eval and train mode.
  LayerNorm and GroupNorm compute their statistics over the channels, the zero one included, so pruning a filter
  shifts the normalisation of the channels beside it: it is still removed exactly, and fine-tuning adapts the rest.
- A BatchNorm without affine transform: its running mean is zeroed, mapping 0 to 0.
- Every other op that maps a zero channel to something non-zero (a squeeze-excitation gate's sigmoid, a LayerNorm
  without affine transform, a norm over a reshape that mixes the channel with other dims, as InstanceNorm is run),
  and a conv whose channels are the model's outputs (a conv classifier, where a pruned filter is a deleted class):
  the conv is left unpruned and named, with the reason, in `unprunable`.

Ops with several tensor inputs (add, mul, conv, matmul) end the trace: the pruned channel's contribution to them is
zero. Known gap: an op that maps zero to non-zero is judged alone, so `x * sigmoid(x)` written out with two ops
leaves the conv unpruned though the product is zero (nn.SiLU, as torchvision and timm use it, is one op).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gradprune_mlflow.defense.metrics import eval_mode

_aten = torch.ops.aten
# norm op -> does it normalise a channels-last tensor over its last dim (layer norm)?
_NORMS = {_aten.native_batch_norm.default: False, _aten._native_batch_norm_legit_no_training.default: False,
          _aten._native_batch_norm_legit.default: False, _aten.cudnn_batch_norm.default: False,
          _aten.native_layer_norm.default: True, _aten.native_group_norm.default: False}
# the convolution ops (a traced script calls _convolution), each with its `transposed` flag at index 6
_CONVS = {_aten.convolution.default, _aten._convolution.default}
_CATS = {_aten.cat.default}
_PERMUTES = {_aten.permute.default}
MIXED = -1  # the channel dim of a tensor whose channels were reshaped together with another dim


@dataclass(frozen=True)
class NormSlice:
    """Channels [first, first + length) of a conv land in channels [start, start + length) of `norm`'s input."""

    norm: nn.Module
    first: int
    start: int
    length: int


@dataclass
class Dataflow:
    convs: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)  # name -> (weight, bias)
    direct: dict[str, nn.Module] = field(default_factory=dict)  # conv name -> the norm that takes its output as is
    norms: dict[str, list[NormSlice]] = field(default_factory=dict)  # conv name -> other norms consuming its channels
    unprunable: dict[str, str] = field(default_factory=dict)  # conv name -> why its filters cannot be zeroed exactly


@dataclass
class _Tracked:
    tensor: torch.Tensor  # kept alive so that its id cannot be reused during the forward
    dim: int  # the channel dim, or MIXED
    segments: list[tuple[int, str, int, int]]  # (channel in this tensor, conv name, conv channel, length)
    conv_output: bool = False  # the conv's output itself, not yet changed by any op


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


def _bind(func, args, kwargs) -> dict:
    return dict(zip([a.name for a in func._schema.arguments], args, strict=False)) | kwargs


class _Tracer(TorchDispatchMode):
    def __init__(self, model: nn.Module, flow: Dataflow):
        super().__init__()
        self.flow = flow
        self.weights = {id(p): name.removesuffix(".weight") for name, p in model.named_parameters() if p.ndim == 4}
        self.owners = {id(t): m for m in model.modules() for t in [*m.parameters(False), *m.buffers(False)]}
        self.tracked: dict[int, _Tracked] = {}

    def track(self, tensor: torch.Tensor, dim: int, segments, conv_output: bool = False) -> None:
        if segments:
            self.tracked[id(tensor)] = _Tracked(tensor, dim, segments, conv_output)

    def lookup(self, tensor) -> _Tracked | None:
        hit = self.tracked.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        return hit if hit is not None and hit.tensor is tensor else None

    def unprunable(self, hit: _Tracked, reason: str) -> None:
        for _, conv, _, _ in hit.segments:
            self.flow.unprunable.setdefault(conv, reason)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _CONVS and id(args[1]) in self.weights and not args[6]:
            name = self.weights[id(args[1])]
            self.flow.convs.setdefault(name, (args[1], args[2]))
            self.track(out, 1, [(0, name, 0, out.shape[1])], conv_output=True)
            return out
        hits = [h for h in map(self.lookup, _tensors([args, kwargs])) if h is not None]
        if not hits:
            return out
        name = func.overloadpacket.__name__
        try:
            self.follow(func, name, args, kwargs, hits, out)
        except Exception as exc:  # an op this trace cannot read: its convs stay unpruned rather than maybe inexact
            for hit in hits:
                self.unprunable(hit, f"the channel could not be followed through {name} ({type(exc).__name__})")
        return out

    def follow(self, func, name, args, kwargs, hits, out) -> None:
        if func in _NORMS:
            self.norm(func, name, _bind(func, args, kwargs), hits[0])
        elif func in _CATS:
            self.cat(args[0], args[1] if len(args) > 1 else kwargs.get("dim", 0), out)
        elif func in _PERMUTES and hits[0].dim != MIXED:
            dims = [d % hits[0].tensor.ndim for d in args[1]]
            self.track(out, dims.index(hits[0].dim), hits[0].segments)
        elif len(_tensors([args, kwargs])) == 1 and isinstance(out, torch.Tensor):
            self.unary(func, name, args, kwargs, hits[0], out)
        elif self.lookup(out) is not None:
            del self.tracked[id(out)]  # changed in place by another tensor (x += shortcut): no longer the conv's alone

    def norm(self, func, name, bound: dict, hit: _Tracked) -> None:
        x, weight = bound["input"], bound.get("weight")
        if hit.dim == MIXED:
            return self.unprunable(hit, f"{name} normalises a reshape that mixes the channel with another dim")
        if _NORMS[func] and (len(bound["normalized_shape"]) != 1 or hit.dim != x.ndim - 1):
            return self.unprunable(hit, f"{name} normalises over more than the channel dim")
        if not _NORMS[func] and hit.dim != 1:
            return self.unprunable(hit, f"{name} normalises the channels along another dim")
        module = self.owners.get(id(weight if weight is not None else bound.get("running_mean")))
        if module is None:
            return self.unprunable(hit, f"{name} without affine parameters maps a zero channel to a non-zero one")
        for start, conv, first, length in hit.segments:
            if hit.conv_output:
                self.flow.direct.setdefault(conv, module)
            else:
                self.flow.norms.setdefault(conv, []).append(NormSlice(module, first, start, length))

    def cat(self, parts, dim: int, out) -> None:
        dim %= out.ndim
        segments, offset = [], 0
        for part in parts:
            hit = self.lookup(part)
            if hit is not None and hit.dim == MIXED:
                self.unprunable(hit, "the channel is concatenated after a reshape that mixed it with another dim")
            elif hit is not None and hit.dim == dim:
                segments += [(offset + s, conv, first, n) for s, conv, first, n in hit.segments]
            offset += part.shape[dim]
        self.track(out, dim, segments)

    def unary(self, func, name, args, kwargs, hit: _Tracked, out: torch.Tensor) -> None:
        x, dim = hit.tensor, hit.dim
        if dim != MIXED and out.shape[:dim + 1] != x.shape[:dim + 1]:
            if out.numel() != x.numel():
                return  # a reduction over the channels ends the trace
            dim = MIXED  # a view that moves the channel among other dims
        elif dim == MIXED and out.numel() != x.numel():
            return
        # pooling, means over the spatial dims and flattening keep the channel where it was: zero in, zero out?
        zeros = torch.zeros_like(x)
        probe = func(*[zeros if a is x else a for a in args], **kwargs)
        if isinstance(probe, torch.Tensor) and probe.shape == out.shape and torch.count_nonzero(probe) == 0:
            self.track(out, dim, hit.segments)
        elif isinstance(probe, torch.Tensor):
            self.unprunable(hit, f"{name} maps a zero channel to a non-zero one")


@torch.no_grad()
def trace(model: nn.Module, example: torch.Tensor) -> Dataflow:
    """Follow every conv's output channels through one eval-mode forward of `example` (see the module docstring).

    `model` is an eager module or a saved-format adapter (models/adapter.py), whose `inner` module is traced on
    `trace_input(example)`, the batch its graph accepts.
    """
    flow = Dataflow()
    inner = getattr(model, "inner", model)
    x = model.trace_input(example) if hasattr(model, "trace_input") else example
    tracer = _Tracer(inner, flow)
    with eval_mode(model), tracer:
        out = inner(x)
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
        if getattr(norm, "bias", None) is not None:
            norm.bias[channels] = 0
    elif getattr(norm, "running_mean", None) is not None:
        norm.running_mean[channels] = 0
