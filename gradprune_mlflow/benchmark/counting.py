"""Count backward passes through a model, whatever the defense does with it (copies, wrappers, autograd.grad).

One pass = one backward (or autograd.grad) that reaches the model's output, whatever its batch size: Grad-Prune's
scoring, its fine-tuning steps, trigger synthesis steps, ANP's ascent and mask steps all count alike. The forward
hook is a plain function, so `copy.deepcopy` copies it by reference and passes through copies count too.
"""

from __future__ import annotations

import torch
from torch import nn


class BackwardCounter:
    """Attach to a model with `with BackwardCounter(model) as c:`; read `c.count`; `detach(m)` cleans a copy."""

    def __init__(self, model: nn.Module):
        self.model = model
        box = [0]

        def on_output(_m, _inp, out):
            if torch.is_tensor(out) and out.requires_grad:
                out.register_hook(lambda _grad: box.__setitem__(0, box[0] + 1))

        self._box, self._hook = box, on_output

    @property
    def count(self) -> int:
        return self._box[0]

    def __enter__(self) -> BackwardCounter:
        self._handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def detach(self, copy: nn.Module) -> nn.Module:
        """Remove the counting hook from a copy of the model that a defense returned; returns the copy."""
        for key, hook in list(copy._forward_hooks.items()):
            if hook is self._hook:
                del copy._forward_hooks[key]
        return copy
