"""The filter mask set: which conv output filters are pruned, and the means to hold them at exactly zero.

A filter is an output channel of a 4-D conv weight. For eager modules the convs are nn.Conv2d modules; for a
saved-format adapter (pt2, TorchScript) they are the 4-D conv weights its graph uses, by the same names. Both are
traced the same way at the level of aten ops (defense/dataflow.py), and everything below works on their tensors alike.

A pruned filter's output channel is exactly zero: its weights and bias are zeroed, and so are the gamma AND beta of a
BatchNorm that directly consumes the conv's output (zeroing gamma alone would leave beta as a constant channel).
Norms reached through concatenations (DenseNet) or permutes (ConvNeXt's channels-last LayerNorm) get the same, and
convs whose channel no zeroing can make exactly zero are left unpruned and listed (`unprunable`; defense/dataflow.py).
Masks are held by re-applying them after every optimiser step, so pruned filters cannot regrow; the saved model is a
plain model with those zeros folded in. Grouped and depthwise convs are masked the same way (per output channel).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradprune_mlflow.defense.dataflow import NormSlice, trace, zero_norm_channels
from gradprune_mlflow.errors import UnsupportedModel


@dataclass(eq=False)
class ConvParams:
    """A saved format's conv (not an nn.Conv2d module): its weight (out, in/groups, kh, kw) and optional bias, the
    model's own tensors, with what FilterMasks and the importance scores read of an nn.Conv2d."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])


def conv_layers(model: nn.Module) -> dict[str, nn.Conv2d]:
    """All Conv2d modules by qualified name, 1x1 shortcuts included. Raises UnsupportedModel if there are none."""
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if not convs:
        raise UnsupportedModel(
            "the model has no Conv2d layer; Grad-Prune prunes conv filters, so it cannot be sanitized"
        )
    return convs


def following_batchnorms(model: nn.Module, example: torch.Tensor) -> dict[str, nn.Module]:
    """Map conv name -> the norm that takes that conv's output tensor as it is, found by one traced forward.

    Identity of tensors is what counts, not module order: it works for Sequential, residual and pre-activation nets.
    """
    return trace(model, example).direct


class FilterMasks:
    """Pruned filters of every conv layer, kept as boolean masks, plus the pruning history."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        flow = trace(model, example)
        if hasattr(model, "inner"):  # a saved-format adapter (models/adapter.py): convs are its 4-D conv weights
            order = [n.removesuffix(".weight") for n, p in model.inner.named_parameters() if p.ndim == 4]
            convs = {n: ConvParams(*flow.convs[n]) for n in order if n in flow.convs}
        else:
            convs = conv_layers(model)
        # convs left unpruned, [{"layer", "reason"}], for the report
        self.unprunable = [{"layer": name, "reason": why} for name, why in flow.unprunable.items()]
        self.convs = {name: c for name, c in convs.items() if name not in flow.unprunable}
        if not self.convs:
            raise UnsupportedModel("no conv filter of the model can be pruned exactly: " + "; ".join(
                f"{u['layer']}: {u['reason']}" for u in self.unprunable) if self.unprunable else
                "the model has no 2-D conv layer; Grad-Prune prunes conv filters, so it cannot be sanitized")
        self.bns = {name: norm for name, norm in flow.direct.items() if name in self.convs}
        # norms reached through a concatenation or a permute
        self.norms: dict[str, list[NormSlice]] = {n: parts for n, parts in flow.norms.items() if n in self.convs}
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
            if bn is not None:  # gamma and beta, or with no gamma the running mean: a zero input stays zero
                zero_norm_channels(bn, torch.nonzero(idx))
            for part in self.norms.get(name, ()):
                zero_norm_channels(part.norm, torch.nonzero(idx[part.first:part.first + part.length]) + part.start)

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
