"""pt2 models (torch.export, MLflow's default pytorch format): trained through the exported program's own graph.

`ExportedProgram.module()` is an fx GraphModule whose parameters are real nn.Parameters, so they train and can be
zeroed like an eager model's; the graph itself is never changed, and the sanitized program is the loaded program with
its state_dict replaced. Two things the graph fixes are worked around, never edited:
- it refuses `.eval()`/`.train()`: the adapter's own `train` does not reach it. An eval-mode export runs BatchNorm
  on its running statistics, which is what fine-tuning with frozen BatchNorm needs; a training-mode export (batch
  statistics, buffers updated in the graph) is refused.
- MLflow exports with the input example's shapes, so a program exported from one image accepts batch size 1 only
  (a guard, and reshapes to batch 1 in the graph): the adapter runs such a program per image under torch.func.vmap,
  which batches the same ops. A program with a dynamic batch is called directly (padded up to its smallest batch),
  and one fixed to a batch of B in chunks of B (the last padded).
"""

from __future__ import annotations

import io

import torch
from torch import nn

from gradprune_mlflow.errors import UnsupportedModel
from gradprune_mlflow.models.adapter import FormatAdapter, Source

FORMAT = "pt2"
_aten = torch.ops.aten
# op -> index of the `training` flag (None: the op is inference-only)
_NORMS = {_aten.batch_norm.default: 5, _aten._native_batch_norm_legit_no_training.default: None}
_TRAINING_NORMS = {_aten._native_batch_norm_legit.default, _aten._native_batch_norm_legit_functional.default,
                   _aten.native_batch_norm.default, _aten.cudnn_batch_norm.default}


def check_eval_mode(ep: torch.export.ExportedProgram, name: str) -> None:
    """Raise UnsupportedModel when the program was exported in training mode (BatchNorm on batch statistics)."""
    for node in ep.graph.nodes:
        if node.op == "call_function" and (node.target in _TRAINING_NORMS or (
                node.target in _NORMS and _NORMS[node.target] is not None and node.args[_NORMS[node.target]] is True)):
            raise UnsupportedModel(f"{name} was exported in training mode (BatchNorm uses batch statistics in its "
                                   "graph); call model.eval() before logging or exporting it")


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
        check_eval_mode(ep, name)
        low, high = _batch_range(ep)
        super().__init__(source)
        self.program = ep.module()
        self.archive = archive
        self.per_image = high == 1
        self.min_batch, self.max_batch = max(low, 1), high

    @classmethod
    def of_module(cls, program: nn.Module) -> ExportedModel:
        """The module MLflow's loader gives for a pt2 model (`ExportedProgram.module()`), made to run at any batch
        size without being told `.eval()`; for measuring only: without the archive it cannot be pruned or saved."""
        user = [n for n in program.graph.nodes if n.op == "placeholder"]
        low, high = _limits(user[0].meta["val"].shape[0], {}) if len(user) == 1 and "val" in user[0].meta \
            else (1, 1)
        self = cls.__new__(cls)
        FormatAdapter.__init__(self, Source(""))
        self.program, self.archive = program, None
        self.per_image, self.min_batch, self.max_batch = high == 1, max(low, 1), high
        return self

    @property
    def inner(self) -> nn.Module:
        return self.program

    def trace_input(self, example: torch.Tensor) -> torch.Tensor:
        return self._padded(example[:self.max_batch or len(example)])

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """At least min_batch rows: rows are independent in an eval-mode graph, so the first one is repeated."""
        return torch.cat([x, x[:1].expand(max(self.min_batch - len(x), 0), *x.shape[1:])])

    def train(self, mode: bool = True) -> ExportedModel:
        # The graph fixes the mode (see the module docstring); the GraphModule refuses to be told otherwise.
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.per_image:
            return torch.func.vmap(lambda one: self.program(one.unsqueeze(0)).squeeze(0))(x)
        # a batch the graph accepts at a time: chunks of at most max_batch, each padded to min_batch
        chunks = x.split(self.max_batch or max(len(x), 1))
        return torch.cat([self.program(self._padded(chunk))[:len(chunk)] for chunk in chunks])

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
