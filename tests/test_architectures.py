"""torchvision and timm architectures: pruned channels are exactly zero after the layer that consumes them.

Real library classes with random initial weights (nothing is downloaded). The consuming layer is a BatchNorm, a
norm reached through concatenations (DenseNet) or a permute (ConvNeXt's channels-last LayerNorm), or the conv itself
where nothing normalises its output. Convs that cannot give a zero channel (squeeze-excitation gates, a conv
classifier) are named as unprunable and never pruned.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradprune_mlflow import lab, sanitize
from gradprune_mlflow.data.cleanset import CleanSet
from gradprune_mlflow.defense.masks import FilterMasks
from gradprune_mlflow.defense.triggers import PatchTrigger
from gradprune_mlflow.models.zoo import VISION, create_model

# architecture -> (number of unprunable convs, a word of the reason)
UNPRUNABLE = {
    "mobilenet_v3_small": (9, "hardsigmoid"),  # squeeze-excitation gates: hardsigmoid(0) = 0.5
    "efficientnet_b0": (16, "sigmoid"),
    "regnet_y_400mf": (16, "sigmoid"),
    "timm_efficientnet_b0": (16, "sigmoid"),
    "squeezenet1_1": (1, "model's outputs"),  # its classifier is a 1x1 conv with one filter per class
}
# big enough to take several seconds a sanitize on two cores
HEAVY = {"resnet50", "efficientnet_b0", "vgg11_bn", "densenet121", "regnet_y_400mf", "convnext_tiny",
         "timm_efficientnet_b0"}
FAST = [name for name in VISION if name not in HEAVY]


@pytest.fixture(scope="module")
def colour_images():
    """Eight colour 32x32 test images, normalised the way the lab's models expect them."""
    mean, std = lab.normalisation("color32")
    x = lab.test_data(8, image="color32").images
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


@torch.no_grad()
def randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Give every norm a non-zero beta, gamma away from 1 and non-trivial statistics: a fresh norm (beta 0, mean 0)
    would map a zero channel to zero even if the mask forgot it."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.LayerNorm | nn.GroupNorm):
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def build(name: str, in_channels: int = 3, size: int = 32, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, in_channels=in_channels, image_size=size)
    randomise_norms(model)
    return model.eval()


def watch_points(model: nn.Module, masks: FilterMasks) -> list[tuple[nn.Module, int, list[int], str]]:
    """(module, channel dim of its output, channels, what) where each pruned filter must read exactly zero."""
    points = []
    for name, conv in masks.convs.items():
        pruned = torch.nonzero(masks.pruned[name]).flatten().tolist()
        if not pruned:
            continue
        bn, extra = masks.bns.get(name), masks.norms.get(name, [])
        if bn is not None:
            points.append((bn, 1, pruned, f"{name} -> its BatchNorm"))
        for part in extra:
            # nn.LayerNorm itself works channels-last; LayerNorm2d and the other norms give (N, C, H, W)
            dim = -1 if type(part.norm) is nn.LayerNorm else 1
            chans = [part.start + c - part.first for c in pruned if part.first <= c < part.first + part.length]
            points.append((part.norm, dim, chans, f"{name} -> {type(part.norm).__name__} at {part.start}"))
        if bn is None and not extra:
            points.append((conv, 1, pruned, f"{name} itself"))
    return points


def outputs_at(model: nn.Module, points, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of each watched module (its first call) for input x; also returns the model's output last."""
    seen: dict[int, torch.Tensor] = {}
    modules = {id(m): m for m, *_ in points}

    def keep(mod, _inputs, out) -> None:  # returns None: a hook's return value would replace the output
        seen.setdefault(id(mod), out.detach().clone())  # cloned: torchvision's in-place ReLUs change it later

    handles = [m.register_forward_hook(keep) for m in modules.values()]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return [seen[id(m)] for m, *_ in points] + [out]


def prune_two_filters_per_layer(masks: FilterMasks) -> None:
    """Two filters of every prunable conv: the first and the middle one."""
    for name, conv in masks.convs.items():
        masks.prune(name, sorted({0, conv.out_channels // 2}), step=1)


@pytest.mark.parametrize("arch", VISION)
def test_pruned_channels_are_exactly_zero_after_the_consuming_layer(arch, colour_images):
    model = build(arch)
    reference = copy.deepcopy(model)
    example = torch.zeros(1, 3, 32, 32)
    masks = FilterMasks(model, example)

    # Nothing pruned: finding the filters changed nothing, outputs are bit for bit the same.
    masks.apply()
    assert torch.equal(model(colour_images), reference(colour_images))

    count, word = UNPRUNABLE.get(arch, (0, ""))
    assert len(masks.unprunable) == count, masks.unprunable
    assert all(word in u["reason"] for u in masks.unprunable)
    assert not {u["layer"] for u in masks.unprunable} & set(masks.convs), "an unprunable conv is offered to pruning"

    prune_two_filters_per_layer(masks)
    # Only the pruned filters and their norms' channels changed, and those are now zero.
    old_state = reference.state_dict()
    for key, value in model.state_dict().items():
        old = old_state[key]
        if value.dtype.is_floating_point and not torch.equal(value, old):
            assert torch.count_nonzero(value[value != old]) == 0, key

    points = watch_points(model, masks)
    names = {id(m): n for n, m in model.named_modules()}
    modules = dict(reference.named_modules())
    before = outputs_at(reference, [(modules[names[id(m)]], *rest) for m, *rest in points], colour_images)
    for mode in ("eval", "train"):  # train mode: BatchNorm uses the batch's statistics
        getattr(model, mode)()
        after = outputs_at(model, points, colour_images)
        for (_m, dim, chans, what), old, new in zip(points, before[:-1], after[:-1], strict=True):
            index = torch.tensor(chans)
            assert torch.count_nonzero(old.index_select(dim % old.ndim, index)) > 0, f"{what}: zero before pruning"
            picked = new.index_select(dim % new.ndim, index)
            assert torch.count_nonzero(picked) == 0, f"{what}: pruned channels {chans} not exactly zero ({mode})"
        assert after[-1].shape == (len(colour_images), 10)
    model.eval()


def small_clean_set(image: str, per_class: int = 10) -> CleanSet:
    return lab.trusted_set(per_class, seed=0, image=image)


def check_sanitized(result, arch: str, num_images: int, channels: int, size: int) -> None:
    report = result.report
    count, _ = UNPRUNABLE.get(arch, (0, ""))
    assert len(report["unprunable_layers"]) == count
    unprunable = {u["layer"] for u in report["unprunable_layers"]}
    assert not unprunable & set(report["pruned_by_layer"])
    assert max(row["pruned"] for row in result.curve) > 0, "the loop pruned filters"
    modules = dict(result.model.named_modules())
    for entry in result.history:
        conv = modules[entry["layer"]]
        assert torch.count_nonzero(conv.weight[entry["filter"]]) == 0
    with torch.no_grad():
        out = result.model(torch.rand(num_images, channels, size, size))
    assert out.shape == (num_images, 10) and torch.isfinite(out).all()


SETTINGS = dict(device="cpu", step_fraction=0.02, prune_patience=1, max_prune_fraction=0.06, finetune_epochs=1,
                acc_drop_budget=0.5,
                recheck_rounds=0)


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in HEAVY else a for a in VISION])
def test_sanitize_runs_end_to_end(arch):
    """One short known-trigger sanitize on colour 32x32 images: a few pruning steps and one fine-tuning epoch."""
    model = build(arch)
    result = sanitize(model, small_clean_set("color32"), PatchTrigger(0), **SETTINGS)
    check_sanitized(result, arch, 4, 3, 32)


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("vgg11_bn", marks=pytest.mark.slow)])
def test_grey_28x28_inputs(arch):
    """One channel and 28x28: the stem takes one channel, and VGG gets its input resized up to 32x32."""
    model = build(arch, in_channels=1, size=28)
    result = sanitize(model, small_clean_set("gray28"), PatchTrigger(0), **SETTINGS)
    check_sanitized(result, arch, 4, 1, 28)


def test_a_thousand_classes():
    model = build("mobilenet_v3_small", num_classes=1000)
    masks = FilterMasks(model, torch.zeros(1, 3, 32, 32))
    prune_two_filters_per_layer(masks)
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 1000)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_lab_backdoors_a_torchvision_model_and_sanitizing_removes_it(arch, model_cache):
    """The lab's attacker side on a real torchvision class: a BadNets backdoor learned on colour images, then
    removed by a known-trigger sanitize (small budget: a few thousand images, short runs)."""
    model = lab.backdoored_model(arch, "badnets", n_train=6000, epochs=2, image="color32", cache_dir=model_cache)
    test = lab.test_data(1000, image="color32")
    trigger = lab.attack_trigger("badnets")
    result = sanitize(model, small_clean_set("color32", 30), trigger, device="cpu", finetune_epochs=5,
                      test_set=test)
    before, after = result.report["before"], result.report["after"]
    assert before["attack_success_rate"] > 0.8, "the lab's model should have learned the backdoor"
    assert after["attack_success_rate"] < 0.2
    assert after["clean_accuracy"] > before["clean_accuracy"] - 0.1


def test_unknown_model_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="resnet18.*convnext_tiny"):
        create_model("resnet19")
