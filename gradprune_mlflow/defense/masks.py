"""The filter mask set: which conv output filters are pruned, and the means to hold them at exactly zero.

A filter is an output channel of a 4-D conv weight. For eager modules the convs are nn.Conv2d modules and their
BatchNorms are found by a traced forward; a saved-format adapter (pt2, TorchScript) names the same tensors from its
graph (`conv_filters`, see models/filters.py), and everything below works on those tensors alike.

A pruned filter's output channel is exactly zero: its weights and bias are zeroed, and so are the gamma AND beta of a
BatchNorm that directly consumes the conv's output (zeroing gamma alone would leave beta as a constant channel).
Norms reached through concatenations (DenseNet) or permutes (ConvNeXt's channels-last LayerNorm) get the same, and
convs whose channel no zeroing can make exactly zero are left unpruned and listed (`unprunable`; defense/dataflow.py).
Masks are held by re-applying them after every optimiser step, so pruned filters cannot regrow; the saved model is a
plain model with those zeros folded in. Grouped and depthwise convs are masked the same way (per output channel).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from gradprune_mlflow.defense.dataflow import NormSlice, trace, zero_norm_channels
from gradprune_mlflow.errors import UnsupportedModel


def conv_layers(model: nn.Module) -> dict[str, nn.Conv2d]:
    """All Conv2d modules by qualified name, 1x1 shortcuts included. Raises UnsupportedModel if there are none."""
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if not convs:
        raise UnsupportedModel(
            "the model has no Conv2d layer; Grad-Prune prunes conv filters, so it cannot be sanitized"
        )
    return convs


@torch.no_grad()
def following_batchnorms(model: nn.Module, example: torch.Tensor) -> dict[str, nn.BatchNorm2d]:
    """Map conv name -> the BatchNorm2d that takes that conv's output tensor directly, found by one traced forward.

    Identity of tensors is what counts, not module order: it works for Sequential, residual and pre-activation nets.
    """
    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: dict[str, nn.BatchNorm2d] = {}
    handles = []

    def on_conv(name):
        def hook(_m, _inp, out):
            outputs[id(out)] = (name, out)  # the tensor is kept alive so its id cannot be reused mid-forward

        return hook

    def on_bn(bn):
        def hook(_m, inp):
            hit = outputs.get(id(inp[0]))
            if hit is not None and hit[1] is inp[0] and bn.num_features == hit[1].shape[1]:
                pairs[hit[0]] = bn

        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(on_conv(name)))
        elif isinstance(m, nn.BatchNorm2d):
            handles.append(m.register_forward_pre_hook(on_bn(m)))
    was_training = model.training
    try:
        model.eval()
        model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return pairs


class FilterMasks:
    """Pruned filters of every conv layer, kept as boolean masks, plus the pruning history."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        self.norms: dict[str, list[NormSlice]] = {}  # norms reached through a concatenation or a permute
        self.unprunable: list[dict[str, str]] = []  # convs left unpruned, [{"layer", "reason"}], for the report
        found = getattr(model, "conv_filters", None)
        if found is not None:  # a saved-format adapter (models/adapter.py): filters found from its graph
            self.convs, self.bns = found()
            self.unprunable = list(model.unprunable)
            if not self.convs:
                raise UnsupportedModel("no conv filter of the model can be pruned exactly: " + "; ".join(
                    f"{u['layer']}: {u['reason']}" for u in self.unprunable) if self.unprunable else
                    "the model has no 2-D conv layer; Grad-Prune prunes conv filters, so it cannot be sanitized")
        else:
            self.convs = conv_layers(model)
            self.bns = following_batchnorms(model, example)
            self._follow_channels(model, example)
        self.pruned = {name: torch.zeros(c.out_channels, dtype=torch.bool) for name, c in self.convs.items()}
        self.history: list[dict[str, Any]] = []

    @property
    def total(self) -> int:
        return sum(len(p) for p in self.pruned.values())

    @property
    def count(self) -> int:
        return int(sum(p.sum() for p in self.pruned.values()))

    def by_layer(self) -> dict[str, int]:
        """Number of pruned filters per layer."""
        return {name: int(p.sum()) for name, p in self.pruned.items()}

    def prune(self, layer: str, filters: list[int], step: int, scores: list[float] | None = None) -> None:
        """Mark filters of `layer` as pruned, record them in the history, and zero them now."""
        for i, f in enumerate(filters):
            if not self.pruned[layer][f]:
                self.pruned[layer][f] = True
                score = None if scores is None else float(scores[i])
                self.history.append({"layer": layer, "filter": int(f), "step": int(step), "score": score})
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every pruned filter's weights and bias and the gamma and beta of its BatchNorm."""
        for name, conv in self.convs.items():
            idx = self.pruned[name].to(conv.weight.device)
            if not idx.any():
                continue
            conv.weight[idx] = 0
            if conv.bias is not None:
                conv.bias[idx] = 0
            bn = self.bns.get(name)
            if bn is not None and bn.affine:
                bn.weight[idx] = 0
                bn.bias[idx] = 0
            elif bn is not None and bn.running_mean is not None:
                # no gamma/beta to zero: a zero mean maps the zero input to exactly zero
                bn.running_mean[idx] = 0
            for part in self.norms.get(name, ()):
                zero_norm_channels(part.norm, torch.nonzero(idx[part.first:part.first + part.length]) + part.start)

    def _follow_channels(self, model: nn.Module, example: torch.Tensor) -> None:
        """Find the norms past concatenations and permutes, and set aside the convs that cannot be pruned exactly."""
        flow = trace(model, self.convs, example)
        self.unprunable = [{"layer": name, "reason": why} for name, why in flow.unprunable.items()]
        self.convs = {name: c for name, c in self.convs.items() if name not in flow.unprunable}
        if not self.convs:
            raise UnsupportedModel("no conv filter of the model can be pruned exactly: "
                                   + "; ".join(f"{u['layer']}: {u['reason']}" for u in self.unprunable))
        for name, parts in flow.norms.items():
            extra = [p for p in parts if p.norm is not self.bns.get(name)]
            if extra and name in self.convs:
                self.norms[name] = extra

    def state(self) -> dict[str, Any]:
        """A copy of the masks and history, to restore with `load_state`."""
        return {"pruned": {k: v.clone() for k, v in self.pruned.items()}, "history": copy.deepcopy(self.history)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.pruned = {k: v.clone() for k, v in state["pruned"].items()}
        self.history = copy.deepcopy(state["history"])

    def replay(self, history: list[dict[str, Any]]) -> None:
        """Prune exactly the filters of a saved history (pruning_history.json) on a model of the same architecture."""
        for entry in history:
            self.prune(entry["layer"], [entry["filter"]], entry["step"], [entry.get("score") or 0.0])
