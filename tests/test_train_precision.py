"""Fine-tuning's precision: what "auto" chooses on a CPU, what it leaves as it was, and fine-tuning in it."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

from gradprune_mlflow.defense import searchnet
from gradprune_mlflow.defense import train_precision as tp
from gradprune_mlflow.defense.normalize import Normalized


class _Timed(nn.Module):
    """A conv net whose forward pass sleeps `fp32` seconds outside autocast and `bf16` inside it, and adds `shift`
    to its logits inside it: a model plainly faster or slower, or plainly wrong, in one precision."""

    def __init__(self, fp32: float = 0.0, bf16: float = 0.0, shift: float = 0.0):
        super().__init__()
        self.conv, self.fp32, self.bf16, self.shift = nn.Conv2d(1, 4, 3), fp32, bf16, shift

    def forward(self, x):
        low = torch.is_autocast_enabled("cpu")
        time.sleep(self.bf16 if low else self.fp32)
        out = self.conv(x).mean((2, 3))
        return out + self.shift if low else out


@pytest.fixture(autouse=True)
def _untimed(monkeypatch):
    monkeypatch.setattr(tp, "_TIMED", {})
    # as on a CPU with bfloat16 instructions, where "auto" times; the test after these covers the others
    monkeypatch.setattr(searchnet, "cpu_computes_bf16", lambda: True)


def test_a_cpu_without_bfloat16_instructions_fine_tunes_in_float32_untimed(monkeypatch):
    monkeypatch.setattr(searchnet, "cpu_computes_bf16", lambda: False)
    assert tp.train_precision(_Timed(0.03, 0.0), torch.rand(4, 1, 8, 8), "auto") == "fp32"
    assert tp._TIMED == {}, "nothing timed"


@pytest.mark.parametrize(("fp32", "bf16", "chosen"), [(0.0, 0.03, "fp32"), (0.03, 0.0, "bf16"), (0.033, 0.03, "fp32")])
def test_auto_on_a_cpu_takes_bfloat16_only_where_its_step_is_clearly_faster(fp32, bf16, chosen):
    # the last case is 10% faster: short of AUTO_GAIN, a near tie keeps float32
    assert tp.train_precision(_Timed(fp32, bf16), torch.rand(4, 1, 8, 8), "auto") == chosen


def test_a_model_that_bfloat16_changes_keeps_float32_however_fast():
    net = _Timed(0.03, 0.0, shift=10.0)
    net.conv.weight.grad = torch.ones_like(net.conv.weight)
    assert tp.train_precision(net, torch.rand(4, 1, 8, 8), "auto") == "fp32"
    assert torch.equal(net.conv.weight.grad, torch.ones_like(net.conv.weight)), "its gradients back as they were"


@pytest.mark.parametrize("forced", ["fp32", "bf16"])
def test_a_forced_precision_is_taken_as_it_is(forced):
    assert tp.train_precision(_Timed(), torch.rand(4, 1, 8, 8), forced) == forced
    assert tp._TIMED == {}, "nothing timed"


def test_timing_leaves_weights_gradients_and_batchnorm_as_they_were(badnets_cnn, clean_set):
    net = Normalized(copy.deepcopy(badnets_cnn), clean_set.meta.mean, clean_set.meta.std)
    net.train()
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.5)
    state = copy.deepcopy(net.state_dict())
    chosen = tp.train_precision(net, clean_set.images[:8], "auto")
    assert chosen in ("fp32", "bf16") and len(tp._TIMED) == 1
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items()), "weights and running statistics"
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in net.parameters())
    assert all(m.training for m in net.modules()), "each module back in its own mode"
    # a second model of the same architecture reuses the answer
    assert tp.train_precision(copy.deepcopy(net), clean_set.images[:8], "auto") == chosen and len(tp._TIMED) == 1


def test_autocast_runs_the_step_in_bfloat16_only_when_asked():
    seen = []

    class Recording(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            out = self.lin(x)
            seen.append(out.dtype)
            return out

    net, x = Recording(), torch.rand(3, 4)
    for precision in ("fp32", "bf16"):
        with tp.train_autocast(x.device, precision):
            net(x)
    assert seen == [torch.float32, torch.bfloat16]
