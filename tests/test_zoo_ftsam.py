"""FT-SAM: its SAM step, and that on the test run's BadNets CNN it stays within its validation budget (and lowers the
attack when it keeps an epoch).

The real trigger only measures here; the defense is handed None, as the benchmark does for trigger-free defenses.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from gradprune_mlflow import lab
from gradprune_mlflow.benchmark.baselines import ft_sam
from gradprune_mlflow.benchmark.baselines.training import MAX_ACC_DROP, allowed_drop
from gradprune_mlflow.benchmark.registry import get_defense
from gradprune_mlflow.defense.metrics import accuracy, evaluate
from gradprune_mlflow.defense.normalize import Normalized


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 3, 2, 2, generator=gen), torch.randint(0, 3, (16,), generator=gen)


@pytest.mark.parametrize("adaptive", [True, False])
def test_sam_step_steps_from_the_original_weights_with_the_perturbed_gradient(adaptive):
    x, y = _batch()
    net, reference = _net(), _net()
    before = copy.deepcopy(net.state_dict())
    # lr 0: the perturbation must be undone exactly, whatever its size.
    ft_sam.sam_step(net, torch.optim.SGD(net.parameters(), lr=0.0), x, y, rho=2.0, adaptive=adaptive)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    # rho 0 is plain (label-smoothed) SGD; a positive rho takes the gradient elsewhere and moves differently.
    ft_sam.sam_step(net, torch.optim.SGD(net.parameters(), lr=0.1), x, y, rho=0.0, adaptive=adaptive)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    F.cross_entropy(reference(x), y, label_smoothing=ft_sam.SMOOTHING).backward()
    opt.step()
    assert all(torch.allclose(a, b) for a, b in zip(net.parameters(), reference.parameters(), strict=True))
    sharp = _net()
    ft_sam.sam_step(sharp, torch.optim.SGD(sharp.parameters(), lr=0.1), x, y, rho=0.5, adaptive=adaptive)
    assert any(not torch.allclose(a, b) for a, b in zip(sharp.parameters(), reference.parameters(), strict=True))


def test_ft_sam_is_registered_trigger_free():
    spec = get_defense("ft-sam")
    assert spec.uses_trigger is False and spec.fn is ft_sam.ft_sam


@pytest.mark.slow
def test_ft_sam_lowers_the_badnets_attack_within_its_validation_budget(badnets_cnn, clean_set, fashion_test):
    out = ft_sam.ft_sam(badnets_cnn, clean_set, None, 0)
    print(f"ft-sam: {out.info}")
    assert type(out.model) is type(badnets_cnn)
    shapes = {k: v.shape for k, v in badnets_cnn.state_dict().items()}
    assert {k: v.shape for k, v in out.model.state_dict().items()} == shapes
    assert all(torch.isfinite(p).all() for p in out.model.state_dict().values() if p.is_floating_point())
    norm = (clean_set.meta.mean, clean_set.meta.std)
    _, val = clean_set.split(0.1, 0)
    base = accuracy(Normalized(badnets_cnn, *norm), val)
    assert accuracy(Normalized(out.model, *norm), val) >= base - allowed_drop(val, MAX_ACC_DROP) - 1e-9
    trigger = lab.attack_trigger("badnets")
    before = evaluate(Normalized(badnets_cnn, *norm), fashion_test, trigger)["attack_success_rate"]
    after = evaluate(Normalized(out.model, *norm), fashion_test, trigger)["attack_success_rate"]
    print(f"ASR {before:.3f} -> {after:.3f}")
    radii = {ft_sam.RHO / 2 ** i for i in range(ft_sam.BACKOFF + 1)}
    assert out.info["tries"] <= ft_sam.BACKOFF + 1 and out.info["rho"] in radii | {0.0}
    if out.info["finetune_epochs"] == 0:
        # No epoch at any radius stayed within the budget (a freshly trained fixture model can be that fragile):
        # the model comes back as given, and the row says so. Whether FT-SAM removes backdoors is the benchmark's
        # sanity check, not this test's.
        assert out.info["rho"] == 0.0
        assert all(torch.equal(a, b) for a, b in zip(out.model.state_dict().values(),
                                                     badnets_cnn.state_dict().values(), strict=True))
    else:
        assert after < before - 0.2
