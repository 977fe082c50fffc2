"""The lab's attack families on real Fashion-MNIST images: what each trigger does to pixels, how each is poisoned
into a training set, the all-to-all ASR, clean models and the cache names of models already trained."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradprune_mlflow import lab
from gradprune_mlflow.data.cleanset import Split
from gradprune_mlflow.defense.metrics import attack_metrics, backdoor_targets
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.triggers import PatchTrigger
from gradprune_mlflow.lab.training import cache_name
from gradprune_mlflow.models.train import poison_set
from gradprune_mlflow.models.zoo import create_model


@pytest.fixture(scope="module")
def real() -> Split:
    return lab.test_data(200)


def formatted(real: Split, image: str, n: int = 32) -> torch.Tensor:
    return lab.to_format(real.images[:n], image, colour_seed=0)


@pytest.mark.parametrize("image", ["gray28", "color32"])
@pytest.mark.parametrize("name", sorted(lab.ATTACKS))
def test_every_trigger_maps_unit_images_to_changed_unit_images_deterministically(real, name, image):
    x = formatted(real, image)
    before = x.clone()
    out = lab.attack_trigger(name).apply(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(x, before), "apply must not change its input"
    assert torch.equal(out, lab.attack_trigger(name).apply(x)), "a fresh trigger of the same name must agree"
    changed = (out - x).abs().flatten(1).amax(1) > 0
    assert changed.float().mean() >= 0.9, f"{name} left {int((~changed).sum())} of {len(x)} images unchanged"
    assert torch.equal(lab.attack_trigger(name).apply(x[:0]), x[:0])


def test_unknown_attack_lists_the_known_ones():
    with pytest.raises(ValueError, match="badnets-random"):
        lab.attack_trigger("nope")
    with pytest.raises(ValueError, match="badnets-random"):
        lab.poisoning("nope")
    assert set(lab.POISONING) <= set(lab.ATTACKS)


def test_checker_patch_is_red_green_on_colour_and_white_black_on_grey(real):
    trigger = lab.attack_trigger("badnets-checker")
    colour = trigger.apply(formatted(real, "color32", 4))[:, :, -3:, -3:]
    assert torch.equal(colour[:, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]).expand(4, 3))
    assert torch.equal(colour[:, :, 0, 1], torch.tensor([0.0, 1.0, 0.0]).expand(4, 3))
    grey = trigger.apply(formatted(real, "gray28", 4))[:, 0, -3:, -3:]
    assert torch.equal(grey[0], torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 0, 1]]))


def test_textured_patch_has_texture_and_touches_nothing_else(real):
    x = formatted(real, "gray28")
    out = lab.attack_trigger("badnets-texture").apply(x)
    patch = out[:, :, -4:, -4:]
    assert patch.std() > 0.1 and torch.equal(patch, patch[:1].expand_as(patch))
    outside = torch.ones(28, 28, dtype=torch.bool)
    outside[-4:, -4:] = False
    assert torch.equal(out[:, :, outside], x[:, :, outside])


def test_random_position_patch_lands_in_different_places_and_only_there(real):
    trigger = lab.attack_trigger("badnets-random")
    x = formatted(real, "rgb32", 60)
    out = trigger.apply(x)
    tops, lefts = trigger.positions(x)
    places = set(zip(tops.tolist(), lefts.tolist(), strict=True))
    assert len(places) >= 30, f"only {len(places)} places for 60 images"
    patch = trigger.patch(3)
    for i in range(len(x)):
        t, left = int(tops[i]), int(lefts[i])
        assert torch.equal(out[i, :, t : t + 4, left : left + 4], patch)
        rest = torch.ones(32, 32, dtype=torch.bool)
        rest[t : t + 4, left : left + 4] = False
        assert torch.equal(out[i][:, rest], x[i][:, rest])
    # An image's place is its own: the same alone as in any batch.
    assert torch.equal(trigger.apply(x[7:8]), out[7:8])
    assert torch.equal(trigger.apply(x.flip(0)), out.flip(0))


def test_wanet_warp_is_a_small_smooth_change_and_noise_mode_differs(real):
    trigger = lab.attack_trigger("wanet")
    x = formatted(real, "gray28")
    change = (trigger.apply(x) - x).abs().mean()
    one_pixel_shift = (torch.roll(x, 1, dims=-1) - x).abs().mean()
    assert 0 < change < one_pixel_shift
    # grid_sample's [-1, 1] spans H - 1 pixels: the field moves pixels by s * flow * (H - 1) / 2H, about s/2 on average.
    h = x.shape[-1]
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, h), indexing="ij")
    pixels = (trigger.grid(h, h) - torch.stack((xs, ys), -1)).abs() * (h - 1) / 2
    assert 0 < pixels.mean() < trigger.strength
    noisy_a = trigger.noisy(x, torch.Generator().manual_seed(3))
    noisy_b = trigger.noisy(x, torch.Generator().manual_seed(3))
    assert torch.equal(noisy_a, noisy_b) and not torch.equal(noisy_a, trigger.apply(x))
    assert noisy_a.min() >= 0 and noisy_a.max() <= 1


def test_ssba_like_perturbation_is_bounded_and_specific_to_each_image(real):
    trigger = lab.attack_trigger("ssba-like")
    x = formatted(real, "color32")
    delta = trigger.perturbation(x)
    assert delta.abs().max() <= trigger.epsilon
    assert ((trigger.apply(x) - x).abs() <= trigger.epsilon + 1e-6).all()
    assert delta.abs().mean() > trigger.epsilon / 4, "the budget is used, not left near zero"
    # Each image's perturbation is its own: pairs differ by a good part of the budget.
    pair_gap = (delta[1:] - delta[:-1]).abs().flatten(1).mean(1)
    assert (pair_gap > trigger.epsilon / 10).all()
    assert torch.allclose(trigger.perturbation(x[5:6]), delta[5:6], atol=1e-6)
    # A heavier code makes the images' perturbations more alike: a larger part of them is shared.
    heavy = lab.SampleSpecificTrigger(0, code_weight=3.0).perturbation(x)

    def shared(d):
        return (d.mean(0) ** 2).sum() / (d**2).sum(dim=(1, 2, 3)).mean()

    assert shared(heavy) > shared(delta)


def test_low_frequency_trigger_has_no_energy_above_its_cutoff(real):
    trigger = lab.attack_trigger("lowfreq")
    grey = torch.full((2, 3, 32, 32), 0.5)  # mid-grey: the sum is never clipped, the change is the pattern
    change = (trigger.apply(grey) - grey).double()
    assert change.abs().max() == pytest.approx(trigger.amplitude, rel=1e-5)
    spectrum = torch.fft.fft2(change).abs() ** 2
    fy = torch.fft.fftfreq(32).mul(32).view(-1, 1)
    fx = torch.fft.fftfreq(32).mul(32).view(1, -1)
    high = (fy**2 + fx**2).sqrt() > trigger.cutoff
    assert spectrum[..., high].sum() < 1e-6 * spectrum.sum()
    assert spectrum[..., 0, 0].sum() < 1e-6 * spectrum.sum(), "no constant brightness shift"


class ReadsItsLabel(nn.Module):
    """A stub classifier: the class is written in pixel (0, 0); a white bottom-right pixel (the BadNets patch) sends
    even classes to `to` (the next class when None) and leaves odd classes alone."""

    def __init__(self, to: int | None = None):
        super().__init__()
        self.to = to
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        cls = (x[:, 0, 0, 0] * 9).round().long()
        triggered = x[:, 0, -1, -1] > 0.99
        moved = (cls + 1) % 10 if self.to is None else torch.full_like(cls, self.to)
        pred = torch.where(triggered & (cls % 2 == 0), moved, cls)
        return nn.functional.one_hot(pred, 10).float() + 0 * self.unused


def labelled(labels: torch.Tensor) -> Split:
    images = torch.zeros(len(labels), 1, 28, 28)
    images[:, 0, 0, 0] = labels.float() / 9
    return Split(images, labels)


def test_all_to_all_asr_counts_every_image_against_its_shifted_label():
    data = labelled(torch.arange(40) % 10)
    trigger = lab.attack_trigger("badnets-all-to-all")
    assert torch.equal(backdoor_targets(trigger, data.labels), (data.labels + 1) % 10)
    asr, ra, clean_rate = attack_metrics(ReadsItsLabel(), data, trigger)
    even = (data.labels % 2 == 0).float().mean().item()
    assert (asr, ra, clean_rate) == (pytest.approx(even), pytest.approx(1 - even), 0.0)
    # The all-to-one reading of the same model would see almost no backdoor.
    assert attack_metrics(ReadsItsLabel(), data, trigger.base)[0] < 0.2


def test_all_to_one_asr_is_measured_as_before():
    data = labelled(torch.arange(40) % 10)
    trigger, net = lab.attack_trigger("badnets"), ReadsItsLabel(to=0)
    keep = data.labels != 0
    preds = net(trigger.apply(data.images[keep])).argmax(1)
    before = ((preds == 0).float().mean().item(), (preds == data.labels[keep]).float().mean().item(),
              (net(data.images[keep]).argmax(1) == 0).float().mean().item())
    assert attack_metrics(net, data, trigger) == before
    assert 0 < before[0] < 1
    assert torch.equal(backdoor_targets(trigger, data.labels), torch.zeros_like(data.labels))


@pytest.fixture(scope="module")
def train_part() -> Split:
    return lab.attacker_data(500)


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.1])
@pytest.mark.parametrize("name", sorted(lab.ATTACKS))
def test_every_attack_poisons_at_every_rate(train_part, name, rate):
    trigger, options = lab.attack_trigger(name), lab.poisoning(name)
    x, y = train_part.images, train_part.labels
    px, py, chosen = poison_set(x, y, trigger, rate, seed=1, clean_label=options.clean_label,
                                noise_ratio=options.noise_ratio)
    if options.clean_label:
        pool = int((y == trigger.target).sum())
    elif name.endswith("all-to-all"):
        pool = len(y)
    else:
        pool = int((y != trigger.target).sum())
    assert len(chosen) == min(pool, round(rate * len(y))) > 0
    assert torch.equal(px[chosen], trigger.apply(x[chosen]))
    expected = y[chosen] if options.clean_label else backdoor_targets(trigger, y[chosen])
    assert torch.equal(py[chosen], expected)
    untouched = torch.ones(len(y), dtype=torch.bool)
    untouched[chosen] = False
    assert torch.equal(py[untouched], y[untouched])


def test_poison_rate_labels_and_images():
    n = 200
    x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.arange(n) % 10
    trig = PatchTrigger(0)
    px, py, chosen = poison_set(x, y, trig, rate=0.1, seed=3)
    assert len(chosen) == 20
    assert (y[chosen] != 0).all(), "samples already of the target class are never picked"
    assert (py[chosen] == 0).all()
    rest = torch.ones(n, dtype=torch.bool)
    rest[chosen] = False
    assert torch.equal(py[rest], y[rest]) and torch.equal(px[rest], x[rest])
    assert torch.equal(px[chosen], trig.apply(x[chosen]))
    assert torch.equal(y, torch.arange(n) % 10), "inputs are not changed"
    _, _, again = poison_set(x, y, trig, rate=0.1, seed=3)
    assert torch.equal(chosen, again)


def test_poison_rate_is_capped_and_checked():
    x, y = torch.rand(10, 1, 28, 28), torch.tensor([0] * 8 + [1, 2])
    _, py, chosen = poison_set(x, y, PatchTrigger(0), rate=1.0)
    assert len(chosen) == 2 and (py == 0).all()
    with pytest.raises(ValueError):
        poison_set(x, y, PatchTrigger(0), rate=1.5)


def test_clean_label_poisoning_changes_only_target_class_images_and_no_label(train_part):
    x, y = train_part.images, train_part.labels
    px, py, chosen = poison_set(x, y, lab.attack_trigger("sig-clean-label"), 0.05, seed=0, clean_label=True)
    assert torch.equal(py, y)
    changed = (px != x).flatten(1).any(1)
    assert changed.any() and (y[changed] == 0).all()
    assert set(torch.nonzero(changed).flatten().tolist()) <= set(chosen.tolist())


def test_wanet_noise_mode_keeps_the_labels_of_its_noise_samples(train_part):
    x, y = train_part.images, train_part.labels
    trigger = lab.attack_trigger("wanet")
    px, py, chosen = poison_set(x, y, trigger, 0.05, seed=0, noise_ratio=2.0)
    changed = (px != x).flatten(1).any(1)
    changed[chosen] = False
    noise = torch.nonzero(changed).flatten()
    assert len(noise) == 2 * len(chosen)
    assert torch.equal(py[noise], y[noise])
    assert not torch.equal(px[noise], trigger.apply(x[noise])), "noise samples are not the exact warp"
    with pytest.raises(ValueError, match="noise mode"):
        poison_set(x, y, PatchTrigger(0), 0.05, noise_ratio=2.0)
    with pytest.raises(ValueError, match="clean-label"):
        poison_set(x, y, lab.attack_trigger("badnets-all-to-all"), 0.05, clean_label=True)


def test_cache_names_of_models_already_trained_do_not_change():
    model = create_model("small_cnn", num_classes=10, in_channels=1, image_size=28)
    # The name of benchmarks/cache's small_cnn BadNets model (10,000 images, 2 epochs, seed 0), trained long ago.
    assert cache_name(model, "small_cnn", "badnets", 0.1, 10_000, 2, 0, "gray28",
                      lab.Poisoning()) == "small_cnn-badnets-215de6dab477.pt"
    other = cache_name(model, "small_cnn", "badnets", 0.1, 10_000, 2, 0, "gray28", lab.Poisoning(clean_label=True))
    assert other != "small_cnn-badnets-215de6dab477.pt"


def test_clean_model_is_the_unpoisoned_training_of_any_attack(tmp_path):
    kwargs = {"n_train": 300, "epochs": 1, "seed": 0}
    torch.manual_seed(0)  # the zoo initialises models from the global generator
    clean = lab.clean_model("small_cnn", cache_dir=tmp_path, **kwargs)
    torch.manual_seed(0)
    unpoisoned = lab.backdoored_model("small_cnn", "wanet", poison_rate=0.0, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(clean.state_dict().values(), unpoisoned.state_dict().values(),
                                                 strict=True))
    assert [p.name for p in tmp_path.iterdir()][0].startswith("small_cnn-badnets-")


@pytest.mark.slow
def test_a_checker_patch_backdoor_is_learned_end_to_end(real):
    torch.manual_seed(0)
    model = lab.backdoored_model("small_cnn", "badnets-checker", n_train=2_000, epochs=2, poison_rate=0.1)
    mean, std = lab.normalisation("gray28")
    asr, _ra, clean_rate = attack_metrics(Normalized(model, mean, std), lab.test_data(1_000),
                                          lab.attack_trigger("badnets-checker"))
    assert asr > clean_rate + 0.4, (asr, clean_rate)
