"""FT-SAM (Zhu et al., ICCV 2023): fine-tuning on the clean set with sharpness-aware minimization.

Each step takes the gradient g of the clean loss, moves the weights to the worst point nearby, w + e, takes the
gradient there and applies it from the original weights w. The perturbation is ASAM's adaptive one (Kwon et al.
2021), the default of the reference implementations: e = rho * |w|^2 g / || |w| g ||, elementwise, so each weight
moves in proportion to its own size (the paper scales per neuron; this is the same idea per weight). The paper's
argument for the large radius (rho 2, against SAM's usual 0.05): it makes the minimizer shrink the norms of the
neurons the backdoor lives in, which the clean loss alone leaves alone. Smoothed cross-entropy (0.1), as in the
reference implementations.

Everything else is the fine-tuning baseline's (baselines.training): SGD lr 0.01, momentum 0.9, weight decay 5e-4,
its epochs with a cosine schedule, BatchNorm frozen, the same shifts and flips, and the last epoch whose accuracy on
the trusted validation split stays within its budget is kept. The reference implementations fine-tune for up to 100
epochs; the epoch budget here is the fine-tuning baseline's, so that the two differ only in the minimizer.

Deviation, like ANP's back-off here: when no epoch at the paper's rho stays within the validation budget (a small
network with a few hundred images and 20 epochs does not win back what rho 2 costs it), the run is repeated from the
original weights at half the radius, at most BACKOFF times, each try with the same epoch budget; the backward
passes of every try are counted. `rho` in the row's info is the radius kept (0 when no try stayed within budget).
"""

from __future__ import annotations

import copy
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from gradprune_mlflow.benchmark.baselines.training import device_of as _device
from gradprune_mlflow.benchmark.baselines.training import sgd_finetune
from gradprune_mlflow.benchmark.registry import Defended, register
from gradprune_mlflow.data.cleanset import CleanSet
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.triggers import Trigger

# The authors' settings (BackdoorBench's ft_sam): rho 2, adaptive perturbation, label smoothing 0.1.
RHO, ADAPTIVE, SMOOTHING = 2.0, True, 0.1
BACKOFF = 2  # retries at rho / 2, rho / 4 when no epoch stayed within the validation budget


def sam_step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *, rho: float = RHO,
             adaptive: bool = ADAPTIVE, smoothing: float = SMOOTHING) -> None:
    """One SAM step on a batch: ascend to w + e within radius rho, descend from w with the gradient found there."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y, label_smoothing=smoothing).backward()
    params = [p for p in params if p.grad is not None]
    with torch.no_grad():
        # ASAM: e = rho T^2 g / ||T g|| with T = |w| elementwise; SAM: T = 1.
        factors = [p.abs() if adaptive else torch.ones_like(p) for p in params]
        norm = torch.stack([(t * p.grad).norm(2) for t, p in zip(factors, params, strict=True)]).norm(2)
        originals = [p.detach().clone() for p in params]  # restored exactly: w + e - e need not be w in floats
        for t, p in zip(factors, params, strict=True):
            p.add_(t * t * p.grad * (rho / (norm + 1e-12)))
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y, label_smoothing=smoothing).backward()
    with torch.no_grad():
        for p, w in zip(params, originals, strict=True):
            p.copy_(w)
    opt.step()


@register("ft-sam", uses_trigger=False, summary="FT-SAM: fine-tuning with sharpness-aware minimization (ASAM, rho 2)")
def ft_sam(model: nn.Module, clean: CleanSet, trigger: Trigger | None, seed: int, rho: float = RHO,
           adaptive: bool = ADAPTIVE) -> Defended:
    """FT-SAM; `rho` and `adaptive` (ASAM's |w|-scaled perturbation, else SAM's plain one) may be set per preset."""
    train, val = clean.split(0.1, seed)
    for tries in range(1, BACKOFF + 2):
        radius = float(rho) / 2 ** (tries - 1)
        work = copy.deepcopy(model).float().eval()
        net = Normalized(work, clean.meta.mean, clean.meta.std).to(_device(work))
        epoch = sgd_finetune(net, train, val, seed=seed, step=partial(sam_step, rho=radius, adaptive=bool(adaptive)))
        if epoch > 0:  # a trained epoch stayed within the budget (epoch 0 is the model as given)
            break
    return Defended(work, {"finetune_epochs": epoch, "rho": radius if epoch else 0.0, "tries": tries,
                           "adaptive": bool(adaptive)})
