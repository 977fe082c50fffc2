"""TorchScript models (torch.jit.save files, MLflow models of a ScriptModule): trained as the script they are.

A ScriptModule's parameters train like an eager module's, but its submodules are not nn.Conv2d or nn.BatchNorm2d
instances (their `original_name` says what they were), so the filters come from the TorchScript graph: each
aten conv whose weight is a 4-D parameter, and the aten::batch_norm that takes that conv's output. BatchNorm is
frozen by keeping those submodules in eval mode while the rest trains. The script's code is never changed: the
sanitized model is the same script saved with new parameter values.
"""

from __future__ import annotations

import copy
import io
import warnings

import torch
from torch import nn

from gradprune_mlflow.models.adapter import FormatAdapter, Source
from gradprune_mlflow.models.filters import CONSUMED, PASS, FilterSpec, first_obstacle, layer_name

FORMAT = "torchscript"
_NORM_MODULES = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"}
_CONVS = {"aten::conv2d": None, "aten::_convolution": 6, "aten::convolution": 6}


# Ops that map a zero channel to a zero channel (see pt2.py); prim::ListConstruct carries tensors into aten::cat.
_ZERO_KEEPING = {f"aten::{op}" for op in (
    "relu", "relu_", "hardtanh", "hardtanh_", "hardswish", "hardswish_", "silu", "silu_", "gelu", "leaky_relu",
    "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "flatten", "view", "reshape", "permute", "clone", "contiguous",
    "dropout", "dropout_", "cat", "add", "add_", "mul", "mul_", "sub", "mean", "detach")} | {"prim::ListConstruct"}
_INPUT_OF = {*_CONVS, "aten::linear"}
_SHAPE_ONLY = {"aten::size", "aten::dim", "aten::numel", "aten::len", "prim::shape", "prim::device", "prim::dtype",
               "aten::__getitem__"}  # read the shape (BatchNorm's input checks), never the values


def _users(node: torch._C.Node) -> list[tuple[int, torch._C.Node]]:
    return [(use.user.output().unique() if use.user.outputsSize() == 1 else id(use.user), use.user)
            for out in node.outputs() for use in out.uses()]


def _judge(user: torch._C.Node, node: torch._C.Node) -> str:
    kind = user.kind()
    if kind == "prim::Return":
        return "its channel reaches the model's output"
    if kind in _INPUT_OF and user.inputsAt(0).unique() in {out.unique() for out in node.outputs()}:
        return CONSUMED
    if kind in _SHAPE_ONLY:
        return CONSUMED
    if kind in _ZERO_KEEPING:
        return PASS
    return f"its channel goes through {kind}, which a zero does not cancel"


def _qualified(value: torch._C.Value) -> str | None:
    """The attribute path ('features.0.weight') a graph value was read from, or None for anything computed."""
    parts = []
    node = value.node()
    while node.kind() == "prim::GetAttr":
        parts.append(node.s("name"))
        node = node.input().node()
    return ".".join(reversed(parts)) if parts and node.kind() == "prim::Param" else None


def _constant(value: torch._C.Value):
    return value.toIValue() if value.node().kind() == "prim::Constant" else None


def script_filters(script: torch.jit.ScriptModule) -> tuple[list[FilterSpec], dict[str, str]]:
    """The script's conv filters: every 4-D conv weight of its inlined graph and the BatchNorm fed by its output;
    and {layer: reason} for the convs left unpruned because zeroing them would not cancel them exactly."""
    graph = script.inlined_graph
    tensors = dict(script.named_parameters()) | dict(script.named_buffers())
    norms: dict[int, torch._C.Node] = {}
    for node in graph.findAllNodes("aten::batch_norm", True):
        norms.setdefault(node.inputsAt(0).unique(), node)
    specs: dict[str, FilterSpec] = {}
    unprunable: dict[str, str] = {}
    for kind, flag in _CONVS.items():
        for node in graph.findAllNodes(kind, True):
            if flag is not None and _constant(node.inputsAt(flag)):
                continue  # transposed conv: its output channels are not the weight's first dimension
            weight = _qualified(node.inputsAt(1))
            if weight is None or weight in specs or layer_name(weight) in unprunable \
                    or getattr(tensors.get(weight), "ndim", 0) != 4:
                continue
            bias = _qualified(node.inputsAt(2))
            norm = norms.get(node.output().unique())
            zeroed = norm.output().unique() if norm is not None else None  # the BatchNorm zeroed with the filter
            why = first_obstacle(node, _users, lambda user, at, zeroed=zeroed: PASS if user.outputsSize() == 1 and
                                 user.output().unique() == zeroed else _judge(user, at))
            if why is not None:
                unprunable[layer_name(weight)] = why
            elif norm is not None:
                w, b, mean = (_qualified(norm.inputsAt(i)) for i in (1, 2, 3))
                specs[weight] = FilterSpec(layer_name(weight), weight, bias, w, b, mean)
            else:
                specs[weight] = FilterSpec(layer_name(weight), weight, bias)
    return sorted(specs.values(), key=lambda s: list(tensors).index(s.weight)), unprunable


class ScriptedModel(FormatAdapter):
    """A ScriptModule with its filters found from its graph; `write` saves it with torch.jit.save."""

    model_format = FORMAT

    def __init__(self, script: torch.jit.ScriptModule, source: Source):
        super().__init__(source, *script_filters(script))
        self.script = script

    @property
    def inner(self) -> nn.Module:
        return self.script

    def __deepcopy__(self, memo: dict) -> ScriptedModel:
        # A ScriptModule's own deepcopy clones its parameters under autograd, which leaves them non-leaf tensors an
        # optimiser refuses; cloned without autograd they are leaves, and get back their requires_grad flags.
        with torch.no_grad():
            script = copy.deepcopy(self.script, memo)
        for old, new in zip(self.script.parameters(), script.parameters(), strict=True):
            new.requires_grad_(old.requires_grad)
        twin = ScriptedModel(script, self.source)
        twin.training = self.training
        return twin

    def train(self, mode: bool = True) -> ScriptedModel:
        # BatchNorm stays in eval mode (frozen statistics), as finetune does for eager models.
        self.training = mode
        for m in self.script.modules():
            m.training = mode and getattr(m, "original_name", "") not in _NORM_MODULES
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.script(x)

    def model_bytes(self) -> bytes:
        self.train(False)
        buf = io.BytesIO()
        with warnings.catch_warnings():  # torch.jit.save's deprecation notice is not for our users to act on
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(self.script, buf)
        return buf.getvalue()
