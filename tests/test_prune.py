"""The pruning loop: paper mode (one filter per step) and fast mode (adaptive steps under an accuracy budget)."""

from __future__ import annotations

import copy

import pytest
import torch

from gradprune_mlflow.config import SanitizeConfig
from gradprune_mlflow.data.cleanset import CleanSet
from gradprune_mlflow.defense.masks import FilterMasks
from gradprune_mlflow.defense.metrics import accuracy, mean_loss
from gradprune_mlflow.defense.normalize import Normalized
from gradprune_mlflow.defense.progress import SilentProgress
from gradprune_mlflow.defense.prune import prune
from gradprune_mlflow.defense.triggers import PatchTrigger
from gradprune_mlflow.defense.unlearning import triggered_copy

PER_CLASS = 50  # trusted images per class: 45 to score with, 5 to validate on (a 50-image validation split)


class Setup:
    """The pruning inputs, built the way the pipeline builds them, on a fresh copy of the model."""

    def __init__(self, model, clean_set: CleanSet):
        idx = torch.cat([torch.nonzero(clean_set.labels == c).flatten()[:PER_CLASS] for c in range(10)])
        small = CleanSet(clean_set.meta, clean_set.images[idx], clean_set.labels[idx])
        self.train, self.val = small.split(0.1, seed=0)
        trigger = PatchTrigger(0)
        self.train_t, self.val_t = triggered_copy(self.train, trigger), triggered_copy(self.val, trigger)
        self.work = copy.deepcopy(model).float().eval()
        self.net = Normalized(self.work, clean_set.meta.mean, clean_set.meta.std)
        self.masks = FilterMasks(self.work, torch.zeros(1, *clean_set.meta.input_shape))

    def run(self, **settings):
        cfg = SanitizeConfig(device="cpu").with_overrides(**settings)
        return prune(self.net, self.masks, self.train_t, self.val, self.val_t, cfg, SilentProgress()), cfg

    def val_accuracy(self) -> float:
        return accuracy(self.net, self.val, 128)

    def val_unlearning_loss(self) -> float:
        return mean_loss(self.net, self.val_t.images, self.val_t.labels, 128)


@pytest.fixture(scope="module")
def paper(badnets_cnn, clean_set):
    setup = Setup(badnets_cnn, clean_set)
    out, cfg = setup.run(mode="paper")
    return setup, out, cfg


@pytest.fixture(scope="module")
def fast(badnets_cnn, clean_set):
    setup = Setup(badnets_cnn, clean_set)
    out, cfg = setup.run(mode="fast")
    return setup, out, cfg


def kept(curve):
    return [row for row in curve if not row.get("undone")]


def assert_best_state_restored(setup: Setup, out) -> None:
    """The net is left at the best kept step: its masks, validation accuracy and loss are that row's, exactly."""
    rows = kept(out.curve)
    best = next(row for row in rows if row["step"] == out.best_step)
    assert best["val_unlearning_loss"] == min(row["val_unlearning_loss"] for row in rows)
    assert setup.masks.count == best["pruned"] == len(setup.masks.history)
    assert all(entry["step"] <= out.best_step for entry in setup.masks.history)
    assert setup.val_accuracy() == best["val_clean_accuracy"]
    assert setup.val_unlearning_loss() == best["val_unlearning_loss"]
    # The restored masks really are in the weights.
    for entry in setup.masks.history:
        assert torch.count_nonzero(setup.masks.convs[entry["layer"]].weight[entry["filter"]]) == 0


def test_paper_mode_prunes_one_filter_per_step_with_one_gradient_pass_each(paper):
    setup, out, cfg = paper
    steps = len(out.curve) - 1
    assert steps > 1
    assert [row["step"] for row in out.curve] == list(range(steps + 1))
    assert [row["pruned"] for row in out.curve] == list(range(steps + 1)), "one filter per step"
    assert not any(row.get("undone") for row in out.curve), "paper mode has no accuracy budget to undo steps"
    assert out.passes == steps, "gradients are recomputed at every step"
    # It stopped on patience (lowest validation unlearning loss not improved for `patience` steps) or on the cap.
    limit = int(cfg.max_prune_fraction * setup.masks.total)
    assert steps - out.best_step == cfg.resolved("prune_patience") == 10 or steps == limit
    assert [entry["step"] for entry in setup.masks.history] == list(range(1, out.best_step + 1))


def test_paper_mode_restores_the_best_state(paper):
    setup, out, _cfg = paper
    assert_best_state_restored(setup, out)


def test_fast_mode_keeps_no_step_below_the_accuracy_budget(fast):
    setup, out, cfg = fast
    base = out.curve[0]["val_clean_accuracy"]
    budget = max(cfg.acc_drop_budget, 1 / len(setup.val))
    assert budget == pytest.approx(0.05)
    for row in kept(out.curve):
        assert row["val_clean_accuracy"] >= base - budget - 1e-9, row
    assert setup.masks.count <= int(cfg.max_prune_fraction * setup.masks.total)


def test_fast_mode_restores_the_best_state(badnets_cnn, clean_set):
    # A loose budget of its own: at the default 5 points a freshly trained model may break the budget with its first
    # filter, and then correctly prunes nothing (best_step 0), which would leave nothing here to check (seen on a
    # fresh clone's test model).
    setup = Setup(badnets_cnn, clean_set)
    out, _cfg = setup.run(mode="fast", acc_drop_budget=0.5)
    assert out.best_step > 0, "pruning the backdoored model should lower the validation unlearning loss"
    assert_best_state_restored(setup, out)


def test_fast_mode_needs_fewer_gradient_passes_than_paper_mode(fast, paper):
    assert fast[1].passes < paper[1].passes


def test_a_step_over_budget_is_undone(badnets_cnn, clean_set):
    """Steps of a quarter of all filters at a 2-point budget: an over-budget step is undone and not kept."""
    setup = Setup(badnets_cnn, clean_set)
    out, cfg = setup.run(mode="fast", step_fraction=0.25, acc_drop_budget=0.02)
    base = out.curve[0]["val_clean_accuracy"]
    undone = [row for row in out.curve if row.get("undone")]
    assert undone, "a 24-filter step should break a 2-point budget"
    assert out.curve[1]["pruned"] == round(0.25 * setup.masks.total) == 24, "the first step takes several filters"
    assert all(row["val_clean_accuracy"] < base - 0.02 for row in undone)
    assert all(row["val_clean_accuracy"] >= base - 0.02 - 1e-9 for row in kept(out.curve))
    assert_best_state_restored(setup, out)
