"""The fine-tuning step timing (benchmarks/train_step.py): the channels-last column trains through the product's
training_layout (its table is search_step.py's: tests/test_search_step.py)."""

from __future__ import annotations

import contextlib

import torch

from gradprune_mlflow.defense import metrics, train_precision
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


def test_the_precision_columns_train_in_float32_and_under_bfloat16_autocast(monkeypatch):
    script = benchmark_script("train_step")
    seen = []

    def recording(device, precision):
        seen.append(precision)
        return train_precision.train_autocast(device, precision)

    monkeypatch.setattr(script, "train_autocast", recording)
    fp32, bf16 = script.precision_seconds("small_cnn", repeats=1)
    assert fp32 > 0 and bf16 > 0
    assert seen == ["fp32", "fp32", "bf16", "bf16"] + ["fp32", "bf16"], "two warm-ups each, then turns"


def test_the_precision_flag_prints_the_float32_and_bfloat16_columns(capsys):
    benchmark_script("train_step").main(["--precision", "--archs", "small_cnn", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out
    assert "| architecture | float32 s/step | bfloat16 s/step | bfloat16 / float32 |" in out
    assert "| small_cnn |" in out
