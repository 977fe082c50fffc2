"""The fine-tuning step timing (benchmarks/train_step.py): the channels-last column trains through the product's
training_layout (its table is search_step.py's: tests/test_search_step.py)."""

from __future__ import annotations

import contextlib

import torch

from gradprune_mlflow.defense import metrics
from scripts import benchmark_script


def test_the_channels_last_column_trains_in_the_product_s_layout(monkeypatch):
    script = benchmark_script("train_step")
    seen = []

    @contextlib.contextmanager
    def recording(net):
        with metrics.training_layout(net):
            seen.append(net.features[4].weight.is_contiguous(memory_format=torch.channels_last))
            yield net

    monkeypatch.setattr(script, "training_layout", recording)
    default, last = script.layout_seconds("small_cnn", repeats=1)
    assert default > 0 and last > 0
    assert seen == [True, True]  # the model and its teacher
