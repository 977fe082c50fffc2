"""TorchScript models (torch.jit.save files, MLflow models of a ScriptModule): trained as the script they are.

A ScriptModule's parameters train like an eager module's, but its submodules are not nn.Conv2d or nn.BatchNorm2d
instances (their `original_name` says what they were), so the filters are the 4-D conv weights its ops use, found by
the aten-level trace every format shares (defense/dataflow.py). BatchNorm is frozen by keeping those submodules in
eval mode while the rest trains. The script's code is never changed: the sanitized model is the same script saved
with new parameter values.
"""

from __future__ import annotations

import copy
import io
import warnings

import torch
from torch import nn

from gradprune_mlflow.models.adapter import FormatAdapter, Source

FORMAT = "torchscript"
_NORM_MODULES = {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"}


class ScriptedModel(FormatAdapter):
    """A ScriptModule with its filters found from its graph; `write` saves it with torch.jit.save."""

    model_format = FORMAT

    def __init__(self, script: torch.jit.ScriptModule, source: Source):
        super().__init__(source)
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
