"""The search-step timing (benchmarks/search_step.py): it times the copy the product searches through, in the
precision asked for, and prints one table row per architecture."""

from __future__ import annotations

import sys

import torch

from gradprune_mlflow.defense import searchnet
from scripts import benchmark_script


def test_each_precision_times_the_product_s_search_copy(monkeypatch):
    script = benchmark_script("search_step")
    built = []
    real = searchnet.search_copy

    def recording(net, example, precision="fp32"):
        copy = real(net, example, precision)
        built.append((precision, next(copy.parameters()).dtype))
        return copy

    monkeypatch.setattr(script, "search_copy", recording)
    assert all(s > 0 for s in script.arch_step_seconds("small_cnn", ["fp32", "bf16"], repeats=2))
    assert built == [("fp32", torch.float32), ("bf16", torch.bfloat16)]


def test_the_table_has_a_row_per_architecture(monkeypatch, capsys):
    script = benchmark_script("search_step")
    monkeypatch.setattr(sys, "argv", ["search_step.py", "--archs", "small_cnn", "small_cnn_nobn", "--repeats", "1",
                                      "--threads", str(torch.get_num_threads())])
    script.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| small_cnn")]
    assert [r.split(" | ")[0] for r in rows] == ["| small_cnn", "| small_cnn_nobn"]
    assert all(float(r.rstrip(" |").split(" | ")[-1]) > 0 for r in rows)
