"""pt2 models (torch.export, MLflow's default pytorch format): trained through the exported program's own graph.

`ExportedProgram.module()` is an fx GraphModule whose parameters are real nn.Parameters, so they train and can be
zeroed like an eager model's; the graph itself is never changed, and the sanitized program is the loaded program with
its state_dict replaced. Two things the graph fixes are worked around, never edited:
- it refuses `.eval()`/`.train()`: the adapter's own `train` does not reach it. An eval-mode export runs BatchNorm
  on its running statistics, which is what fine-tuning with frozen BatchNorm needs; a training-mode export (batch
  statistics, buffers updated in the graph) is refused.
- MLflow exports with the input example's shapes, so a program exported from one image accepts batch size 1 only
  (a guard, and reshapes to batch 1 in the graph): the adapter runs such a program per image under torch.func.vmap,
  which batches the same ops. A program with a dynamic batch is called directly (padded up to its smallest batch).
"""

from __future__ import annotations

import io
import operator

import torch
from torch import nn

from gradprune_mlflow.errors import UnsupportedModel
from gradprune_mlflow.models.adapter import FormatAdapter, Source
from gradprune_mlflow.models.filters import CONSUMED, PASS, FilterSpec, first_obstacle, layer_name

FORMAT = "pt2"
_aten = torch.ops.aten
# op -> (index of the weight argument, index of the `transposed` flag or None)
_CONVS = {_aten.conv2d.default: None, _aten.convolution.default: 6}
# op -> index of the `training` flag (None: the op is inference-only)
_NORMS = {_aten.batch_norm.default: 5, _aten._native_batch_norm_legit_no_training.default: None}
_TRAINING_NORMS = {_aten._native_batch_norm_legit.default, _aten._native_batch_norm_legit_functional.default,
                   _aten.native_batch_norm.default, _aten.cudnn_batch_norm.default}


# Ops that map a zero channel to a zero channel (activations that keep 0 at 0, pooling, residual adds, gating by
# multiplication, reshapes, concatenation): a pruned filter's zeros flow through them unchanged.
_ZERO_KEEPING = {getattr(_aten, op).default for op in (
    "relu", "relu_", "hardtanh", "hardtanh_", "hardswish", "hardswish_", "silu", "silu_", "gelu", "leaky_relu",
    "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "view", "reshape", "permute", "clone", "contiguous",
    "dropout", "cat", "max_pool2d_with_indices", "_unsafe_view", "alias", "detach") if hasattr(getattr(_aten, op),
                                                                                           "default")} | {
    _aten.add.Tensor, _aten.add_.Tensor, _aten.mul.Tensor, _aten.mul_.Tensor, _aten.sub.Tensor, _aten.mean.dim,
    _aten.flatten.using_ints, operator.getitem}
_INPUT_OF = {*_CONVS, _aten.linear.default}


def _judge(user, node) -> str:
    if user.op == "output":
        return "its channel reaches the model's output"
    if user.target in _INPUT_OF and user.args[0] is node:
        return CONSUMED
    if user.target in (_aten.sym_size.int, _aten.sym_numel.default):  # the shape, never the values
        return CONSUMED
    if user.target in _ZERO_KEEPING:
        return PASS
    return f"its channel goes through {getattr(user.target, '__name__', user.target)}, which a zero does not cancel"


def _names(ep: torch.export.ExportedProgram) -> dict[str, str]:
    sig = ep.graph_signature
    return {**sig.inputs_to_parameters, **sig.inputs_to_buffers}


def graph_filters(ep: torch.export.ExportedProgram, name: str) -> tuple[list[FilterSpec], dict[str, str]]:
    """The program's conv filters from its aten graph: each 4-D conv weight and the BatchNorm fed by its output,
    and {layer: reason} for the convs left unpruned because zeroing them would not cancel them exactly.

    Raises UnsupportedModel when the program was exported in training mode (BatchNorm on batch statistics).
    """
    names = _names(ep)
    state = ep.state_dict
    specs: dict[str, FilterSpec] = {}
    unprunable: dict[str, str] = {}
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _TRAINING_NORMS or (node.target in _NORMS and _NORMS[node.target] is not None
                                               and node.args[_NORMS[node.target]] is True):
            raise UnsupportedModel(f"{name} was exported in training mode (BatchNorm uses batch statistics in its "
                                   "graph); call model.eval() before logging or exporting it")
        if node.target not in _CONVS:
            continue
        flag = _CONVS[node.target]
        if flag is not None and len(node.args) > flag and node.args[flag]:
            continue  # transposed conv: its output channels are not the weight's first dimension
        weight = names.get(getattr(node.args[1], "name", ""))
        if weight is None or weight in specs or layer_name(weight) in unprunable or state[weight].ndim != 4:
            continue
        bias = names.get(getattr(node.args[2], "name", "")) if len(node.args) > 2 else None
        norm = [u for u in node.users if u.target in _NORMS and u.args[0] is node]
        zeroed = norm[0] if len(norm) == 1 else None  # the BatchNorm zeroed with the filter
        why = first_obstacle(node, lambda n: [(u, u) for u in n.users],
                             lambda user, at, zeroed=zeroed: PASS if user is zeroed else _judge(user, at))
        if why is not None:
            unprunable[layer_name(weight)] = why
        elif len(norm) == 1:
            w, b, mean = (names.get(getattr(a, "name", "")) for a in norm[0].args[1:4])
            specs[weight] = FilterSpec(layer_name(weight), weight, bias, w, b, mean)
        else:
            specs[weight] = FilterSpec(layer_name(weight), weight, bias)
    return list(specs.values()), unprunable


def _batch_range(ep: torch.export.ExportedProgram) -> tuple[int, int | None]:
    """(smallest, largest) batch size the program accepts; largest None when unbounded."""
    user = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs]
    if len(user) != 1:
        raise UnsupportedModel(f"the exported program takes {len(user)} inputs; gradprune sanitizes image "
                               "classifiers with one image-batch input")
    return _limits(user[0].meta["val"].shape[0], ep.range_constraints)


def _limits(dim, ranges: dict) -> tuple[int, int | None]:
    if isinstance(dim, int):
        return dim, dim
    rng = ranges.get(dim.node.expr)
    if rng is None:  # a dynamic dimension torch.export did not bound: it specialises sizes 0 and 1 away
        return 2, None
    try:
        high = int(rng.upper)
    except (TypeError, ValueError, OverflowError, AttributeError):  # unbounded: sympy's or torch's own infinity
        high = None
    return int(rng.lower), high


def is_exported_module(module: nn.Module) -> bool:
    """True for `ExportedProgram.module()`'s GraphModule (what MLflow's loader gives for a pt2 model)."""
    try:
        from torch.export._unlift import _StatefulGraphModule
    except ImportError:  # torch moved it: tell it by the input spec only unlifted programs carry
        return isinstance(module, torch.fx.GraphModule) and getattr(module, "_in_spec", None) is not None
    return isinstance(module, _StatefulGraphModule)


class ExportedModel(FormatAdapter):
    """A pt2 program as a trainable module of any batch size; `write` saves it as pt2 with the new weights."""

    model_format = FORMAT

    def __init__(self, archive: bytes, source: Source, name: str):
        ep = torch.export.load(io.BytesIO(archive))
        specs, unprunable = graph_filters(ep, name)
        low, high = _batch_range(ep)
        if high is not None and high != 1 and low == high:
            raise UnsupportedModel(f"{name} was exported for batches of exactly {low}; export it with a batch of "
                                   "one or a dynamic batch dimension")
        super().__init__(source, specs, unprunable)
        self.program = ep.module()
        self.archive = archive
        self.per_image = high == 1
        self.min_batch = max(low, 1)

    @classmethod
    def of_module(cls, program: nn.Module) -> ExportedModel:
        """The module MLflow's loader gives for a pt2 model (`ExportedProgram.module()`), made to run at any batch
        size without being told `.eval()`; for measuring only: without the archive it cannot be pruned or saved."""
        user = [n for n in program.graph.nodes if n.op == "placeholder"]
        low, high = _limits(user[0].meta["val"].shape[0], {}) if len(user) == 1 and "val" in user[0].meta \
            else (1, 1)
        self = cls.__new__(cls)
        FormatAdapter.__init__(self, Source(""), [])
        self.program, self.archive = program, None
        self.per_image, self.min_batch = high == 1, max(low, 1)
        return self

    @property
    def inner(self) -> nn.Module:
        return self.program

    def train(self, mode: bool = True) -> ExportedModel:
        # The graph fixes the mode (see the module docstring); the GraphModule refuses to be told otherwise.
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_image:
            return torch.func.vmap(lambda one: self.program(one.unsqueeze(0)).squeeze(0))(x)
        n = x.shape[0]
        if n < self.min_batch:  # rows are independent in an eval-mode graph: repeat, then keep the real ones
            x = torch.cat([x, x[:1].expand(self.min_batch - n, *x.shape[1:])])
        return self.program(x)[:n]

    def model_bytes(self) -> bytes:
        if self.archive is None:
            raise UnsupportedModel("this pt2 module was loaded without its archive; load it with gradprune to save it")
        ep = torch.export.load(io.BytesIO(self.archive))
        current = dict(self.program.named_parameters()) | dict(self.program.named_buffers())
        with torch.no_grad():
            for key, old in list(ep.state_dict.items()):
                new = current[key].detach().to(device=old.device, dtype=old.dtype).clone()
                ep.state_dict[key] = nn.Parameter(new, requires_grad=old.requires_grad) \
                    if isinstance(old, nn.Parameter) else new
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        return buf.getvalue()
